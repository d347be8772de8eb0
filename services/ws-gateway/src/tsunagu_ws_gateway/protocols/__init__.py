"""The protocols a client may speak, each turning its frames into the session's typed commands and the
session's replies back into its frames: `native` (Centrifugo's, JSON and protobuf), `jsonrpc`, `stomp`,
`graphql` (strawberry), `socketio` (python-socketio), `collab` (y-websocket) and `fhir` (FHIR
subscriptions). The sans-I/O codecs they use are in `protocol/`; `base.py` is what the adapters share."""
