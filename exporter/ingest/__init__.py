"""From decoded JSON to validated, guarded, priced and deduplicated record columns."""
