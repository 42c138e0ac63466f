"""Embedded development services: PostgreSQL 16 + pgvector (pgserver) and a local redis-server.

Used only when ``DATABASE_URL`` / ``REDIS_URL`` are unset, so that a fresh clone runs with no
pre-provisioned servers. Both helpers are idempotent and safe to call from several processes at
once (the web server, Celery worker and beat all attach to the same instances): pgserver keeps
its own inter-process handle list, and the Redis helper serialises start-up with a file lock.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import fasteners

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("PARLEY_VAR_DIR", BASE_DIR / "var"))


@dataclass(frozen=True)
class EmbeddedPostgres:
    host: str  # the Unix socket directory
    user: str
    name: str


def ensure_postgres(*, keep_running: bool = False) -> EmbeddedPostgres:
    """Start (or attach to) the embedded PostgreSQL under ``var/pgdata``.

    pgserver stops the server when the last attached process exits, unless ``keep_running``.
    """
    import pgserver  # heavy import, only when the embedded default is used

    VAR_DIR.mkdir(parents=True, exist_ok=True)
    server = pgserver.get_server(VAR_DIR / "pgdata", cleanup_mode=None if keep_running else "stop")
    info = server.get_postmaster_info()
    return EmbeddedPostgres(host=str(info.socket_dir), user="postgres", name="postgres")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _redis_alive(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _stop_redis(port: int) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(b"SHUTDOWN NOSAVE\r\n")
            sock.recv(16)
    except OSError:
        pass


def ensure_redis() -> str:
    """Return the URL of the embedded redis-server, starting it on a free loopback port if needed.

    The process that starts it stops it when it exits; processes that merely attach leave it be.
    """
    redis_dir = VAR_DIR / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port_file = redis_dir / "port"
    with fasteners.InterProcessLock(str(redis_dir / ".lock")):
        if port_file.exists():
            port = int(port_file.read_text().strip() or 0)
            if port and _redis_alive(port):
                return f"redis://127.0.0.1:{port}/0"
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "REDIS_URL is unset and no redis-server is on the PATH: "
                "install it (apt-get install redis-server) or set REDIS_URL."
            )
        port = _free_port()
        subprocess.run(
            [
                binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "yes",
                "--dir",
                str(redis_dir),
                "--pidfile",
                str(redis_dir / "redis.pid"),
                "--logfile",
                str(redis_dir / "redis.log"),
                "--maxclients",
                "20000",
            ],
            check=True,
        )
        deadline = time.monotonic() + 10
        while not _redis_alive(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"embedded redis-server did not start; see {redis_dir / 'redis.log'}")
            time.sleep(0.05)
        port_file.write_text(str(port))
        if not os.environ.get("PARLEY_KEEP_EMBEDDED"):
            atexit.register(_stop_redis, port)
        return f"redis://127.0.0.1:{port}/0"
