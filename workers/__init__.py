"""Celery adapter: task definitions and the worker processes that run them."""
