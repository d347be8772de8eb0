"""FHIR R5/R4B subscriptions over WebSocket (the Subscriptions Framework's websocket channel): binding
tokens, `/fhir/ws`, rest-hook deliveries in at `/fhir/notify`, and `$events` for what a client missed.
model.py, commands.py and binding.py hold the parts without sockets; endpoints.py the HTTP and
WebSocket endpoints."""

from tsunagu_ws_gateway.protocols.fhir.endpoints import build_fhir_router

__all__ = ["build_fhir_router"]
