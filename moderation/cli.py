"""The ``moderation`` command: tenants, migrations, the fixture model and evaluation tools."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from moderation.config import get_settings
from moderation.errors import ModerationError

if TYPE_CHECKING:
    from alembic.config import Config

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def alembic_config(database_url: str | None = None) -> Config:
    """Alembic configuration pointing at this project's migrations."""
    from alembic.config import Config

    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    if database_url:
        config.attributes["database_url"] = database_url
    return config


def migrate(database_url: str | None = None) -> None:
    """Bring the database schema to the newest revision."""
    from alembic import command

    command.upgrade(alembic_config(database_url), "head")


def _tenants_create(args: argparse.Namespace) -> int:
    from moderation.db import session_scope
    from moderation.tenants.service import create_tenant

    with session_scope() as session:
        issued = create_tenant(session, args.name)
        tenant_id = issued.tenant.id
    if args.json:
        print(json.dumps({"tenant_id": str(tenant_id), "name": args.name, "api_key": issued.key}))
    else:
        print(f"tenant {args.name} created ({tenant_id})")
        print(f"API key (shown once, store it now): {issued.key}")
    return 0


def _tenants_key(args: argparse.Namespace) -> int:
    from moderation.db import session_scope
    from moderation.tenants.repository import TenantRepository
    from moderation.tenants.service import issue_api_key

    with session_scope() as session:
        tenant = TenantRepository(session).get_by_name(args.name)
        if tenant is None:
            print(f"no tenant named {args.name!r}", file=sys.stderr)
            return 1
        key = issue_api_key(session, tenant, label=args.label)
    print(key)
    return 0


def _tenants_list(_: argparse.Namespace) -> int:
    from moderation.db import session_scope
    from moderation.tenants.repository import TenantRepository

    with session_scope() as session:
        for tenant in TenantRepository(session).list():
            print(
                f"{tenant.id}  {tenant.name}  block>={tenant.block_threshold} allow<={tenant.allow_threshold} "
                f"min_confidence={tenant.min_confidence}"
            )
    return 0


def _tenants_set(args: argparse.Namespace) -> int:
    from moderation.db import session_scope
    from moderation.tenants.repository import TenantRepository
    from moderation.tenants.schemas import TenantSettingsOut, TenantSettingsUpdate
    from moderation.tenants.service import update_settings

    with session_scope() as session:
        tenant = TenantRepository(session).get_by_name(args.name)
        if tenant is None:
            print(f"no tenant named {args.name!r}", file=sys.stderr)
            return 1
        update = TenantSettingsUpdate(
            block_threshold=args.block_threshold,
            allow_threshold=args.allow_threshold,
            min_confidence=args.min_confidence,
        )
        update_settings(tenant, update)
        if args.rate_limit is not None:
            tenant.rate_limit_per_minute = args.rate_limit
        print(TenantSettingsOut.from_model(tenant).model_dump_json(indent=2))
    return 0


def _migrate(_: argparse.Namespace) -> int:
    migrate()
    print("database is at the newest schema revision")
    return 0


def _fixture_build(args: argparse.Namespace) -> int:
    from moderation.engine.fixture import build_fixture_model

    path = build_fixture_model(Path(args.path), seed=args.seed)
    print(f"fixture model written to {path} (random weights: for tests and machines without a GPU only)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``moderation`` command."""
    parser = argparse.ArgumentParser(prog="moderation", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    tenants = sub.add_parser("tenants", help="manage tenants and their API keys").add_subparsers(
        dest="tenants_command", required=True
    )
    create = tenants.add_parser("create", help="create a tenant and print its first API key")
    create.add_argument("name")
    create.add_argument("--json", action="store_true", help="print the result as JSON")
    create.set_defaults(func=_tenants_create)
    key = tenants.add_parser("issue-key", help="issue another API key for a tenant")
    key.add_argument("name")
    key.add_argument("--label")
    key.set_defaults(func=_tenants_key)
    tenants.add_parser("list", help="list tenants").set_defaults(func=_tenants_list)
    setter = tenants.add_parser("set", help="change a tenant's thresholds or rate limit")
    setter.add_argument("name")
    setter.add_argument("--block-threshold", type=float)
    setter.add_argument("--allow-threshold", type=float)
    setter.add_argument("--min-confidence", type=float)
    setter.add_argument("--rate-limit", type=int, help="submissions per minute")
    setter.set_defaults(func=_tenants_set)

    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=_migrate)

    fixture = sub.add_parser("fixture-model", help="the offline fixture model").add_subparsers(
        dest="fixture_command", required=True
    )
    build = fixture.add_parser("build", help="write a tiny random Qwen3-VL with the real tokenizer to PATH")
    build.add_argument("path")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=_fixture_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line."""
    from moderation.logging import configure_logging

    configure_logging("WARNING")
    args = build_parser().parse_args(argv)
    get_settings()
    try:
        return int(args.func(args))
    except ModerationError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
