"""Managing blocklists and known images, on the test database."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import update
from sqlalchemy.orm import Session

from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.errors import Conflict, InvalidInput, NotFound
from moderation.policy import service
from moderation.policy.perceptual import image_hashes
from moderation.policy.schemas import BlocklistIn, KnownImageOut
from moderation.submissions.models import Decision, Submission, SubmissionStatus
from moderation.submissions.service import submit
from moderation.tenants.models import Tenant
from moderation.tenants.repository import TenantRepository
from moderation.tenants.service import create_tenant
from tests.conftest import make_jpeg


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs", fsync=False)


@pytest.fixture
def tenant(session: Session, settings: Settings) -> Tenant:
    return create_tenant(session, "acme", settings).tenant


def reviewed_submission(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings, image: bytes
) -> uuid.UUID:
    """A submission a reviewer has rejected."""
    sid = submit(
        session, tenant, image=image, caption="leaked", blob_store=store, settings=settings
    ).submission.id
    session.execute(
        update(Submission)
        .where(Submission.id == sid)
        .values(status=SubmissionStatus.reviewed, final_decision=Decision.block)
    )
    return sid


def test_blocklist_round_trip_bumps_the_policy_version(
    session: Session, tenant: Tenant, settings: Settings
) -> None:
    before = tenant.policy_version
    out = service.set_blocklist(
        session, tenant.id, BlocklistIn(terms=["Free Money", "加微信"], patterns=[r"1[3-9]\d{9}"]), settings
    )
    assert out.terms == ["Free Money", "加微信"] and out.patterns == [r"1[3-9]\d{9}"]
    assert out.policy_version == before + 1
    row = TenantRepository(session).get(tenant.id)
    assert row is not None and service.get_blocklist(row) == out
    hits = service.blocklist_for(row, settings).match("ＦＲＥＥ money", "caption")
    assert [h.entry for h in hits] == ["Free Money"]


def test_unsafe_blocklist_is_refused_and_nothing_changes(
    session: Session, tenant: Tenant, settings: Settings
) -> None:
    with pytest.raises(InvalidInput) as err:
        service.set_blocklist(session, tenant.id, BlocklistIn(terms=["ok"], patterns=["(a+)+$"]), settings)
    assert err.value.code == "unsafe_pattern"
    assert service.get_blocklist(tenant).terms == []


def test_known_image_from_reviewed_submission(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings
) -> None:
    image = make_jpeg(320, 240, seed=7)
    sid = reviewed_submission(session, tenant, store, settings, image)
    known = service.add_known_image(
        session, tenant, sid, label="  leaked  ticket ", created_by="cli:alice", blob_store=store
    )
    assert known.label == "leaked ticket" and known.source_submission_id == sid
    out = KnownImageOut.from_model(known)
    assert len(out.phash) == 16 and out.created_by == "cli:alice"
    assert [k.id for k in service.list_known_images(session, tenant)] == [known.id]

    # A re-encoded, resized copy matches; a different image does not.
    copy = Image.open(io.BytesIO(image)).resize((160, 120))
    match = service.find_known_image(session, tenant.id, image_hashes(copy), settings)
    assert match is not None and match.known_image_id == known.id and match.label == "leaked ticket"
    assert match.phash_distance <= settings.known_image_max_distance
    other = Image.open(io.BytesIO(make_jpeg(320, 240, seed=8)))
    assert service.find_known_image(session, tenant.id, image_hashes(other), settings) is None

    with pytest.raises(Conflict) as err:
        service.add_known_image(session, tenant, sid, label="again", created_by="x", blob_store=store)
    assert err.value.code == "known_image_exists"
    service.remove_known_image(session, tenant, known.id)
    assert service.list_known_images(session, tenant) == []
    with pytest.raises(NotFound):
        service.remove_known_image(session, tenant, known.id)


def test_known_image_needs_a_reviewed_submission_of_the_tenant(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings
) -> None:
    sid = submit(
        session, tenant, image=make_jpeg(64, 64), caption="x", blob_store=store, settings=settings
    ).submission.id
    with pytest.raises(Conflict) as err:
        service.add_known_image(session, tenant, sid, label="x", created_by="x", blob_store=store)
    assert err.value.code == "submission_not_reviewed"
    other = create_tenant(session, "globex", settings).tenant
    with pytest.raises(NotFound):
        service.add_known_image(session, other, sid, label="x", created_by="x", blob_store=store)


def test_known_images_are_per_tenant(
    session: Session, tenant: Tenant, store: LocalBlobStore, settings: Settings
) -> None:
    image = make_jpeg(200, 200, seed=3)
    sid = reviewed_submission(session, tenant, store, settings, image)
    service.add_known_image(session, tenant, sid, label="x", created_by="x", blob_store=store)
    other = create_tenant(session, "globex", settings).tenant
    hashes = image_hashes(Image.open(io.BytesIO(image)))
    assert service.find_known_image(session, other.id, hashes, settings) is None
    assert service.find_known_image(session, tenant.id, hashes, settings) is not None
