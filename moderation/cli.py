"""The ``moderation`` command: tenants, migrations, the fixture model and evaluation tools."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from moderation.config import get_settings
from moderation.errors import ModerationError, NotFound

if TYPE_CHECKING:
    from alembic.config import Config
    from sqlalchemy.orm import Session

    from moderation.tenants.models import Tenant

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def migrations_root() -> Path:
    """The folder holding alembic.ini: the source checkout, or the working directory of an installed copy."""
    for candidate in (PROJECT_ROOT, Path.cwd()):
        if (candidate / "alembic.ini").is_file() and (candidate / "alembic").is_dir():
            return candidate
    raise FileNotFoundError("alembic.ini not found; run `moderation migrate` from the project folder")


def alembic_config(database_url: str | None = None) -> Config:
    """Alembic configuration pointing at this project's migrations."""
    from alembic.config import Config

    root = migrations_root()
    config = Config(str(root / "alembic.ini"))
    config.set_main_option("script_location", str(root / "alembic"))
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
            retention = "default" if tenant.retention_days is None else tenant.retention_days
            print(
                f"{tenant.id}  {tenant.name}  block>={tenant.block_threshold} allow<={tenant.allow_threshold} "
                f"min_confidence={tenant.min_confidence} retention_days={retention}"
            )
    return 0


def _tenants_set(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from moderation.db import session_scope
    from moderation.errors import InvalidInput
    from moderation.tenants.repository import TenantRepository
    from moderation.tenants.schemas import TenantSettingsOut, TenantSettingsUpdate
    from moderation.tenants.service import change_settings

    with session_scope() as session:
        tenant = TenantRepository(session).get_by_name(args.name)
        if tenant is None:
            print(f"no tenant named {args.name!r}", file=sys.stderr)
            return 1
        given = {
            name: getattr(args, name)
            for name in ("block_threshold", "allow_threshold", "min_confidence", "retention_days")
            if getattr(args, name) is not None
        }
        if args.default_retention:
            given["retention_days"] = None
        if given:
            try:
                update = TenantSettingsUpdate(**given)
            except ValidationError as exc:
                error = exc.errors()[0]
                option = "--" + "-".join(str(part) for part in error["loc"]).replace("_", "-")
                raise InvalidInput(f"{option}: {error['msg']}", code="invalid_setting") from None
            change_settings(session, tenant.id, update, "cli")
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


def _tenant_named(session: Session, name: str) -> Tenant:
    from moderation.tenants.repository import TenantRepository

    tenant = TenantRepository(session).get_by_name(name)
    if tenant is None:
        raise NotFound(f"no tenant named {name!r}", code="tenant_not_found")
    return tenant


def _known_images_add(args: argparse.Namespace) -> int:
    import getpass
    import uuid

    from moderation.blobs import blob_store_from_settings
    from moderation.db import session_scope
    from moderation.policy.schemas import KnownImageOut
    from moderation.policy.service import add_known_image

    with session_scope() as session:
        tenant = _tenant_named(session, args.tenant)
        known = add_known_image(
            session,
            tenant,
            uuid.UUID(args.submission_id),
            label=args.label,
            created_by=args.created_by or f"cli:{getpass.getuser()}",
            blob_store=blob_store_from_settings(get_settings()),
        )
        out = KnownImageOut.from_model(known)
    print(
        out.model_dump_json(indent=2)
        if args.json
        else f"known image {out.id} added: {out.label} (pHash {out.phash})"
    )
    return 0


def _known_images_list(args: argparse.Namespace) -> int:
    from moderation.db import session_scope
    from moderation.policy.schemas import KnownImageOut
    from moderation.policy.service import list_known_images

    with session_scope() as session:
        rows = [
            KnownImageOut.from_model(k)
            for k in list_known_images(session, _tenant_named(session, args.tenant))
        ]
    if args.json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], ensure_ascii=False, indent=2))
        return 0
    for r in rows:
        print(
            f"{r.id}  pHash {r.phash}  {r.label}  "
            f"(from {r.source_submission_id}, by {r.created_by}, {r.created_at:%Y-%m-%d})"
        )
    if not rows:
        print(f"tenant {args.tenant} has no known images")
    return 0


def _known_images_remove(args: argparse.Namespace) -> int:
    import uuid

    from moderation.db import session_scope
    from moderation.policy.service import remove_known_image

    with session_scope() as session:
        remove_known_image(session, _tenant_named(session, args.tenant), uuid.UUID(args.known_image_id))
    print(f"known image {args.known_image_id} removed")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from moderation.engine import load_engine
    from moderation.evaluation.dataset import load_samples
    from moderation.evaluation.runner import run_evaluation, summarize, summary_lines, write_report
    from moderation.policy.routing import Thresholds

    settings = get_settings()
    path = Path(args.file)
    samples = load_samples(path)[: args.limit] if args.limit else load_samples(path)
    thresholds = Thresholds(
        block_threshold=args.block_threshold
        if args.block_threshold is not None
        else settings.default_block_threshold,
        allow_threshold=args.allow_threshold
        if args.allow_threshold is not None
        else settings.default_allow_threshold,
        min_confidence=args.min_confidence
        if args.min_confidence is not None
        else settings.default_min_confidence,
    )
    engine = load_engine(settings)

    def progress(done: int, total: int) -> None:
        print(f"judged {done}/{total}", file=sys.stderr)

    items = run_evaluation(
        engine,
        samples,
        base_dir=path.parent,
        settings=settings,
        thresholds=thresholds,
        batch_size=args.batch_size or settings.batch_max_size,
        progress=progress,
    )
    report = summarize(items, engine=engine, samples_file=str(path), thresholds=thresholds)
    out_dir = (
        Path(args.out)
        if args.out
        else settings.data_dir / "eval" / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    )
    json_path, md_path = write_report(report, out_dir)
    print("\n".join(summary_lines(report)))
    print(f"report written to {json_path} and {md_path}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from moderation.db import session_scope
    from moderation.evaluation.service import apply_calibration, calibrate_tenant, report_lines
    from moderation.tenants.repository import TenantRepository

    with session_scope() as session:
        tenant = _tenant_named(session, args.tenant)
        result = calibrate_tenant(
            session,
            tenant,
            target_error=args.target_error,
            method=args.method,
            since_days=args.days,
            min_labels=args.min_labels,
        )
        print("\n".join(report_lines(result, tenant)))
        if args.apply:
            locked = TenantRepository(session).get(tenant.id, for_update=True)
            assert locked is not None
            apply_calibration(locked, result)
            print(
                f"applied: allow <= {locked.allow_threshold:.3f}, block >= {locked.block_threshold:.3f} "
                f"(policy version {locked.policy_version})"
            )
        elif result.proposed is not None:
            print("run again with --apply to use the proposed thresholds")
    return 0 if result.proposed is not None else 1


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
    setter = tenants.add_parser("set", help="change a tenant's thresholds, rate limit or retention period")
    setter.add_argument("name")
    setter.add_argument("--block-threshold", type=float)
    setter.add_argument("--allow-threshold", type=float)
    setter.add_argument("--min-confidence", type=float)
    setter.add_argument("--rate-limit", type=int, help="submissions per minute")
    retention = setter.add_mutually_exclusive_group()
    retention.add_argument(
        "--retention-days", type=int, help="erase final submissions this many days old (0: keep everything)"
    )
    retention.add_argument(
        "--default-retention", action="store_true", help="go back to MODERATION_RETENTION_DAYS"
    )
    setter.set_defaults(func=_tenants_set)

    from moderation.reviewers.cli import add_reviewer_commands

    add_reviewer_commands(sub)

    sub.add_parser("migrate", help="apply database migrations").set_defaults(func=_migrate)

    fixture = sub.add_parser("fixture-model", help="the offline fixture model").add_subparsers(
        dest="fixture_command", required=True
    )
    build = fixture.add_parser("build", help="write a tiny random Qwen3-VL with the real tokenizer to PATH")
    build.add_argument("path")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=_fixture_build)
    _add_policy_commands(sub)
    return parser


def _add_policy_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    known = sub.add_parser("known-images", help="a tenant's known images (blocked on sight)").add_subparsers(
        dest="known_images_command", required=True
    )
    add = known.add_parser("add", help="add the image of a reviewed submission")
    add.add_argument("tenant")
    add.add_argument("submission_id")
    add.add_argument("--label", required=True, help="what the image is, shown in verdict explanations")
    add.add_argument("--created-by", help="who adds it (default: cli:<user>)")
    add.add_argument("--json", action="store_true", help="print the result as JSON")
    add.set_defaults(func=_known_images_add)
    listing = known.add_parser("list", help="list a tenant's known images")
    listing.add_argument("tenant")
    listing.add_argument("--json", action="store_true", help="print the result as JSON")
    listing.set_defaults(func=_known_images_list)
    remove = known.add_parser("remove", help="remove a known image")
    remove.add_argument("tenant")
    remove.add_argument("known_image_id")
    remove.set_defaults(func=_known_images_remove)

    evaluate = sub.add_parser("eval", help="judge a labelled JSONL file and report accuracy and calibration")
    evaluate.add_argument("file", help="JSON Lines: image (path or URL), caption, expected, categories")
    evaluate.add_argument("--out", help="report folder (default: DATA_DIR/eval/<timestamp>)")
    evaluate.add_argument("--batch-size", type=int, help="samples per engine batch (default: BATCH_MAX_SIZE)")
    evaluate.add_argument("--limit", type=int, help="judge only the first N samples")
    evaluate.add_argument("--block-threshold", type=float)
    evaluate.add_argument("--allow-threshold", type=float)
    evaluate.add_argument("--min-confidence", type=float)
    evaluate.set_defaults(func=_eval)

    calibrate = sub.add_parser(
        "calibrate", help="fit a tenant's score calibration and thresholds from reviewer decisions"
    )
    calibrate.add_argument("--tenant", required=True)
    calibrate.add_argument("--target-error", type=float, default=0.02, help="largest acceptable error rate")
    calibrate.add_argument("--method", choices=["isotonic", "platt"], default="isotonic")
    calibrate.add_argument("--days", type=int, default=90, help="use verdicts of the last N days")
    calibrate.add_argument("--min-labels", type=int, default=30, help="fewest reviewer decisions to fit on")
    calibrate.add_argument("--apply", action="store_true", help="set the proposed thresholds on the tenant")
    calibrate.set_defaults(func=_calibrate)


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
