"""``make run``: migrate, make sure a dev tenant exists, then run the API, the workers and beat together."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(".data").resolve()
BIN = Path(sys.executable).parent


def banner(text: str) -> None:
    """Print a message nobody can miss."""
    line = "=" * 78
    print(f"\n{line}\n{text}\n{line}\n", flush=True)


def _key_works(key: str) -> bool:
    """Whether ``key`` authenticates against the database this run uses."""
    from sqlalchemy.orm import Session

    from moderation.db import make_engine
    from moderation.errors import Unauthorized
    from moderation.tenants.service import authenticate

    engine = make_engine(os.environ["MODERATION_DATABASE_URL"], pool_size=1)
    try:
        with Session(engine) as session:
            authenticate(session, f"Bearer {key}")
        return True
    except Unauthorized:
        return False
    finally:
        engine.dispose()


def ensure_dev_tenant() -> str:
    """The ``dev`` tenant's API key for this run's database (kept in .data/dev-tenant.json, mode 0600).

    A key kept from a run on another database (a URL given this time, a wiped .data/) is checked first: a
    new ``dev`` tenant, or a new key for an existing one, replaces it.
    """
    record = DATA / "dev-tenant.json"
    if record.exists():
        key = str(json.loads(record.read_text())["api_key"])
        if _key_works(key):
            return key
    created = subprocess.run(  # noqa: S603
        [str(BIN / "moderation"), "tenants", "create", "dev", "--json"], capture_output=True, text=True
    )
    if created.returncode == 0:
        key = str(json.loads(created.stdout)["api_key"])
    else:  # the tenant exists in this database, its key is not ours: issue another
        issued = subprocess.run(  # noqa: S603
            [str(BIN / "moderation"), "tenants", "issue-key", "dev", "--label", "make run"],
            check=True,
            capture_output=True,
            text=True,
        )
        key = issued.stdout.strip()
    record.write_text(json.dumps({"api_key": key}))
    record.chmod(0o600)
    return key


def main() -> int:
    """Start every process and stop them all when one exits or on Ctrl-C."""
    env = dict(os.environ)
    env.setdefault("MODERATION_ALLOW_PRIVATE_NETWORK", "true")
    env.setdefault("MODERATION_BLOB_FSYNC", "true")
    if not env.get("MODERATION_MODEL"):
        env["MODERATION_MODEL"] = str(DATA / "fixture-model")
        banner(
            "MODERATION_MODEL is not set: using the OFFLINE FIXTURE MODEL (tiny, random weights).\n"
            "Verdicts are meaningless. Set MODERATION_MODEL=Qwen/Qwen3-VL-8B-Instruct (or a local folder)\n"
            "on a machine with a GPU for real moderation."
        )
    prom = DATA / "prometheus"
    shutil.rmtree(prom, ignore_errors=True)
    prom.mkdir(parents=True)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(prom)
    os.environ.update(env)

    subprocess.run([str(BIN / "moderation"), "migrate"], check=True, env=env)  # noqa: S603
    key = ensure_dev_tenant()
    if env["MODERATION_ALLOW_PRIVATE_NETWORK"].lower() in ("1", "true", "yes"):
        banner("DEV MODE: image_url fetches and webhooks may reach private and loopback addresses.")
    host, port = env.get("MODERATION_HOST", "127.0.0.1"), env.get("MODERATION_PORT", "8000")
    banner(
        f"API: http://{host}:{port}   (docs at /docs)\n"
        f"Dev tenant API key: {key}\n"
        f'Try: curl -H "Authorization: Bearer {key}" -F image=@photo.jpg -F caption="hello" '
        f"http://{host}:{port}/v1/submissions"
    )
    celery = str(BIN / "celery")
    commands = {
        "api": [str(BIN / "uvicorn"), "api.main:app", "--host", host, "--port", port],
        "worker-gpu": [
            celery,
            "-A",
            "workers.celery_app",
            "worker",
            "-Q",
            "gpu",
            "--pool",
            "solo",
            "-n",
            "gpu@%h",
            "--loglevel",
            "INFO",
        ],
        "worker-cpu": [
            celery,
            "-A",
            "workers.celery_app",
            "worker",
            "-Q",
            "webhooks,maintenance",
            "--pool",
            "threads",
            "--concurrency",
            "8",
            "-n",
            "cpu@%h",
            "--loglevel",
            "INFO",
        ],
        "beat": [
            celery,
            "-A",
            "workers.celery_app",
            "beat",
            "--schedule",
            str(DATA / "celerybeat-schedule"),
            "--loglevel",
            "INFO",
        ],
    }
    procs = {name: subprocess.Popen(cmd, env=env) for name, cmd in commands.items()}  # noqa: S603

    def stop(*_: object) -> None:
        for proc in procs.values():
            if proc.poll() is None:
                proc.terminate()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
    finally:
        stop()
        deadline = time.monotonic() + 20
        for proc in procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
    failed = [n for n, p in procs.items() if p.returncode not in (0, -signal.SIGTERM, -signal.SIGINT)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
