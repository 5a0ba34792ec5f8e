"""Pages of the reviewers' web UI (``/review``): login, queue, review screen, history, audit, search, reports.

Pages are rendered on the server with Jinja2. The review screen talks to a few JSON endpoints here that
decide and return the next item's HTML in the same round trip, so the next item appears at once.
"""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field

from api.deps import SessionDep, SettingsDep
from api.ui import auth
from api.ui.auth import FormPrincipalDep, Principal, PrincipalDep
from moderation.audit.repository import AuditRepository
from moderation.db import utcnow
from moderation.errors import Conflict, InvalidInput, ModerationError, NotFound, Unauthorized
from moderation.policy import service as policy
from moderation.policy.schemas import BlocklistIn
from moderation.review import admin, queries, reports, service
from moderation.review.models import ReviewDecision, ReviewItem, ReviewState
from moderation.review.repository import ReviewRepository
from moderation.reviewers import service as reviewers
from moderation.reviewers.models import Role
from moderation.tenants.schemas import CustomCategory, TenantSettingsUpdate

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
STATIC_FILES = {"review.css": "text/css", "review.js": "text/javascript", "favicon.svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")

templates = Jinja2Templates(directory=str(HERE / "templates"))


def _age(value: datetime | float | None) -> str:
    if value is None:
        return "—"
    seconds = value if isinstance(value, int | float) else (utcnow() - value).total_seconds()
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "—"


def _when_s(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "—"


ISO_TIME = re.compile(r"^(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(\.\d+)?\+00:00$")


def _val(value: Any) -> str:
    if value is None or value == [] or value == "":
        return "—"
    if isinstance(value, list):
        return ", ".join(_val(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_val(v)}" for k, v in value.items())
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value)
    match = ISO_TIME.match(text)
    return f"{match.group(1)} {match.group(2)}" if match else text


def _short_id(value: object) -> str:
    # UUIDv7s share their time prefix; the random tail tells them apart.
    return "…" + str(value)[-8:]


def _pct(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value * 100:.{digits}f}%"


def _lang(text: str | None) -> str:
    return "zh" if text and CJK.search(text) else "en"


def _label(name: str) -> str:
    return name.replace("_", " ")


templates.env.filters.update(
    age=_age, when=_when, when_s=_when_s, pct=_pct, lang=_lang, label=_label, val=_val, short_id=_short_id
)


def _wants_json(request: Request) -> bool:
    return request.headers.get("x-requested-with") == "fetch"


class UiRoute(APIRoute):
    """Turns errors into a login redirect or an error page (JSON for the screen's fetches); adds headers."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """Wrap the handler."""
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                response = await handler(request)
            except ModerationError as exc:
                response = _error_response(request, exc)
            for key, value in SECURITY_HEADERS.items():
                response.headers.setdefault(key, value)
            response.headers.setdefault("Cache-Control", "no-store")
            return response

        return wrapped


def _error_response(request: Request, exc: ModerationError) -> Response:
    if _wants_json(request):
        return JSONResponse(
            {"error": {"code": exc.code, "message": exc.message}}, status_code=exc.status_code
        )
    if isinstance(exc, Unauthorized):
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/review/login?next={quote(target)}", status_code=303)
    return templates.TemplateResponse(
        request,
        "error.html",
        {"status": exc.status_code, "message": exc.message, "code": exc.code, "principal": None},
        status_code=exc.status_code,
    )


router = APIRouter(prefix="/review", route_class=UiRoute, include_in_schema=False)


def _page(request: Request, name: str, principal: Principal | None, **context: Any) -> HTMLResponse:
    return templates.TemplateResponse(
        request, name, {"principal": principal, "Role": Role, "nav": name.split(".")[0], **context}
    )


def _safe_next(target: str | None) -> str:
    if target and target.startswith("/review") and not target.startswith("//"):
        return target
    return "/review"


@router.get("/static/{name}")
def static(name: str) -> Response:
    """The UI's stylesheet and script (no build step)."""
    if name not in STATIC_FILES:
        raise NotFound("no such file")
    return FileResponse(
        STATIC / name, media_type=STATIC_FILES[name], headers={"Cache-Control": "public, max-age=300"}
    )


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, settings: SettingsDep, next: str | None = None) -> Response:
    """The sign-in form."""
    return _login_form(request, settings, next=_safe_next(next), error=None, email="", status=200)


def _login_form(
    request: Request, settings: SettingsDep, *, next: str, error: str | None, email: str, status: int
) -> Response:
    token = secrets.token_urlsafe(24)
    response = _page(request, "login.html", None, login_csrf=token, next=next, error=error, email=email)
    response.status_code = status
    auth.set_login_csrf(response, request, settings, token)
    return response


@router.post("/login")
async def login(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    email: Annotated[str, Form(max_length=320)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    csrf_token: Annotated[str, Form(max_length=200)] = "",
    next: Annotated[str, Form(max_length=2000)] = "/review",
) -> Response:
    """Check the password, open a session and go to the queue."""
    if not auth.login_csrf_valid(request, csrf_token):
        return _login_failed(
            request, settings, email, next, "Your sign-in form expired; please try again.", 400
        )

    def _login() -> reviewers.IssuedSession:
        try:
            issued = reviewers.login(
                session, email, password, settings, user_agent=request.headers.get("user-agent")
            )
        except ModerationError:
            session.commit()  # failed attempts count towards the lockout
            raise
        session.commit()
        return issued

    try:
        issued = await run_in_threadpool(_login)
    except ModerationError as exc:
        return _login_failed(request, settings, email, next, exc.message, exc.status_code)
    response = RedirectResponse(_safe_next(next), status_code=303)
    auth.set_session_cookie(response, request, settings, issued.token)
    response.delete_cookie(auth.LOGIN_CSRF_COOKIE, path="/review")
    return response


def _login_failed(
    request: Request, settings: SettingsDep, email: str, next: str, error: str, status: int
) -> Response:
    return _login_form(request, settings, next=_safe_next(next), error=error, email=email, status=status)


@router.post("/logout")
def logout(
    request: Request, principal: FormPrincipalDep, session: SessionDep, settings: SettingsDep
) -> Response:
    """End the session."""
    token = request.cookies.get(auth.SESSION_COOKIE)
    if token:
        reviewers.logout(session, token)
        session.commit()
    response = RedirectResponse("/review/login", status_code=303)
    auth.clear_session_cookie(response, request, settings)
    return response


DASHBOARD_PAGE_ITEMS = 50


@router.get("", response_class=HTMLResponse)
def dashboard(
    request: Request, principal: PrincipalDep, session: SessionDep, after: str | None = None
) -> Response:
    """The queue at a glance: counts, categories, the oldest item, and the open items in order, a page at a time."""
    overview = reports.overview(session)
    items, next_after = queries.items_page(session, limit=DASHBOARD_PAGE_ITEMS, cursor=after, open_only=True)
    rows = queries.items_with_submissions(session, items)
    return _page(
        request,
        "dashboard.html",
        principal,
        overview=overview,
        rows=rows,
        top_category=_top_category,
        first_page=after is None,
        next_after=next_after,
    )


def _top_category(submission: Any) -> tuple[str, float] | None:
    verdict = getattr(submission, "verdict", None)
    if verdict is None or not verdict.categories:
        return None
    top = max(verdict.categories, key=lambda c: float(c["score"]))
    return str(top["name"]), float(top["score"])


def _queue(value: str | None) -> str:
    return "escalations" if value == "escalations" else "review"


def _render_item(
    request: Request,
    principal: Principal,
    session: SessionDep,
    settings: SettingsDep,
    item: ReviewItem | None,
    queue: str,
) -> str:
    if item is None:
        return templates.get_template("_empty.html").render({"queue": queue, "principal": principal})
    context = queries.item_context(
        session, item.id, blur_threshold=settings.review_blur_threshold, viewer=principal.ref
    )
    return templates.get_template("_item.html").render(
        {"c": context, "principal": principal, "queue": queue, "interactive": True, "request": request}
    )


@router.get("/work", response_class=HTMLResponse)
def work(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    queue: str | None = None,
) -> Response:
    """The review screen; the item you hold is shown at once, otherwise the page claims one."""
    queue = _queue(queue)
    if queue == "escalations":
        principal.ref.require(Role.lead, "handle escalations")
    held = ReviewRepository(session).held_by(
        principal.reviewer.email, utcnow(), escalated=queue == "escalations"
    )
    html = _render_item(request, principal, session, settings, held, queue) if held else None
    session.rollback()  # held_by locks the row; this page only reads
    return _page(request, "work.html", principal, queue=queue, item_html=html)


class NextIn(BaseModel):
    """Which queue the screen works on."""

    queue: str = "review"


class DecideIn(BaseModel):
    """A decision from the review screen."""

    lease_token: uuid.UUID
    decision: ReviewDecision
    categories: list[str] = Field(default_factory=list, max_length=40)
    note: str | None = Field(default=None, max_length=2000)
    queue: str = "review"


class LeaseForm(BaseModel):
    """An item the screen holds."""

    lease_token: uuid.UUID
    queue: str = "review"


def _claim_and_render(
    request: Request, principal: Principal, session: SessionDep, settings: SettingsDep, queue: str
) -> dict[str, Any]:
    item = service.claim_next(
        session, principal.ref, settings.review_lease_seconds, escalated=queue == "escalations"
    )
    session.commit()
    return {
        "html": _render_item(request, principal, session, settings, item, queue),
        "item_id": str(item.id) if item else None,
    }


@router.post("/work/next")
def work_next(
    body: NextIn, request: Request, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> JSONResponse:
    """Claim the next item and return its HTML."""
    return JSONResponse(_claim_and_render(request, principal, session, settings, _queue(body.queue)))


_TOASTS = {
    ReviewDecision.approve: "Approved",
    ReviewDecision.reject: "Rejected",
    ReviewDecision.escalate: "Escalated to leads",
}


@router.post("/work/{item_id}/decide")
def work_decide(
    item_id: uuid.UUID,
    body: DecideIn,
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
) -> JSONResponse:
    """Decide the item and return the next one's HTML in the same answer."""
    item = service.decide(
        session,
        item_id,
        reviewer=principal.ref,
        lease_token=body.lease_token,
        decision=body.decision,
        categories=body.categories,
        note=body.note,
    )
    session.commit()
    toast = _TOASTS[body.decision]
    if body.decision == ReviewDecision.reject and item.categories:
        toast += f" · {', '.join(_label(c) for c in item.categories)}"
    return JSONResponse(
        {"toast": toast, **_claim_and_render(request, principal, session, settings, _queue(body.queue))}
    )


@router.post("/work/{item_id}/skip")
def work_skip(
    item_id: uuid.UUID,
    body: LeaseForm,
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
) -> JSONResponse:
    """Skip the item (someone else will get it) and return the next one."""
    service.release(session, item_id, reviewer=principal.ref, lease_token=body.lease_token, skip=True)
    session.commit()
    return JSONResponse(
        {"toast": "Skipped", **_claim_and_render(request, principal, session, settings, _queue(body.queue))}
    )


@router.post("/work/{item_id}/release")
def work_release(
    item_id: uuid.UUID, body: LeaseForm, principal: PrincipalDep, session: SessionDep
) -> JSONResponse:
    """Give the item back and stop reviewing."""
    service.release(session, item_id, reviewer=principal.ref, lease_token=body.lease_token)
    session.commit()
    return JSONResponse({"toast": "Released", "redirect": "/review"})


@router.post("/work/{item_id}/renew")
def work_renew(
    item_id: uuid.UUID, body: LeaseForm, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> JSONResponse:
    """Keep holding the item while the screen is open."""
    item = service.renew(
        session,
        item_id,
        reviewer=principal.ref,
        lease_token=body.lease_token,
        lease_seconds=settings.review_lease_seconds,
        max_hold_seconds=settings.review_max_hold_seconds,
    )
    session.commit()
    return JSONResponse(
        {"lease_expires_at": item.lease_expires_at.isoformat() if item.lease_expires_at else None}
    )


@router.get("/items/{item_id}", response_class=HTMLResponse)
def item_page(
    item_id: uuid.UUID, request: Request, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> Response:
    """One item, read-only: what the reviewer saw, the submission's history and its audit trail."""
    context = queries.item_context(
        session, item_id, blur_threshold=settings.review_blur_threshold, viewer=principal.ref
    )
    return _page(request, "item.html", principal, c=context, interactive=False, queue="review")


@router.post("/items/{item_id}/reassign")
def item_reassign(
    item_id: uuid.UUID,
    principal: FormPrincipalDep,
    session: SessionDep,
    to: Annotated[str, Form(max_length=320)],
    note: Annotated[str, Form(max_length=2000)] = "",
) -> Response:
    """Hand an open item to another reviewer (leads)."""
    service.reassign(session, item_id, actor=principal.ref, to=to, note=note or None)
    session.commit()
    return RedirectResponse(f"/review/items/{item_id}?toast=Reassigned+to+{quote(to)}", status_code=303)


@router.get("/history", response_class=HTMLResponse)
def history(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    reviewer: str | None = None,
    mine: bool = False,
) -> Response:
    """Recent decisions: your own, or everyone's (leads)."""
    who = (reviewer or None) if principal.ref.can(Role.lead) and not mine else principal.reviewer.email
    page = ReviewRepository(session).list_page(state=ReviewState.decided, decided_by=who, limit=200)
    items = [item for item, _ in page]
    rows = queries.items_with_submissions(session, items)
    return _page(request, "history.html", principal, rows=rows, who=who)


AUDIT_PAGE = 300


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    actor: str | None = None,
    action: str | None = None,
    subject: str | None = None,
    older_than: uuid.UUID | None = None,
) -> Response:
    """The audit log (leads), 300 entries a page."""
    principal.ref.require(Role.lead, "read the audit log")
    subject_type, _, subject_id = (subject or "").partition(":")
    entries = AuditRepository(session).search(
        actor=actor or None,
        action=action or None,
        subject_type=subject_type or None,
        subject_id=subject_id or None,
        older_than=older_than,
        limit=AUDIT_PAGE + 1,
    )
    more = len(entries) > AUDIT_PAGE
    entries = entries[:AUDIT_PAGE]
    return _page(
        request,
        "audit.html",
        principal,
        entries=entries,
        older=entries[-1].id if more and entries else None,
        actor=actor or "",
        action=action or "",
        subject=subject or "",
    )


@router.get("/search", response_class=HTMLResponse)
def search(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    q: Annotated[str, Query(max_length=256)] = "",
) -> Response:
    """Find submissions by id or external id."""
    results = queries.search(session, q)
    if len(results) == 1 and results[0][1]:
        return RedirectResponse(f"/review/items/{results[0][1][-1].id}", status_code=303)
    hidden = queries.hidden_decisions(session, principal.ref, [sub.id for sub, _, _ in results])
    return _page(request, "search.html", principal, q=q, results=results, hidden=hidden)


@router.get("/reports", response_class=HTMLResponse)
def reports_page(
    request: Request,
    principal: PrincipalDep,
    session: SessionDep,
    days: Annotated[int, Query(ge=1, le=365)] = 30,
) -> Response:
    """Model versus reviewers, threshold suggestions and QA agreement (leads)."""
    model = reports.model_agreement(session, principal.ref, days=days)
    qa = reports.qa_agreement(session, principal.ref, days=days)
    return _page(request, "reports.html", principal, model=model, qa=qa, days=days)


@router.post("/qa/sample")
def qa_sample(
    principal: FormPrincipalDep,
    session: SessionDep,
    count: Annotated[int, Form(ge=1, le=500)] = 20,
    days: Annotated[int, Form(ge=1, le=365)] = 30,
) -> Response:
    """Send a sample of recent decisions for a blind second review (leads)."""
    items = service.sample_for_qa(session, principal.ref, count, days=days)
    session.commit()
    return RedirectResponse(
        f"/review/reports?days={days}&toast={len(items)}+items+sent+to+QA", status_code=303
    )


@router.get("/admin/tenants", response_class=HTMLResponse)
def tenants_page(request: Request, principal: PrincipalDep, session: SessionDep) -> Response:
    """Tenants' routing thresholds, custom categories, blocklists and known images (admins)."""
    return _tenants_page(request, principal, session)


def _tenants_page(
    request: Request,
    principal: Principal,
    session: SessionDep,
    *,
    errors: dict[str, str] | None = None,
    drafts: dict[str, str] | None = None,
    status: int = 200,
) -> Response:
    """The tenants page; ``errors`` and ``drafts`` (keyed ``<tenant id>:<field>``) refill a refused form."""
    tenants = admin.list_tenants(session, principal.ref)
    response = _page(
        request,
        "tenants.html",
        principal,
        tenants=tenants,
        blocklists={t.id: policy.get_blocklist(t) for t in tenants},
        known_images=admin.known_images_by_tenant(session, principal.ref, tenants),
        errors=errors or {},
        drafts=drafts or {},
    )
    response.status_code = status
    return response


def _custom_categories(text: str) -> list[CustomCategory]:
    result = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, sep, definition = line.partition(":")
        if not sep:
            raise InvalidInput(
                f"write each category as 'name: definition' ({line.strip()!r})", code="invalid_categories"
            )
        result.append(CustomCategory(name=name.strip(), definition=definition.strip()))
    return result


@router.post("/admin/tenants/{tenant_id}")
def tenant_update(
    tenant_id: uuid.UUID,
    principal: FormPrincipalDep,
    session: SessionDep,
    allow_threshold: Annotated[float, Form(ge=0, le=1)],
    block_threshold: Annotated[float, Form(ge=0, le=1)],
    min_confidence: Annotated[float, Form(ge=0, le=1)],
    category_review_threshold: Annotated[float, Form(ge=0, le=1)],
    category_block_threshold: Annotated[float, Form(ge=0, le=1)],
    categories: Annotated[str, Form(max_length=20000)] = "",
) -> Response:
    """Change a tenant's thresholds and categories (admins); audited."""
    update = TenantSettingsUpdate(
        allow_threshold=allow_threshold,
        block_threshold=block_threshold,
        min_confidence=min_confidence,
        category_review_threshold=category_review_threshold,
        category_block_threshold=category_block_threshold,
        categories=_custom_categories(categories),
    )
    tenant = admin.update_tenant_settings(session, principal.ref, tenant_id, update)
    session.commit()
    return RedirectResponse(
        f"/review/admin/tenants?toast=Saved+{quote(tenant.name)}#t-{tenant.id}", status_code=303
    )


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


@router.post("/admin/tenants/{tenant_id}/blocklist")
def tenant_blocklist(
    tenant_id: uuid.UUID,
    request: Request,
    principal: FormPrincipalDep,
    session: SessionDep,
    settings: SettingsDep,
    terms: Annotated[str, Form(max_length=300_000)] = "",
    patterns: Annotated[str, Form(max_length=100_000)] = "",
) -> Response:
    """Replace a tenant's blocklist (admins); audited. Invalid entries are shown on the page, nothing changes."""
    principal.ref.require(Role.admin, "manage tenants")
    update = BlocklistIn(terms=_lines(terms), patterns=_lines(patterns))
    try:
        tenant, _ = admin.set_tenant_blocklist(session, principal.ref, tenant_id, update, settings)
    except InvalidInput as exc:
        session.rollback()
        key = f"{tenant_id}:blocklist"
        return _tenants_page(
            request,
            principal,
            session,
            errors={key: exc.message},
            drafts={f"{key}_terms": terms, f"{key}_patterns": patterns},
            status=exc.status_code,
        )
    session.commit()
    return RedirectResponse(
        f"/review/admin/tenants?toast=Blocklist+of+{quote(tenant.name)}+saved#bl-{tenant.id}", status_code=303
    )


@router.post("/admin/tenants/{tenant_id}/known-images")
def tenant_known_image_add(
    tenant_id: uuid.UUID,
    request: Request,
    principal: FormPrincipalDep,
    session: SessionDep,
    submission_id: Annotated[str, Form(max_length=200)] = "",
    label: Annotated[str, Form(max_length=1000)] = "",
) -> Response:
    """Add a reviewed submission's image to a tenant's known images (admins); audited."""
    principal.ref.require(Role.admin, "manage tenants")
    key = f"{tenant_id}:known_image"
    try:
        try:
            parsed = uuid.UUID(submission_id.strip())
        except ValueError as exc:
            raise InvalidInput("enter the id of a reviewed submission", code="invalid_submission_id") from exc
        tenant, _ = admin.add_tenant_known_image(
            session, principal.ref, tenant_id, parsed, label=label, blob_store=request.app.state.blob_store
        )
    except (InvalidInput, Conflict, NotFound) as exc:
        if exc.code == "tenant_not_found":
            raise
        session.rollback()
        return _tenants_page(
            request,
            principal,
            session,
            errors={key: exc.message},
            drafts={f"{key}_submission_id": submission_id, f"{key}_label": label},
            status=exc.status_code,
        )
    session.commit()
    return RedirectResponse(
        f"/review/admin/tenants?toast=Known+image+added+to+{quote(tenant.name)}#ki-{tenant.id}",
        status_code=303,
    )


@router.post("/admin/tenants/{tenant_id}/known-images/{known_image_id}/remove")
def tenant_known_image_remove(
    tenant_id: uuid.UUID, known_image_id: uuid.UUID, principal: FormPrincipalDep, session: SessionDep
) -> Response:
    """Remove one of a tenant's known images (admins); audited."""
    tenant, label = admin.remove_tenant_known_image(session, principal.ref, tenant_id, known_image_id)
    session.commit()
    return RedirectResponse(
        f"/review/admin/tenants?toast=Removed+{quote(label)}#ki-{tenant.id}", status_code=303
    )
