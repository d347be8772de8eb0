"""Sockets that carry a connection's frames: `websocket.py` today; Server-Sent Events, HTTP streaming
(with `POST /emulation` for what the client sends) and WebTransport next, each a `core.transport.Transport`
plus an async iterator of the frames the client sends, run by the one socket loop (core/loop.py)."""
