"""The reviewers' web UI: server-rendered pages under ``/review``."""
