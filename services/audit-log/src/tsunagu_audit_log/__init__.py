"""audit-log: Hash-chained, tamper-evident audit log of security events in PostgreSQL."""
