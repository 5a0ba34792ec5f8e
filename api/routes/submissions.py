"""Submission intake and read-back (``/v1/submissions``)."""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import anyio.to_thread
from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import BaseModel, Field

from api.deps import SessionDep, TenantDep, cached_tenant, resolve_tenant
from api.multipart import boundary_of, parse_form, read_body
from moderation import metrics
from moderation.config import Settings
from moderation.errors import (
    InvalidInput,
    ModerationError,
    NotFound,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from moderation.net.safe_http import OutboundPolicy, fetch_bytes
from moderation.submissions import erasure, service
from moderation.submissions.schemas import SubmissionAccepted, SubmissionOut, SubmissionPage
from moderation.submissions.validation import cheap_to_check
from moderation.tenants.models import Tenant

router = APIRouter(prefix="/v1/submissions", tags=["submissions"])
T = TypeVar("T")

# Multipart framing around the image and fields; the image limit itself is enforced on the bytes.
_FORM_OVERHEAD = 64 * 1024
# Bodies and images up to this size are parsed and checked on the event loop (well under a millisecond).
_CHECK_ON_LOOP_BYTES = 1024 * 1024


class SubmissionJSON(BaseModel):
    """A JSON submission: the caption and exactly one of ``image_base64`` / ``image_url``."""

    caption: str
    image_base64: str | None = None
    image_url: str | None = Field(default=None, max_length=4096)
    external_id: str | None = None
    metadata: dict[str, Any] | str | None = None


def _request_limit(settings: Settings) -> int:
    """Largest body an intake request may have: the image limit, base64-encoded, plus the other fields."""
    return settings.max_image_bytes * 4 // 3 + _FORM_OVERHEAD


def _request_too_large(settings: Settings) -> str:
    return f"request is larger than the {settings.max_image_bytes}-byte image limit allows"


async def _read_request_body(request: Request, settings: Settings) -> bytes:
    """The request body, refused (413) past the intake limit while it is read."""
    return await read_body(
        request,
        _request_limit(settings),
        too_large=_request_too_large(settings),
        timeout=settings.request_body_timeout_seconds,
    )


async def _on_loop_if(cheap: bool, work: Callable[[], T]) -> T:
    """Run ``work`` on the event loop when it is ``cheap``, else on a thread (it would stall the loop)."""
    if cheap:
        return work()
    return await run_in_threadpool(work)


def _content_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    return int(raw) if raw and raw.isdigit() else None


async def _parse_multipart(request: Request, settings: Settings) -> dict[str, Any]:
    boundary = boundary_of(request.headers["content-type"])
    body = await _read_request_body(request, settings)
    form = await _on_loop_if(len(body) <= _CHECK_ON_LOOP_BYTES, functools.partial(parse_form, body, boundary))
    image = form.get("image")
    if image is None or not image.is_file:
        raise InvalidInput("multipart field 'image' (a file) is required", code="image_missing")
    if len(image.data) > settings.max_image_bytes:
        raise PayloadTooLarge(
            f"image is larger than {settings.max_image_bytes} bytes", code="image_too_large"
        )
    caption = form.get("caption")
    if caption is None:
        raise InvalidInput("multipart field 'caption' is required", code="caption_empty")
    fields: dict[str, str | None] = {}
    for name in ("external_id", "metadata"):
        part = form.get(name)
        if part is not None and part.is_file:
            raise InvalidInput(f"multipart field '{name}' must be text", code=f"invalid_{name}")
        try:
            fields[name] = None if part is None else part.data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"multipart field '{name}' is not UTF-8", code=f"invalid_{name}") from exc
    return {"image": image.data, "caption": caption.data, "source_url": None, **fields}


async def _parse_json(request: Request, settings: Settings, tenant_id: uuid.UUID) -> dict[str, Any]:
    body = await _read_request_body(request, settings)
    try:
        data = SubmissionJSON.model_validate_json(body)
    except ValueError as exc:
        raise InvalidInput(f"invalid JSON submission: {exc}".splitlines()[0], code="invalid_json") from exc
    if (data.image_base64 is None) == (data.image_url is None):
        raise InvalidInput("give exactly one of image_base64 and image_url", code="image_missing")
    key = request.headers.get("idempotency-key")
    if data.image_url is not None and (key is not None or data.external_id is not None):
        # A retry must get its submission back even when the image's origin no longer answers: look the
        # key up before fetching anything.
        def _find() -> service.IntakeResult | None:
            with request.app.state.sessions() as session:
                return service.find_replay(
                    session, tenant_id, idempotency_key=key, external_id=data.external_id
                )

        replay = await run_in_threadpool(_find)
        if replay is not None:
            return {"replay": replay}
    if data.image_base64 is not None:
        image = service.decode_base64_image(data.image_base64, settings)
        source_url = None
    else:
        assert data.image_url is not None
        fetch = functools.partial(
            fetch_bytes,
            data.image_url,
            OutboundPolicy.from_settings(settings),
            max_bytes=settings.max_image_bytes,
            timeout_seconds=settings.fetch_timeout_seconds,
            max_redirects=settings.fetch_max_redirects,
        )
        # Fetches wait on slow origins for seconds: they take tokens of their own, never the shared pool's
        # that every other request's work (authentication, reads) needs.
        fetched = await anyio.to_thread.run_sync(fetch, limiter=request.app.state.fetch_limiter)
        image, source_url = fetched.data, data.image_url
    return {
        "image": image,
        "caption": data.caption,
        "external_id": data.external_id,
        "metadata": data.metadata,
        "source_url": source_url,
    }


async def _store(
    request: Request, tenant_id: uuid.UUID, settings: Settings, fields: dict[str, Any]
) -> service.IntakeResult:
    """Check a submission's fields and hand it to the process's intake writer; its answer after the commit."""
    prepare = functools.partial(
        service.prepare_submission,
        tenant_id,
        settings=settings,
        idempotency_key=request.headers.get("idempotency-key"),
        **fields,
    )
    # Checking a typical image costs less than a thread hand-off; a large one, or a small one crafted to be
    # slow to walk, would stall the loop.
    image: bytes = fields["image"]
    prepared = await _on_loop_if(len(image) <= _CHECK_ON_LOOP_BYTES and cheap_to_check(image), prepare)
    # The writer answers after the commit that stored the submission (shared with whatever arrived
    # alongside it), so a 202 is never given for something a crash could lose.
    return await request.app.state.intake_writer.submit_from_loop(prepared, settings.intake_timeout_seconds)


@router.post("", status_code=202, response_model=SubmissionAccepted)
async def create_submission(request: Request) -> Response:
    """Accept an image and its caption for moderation; answers 202 at once."""
    # Hot path: authentication from the tenant cache, the asynchronous rate limiter, parsing and checks run
    # on the event loop; storing is handed to the process's intake writer (group commit).
    started = time.perf_counter()
    state = request.app.state
    settings: Settings = state.settings
    outcome = "error"
    try:
        authorization = request.headers.get("authorization")
        tenant = cached_tenant(request, authorization)
        if tenant is None:

            def _authenticate() -> Tenant:
                with state.sessions() as session:
                    found = resolve_tenant(request, session, authorization)
                    session.expunge(found)
                    return found

            tenant = await run_in_threadpool(_authenticate)
        await state.rate_limiter.enforce(
            str(tenant.id),
            tenant.rate_limit_per_minute or settings.rate_limit_per_minute,
            settings.rate_limit_burst,
        )
        length = _content_length(request)
        if length is not None and length > _request_limit(settings):
            raise PayloadTooLarge(_request_too_large(settings))
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type == "multipart/form-data":
            fields = await _parse_multipart(request, settings)
        elif content_type == "application/json":
            fields = await _parse_json(request, settings, tenant.id)
        else:
            raise UnsupportedMediaType(
                "send multipart/form-data or application/json", code="unsupported_content_type"
            )
        replayed: service.IntakeResult | None = fields.pop("replay", None)
        result = replayed if replayed is not None else await _store(request, tenant.id, settings, fields)
        created = result.created
        body = SubmissionAccepted(id=result.id, status=str(result.status), created_at=result.created_at)
        outcome = "accepted" if created else "replayed"
    except ModerationError as exc:
        outcome = exc.code
        raise
    finally:
        metrics.INTAKE_REQUESTS.labels(outcome).inc()
        metrics.INTAKE_LATENCY.observe(time.perf_counter() - started)
    headers = {"Location": f"/v1/submissions/{body.id}"}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    # The same JSON a JSONResponse of the model's dump holds, serialised by pydantic-core in one step.
    return Response(body.model_dump_json(), status_code=202, headers=headers, media_type="application/json")


def _parse_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError as exc:
        raise NotFound("submission not found", code="submission_not_found") from exc


@router.get("/{submission_id}", response_model=SubmissionOut)
def get_submission(submission_id: str, tenant: TenantDep, session: SessionDep) -> SubmissionOut:
    """A submission with its verdict and review."""
    return service.get_submission(session, tenant, _parse_id(submission_id))


@router.delete("/{submission_id}", status_code=204)
def erase_submission(submission_id: str, tenant: TenantDep, session: SessionDep) -> Response:
    """Erase a final submission's content and image; its decision, scores and history stay (idempotent)."""
    erased = erasure.erase_submission(session, tenant, _parse_id(submission_id))
    session.commit()
    if erased:
        metrics.SUBMISSIONS_ERASED.labels("api").inc()
    return Response(status_code=204)


@router.get("", response_model=SubmissionPage)
def list_submissions(
    tenant: TenantDep,
    session: SessionDep,
    status: str | None = None,
    limit: Annotated[int, Query()] = 50,
    cursor: str | None = None,
) -> SubmissionPage:
    """The tenant's submissions, newest first, a page at a time."""
    return service.list_submissions(session, tenant, status=status, limit=limit, cursor=cursor)
