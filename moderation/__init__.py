"""Core of the image + caption moderation service: models, services, engine and policy."""

__version__ = "0.1.0"
