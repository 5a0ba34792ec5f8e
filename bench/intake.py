"""Intake benchmark: accepted submissions per second and p50/p99 latency of ``POST /v1/submissions``.

Two targets are measured in one run, on the same machine, with identical uvicorn options:

* ``real``: ``uvicorn api.main:app`` on a fresh migrated database (``moderation_bench``), its own Redis
  database index, blobs in a temporary folder, a tenant made with ``moderation tenants create`` and the real
  Celery dispatch to Redis (no worker runs: the jobs just queue up in Redis);
* ``bare``: ``uvicorn bench.intake:bare_app``, a FastAPI app whose endpoint only reads the multipart upload
  and answers 202. It is the ceiling this machine and this client reach for ~140 KB multipart posts.

The load generator runs in this process (a separate process from both servers): ``--concurrency``
keep-alive connections, each sending one request at a time (closed loop) for ``--duration`` seconds after a
``--warmup`` phase, with a hard cap on the request count. Every request carries a distinct JPEG: 64 noisy
1000x750 JPEGs of ~140 KB are generated up front and each request gets a unique JPEG comment segment, so
content addressing (one blob per SHA-256) never turns a write into a no-op.

Run from the repository root::

    .venv/bin/python bench/intake.py --duration 15
    .venv/bin/python bench/intake.py --duration 15 --workers 2 --json-out bench/results/intake-w2.json

The client's own CPU use is reported: on a small machine it competes with the servers for the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/moderation_bench"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"
OWNER_KEY = "bench:intake:owner"
BOUNDARY = "benchboundary7d4a1c9e0b3f"
K = TypeVar("K")
TARGET_RATIO = 0.40
TARGET_P99_MS = 50.0
NUM_IMAGES = 64


# --------------------------------------------------------------------------------------------------------
# The bare endpoint: read the multipart upload, answer 202. Served by its own uvicorn process.
# --------------------------------------------------------------------------------------------------------

bare_app = FastAPI(title="bare intake (benchmark ceiling)")


@bare_app.post("/v1/submissions", status_code=202)
async def bare_submission(request: Request) -> JSONResponse:
    """Parse the multipart form as a plain FastAPI endpoint does (Starlette), read the whole image, answer 202."""
    form = await request.form(max_files=2, max_fields=20, max_part_size=4000 * 4 + 1024)
    try:
        image = form.get("image")
        caption = form.get("caption")
        if not isinstance(image, UploadFile) or caption is None:
            return JSONResponse({"error": "image and caption are required"}, status_code=422)
        size = 0
        while chunk := await image.read(1024 * 1024):
            size += len(chunk)
    finally:
        await form.close()
    return JSONResponse({"id": str(uuid.uuid4()), "status": "queued", "bytes": size}, status_code=202)


@bare_app.get("/healthz")
async def bare_healthz() -> dict[str, str]:
    """Liveness."""
    return {"status": "ok"}


# --------------------------------------------------------------------------------------------------------
# Payloads
# --------------------------------------------------------------------------------------------------------


def _noisy_jpeg(seed: int, width: int, height: int, sigma: float, quality: int) -> bytes:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ys = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    xs = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    a, b, c = (rng.uniform(0, 255, 3).astype(np.float32) for _ in range(3))
    img = a * (1 - xs) * (1 - ys) + b * xs + c * ys * (1 - xs)
    img = np.broadcast_to(img, (height, width, 3)).copy()
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width - 10)), int(rng.integers(0, height - 10))
        w, h = int(rng.integers(10, width // 4)), int(rng.integers(10, height // 4))
        img[y0 : y0 + h, x0 : x0 + w] = rng.uniform(0, 255, 3)
    img += rng.normal(0.0, sigma, img.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_images(count: int, width: int, height: int, target_bytes: int, quality: int = 85) -> list[bytes]:
    """``count`` distinct noisy JPEGs whose noise level is tuned so the first one is ~``target_bytes``."""
    lo, hi = 0.0, 80.0
    for _ in range(14):
        mid = (lo + hi) / 2
        if len(_noisy_jpeg(0, width, height, mid, quality)) < target_bytes:
            lo = mid
        else:
            hi = mid
    sigma = (lo + hi) / 2
    return [_noisy_jpeg(seed, width, height, sigma, quality) for seed in range(count)]


def jpeg_comment(payload: bytes) -> bytes:
    """A JPEG COM segment (goes right after SOI; decoders skip it)."""
    return b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload


class Payloads:
    """Pre-serialised HTTP requests; request ``i`` gets image ``i % 64`` with a unique comment and caption."""

    def __init__(self, images: Sequence[bytes], host: str, port: int, api_key: str | None) -> None:
        self.nonce = uuid.uuid4().hex[:12].encode()
        self.images = images
        self._static: list[tuple[bytes, bytes, dict[str, str]]] = []
        caption_head = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="caption"\r\n\r\n').encode()
        self._image_head = (
            f'\r\n--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="bench.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode() + b"\xff\xd8"
        sample_caption, sample_com = self._caption(0), jpeg_comment(self._comment(0))
        for jpeg in images:
            assert jpeg[:2] == b"\xff\xd8"
            tail = jpeg[2:] + f"\r\n--{BOUNDARY}--\r\n".encode()
            length = (
                len(caption_head) + len(sample_caption) + len(self._image_head) + len(sample_com) + len(tail)
            )
            headers = {
                "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
                "Content-Length": str(length),
            }
            if api_key:
                headers["Authorization"] = f"Bearer {api_key}"
            head = f"POST /v1/submissions HTTP/1.1\r\nHost: {host}:{port}\r\n" + "".join(
                f"{k}: {v}\r\n" for k, v in headers.items()
            )
            self._static.append(((head + "\r\n").encode() + caption_head, tail, headers))

    def _caption(self, i: int) -> bytes:
        return f"benchmark submission {i:012d}: a photo of a red bicycle leaning on a fence".encode()

    def _comment(self, i: int) -> bytes:
        return b"bench-" + self.nonce + f"-{i:012d}".encode()

    def raw(self, i: int) -> list[bytes]:
        """Request ``i`` as wire chunks (request line and headers included)."""
        head, tail, _ = self._static[i % len(self._static)]
        return [head, self._caption(i), self._image_head, jpeg_comment(self._comment(i)), tail]

    def body(self, i: int) -> tuple[dict[str, str], bytes]:
        """Request ``i`` as headers and body (for httpx)."""
        head, tail, headers = self._static[i % len(self._static)]
        body_head = head.split(b"\r\n\r\n", 1)[1]
        parts = [body_head, self._caption(i), self._image_head, jpeg_comment(self._comment(i)), tail]
        return headers, b"".join(parts)


# --------------------------------------------------------------------------------------------------------
# Load generator
# --------------------------------------------------------------------------------------------------------


class RawConnection:
    """A minimal HTTP/1.1 keep-alive client over asyncio streams: pre-serialised requests, cheap parsing."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        """Connect."""
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def close(self) -> None:
        """Disconnect."""
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        self.reader = self.writer = None

    async def request(self, chunks: list[bytes]) -> tuple[int, bytes]:
        """Send one request and read its response; returns (status, body)."""
        if self.writer is None:
            await self.open()
        assert self.reader is not None and self.writer is not None
        self.writer.writelines(chunks)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked, close = 0, False, False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if chunked:
            parts = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
                data = await self.reader.readexactly(size + 2)
                if size == 0:
                    break
                parts.append(data[:-2])
            body = b"".join(parts)
        else:
            body = await self.reader.readexactly(length) if length else b""
        if close:
            await self.close()
        return status, body


class HttpxConnection:
    """One httpx request at a time on a shared AsyncClient (pool of ``concurrency`` connections)."""

    def __init__(self, client: Any, url: str, payloads: Payloads) -> None:
        self.client, self.url, self.payloads = client, url, payloads

    async def open(self) -> None:
        """Nothing to do: the pool connects lazily."""

    async def close(self) -> None:
        """Nothing to do: the pool is closed by its owner."""

    async def request_i(self, i: int) -> tuple[int, bytes]:
        """Send request ``i``."""
        headers, body = self.payloads.body(i)
        response = await self.client.post(self.url, content=body, headers=headers)
        return response.status_code, response.content


@dataclass
class PhaseResult:
    """What one load phase measured."""

    target: str
    seconds: float
    ok: int
    errors: Counter[str]
    latencies: list[float]
    client_cpu: float
    server_cpu: float
    server_sys: float
    server_threads: dict[str, float]  # CPU seconds by thread role (see _thread_cpu)
    services_cpu: float
    machine_busy: float
    error_samples: list[str] = field(default_factory=list)
    connections: list[int] = field(default_factory=list)
    busiest_others: list[str] = field(default_factory=list)


def _tree_pids(pid: int) -> list[int]:
    """A process and its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [pid, *(p.pid for p in root.children(recursive=True))]
    except psutil.Error:
        return [pid]


def _tree_cpu(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process and its descendants."""
    import psutil

    user = system = 0.0
    try:
        root = psutil.Process(pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                user, system = user + t.user, system + t.system
    except psutil.Error:
        pass
    return user, system


def _thread_cpu(pid: int) -> dict[tuple[int, int], tuple[str, float]]:
    """CPU seconds of every thread of a process tree, by (pid, thread id), with the thread's role.

    Roles: ``main`` (a process's first thread: uvicorn's event loop in a worker), the intake writer (named
    ``intake-writer`` for the OS by the service), and ``other``.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    usage: dict[tuple[int, int], tuple[str, float]] = {}
    for proc_pid in _tree_pids(pid):
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{proc_pid}/task"):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    with open(f"/proc/{proc_pid}/task/{tid}/stat") as handle:
                        stat = handle.read()
                    fields = stat[stat.rindex(")") + 2 :].split()
                    name = stat[stat.index("(") + 1 : stat.rindex(")")]
                    role = "main" if int(tid) == proc_pid else name if name == "intake-writer" else "other"
                    usage[(proc_pid, int(tid))] = (role, (int(fields[11]) + int(fields[12])) / ticks)
    return usage


def _thread_deltas(
    before: dict[tuple[int, int], tuple[str, float]], after: dict[tuple[int, int], tuple[str, float]]
) -> dict[str, float]:
    """CPU seconds used between two snapshots, summed by thread role."""
    roles: dict[str, float] = {}
    for key, seconds in _cpu_deltas(before, after).items():
        role = after[key][0]
        roles[role] = roles.get(role, 0.0) + seconds
    return roles


def _owner_of(server_pid: int, port: int, client_port: int) -> int | None:
    """The pid of the server process that accepted the connection from ``client_port``, if any yet."""
    import psutil

    with contextlib.suppress(psutil.Error):
        root = psutil.Process(server_pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                for c in proc.net_connections(kind="tcp"):
                    if c.laddr and c.laddr.port == port and c.raddr and c.raddr.port == client_port:
                        return proc.pid
    return None


async def open_balanced(conns: Sequence[RawConnection], server_pid: int, port: int, workers: int) -> None:
    """Open the connections one by one, re-connecting until each uvicorn worker holds its share.

    uvicorn's workers share one listening socket and each accepts whatever is pending, so a handful of
    long-lived keep-alive connections often all land in one worker, which would make ``--workers 2`` measure
    a single process. Many real clients (or a proxy) spread connections; this reproduces that.
    """
    quota = -(-len(conns) // workers)
    held: Counter[int | None] = Counter()
    for conn in conns:
        for _ in range(100):
            await conn.open()
            assert conn.writer is not None
            client_port = conn.writer.get_extra_info("sockname")[1]
            owner = None
            for _ in range(100):
                owner = _owner_of(server_pid, port, client_port)
                if owner is not None:
                    break
                await asyncio.sleep(0.002)
            if owner is None or held[owner] < quota:
                break
            await conn.close()
        held[owner] += 1


def connections_per_worker(server_pid: int, port: int) -> list[int]:
    """Established connections to ``port`` held by each process of the server tree (uvicorn workers)."""
    import psutil

    counts: list[int] = []
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(server_pid)
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                n = sum(
                    1
                    for c in proc.net_connections(kind="tcp")
                    if c.status == psutil.CONN_ESTABLISHED and c.laddr and c.laddr.port == port
                )
                if n:
                    counts.append(n)
    return counts


def _process_cpu() -> dict[int, tuple[str, float]]:
    """Name and CPU seconds used so far of every process on this machine, by pid."""
    import psutil

    usage: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is not None:
            usage[proc.pid] = (proc.info["name"] or "?", times.user + times.system)
    return usage


def _is_service(name: str) -> bool:
    return name.startswith("postgres") or name.startswith("redis-server")


def _cpu_deltas(before: dict[K, tuple[str, float]], after: dict[K, tuple[str, float]]) -> dict[K, float]:
    """CPU used between two snapshots by the processes or threads alive at the second (new ones from zero)."""
    deltas = {}
    for key, (_, t) in after.items():
        prev = before.get(key)
        deltas[key] = max(0.0, t - (prev[1] if prev else 0.0))
    return deltas


def _machine_busy() -> float:
    import psutil

    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


async def run_phase(
    target: str,
    *,
    host: str,
    port: int,
    payloads: Payloads,
    counter: list[int],
    concurrency: int,
    duration: float,
    max_requests: int,
    timeout: float,
    client_kind: str,
    server_pid: int,
    workers: int = 1,
) -> PhaseResult:
    """Drive ``concurrency`` closed-loop connections for ``duration`` seconds (or ``max_requests``)."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    samples: list[str] = []
    ok = 0
    issued = 0
    httpx_client: Any = None
    if client_kind == "httpx":
        import httpx

        httpx_client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            timeout=timeout,
        )
        conns: list[Any] = [
            HttpxConnection(httpx_client, f"http://{host}:{port}/v1/submissions", payloads)
            for _ in range(concurrency)
        ]
    else:
        conns = [RawConnection(host, port) for _ in range(concurrency)]
    if client_kind == "raw" and workers > 1:
        await open_balanced(conns, server_pid, port, workers)
    else:
        await asyncio.gather(*(c.open() for c in conns))
    perf = time.perf_counter

    async def drive(conn: Any) -> None:
        nonlocal ok, issued
        while issued < max_requests and perf() < deadline:
            issued += 1
            i = counter[0]
            counter[0] += 1
            t0 = perf()
            try:
                async with asyncio.timeout(timeout):
                    if client_kind == "httpx":
                        status, body = await conn.request_i(i)
                    else:
                        status, body = await conn.request(payloads.raw(i))
            except Exception as exc:
                errors[type(exc).__name__] += 1
                if len(samples) < 5:
                    samples.append(f"{type(exc).__name__}: {exc}")
                await conn.close()
                continue
            elapsed = perf() - t0
            if status == 202:
                ok += 1
                latencies.append(elapsed)
            else:
                errors[f"HTTP {status}"] += 1
                if len(samples) < 5:
                    samples.append(f"HTTP {status}: {body[:300]!r}")

    cpu0, srv0, procs0, busy0 = time.process_time(), _tree_cpu(server_pid), _process_cpu(), _machine_busy()
    threads0 = _thread_cpu(server_pid)
    started = perf()
    deadline = started + duration
    await asyncio.gather(*(drive(c) for c in conns))
    seconds = perf() - started
    threads1 = _thread_cpu(server_pid)
    cpu1, srv1, procs1, busy1 = time.process_time(), _tree_cpu(server_pid), _process_cpu(), _machine_busy()
    deltas = _cpu_deltas(procs0, procs1)
    ours = {os.getpid(), *_tree_pids(server_pid)}
    services = sum(d for pid, d in deltas.items() if _is_service(procs1[pid][0]))
    others = sorted(
        (
            (d, procs1[pid][0])
            for pid, d in deltas.items()
            if pid not in ours and not _is_service(procs1[pid][0])
        ),
        reverse=True,
    )
    spread = connections_per_worker(server_pid, port)
    for c in conns:
        await c.close()
    if httpx_client is not None:
        await httpx_client.aclose()
    return PhaseResult(
        target=target,
        seconds=seconds,
        ok=ok,
        errors=errors,
        latencies=latencies,
        client_cpu=cpu1 - cpu0,
        server_cpu=sum(srv1) - sum(srv0),
        server_sys=srv1[1] - srv0[1],
        server_threads=_thread_deltas(threads0, threads1),
        services_cpu=services,
        busiest_others=[f"{name} {d:.1f}s" for d, name in others[:3] if d >= 0.5],
        machine_busy=busy1 - busy0,
        error_samples=samples,
        connections=spread,
    )


# --------------------------------------------------------------------------------------------------------
# Servers and their state
# --------------------------------------------------------------------------------------------------------


def wait_for_quiet(threshold_pct: float, max_wait: float) -> None:
    """Wait (at most ``max_wait`` s) until the machine is below ``threshold_pct`` busy over one second."""
    import psutil

    if threshold_pct <= 0:
        return
    deadline = time.monotonic() + max_wait
    busy = psutil.cpu_percent(interval=1.0)
    waited = 1.0
    while busy > threshold_pct and time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=1.0)
        waited += 1.0
    if waited > 1.0:
        state = "quiet" if busy <= threshold_pct else "still busy, going on"
        print(f"  waited {waited:.0f}s for other processes ({busy:.0f}% busy, {state})")


def free_port() -> int:
    """An unused TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def uvicorn_options(args: argparse.Namespace) -> list[str]:
    """The uvicorn options both servers get, identically."""
    opts = ["--host", "127.0.0.1", "--workers", str(args.workers), "--loop", args.loop, "--http", args.http]
    opts += ["--log-level", "info"]
    if not args.access_log:
        opts.append("--no-access-log")
    return opts


@dataclass
class Server:
    """A uvicorn subprocess in its own session (so the whole tree can be signalled)."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    workers: int

    def log(self) -> str:
        """Its output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_ready(self, path: str, timeout: float = 90.0) -> None:
        """Wait until every worker finished startup and ``path`` answers 200."""
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} server exited:\n{self.log()[-4000:]}")
            if self.log().count("Application startup complete") >= self.workers:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=5).status_code == 200:
                        return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} server not ready in {timeout:.0f}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        """SIGINT the process group (py-spy writes its profile on SIGINT), then SIGTERM, then SIGKILL."""
        for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)


def start_server(
    name: str,
    app: str,
    args: argparse.Namespace,
    env: dict[str, str],
    log_dir: Path,
    profile: str | None = None,
) -> Server:
    """Start ``uvicorn APP`` with the shared options; optionally under ``py-spy record``."""
    port = free_port()
    cmd = [str(BIN / "uvicorn"), app, "--port", str(port), *uvicorn_options(args)]
    if profile:
        fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(Path(profile).suffix, "raw")
        spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
        if spy is None:
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install py-spy")
        cmd = [spy, "record", "-o", profile, "-f", fmt, "-r", str(args.profile_rate), "--subprocesses"]
        cmd += ["--idle"] if args.profile_idle else []
        cmd += ["--gil"] if args.profile_gil else []
        cmd += ["--", str(BIN / "uvicorn"), app, "--port", str(port), *uvicorn_options(args)]
    log_path = log_dir / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    return Server(name=name, port=port, proc=proc, log_path=log_path, workers=args.workers)


def recreate_database(url: str) -> None:
    """Drop and create the benchmark database, then migrate it to the newest schema."""
    import psycopg
    from sqlalchemy.engine import make_url

    from moderation.cli import migrate

    parsed = make_url(url)
    admin = parsed.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{parsed.database}"')
    migrate(url)


def drop_database(url: str) -> None:
    """Drop the benchmark database."""
    import psycopg
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    admin = parsed.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)')


def claim_redis_db(url: str) -> None:
    """Flush the benchmark's Redis database, refusing if it holds keys this benchmark did not write."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        if client.dbsize() and not client.exists(OWNER_KEY):
            raise SystemExit(f"{url} is not empty and not this benchmark's; pick another with --redis-url")
        client.flushdb()
        client.set(OWNER_KEY, "bench/intake.py")
    finally:
        client.close()


def flush_redis_db(url: str) -> tuple[int, int]:
    """Flush the benchmark's Redis database; first counts the queued GPU jobs and the submissions they name."""
    import base64

    import redis

    client = redis.Redis.from_url(url)
    try:
        messages = client.lrange("gpu", 0, -1)
        named = 0
        for raw in messages:
            args, _, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
            named += len(args)
        client.flushdb()
        return len(messages), named
    finally:
        client.close()


def count_submissions(url: str) -> int:
    """Rows in the benchmark database's submissions table."""
    import psycopg
    from sqlalchemy.engine import make_url

    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM submissions").fetchone()
        return int(row[0]) if row else 0


# --------------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def summarise(results: Sequence[PhaseResult]) -> dict[str, Any]:
    """Totals of one target's measured phases."""
    ok = sum(r.ok for r in results)
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    seconds = sum(r.seconds for r in results)
    lat = [x for r in results for x in r.latencies]
    requests = ok + sum(errors.values())
    per_req = max(1, requests)
    return {
        "requests": requests,
        "accepted": ok,
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "error_samples": [s for r in results for s in r.error_samples][:5],
        "seconds": round(seconds, 3),
        "submissions_per_s": round(ok / seconds, 1) if seconds else 0.0,
        "p50_ms": round(percentile(lat, 50) * 1000, 2),
        "p99_ms": round(percentile(lat, 99) * 1000, 2),
        "mean_ms": round(statistics.fmean(lat) * 1000, 2) if lat else float("nan"),
        "max_ms": round(max(lat) * 1000, 2) if lat else float("nan"),
        "client_cpu_ms_per_req": round(sum(r.client_cpu for r in results) * 1000 / per_req, 3),
        "server_cpu_ms_per_req": round(sum(r.server_cpu for r in results) * 1000 / per_req, 3),
        "server_sys_cpu_ms_per_req": round(sum(r.server_sys for r in results) * 1000 / per_req, 3),
        "server_thread_cpu_ms_per_req": {
            role: round(sum(r.server_threads.get(role, 0.0) for r in results) * 1000 / per_req, 3)
            for role in sorted({role for r in results for role in r.server_threads})
        },
        "pg_redis_cpu_ms_per_req": round(sum(r.services_cpu for r in results) * 1000 / per_req, 3),
        "other_processes_cpu_pct": round(
            100
            * sum(r.machine_busy - r.client_cpu - r.server_cpu - r.services_cpu for r in results)
            / (seconds * (os.cpu_count() or 1)),
            1,
        )
        if seconds
        else 0.0,
        "per_round": [
            {
                "submissions_per_s": round(r.ok / r.seconds, 1) if r.seconds else 0.0,
                "p99_ms": round(percentile(r.latencies, 99) * 1000, 2),
                "connections_per_process": r.connections,
                "busiest_other_processes": r.busiest_others,
            }
            for r in results
        ],
        "machine_busy_pct": round(
            100 * sum(r.machine_busy for r in results) / (seconds * (os.cpu_count() or 1)), 1
        )
        if seconds
        else 0.0,
    }


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The results as a Markdown table."""
    cols = [
        ("target", "target"),
        ("requests", "requests"),
        ("errors", "errors"),
        ("submissions/s", "submissions_per_s"),
        ("p50 ms", "p50_ms"),
        ("p99 ms", "p99_ms"),
        ("client CPU ms/req", "client_cpu_ms_per_req"),
        ("server CPU ms/req", "server_cpu_ms_per_req"),
        ("PG+Redis CPU ms/req", "pg_redis_cpu_ms_per_req"),
        ("machine busy %", "machine_busy_pct"),
        ("others' CPU %", "other_processes_cpu_pct"),
    ]
    rows = [[name] + [str(s[key]) for _, key in cols[1:]] for name, s in summary.items()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, (h, _) in enumerate(cols)]
    line = "| " + " | ".join(h.ljust(w) for (h, _), w in zip(cols, widths, strict=True)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| "
        + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        + " |"
        for r in rows
    ]
    return "\n".join([line, sep, *body])


# --------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--workers", type=int, default=1, help="uvicorn worker processes for both servers (default 1)"
    )
    p.add_argument(
        "--concurrency", type=int, default=16, help="concurrent keep-alive connections (default 16)"
    )
    p.add_argument(
        "--duration", type=float, default=20.0, help="measured seconds per target and round (default 20)"
    )
    p.add_argument(
        "--warmup", type=float, default=3.0, help="unmeasured seconds before each measurement (default 3)"
    )
    p.add_argument("--rounds", type=int, default=1, help="alternate bare/real this many times (default 1)")
    p.add_argument(
        "--max-requests", type=int, default=200_000, help="cap on requests per phase (default 200000)"
    )
    p.add_argument("--timeout", type=float, default=30.0, help="per-request timeout in seconds (default 30)")
    p.add_argument(
        "--quiet-below",
        type=float,
        default=25.0,
        help="before each target, wait until the machine is below this %% busy (0: don't wait)",
    )
    p.add_argument(
        "--quiet-max-wait", type=float, default=120.0, help="longest such wait in seconds (default 120)"
    )
    p.add_argument("--only", choices=["both", "real", "bare"], default="both", help="which targets to run")
    p.add_argument(
        "--client",
        choices=["raw", "httpx"],
        default="raw",
        help="raw: minimal asyncio HTTP/1.1 client (default); httpx: httpx.AsyncClient",
    )
    p.add_argument("--loop", default="uvloop", help="uvicorn --loop for both servers (default uvloop)")
    p.add_argument("--http", default="httptools", help="uvicorn --http for both servers (default httptools)")
    p.add_argument("--access-log", action="store_true", help="keep uvicorn's access log on (both servers)")
    p.add_argument(
        "--blob-fsync",
        choices=["default", "true", "false"],
        default="default",
        help="MODERATION_BLOB_FSYNC for the real server (default: the service's default, true)",
    )
    p.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="MODERATION_NAME=VALUE",
        help="a setting for the real server (repeatable), e.g. MODERATION_INTAKE_STORE_CONCURRENCY=4",
    )
    p.add_argument("--image-kb", type=float, default=140.0, help="target JPEG size in KB (default 140)")
    p.add_argument("--database-url", default=DEFAULT_DATABASE_URL, help="dropped and re-created by the run")
    p.add_argument(
        "--redis-url", default=DEFAULT_REDIS_URL, help="a Redis database index of its own; flushed"
    )
    p.add_argument("--keep-db", action="store_true", help="do not drop the benchmark database at the end")
    p.add_argument("--keep-work", action="store_true", help="keep the temp folder (server logs, blobs)")
    p.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    p.add_argument("--profile", help="run the real server under `py-spy record -o PATH` (.svg, .json or raw)")
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second (default 100)")
    p.add_argument("--profile-idle", action="store_true", help="py-spy --idle: include waiting threads")
    p.add_argument("--profile-gil", action="store_true", help="py-spy --gil: only threads holding the GIL")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    targets = ["bare", "real"] if args.only == "both" else [args.only]
    print(
        f"intake benchmark {time.strftime('%Y-%m-%d %H:%M %z')}: {platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}"
    )
    print(f"load average before start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    t0 = time.perf_counter()
    images = make_images(NUM_IMAGES, 1000, 750, int(args.image_kb * 1000))
    sizes = sorted(len(i) for i in images)
    print(
        f"images: {len(images)} distinct 1000x750 noisy JPEGs, {sizes[0] / 1000:.1f} / "
        f"{statistics.median(sizes) / 1000:.1f} / {sizes[-1] / 1000:.1f} KB (min/median/max), "
        f"plus a unique COM segment per request ({time.perf_counter() - t0:.1f}s to generate)"
    )

    work = Path(tempfile.mkdtemp(prefix="moderation-bench-intake-"))
    servers: dict[str, Server] = {}
    api_key: str | None = None
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
        env.update(
            {
                "MODERATION_DATABASE_URL": args.database_url,
                "MODERATION_REDIS_URL": args.redis_url,
                "MODERATION_DATA_DIR": str(work / "data"),
                "MODERATION_BLOB_DIR": str(work / "blobs"),
                "MODERATION_RATE_LIMIT_PER_MINUTE": "100000000",
                "MODERATION_RATE_LIMIT_BURST": "100000000",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if args.blob_fsync != "default":
            env["MODERATION_BLOB_FSYNC"] = args.blob_fsync
        for setting in args.server_env:
            name, sep, value = setting.partition("=")
            if not sep or not name.startswith("MODERATION_"):
                raise SystemExit(f"--server-env wants MODERATION_NAME=VALUE, not {setting!r}")
            env[name] = value
        if "real" in targets:
            recreate_database(args.database_url)
            claim_redis_db(args.redis_url)
            out = subprocess.run(
                [str(BIN / "moderation"), "tenants", "create", "bench", "--json"],
                env=env,
                cwd=ROOT,
                check=True,
                capture_output=True,
                text=True,
            )
            api_key = str(json.loads(out.stdout)["api_key"])
            servers["real"] = start_server("real", "api.main:app", args, env, work, profile=args.profile)
        if "bare" in targets:
            servers["bare"] = start_server("bare", "bench.intake:bare_app", args, env, work)
        for name, server in servers.items():
            server.wait_ready("/readyz" if name == "real" else "/healthz")
        opts = " ".join(uvicorn_options(args))
        print(f"servers: uvicorn {opts} (identical for both); logs in {work}")
        print(
            f"load: {args.concurrency} connections, {args.client} client in this process (pid {os.getpid()}), "
            f"{args.warmup:g}s warm-up + {args.duration:g}s measured per target and round, {args.rounds} round(s)"
        )
        print(
            "note: the client shares this machine's CPUs with the servers, Postgres and Redis; its own CPU "
            "cost per request is in the table (the bare row shows how fast this client can drive a server)."
        )

        counter = [0]
        results: dict[str, list[PhaseResult]] = {t: [] for t in targets}
        runner = _event_loop_runner()
        with runner:
            for rnd in range(args.rounds):
                for target in targets:
                    server = servers[target]
                    payloads = Payloads(
                        images, "127.0.0.1", server.port, api_key if target == "real" else None
                    )
                    common: dict[str, Any] = {
                        "host": "127.0.0.1",
                        "port": server.port,
                        "payloads": payloads,
                        "counter": counter,
                        "concurrency": args.concurrency,
                        "max_requests": args.max_requests,
                        "timeout": args.timeout,
                        "client_kind": args.client,
                        "server_pid": server.proc.pid,
                        "workers": args.workers,
                    }
                    wait_for_quiet(args.quiet_below, args.quiet_max_wait)
                    if args.warmup > 0:
                        warm = runner.run(run_phase(target, duration=args.warmup, **common))
                        print(
                            f"  round {rnd + 1} {target}: warm-up {warm.ok} accepted, "
                            f"{sum(warm.errors.values())} errors"
                        )
                    res = runner.run(run_phase(target, duration=args.duration, **common))
                    results[target].append(res)
                    print(
                        f"  round {rnd + 1} {target}: {res.ok} accepted in {res.seconds:.1f}s "
                        f"({res.ok / res.seconds:.0f}/s), {sum(res.errors.values())} errors, "
                        f"connections per server process: {res.connections}"
                    )
                    if res.busiest_others:
                        print(
                            f"    busiest other processes meanwhile (CPU s): {', '.join(res.busiest_others)}"
                        )
                    for sample in res.error_samples:
                        print(f"    error: {sample}")

        summary = {t: summarise(results[t]) for t in targets}
        print()
        print(format_table(summary))
        print()
        for name, s in summary.items():
            print(
                f"{name}: server CPU {s['server_cpu_ms_per_req']} ms/req, of it kernel (sys) "
                f"{s['server_sys_cpu_ms_per_req']} ms; mean latency {s['mean_ms']} ms, max {s['max_ms']} ms; "
                f"everything else on the machine (kernel softirq, other users' processes): "
                f"{s['other_processes_cpu_pct']}% of all CPUs"
            )
            by_thread = ", ".join(f"{role} {ms} ms" for role, ms in s["server_thread_cpu_ms_per_req"].items())
            print(f"{name}: server CPU per request by thread: {by_thread}")
        print()
        verdicts: dict[str, Any] = {}
        if "real" in summary and "bare" in summary:
            real, bare = summary["real"], summary["bare"]
            ratio = (
                real["submissions_per_s"] / bare["submissions_per_s"] if bare["submissions_per_s"] else 0.0
            )
            rate_ok = ratio >= TARGET_RATIO
            p99_ok = real["p99_ms"] <= TARGET_P99_MS
            verdicts = {
                "ratio_real_bare": round(ratio, 3),
                "rate_target": "PASS" if rate_ok else "FAIL",
                "p99_target": "PASS" if p99_ok else "FAIL",
            }
            print(
                f"ratio real/bare: {ratio:.3f} ({real['submissions_per_s']} / {bare['submissions_per_s']} per s)"
            )
            # Each round runs bare then real back to back: its ratio shows how much the machine drifted.
            per_round = [
                r["submissions_per_s"] / b["submissions_per_s"]
                for r, b in zip(real["per_round"], bare["per_round"], strict=True)
                if b["submissions_per_s"]
            ]
            if len(per_round) > 1:
                verdicts["ratio_per_round"] = [round(x, 3) for x in per_round]
                print(f"ratio per round: {', '.join(f'{x:.3f}' for x in per_round)}")
            print(
                f"target: at least {TARGET_RATIO:.0%} of the bare endpoint's rate ... "
                f"{'PASS' if rate_ok else 'FAIL'} ({ratio:.1%})"
            )
            print(
                f"target: p99 at most {TARGET_P99_MS:.0f} ms .................. "
                f"{'PASS' if p99_ok else 'FAIL'} ({real['p99_ms']} ms)"
            )
        elif "real" in summary:
            p99_ok = summary["real"]["p99_ms"] <= TARGET_P99_MS
            verdicts = {"p99_target": "PASS" if p99_ok else "FAIL"}
            print(f"target: p99 at most {TARGET_P99_MS:.0f} ms: {'PASS' if p99_ok else 'FAIL'}")

        if "real" in servers:
            rows = count_submissions(args.database_url)
            print(f"check: {rows} submissions in {args.database_url.rsplit('/', 1)[1]} (warm-up included)")
            summary["real"]["db_rows"] = rows

        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            report = {
                "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "command": " ".join([_python_name(), *sys.argv]),
                "machine": {
                    "host": platform.node(),
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                },
                "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                "uvicorn": uvicorn_options(args),
                "image_bytes": {"min": sizes[0], "median": statistics.median(sizes), "max": sizes[-1]},
                "targets": {"ratio_min": TARGET_RATIO, "p99_max_ms": TARGET_P99_MS, **verdicts},
                "results": summary,
            }
            args.json_out.write_text(json.dumps(report, indent=2) + "\n")
            print(f"wrote {args.json_out}")
    finally:
        for server in servers.values():
            server.stop()
        if "real" in targets:
            with contextlib.suppress(Exception):
                queued, named = flush_redis_db(args.redis_url)
                print(
                    f"check: {queued} GPU jobs naming {named} submissions were queued in Redis "
                    f"({args.redis_url}); flushed"
                )
            if not args.keep_db:
                with contextlib.suppress(Exception):
                    drop_database(args.database_url)
        if args.profile:
            print(f"profile: {args.profile}")
        if args.keep_work:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _python_name() -> str:
    exe = Path(sys.executable)
    return os.path.relpath(exe, ROOT) if exe.is_relative_to(ROOT) else str(exe)


def _event_loop_runner() -> asyncio.Runner:
    factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        factory = uvloop.new_event_loop
    return asyncio.Runner(loop_factory=factory)


if __name__ == "__main__":
    sys.exit(main())
