"""Verdict-write benchmark: the time a GPU worker spends writing one batch's verdicts to Postgres.

The GPU worker writes a batch's verdicts after the engine ran, serially with the next batch's inference, so
this time is lost GPU time. The benchmark claims ``--batch`` queued submissions of one tenant (with a
webhook endpoint, so every verdict also records a delivery) exactly as a worker does, builds their drafts
from engine results through the real post-engine policy (a share of them land in review), and times
``BatchProcessor._write_verdicts`` with the statements it runs.

Run from the repository root (Postgres from the settings; the database is dropped and re-created)::

    .venv/bin/python bench/verdict_writes.py --batch 64 --rounds 5
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import event
from sqlalchemy.orm import sessionmaker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from moderation import jobs  # noqa: E402
from moderation.blobs import LocalBlobStore  # noqa: E402
from moderation.config import Settings  # noqa: E402
from moderation.db import make_engine  # noqa: E402
from moderation.engine import EngineResult, load_engine  # noqa: E402
from moderation.processing.service import BatchProcessor, BatchReport, _Prepared  # noqa: E402
from moderation.submissions.service import submit  # noqa: E402
from moderation.tenants.service import create_tenant  # noqa: E402
from moderation.webhooks.models import WebhookEndpoint  # noqa: E402
from tests.conftest import FIXTURE_MODEL_DIR, make_jpeg, migrated_database  # noqa: E402
from workers.celery_app import CeleryDispatcher, make_celery  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/moderation_bench_verdicts"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/14"


def main() -> None:
    """Run the benchmark and print a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[16, 64, 128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="dropped and re-created")
    parser.add_argument(
        "--redis-url", default=DEFAULT_REDIS_URL, help="webhook jobs go here; flushed at the end"
    )
    args = parser.parse_args()

    url = migrated_database(args.database_url)
    blobs = Path(tempfile.mkdtemp(prefix="verdict-bench-"))
    settings = Settings(
        database_url=url,
        redis_url=args.redis_url,
        data_dir=blobs,
        blob_dir=blobs,
        blob_fsync=False,
        model=str(FIXTURE_MODEL_DIR),
        batch_wait_ms=0,
        warmup=False,
    )
    engine_sql = make_engine(url)
    sessions = sessionmaker(bind=engine_sql, expire_on_commit=False)
    store = LocalBlobStore(blobs, fsync=False)
    with sessions() as session, session.begin():
        tenant = create_tenant(session, "bench", settings).tenant
        session.add(
            WebhookEndpoint(
                tenant_id=tenant.id,
                url="http://hooks.example/x",
                events=["submission.decided"],
                secret="whsec_AAAA",  # noqa: S106 - a fixed test secret; nothing is delivered
            )
        )
        session.expunge(tenant)
    # Webhook jobs reach a real broker, as a worker's do.
    celery = make_celery(settings)
    jobs.set_dispatcher(CeleryDispatcher(celery))
    image = make_jpeg(64, 64)
    statements: list[int] = [0]
    event.listen(engine_sql, "before_cursor_execute", lambda *a: statements.__setitem__(0, statements[0] + 1))
    rng = random.Random(7)
    # The real post-engine step needs the engine's identity: the fixture model, loaded as a worker loads it.
    processor = BatchProcessor(sessions, load_engine(settings), store, settings)

    print("| batch | rounds | write ms (median) | min | max | ms per verdict | statements per batch |")
    print("|------:|-------:|------------------:|----:|----:|---------------:|---------------------:|")
    for batch in args.batch:
        timings: list[float] = []
        counts: list[int] = []
        for _ in range(args.rounds):
            for n in range(batch):
                with sessions() as session, session.begin():
                    submit(
                        session,
                        tenant,
                        image=image,
                        caption=f"caption {n}",
                        blob_store=store,
                        settings=settings,
                    )
            leased = processor._claim(None, batch, fresh_only=True)
            drafts = []
            for item in leased:
                score = rng.random()
                result = EngineResult(
                    description="a cat sitting on a mat",
                    visible_text="",
                    explanation="the caption matches the picture",
                    conflict_score=score,
                    confidence=0.5 + rng.random() / 2,
                    category_scores={"violence": rng.random() / 4},
                )
                drafts.append(processor._engine_draft(_Prepared(item, tenant, None), result, 20.0))  # type: ignore[arg-type]
            statements[0] = 0
            started = time.perf_counter()
            report = BatchReport()
            processor._write_verdicts(drafts, report)
            timings.append((time.perf_counter() - started) * 1000)
            counts.append(statements[0])
            assert len(report.decided) == batch, report
        median = statistics.median(timings)
        print(
            f"| {batch} | {args.rounds} | {median:.1f} | {min(timings):.1f} | {max(timings):.1f} | "
            f"{median / batch:.2f} | {statistics.median(counts):.0f} |"
        )
    redis.Redis.from_url(args.redis_url).flushdb()


if __name__ == "__main__":
    main()
