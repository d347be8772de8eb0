"""Centrifugo's proxy and server API messages (generated from proto/centrifugal/centrifugo by `make proto`)
and the gRPC plumbing built from their service descriptors (grpc_services.py)."""
