"""Errors the core raises, each with a machine-readable code and the HTTP status an adapter should use."""

from __future__ import annotations


class ModerationError(Exception):
    """Base of every expected error: carries a stable ``code``, a message and an HTTP status."""

    code = "error"
    status_code = 400

    def __init__(self, message: str, *, code: str | None = None, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status_code is not None:
            self.status_code = status_code


class NotFound(ModerationError):
    """The resource does not exist, or belongs to another tenant."""

    code = "not_found"
    status_code = 404


class Unauthorized(ModerationError):
    """Missing or wrong credentials."""

    code = "unauthorized"
    status_code = 401


class Conflict(ModerationError):
    """The request conflicts with the current state of the resource."""

    code = "conflict"
    status_code = 409


class InvalidInput(ModerationError):
    """The request is well-formed but its content is not acceptable."""

    code = "invalid_input"
    status_code = 422


class PayloadTooLarge(ModerationError):
    """The upload exceeds the configured size limit."""

    code = "payload_too_large"
    status_code = 413


class RequestTimeout(ModerationError):
    """The client did not send its request body in time."""

    code = "request_timeout"
    status_code = 408


class UnsupportedMediaType(ModerationError):
    """The upload is not an image format the service accepts."""

    code = "unsupported_media_type"
    status_code = 415


class RateLimited(ModerationError):
    """The tenant exceeded its request rate; retry after ``retry_after`` seconds."""

    code = "rate_limited"
    status_code = 429

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BlockedDestination(ModerationError):
    """An outbound URL points at a destination the service must not reach (SSRF protection)."""

    code = "blocked_destination"
    status_code = 422


class FetchFailed(ModerationError):
    """An outbound fetch failed: network error, bad status, timeout or size limit."""

    code = "fetch_failed"
    status_code = 422


class ServiceUnavailable(ModerationError):
    """The service cannot take the request now (shutting down, a dependency is down); retry later."""

    code = "service_unavailable"
    status_code = 503
