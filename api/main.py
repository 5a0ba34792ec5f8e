"""ASGI entry point: ``uvicorn api.main:app``."""

from moderation.logging import configure_logging

from api.app import create_app

configure_logging()
app = create_app()
