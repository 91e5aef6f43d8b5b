"""The API's routes, one router per resource: ingest, usage, anomalies and detectors, prices,
backend health (read from Prometheus), the Alertmanager receiver, and the status endpoints
(status page, probes, /metrics)."""
