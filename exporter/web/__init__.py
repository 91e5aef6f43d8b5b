"""The HTTP edge: the FastAPI app, its routes, token checks, body limits and connection hygiene."""
