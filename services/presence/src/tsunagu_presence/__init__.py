"""presence: Who is online per channel and per user, from the gateways' connection events."""
