"""The calling tenant's blocklist (``/v1/blocklist``) and known images (``/v1/known-images``)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request, Response

from api.deps import SessionDep, SettingsDep, TenantDep
from moderation.blobs import BlobStore
from moderation.errors import NotFound
from moderation.policy import service
from moderation.policy.schemas import BlocklistIn, BlocklistOut, KnownImageCreate, KnownImageOut

router = APIRouter(tags=["policy"])


@router.get("/v1/blocklist", response_model=BlocklistOut)
def get_blocklist(tenant: TenantDep, session: SessionDep) -> BlocklistOut:
    """The tenant's blocklist: terms and regular expressions."""
    return service.read_blocklist(session, tenant.id)


@router.put("/v1/blocklist", response_model=BlocklistOut)
def put_blocklist(
    data: BlocklistIn, tenant: TenantDep, session: SessionDep, settings: SettingsDep
) -> BlocklistOut:
    """Replace the tenant's blocklist; unsafe or invalid patterns are refused with 422."""
    out = service.set_blocklist(session, tenant.id, data, settings)
    session.commit()
    return out


@router.get("/v1/known-images", response_model=list[KnownImageOut])
def list_known_images(tenant: TenantDep, session: SessionDep) -> list[KnownImageOut]:
    """The tenant's known images, newest first."""
    return [KnownImageOut.from_model(k) for k in service.list_known_images(session, tenant)]


@router.post("/v1/known-images", status_code=201, response_model=KnownImageOut)
def add_known_image(
    data: KnownImageCreate, request: Request, tenant: TenantDep, session: SessionDep
) -> KnownImageOut:
    """Add the image of a reviewed submission; near-duplicates of it are blocked from now on."""
    blob_store: BlobStore = request.app.state.blob_store
    known = service.add_known_image(
        session, tenant, data.submission_id, label=data.label, created_by="api", blob_store=blob_store
    )
    session.commit()
    return KnownImageOut.from_model(known)


@router.delete("/v1/known-images/{known_image_id}", status_code=204)
def delete_known_image(known_image_id: str, tenant: TenantDep, session: SessionDep) -> Response:
    """Remove a known image."""
    try:
        parsed = uuid.UUID(known_image_id)
    except ValueError as exc:
        raise NotFound("known image not found", code="known_image_not_found") from exc
    service.remove_known_image(session, tenant, parsed)
    session.commit()
    return Response(status_code=204)
