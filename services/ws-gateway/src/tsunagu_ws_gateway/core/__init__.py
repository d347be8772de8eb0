"""What every transport and protocol of the gateway shares, read top to bottom:

- `transport.py`: a `Transport` (frames out, close; websocket today, SSE, HTTP streaming and
  WebTransport next) and the `Peer` at its other end;
- `admission.py`: the one admission function: peer and credential in, a grant out, or one typed refusal;
- `registry.py`: every connection and session of this node, whatever its protocol, walked by
  revocation, drain, the server API's disconnect and the connection limits;
- `commands.py`, `replies.py`: the typed commands a protocol hands a session and the replies it gets back;
- `session.py`: one client session (the native protocol's semantics: subscriptions, recovery, publish...),
  testable without a server;
- `loop.py`: the one socket loop (read a frame, check its size, hand it to the protocol, close codes);
- `gateway.py`: what all sessions on the node share.
"""
