"""Tsunagu: one WebSocket gateway and small services over Kafka and Redis. `tsunagu` is the CLI."""
