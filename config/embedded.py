"""Embedded development services: PostgreSQL 16 + pgvector (pgserver) and a local redis-server.

Used only when ``DATABASE_URL`` / ``REDIS_URL`` are unset, so that a fresh clone runs with no
pre-provisioned servers. Both helpers are idempotent and safe to call from several processes at
once (the web server, Celery worker and beat all attach to the same instances): pgserver keeps
its own inter-process handle list, and the Redis helper serialises start-up with a file lock.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import fasteners

# pgserver narrates every start and attach at INFO; only problems are worth a line.
logging.getLogger("pgserver").setLevel(logging.WARNING)

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
    # A process that detaches last stops the server (cleanup_mode "stop"); one starting at that very
    # moment sees pg_ctl fail. Starts are serialised, and a start that lost that race is retried.
    with fasteners.InterProcessLock(VAR_DIR / "pgserver.lock"):
        for attempt in range(5):
            try:
                server = pgserver.get_server(VAR_DIR / "pgdata", cleanup_mode=None if keep_running else "stop")
                break
            except subprocess.CalledProcessError:
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
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


def _alive_pids(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        alive.append(pid)
    return alive


def _read_handles(path: Path) -> list[int]:
    try:
        return [int(pid) for pid in json.loads(path.read_text())]
    except (FileNotFoundError, ValueError):
        return []


def _release_redis(redis_dir: Path, port: int) -> None:
    """At exit: drop this process's handle; the last process attached stops the server."""
    handles_file = redis_dir / "handles.json"
    with fasteners.InterProcessLock(str(redis_dir / ".lock")):
        remaining = [pid for pid in _alive_pids(_read_handles(handles_file)) if pid != os.getpid()]
        handles_file.write_text(json.dumps(remaining))
        if not remaining:
            _stop_redis(port)


def ensure_redis() -> str:
    """Return the URL of the embedded redis-server, starting it on a free loopback port if needed.

    Like pgserver, every process that uses it holds a handle (its pid in ``handles.json``); the
    last one to exit stops it, so ``make run`` and ``make test`` can share it safely.
    """
    redis_dir = VAR_DIR / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True)
    port_file = redis_dir / "port"
    handles_file = redis_dir / "handles.json"
    with fasteners.InterProcessLock(str(redis_dir / ".lock")):
        port = int(port_file.read_text().strip() or 0) if port_file.exists() else 0
        if not (port and _redis_alive(port)):
            port = _start_redis(redis_dir)
            port_file.write_text(str(port))
            handles: list[int] = []
        else:
            handles = _alive_pids(_read_handles(handles_file))
        if os.getpid() not in handles:
            handles.append(os.getpid())
            atexit.register(_release_redis, redis_dir, port)
        handles_file.write_text(json.dumps(handles))
    return f"redis://127.0.0.1:{port}/0"


def _start_redis(redis_dir: Path) -> int:
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
    return port
