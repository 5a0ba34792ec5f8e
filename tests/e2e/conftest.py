"""Real processes for end-to-end tests: uvicorn, Celery workers and beat on real Postgres and Redis."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import Engine, create_engine

from tests.conftest import migrated_database

E2E_DATABASE_URL = os.environ.get(
    "MODERATION_E2E_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/moderation_e2e"
)
E2E_REDIS_URL = os.environ.get("MODERATION_E2E_REDIS_URL", "redis://127.0.0.1:6379/10")
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """The running service: its processes, URLs and a way to restart parts of it."""

    env: dict[str, str]
    log_dir: Path
    api_url: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    db: Engine | None = None

    def start(self, name: str) -> None:
        """Start one named process (api, gpu, cpu, beat)."""
        celery = [str(BIN / "celery"), "-A", "workers.celery_app"]
        commands = {
            "api": [
                str(BIN / "uvicorn"),
                "api.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                self.api_url.rsplit(":", 1)[1],
            ],
            "gpu": [
                *celery,
                "worker",
                "-Q",
                "gpu",
                "--pool",
                "solo",
                "-n",
                f"gpu-{time.time_ns()}@%h",
                "-l",
                "INFO",
            ],
            "cpu": [
                *celery,
                "worker",
                "-Q",
                "webhooks,maintenance",
                "--pool",
                "threads",
                "-c",
                "4",
                "-n",
                f"cpu-{time.time_ns()}@%h",
                "-l",
                "INFO",
            ],
            "beat": [*celery, "beat", "-l", "INFO", "--schedule", str(self.log_dir / "beat-schedule")],
        }
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        self.procs[name] = subprocess.Popen(
            commands[name],
            env=self.env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a process (SIGKILL by default: no clean-up, as in a crash)."""
        proc = self.procs.pop(name)
        os.killpg(proc.pid, sig)
        proc.wait(30)

    def stop_all(self) -> None:
        """Terminate every process."""
        for name in list(self.procs):
            proc = self.procs.pop(name)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)

    def log(self, name: str) -> str:
        """The output of a process so far."""
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cli(self, *args: str) -> str:
        """Run the ``moderation`` command against this stack."""
        return subprocess.run(
            [str(BIN / "moderation"), *args],
            env=self.env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def wait_api(self, timeout: float = 60) -> None:
        """Wait until the API answers /readyz."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.api_url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise AssertionError("API did not become ready:\n" + self.log("api")[-3000:])

    def wait_worker_ready(self, name: str, timeout: float = 180) -> None:
        """Wait until a Celery worker logs that it is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "ready." in self.log(name):
                return
            if self.procs[name].poll() is not None:
                raise AssertionError(f"{name} exited:\n" + self.log(name)[-4000:])
            time.sleep(0.3)
        raise AssertionError(f"{name} not ready:\n" + self.log(name)[-4000:])


@contextmanager
def running_stack(
    log_dir: Path,
    database_url: str,
    fixture_model_dir: Path,
    overrides: dict[str, str],
    names: tuple[str, ...],
) -> Iterator[Stack]:
    """Migrate a fresh database, flush the Redis db, start the named processes and wait until they serve."""
    database_url = migrated_database(database_url)
    redis.Redis.from_url(E2E_REDIS_URL).flushdb()
    env = {
        **os.environ,
        "MODERATION_DATABASE_URL": database_url,
        "MODERATION_REDIS_URL": E2E_REDIS_URL,
        "MODERATION_BLOB_DIR": str(log_dir / "blobs"),
        "MODERATION_MODEL": str(fixture_model_dir),
        "MODERATION_ALLOW_PRIVATE_NETWORK": "true",
        "MODERATION_MAX_NEW_TOKENS": "24",
        "MODERATION_WEBHOOK_BACKOFF_BASE_SECONDS": "0.5",
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }
    s = Stack(env=env, log_dir=log_dir, api_url=f"http://127.0.0.1:{free_port()}")
    s.db = create_engine(database_url)
    try:
        for name in names:
            s.start(name)
        s.wait_api()
        for name in names:
            if name in ("gpu", "cpu"):
                s.wait_worker_ready(name)
        yield s
    finally:
        s.stop_all()
        s.db.dispose()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, fixture_model_dir: Path) -> Iterator[Stack]:
    """The whole service, started fresh for a test module, with short leases so crashes recover fast."""
    overrides = {
        "MODERATION_BATCH_MAX_SIZE": "4",
        "MODERATION_BATCH_WAIT_MS": "300",
        "MODERATION_PROCESSING_LEASE_SECONDS": "6",
        "MODERATION_QUEUE_REDELIVER_SECONDS": "4",
        "MODERATION_SWEEP_INTERVAL_SECONDS": "1",
    }
    with running_stack(
        tmp_path_factory.mktemp("stack"),
        E2E_DATABASE_URL,
        fixture_model_dir,
        overrides,
        ("api", "gpu", "cpu", "beat"),
    ) as s:
        yield s


@pytest.fixture(scope="module")
def api_key(stack: Stack) -> str:
    """A tenant's API key, created with the real CLI."""
    return str(json.loads(stack.cli("tenants", "create", f"e2e-{time.time_ns()}", "--json"))["api_key"])
