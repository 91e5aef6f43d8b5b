"""Prometheus collectors: what the exporter's state looks like on /metrics."""
