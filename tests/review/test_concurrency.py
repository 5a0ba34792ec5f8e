"""Many reviewers claiming at once, on real concurrent transactions: never two on one item."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, delete, update
from sqlalchemy.orm import Session, sessionmaker

from moderation.blobs import LocalBlobStore
from moderation.config import Settings
from moderation.db import utcnow
from moderation.errors import Conflict
from moderation.review import service
from moderation.review.models import ReviewDecision, ReviewItem
from moderation.tenants.models import Tenant
from tests.conftest import RecordingDispatcher
from tests.review.helpers import add_review_item, make_tenant

REVIEWERS = 8
ITEMS = 40


@pytest.fixture
def committed(
    db_engine: Engine, settings: Settings, tmp_path: Path
) -> Iterator[tuple[sessionmaker[Session], uuid.UUID]]:
    """Real committed items of a fresh tenant (deleted afterwards, audit entries stay)."""
    sessions = sessionmaker(bind=db_engine, expire_on_commit=False)
    with sessions() as session, session.begin():
        tenant = make_tenant(session, settings)
        blobs = LocalBlobStore(tmp_path / "blobs", fsync=False)
        for i in range(ITEMS):
            add_review_item(session, tenant, blobs, settings, conflict=0.3 + (i % 7) / 10, seed=i)
        tenant_id = tenant.id
    yield sessions, tenant_id
    with sessions() as session, session.begin():
        session.execute(delete(Tenant).where(Tenant.id == tenant_id))


def _race(sessions: sessionmaker[Session], tenant_id: uuid.UUID) -> list[tuple[str, uuid.UUID, uuid.UUID]]:
    barrier = threading.Barrier(REVIEWERS)
    claims: list[tuple[str, uuid.UUID, uuid.UUID]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        try:
            barrier.wait()
            for k in range(ITEMS + 1):
                # A new reviewer each time: one who already holds an item would just get it back.
                reviewer = f"r{n}.{k}@example.com"
                with sessions() as session, session.begin():
                    item = service.claim_next(session, reviewer, 600)
                    if item is None:
                        return
                    if item.tenant_id != tenant_id:
                        continue
                    assert item.lease_token is not None
                    with lock:
                        claims.append((reviewer, item.id, item.lease_token))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(REVIEWERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return claims


def test_concurrent_claims_never_share_an_item_and_takeovers_fence_old_holders(
    committed: tuple[sessionmaker[Session], uuid.UUID], dispatched: RecordingDispatcher
) -> None:
    sessions, tenant_id = committed
    claims = _race(sessions, tenant_id)
    per_item = Counter(item_id for _, item_id, _ in claims)
    assert len(per_item) == ITEMS and set(per_item.values()) == {1}
    assert len({r.split(".")[0] for r, _, _ in claims}) > 1, "the reviewers should have shared the work"

    # Every lease expires; the reviewers race again and each item is taken over exactly once.
    with sessions() as session, session.begin():
        session.execute(
            update(ReviewItem)
            .where(ReviewItem.tenant_id == tenant_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    takeovers = _race(sessions, tenant_id)
    per_item = Counter(item_id for _, item_id, _ in takeovers)
    assert len(per_item) == ITEMS and set(per_item.values()) == {1}

    first = {item_id: (reviewer, token) for reviewer, item_id, token in claims}
    second = {item_id: (reviewer, token) for reviewer, item_id, token in takeovers}
    for item_id, (reviewer, token) in list(first.items())[:5]:
        new_reviewer, new_token = second[item_id]
        with sessions() as session, session.begin(), pytest.raises(Conflict):
            service.decide(
                session, item_id, reviewer=reviewer, lease_token=token, decision=ReviewDecision.approve
            )
        with sessions() as session, session.begin():
            decided = service.decide(
                session,
                item_id,
                reviewer=new_reviewer,
                lease_token=new_token,
                decision=ReviewDecision.approve,
            )
            assert decided.decided_by == new_reviewer
