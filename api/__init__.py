"""FastAPI adapter: the public HTTP API over the moderation core."""
