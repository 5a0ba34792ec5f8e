"""A tenant reads and changes its own thresholds and categories."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from moderation.audit.models import AuditEntry
from tests.api.conftest import ApiTenant


def test_tenant_settings_round_trip(client: TestClient, tenant: ApiTenant) -> None:
    got = client.get("/v1/tenant", headers=tenant.headers).json()
    assert (got["block_threshold"], got["allow_threshold"], got["min_confidence"]) == (0.8, 0.3, 0.6)
    res = client.patch(
        "/v1/tenant",
        json={
            "block_threshold": 0.9,
            "categories": [{"name": "gambling", "definition": "Promotes betting."}],
        },
        headers=tenant.headers,
    )
    assert res.status_code == 200, res.text
    body = res.json()
    assert body["block_threshold"] == 0.9 and body["categories"] == [
        {"name": "gambling", "definition": "Promotes betting."}
    ]
    assert body["policy_version"] == got["policy_version"] + 1


def test_bad_tenant_settings_are_refused(client: TestClient, tenant: ApiTenant) -> None:
    res = client.patch("/v1/tenant", json={"allow_threshold": 0.95}, headers=tenant.headers)
    assert res.status_code == 422 and res.json()["error"]["code"] == "invalid_threshold"
    res = client.patch("/v1/tenant", json={"block_threshold": 1.5}, headers=tenant.headers)
    assert res.status_code == 422 and res.json()["error"]["code"] == "validation_error"
    res = client.patch(
        "/v1/tenant", json={"categories": [{"name": "violence", "definition": "dup"}]}, headers=tenant.headers
    )
    assert res.status_code == 422 and res.json()["error"]["code"] == "invalid_categories"


def test_text_the_database_cannot_store_is_refused_with_422_not_500(
    client: TestClient, tenant: ApiTenant
) -> None:
    nul_category = {"categories": [{"name": "scam_ads", "definition": "ads for\x00 scams"}]}
    res = client.patch("/v1/tenant", json=nul_category, headers=tenant.headers)
    assert res.status_code == 422 and res.json()["error"]["code"] == "invalid_categories"
    hook = {"url": "https://hooks.example.com/x", "events": ["submission.decided"], "description": "a\x00b"}
    res = client.post("/v1/webhook-endpoints", json=hook, headers=tenant.headers)
    assert res.status_code == 422 and res.json()["error"]["code"] == "validation_error"
    # Any other field that reaches the database with a NUL: the same 422, never a 500.
    res = client.post(
        "/v1/submissions/00000000-0000-0000-0000-000000000000/appeal",
        json={"reason": "x\x00"},
        headers=tenant.headers,
    )
    assert res.status_code == 422 and res.json()["error"]["code"] == "validation_error"


def test_a_tenant_sets_its_own_retention_period_and_goes_back_to_the_default(
    client: TestClient, tenant: ApiTenant, sessions: sessionmaker[Session]
) -> None:
    got = client.get("/v1/tenant", headers=tenant.headers).json()
    assert got["retention_days"] is None  # the service's default
    res = client.patch("/v1/tenant", json={"retention_days": 30}, headers=tenant.headers)
    assert res.status_code == 200, res.text
    assert res.json()["retention_days"] == 30
    assert res.json()["policy_version"] == got["policy_version"]  # no verdict depends on it
    res = client.patch("/v1/tenant", json={"block_threshold": 0.85}, headers=tenant.headers)
    assert res.json()["retention_days"] == 30  # left out: unchanged
    res = client.patch("/v1/tenant", json={"retention_days": None}, headers=tenant.headers)
    assert res.json()["retention_days"] is None
    for bad in (-1, 40000, "soon", "30", True, 1.5):
        res = client.patch("/v1/tenant", json={"retention_days": bad}, headers=tenant.headers)
        assert res.status_code == 422 and res.json()["error"]["code"] == "validation_error"
    with sessions() as session:
        entries = session.scalars(
            select(AuditEntry).where(AuditEntry.action == "tenant.settings").order_by(AuditEntry.id)
        ).all()
    assert [(e.actor, e.before, e.after) for e in entries] == [
        (f"tenant:{tenant.tenant.name}", {"retention_days": None}, {"retention_days": 30}),
        (
            f"tenant:{tenant.tenant.name}",
            {"block_threshold": 0.8, "policy_version": 1},
            {"block_threshold": 0.85, "policy_version": 2},
        ),
        (f"tenant:{tenant.tenant.name}", {"retention_days": 30}, {"retention_days": None}),
    ]
