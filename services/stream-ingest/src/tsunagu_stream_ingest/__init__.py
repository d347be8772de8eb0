"""stream-ingest: Relays the user's own Kafka topics to channels, conflated, with a last-value cache."""
