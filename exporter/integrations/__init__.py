"""Client-side integrations: code that runs in the user's LLM stack and sends records here.
Nothing in this package imports the rest of the exporter."""
