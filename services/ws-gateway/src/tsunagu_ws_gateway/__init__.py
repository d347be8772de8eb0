"""ws-gateway: terminates every client WebSocket (native protocol, y-websocket, JSON-RPC, GraphQL, STOMP)."""
