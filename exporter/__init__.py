"""llm-usage-exporter: LLM usage records in, Prometheus metrics and anomaly signals out."""

__version__ = "0.1.0"
