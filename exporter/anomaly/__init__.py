"""The rolling-baseline anomaly signals: their specs, the scope history, the statistics and the evaluator."""
