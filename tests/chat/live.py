"""Real server processes for end-to-end tests: config.asgi served on free loopback ports by
uvicorn as production runs it (docker/entrypoint.sh) or by daphne (Channels' development server),
pointed at the test database and the test Redis."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
from django.conf import settings

BASE_DIR = Path(settings.BASE_DIR)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_database_url() -> str:
    db = settings.DATABASES["default"]
    host = db.get("HOST") or "localhost"
    host_part = quote(host, safe="") if host.startswith("/") else host
    port = f":{db['PORT']}" if db.get("PORT") else ""
    password = f":{quote(db['PASSWORD'], safe='')}" if db.get("PASSWORD") else ""
    return f"postgres://{db.get('USER') or 'postgres'}{password}@{host_part}{port}/{db['NAME']}"


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the test process dies (so a killed run leaves no server)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _command(server: str, port: int) -> list[str]:
    bin_directory = Path(sys.executable).parent
    if server == "daphne":
        return [str(bin_directory / "daphne"), "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"]
    if server == "uvicorn":  # production's flags (docker/entrypoint.sh), one worker
        return [
            str(bin_directory / "uvicorn"),
            *("--host", "127.0.0.1", "--port", str(port)),
            *("--loop", "uvloop", "--http", "httptools", "--no-access-log", "--lifespan", "off"),
            "config.asgi:application",
        ]
    raise ValueError(server)


class LiveServer:
    def __init__(self, server: str = "uvicorn") -> None:
        self.server = server
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environment = {
            **os.environ,
            "PARLEY_ENV": "test",
            "DATABASE_URL": test_database_url(),
            "REDIS_URL": settings.REDIS_URL,
            "PYTHONUNBUFFERED": "1",
        }
        self.log_path = BASE_DIR / "var" / "live" / f"{self.port}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            _command(server, self.port),
            cwd=BASE_DIR,
            env=environment,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"live {server} server on {self.port} did not start; see {self.log_path}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()
        if b"Traceback" not in self.log_path.read_bytes():
            self.log_path.unlink()  # keep only logs worth reading
