"""Reviewer accounts: roles, password logins, sessions, API tokens and lockout."""
