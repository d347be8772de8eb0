"""Grafana dashboards as code: `panels` (the shared helpers) and one module per dashboard."""
