"""Server processes for the chat-throughput benchmark, each started as its own subprocess on a
free loopback port: the mock model server, Parley (web processes under daphne, uvicorn or granian,
plus generation workers), and LiteLLM's proxy from the benchmark's own virtual environment.

Parley's processes run with production settings against the bench database and the bench Redis
database, as ``tests/chat/live.py`` runs daphne against the test database (a ``DATABASE_URL``
naming it).
Every process dies with the test process (PR_SET_PDEATHSIG) and logs to var/bench/logs/.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
from django.conf import settings

from tests.chat.live import _die_with_parent, free_port, test_database_url

BASE_DIR = Path(settings.BASE_DIR)
LOG_DIRECTORY = BASE_DIR / "var" / "bench" / "logs"
BIN = Path(sys.executable).parent
BENCH_VENV = BASE_DIR / "var" / "bench-venv"
# LiteLLM and py-spy live in a virtualenv of their own: neither is a dependency of Parley.
BENCH_VENV_PACKAGES = (("litellm", "litellm[proxy]"), ("py-spy", "py-spy"))
BENCH_VENV_INSTALL_TIMEOUT_SECONDS = 900
STARTUP_TIMEOUT_SECONDS = 90  # LiteLLM's proxy takes ~25 s to start on a quiet 2-core machine
MOCK_MODEL = "mock-model"
LITELLM_WORKERS = 2
# The last line of a traceback, "package.module.SomeError: what happened", as printed or inside a
# JSON log line (where it ends at an escaped newline or the closing quote).
_EXCEPTION_LINE = re.compile(
    r"(?:^|\\n|\s)(?P<type>[A-Za-z_][\w.]*(?:Error|Exception|Timeout)): (?P<message>[^\n\\\"]*)", re.MULTILINE
)


@dataclass
class ServerGroup:
    """One system under test: its processes and the URLs that serve it (one per daphne process,
    one shared port for servers that run their own workers)."""

    name: str
    urls: list[str]
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def root_pids(self) -> list[int]:
        return [process.pid for process in self.processes]

    def pids(self) -> list[int]:
        """Every live process of the group, forked workers included."""
        pids = []
        for process in self.processes:
            try:
                parent = psutil.Process(process.pid)
                pids += [parent.pid, *(child.pid for child in parent.children(recursive=True))]
            except psutil.NoSuchProcess:
                continue
        return pids

    def errors(self, *, top: int = 3) -> list[tuple[str, int]]:
        """The most frequent exceptions in the group's logs: why some answers failed."""
        counts: Counter[str] = Counter()
        for log in self.logs:
            for match in _EXCEPTION_LINE.finditer(log.read_text(errors="replace")):
                message = match["message"]
                counts[f"{match['type']}: {message if len(message) <= 120 else '…' + message[-100:]}"] += 1
        return counts.most_common(top)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def _spawn(
    name: str, argv: Sequence[str], *, env: dict[str, str], cwd: Path = BASE_DIR
) -> tuple[subprocess.Popen, Path]:
    LOG_DIRECTORY.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIRECTORY / f"{name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            list(argv), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent
        )
    return process, log_path


def _wait_until(is_ready: Callable[[], bool], group: ServerGroup, what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if any(process.poll() is not None for process in group.processes):
            break
        if is_ready():
            return
        time.sleep(0.2)
    group.stop()
    raise RuntimeError(f"{group.name} did not start ({what}); see {', '.join(map(str, group.logs))}")


def _answers(url: str, headers: dict[str, str] | None = None) -> Callable[[], bool]:
    def is_ready() -> bool:
        try:
            return httpx.get(url, timeout=1, headers=headers).status_code < 500
        except httpx.HTTPError:
            return False

    return is_ready


# --- the mock model ----------------------------------------------------------------------------


def mock_start(
    *, workers: int, ttft_ms: float = 0.0, tokens_per_second: float = 0.0, answer_tokens: int | None = None
) -> ServerGroup:
    """``python -m chat.mock_server``, 20-token answers (its default) unless ``answer_tokens``; no
    delay unless ``ttft_ms``, no pacing unless ``tokens_per_second``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process, log = _spawn(
        "mock",
        [
            sys.executable,
            *("-m", "chat.mock_server", "--port", str(port), "--workers", str(workers)),
            *("--ttft-ms", str(ttft_ms), "--tokens-per-second", str(tokens_per_second)),
            *(("--answer-tokens", str(answer_tokens)) if answer_tokens else ()),
        ],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    group = ServerGroup(name="mock", urls=[url], processes=[process], logs=[log])
    _wait_until(_answers(f"{url}/health"), group, "GET /health")
    return group


def mock_route(mock: ServerGroup) -> dict:
    """A bot's provider route to the mock, through the lean aiohttp client."""
    return {
        "targets": [
            {
                "kind": "openai",
                "name": "mock",
                "base_url": f"{mock.urls[0]}/v1",
                "model": MOCK_MODEL,
                "client": "aiohttp",
            }
        ]
    }


# --- Parley ------------------------------------------------------------------------------------


def parley_environment() -> dict[str, str]:
    """Production settings (a connection pool per process, JSON request logs at INFO, no debug),
    pointed at the bench database and the bench Redis database. The secret key and API-key pepper
    are this process's, so that the keys the benchmark creates here verify there."""
    return {
        **os.environ,
        "PARLEY_ENV": "production",
        "DJANGO_SECRET_KEY": settings.SECRET_KEY,
        "PARLEY_API_KEY_PEPPER": settings.PARLEY_API_KEY_PEPPER,
        # The mock model runs on loopback: allowed the way an operator allows a self-hosted server.
        "PARLEY_OUTBOUND_ALLOWLIST": "127.0.0.0/8,::1/128,localhost",
        "DATABASE_URL": test_database_url(),
        "REDIS_URL": settings.REDIS_URL,
        "PYTHONUNBUFFERED": "1",
    }


def web_server_installed(server: str) -> bool:
    return (BIN / server).exists()


def _web_command(server: str, port: int, workers: int) -> list[str]:
    if server == "daphne":  # one process per port: daphne has no worker processes of its own
        return [str(BIN / "daphne"), "-b", "127.0.0.1", "-p", str(port), "config.asgi:application"]
    if server == "uvicorn":
        return [
            str(BIN / "uvicorn"),
            "config.asgi:application",
            "--host=127.0.0.1",
            f"--port={port}",
            f"--workers={workers}",
            "--loop=uvloop",
            "--http=httptools",
            "--lifespan=off",  # Django's ASGI handler does not speak the lifespan protocol
            "--no-access-log",
            "--log-level=warning",
        ]
    if server == "granian":
        return [
            str(BIN / "granian"),
            "--interface=asginl",  # ASGI without lifespan, which Django does not speak
            "--host=127.0.0.1",
            f"--port={port}",
            f"--workers={workers}",
            "--loop=uvloop",
            "--no-access-log",
            "--log-level=warning",
            "config.asgi:application",
        ]
    raise ValueError(server)


def parley_web_start(server: str, *, workers: int, environment: dict[str, str]) -> ServerGroup:
    """``workers`` web processes of Parley's ASGI app under ``server`` (daphne, uvicorn, granian)."""
    group = ServerGroup(name=f"parley-{server}", urls=[])
    for index in range(workers if server == "daphne" else 1):
        port = free_port()
        process, log = _spawn(f"parley-{server}-{index}", _web_command(server, port, workers), env=environment)
        group.processes.append(process)
        group.logs.append(log)
        group.urls.append(f"http://127.0.0.1:{port}")

    def all_answer() -> bool:
        # With its own workers, a server answers once any worker is up; wait for the rest a little.
        return all(_answers(f"{url}/healthz")() for url in group.urls)

    _wait_until(all_answer, group, "GET /healthz")
    if server != "daphne" and workers > 1:  # one worker: the server's own process serves
        _wait_for_workers(group, workers)
    return group


def _wait_for_workers(group: ServerGroup, workers: int) -> None:
    """Until ``workers`` worker processes exist and have had time to import Django."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline and len(group.pids()) < workers + 1:
        time.sleep(0.2)
    time.sleep(3)  # each worker imports the app on start; its first requests would pay for it


def generators_start(*, processes: int, environment: dict[str, str], concurrency: int | None = None) -> ServerGroup:
    """``manage.py run_generators`` processes (one consumer group shares the jobs out)."""
    group = ServerGroup(name="parley-generators", urls=[])
    extra = ["--concurrency", str(concurrency)] if concurrency else []
    for index in range(processes):
        process, log = _spawn(
            f"parley-generators-{index}", [sys.executable, "manage.py", "run_generators", *extra], env=environment
        )
        group.processes.append(process)
        group.logs.append(log)

    def all_ready() -> bool:
        return all(b"ready" in log.read_bytes() for log in group.logs)

    _wait_until(all_ready, group, "'generation worker … ready' in its log")
    return group


FLUSHER = (
    "import time, django; django.setup();"
    "from chat.memory.persistence import messages_flush\n"
    "while True:\n    messages_flush(max_batches=10); time.sleep(1)"
)


def flusher_start(*, environment: dict[str, str]) -> ServerGroup:
    """What Celery beat's ``messages_flush_task`` does in production, about every second, as one
    process: batched persistence of the turns' messages is part of the work being measured."""
    process, log = _spawn("parley-flusher", [sys.executable, "-c", FLUSHER], env=environment)
    return ServerGroup(name="parley-flusher", urls=[], processes=[process], logs=[log])


# --- LiteLLM -----------------------------------------------------------------------------------


def bench_venv_ensure() -> dict[str, Path | str]:
    """The benchmark's own virtualenv with LiteLLM's proxy and py-spy, created when missing.

    Returns each tool's executable, or why it is missing (a string). The install is slow (~2 min)
    and happens once; a failed one is retried on the next run.
    """
    python = BENCH_VENV / "bin" / "python"
    if not python.exists():
        base = getattr(sys, "_base_executable", sys.executable)
        result = subprocess.run([base, "-m", "venv", str(BENCH_VENV)], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            return {tool: f"python -m venv failed: {result.stderr.strip()[-300:]}" for tool, _ in BENCH_VENV_PACKAGES}
    tools: dict[str, Path | str] = {}
    for tool, requirement in BENCH_VENV_PACKAGES:
        executable = BENCH_VENV / "bin" / tool
        if not executable.exists():
            print(f"\nInstalling {requirement} into {BENCH_VENV} (once)…", flush=True)
            try:
                result = subprocess.run(
                    [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement],
                    capture_output=True,
                    text=True,
                    timeout=BENCH_VENV_INSTALL_TIMEOUT_SECONDS,
                    check=False,
                )
                failure = result.stderr.strip()[-500:] if result.returncode != 0 else ""
            except subprocess.TimeoutExpired:
                failure = f"pip install took over {BENCH_VENV_INSTALL_TIMEOUT_SECONDS} s"
            if not executable.exists():
                tools[tool] = f"pip install {requirement!r} failed: {failure or 'no executable installed'}"
                continue
        tools[tool] = executable
    return tools


def bench_venv_version(package: str) -> str:
    result = subprocess.run(
        [
            str(BENCH_VENV / "bin" / "python"),
            "-c",
            f"from importlib.metadata import version; print(version({package!r}))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or "?"


def litellm_spawn(executable: Path, *, mock_url: str) -> tuple[ServerGroup, str]:
    """LiteLLM's proxy in front of the mock, ``LITELLM_WORKERS`` processes, a master key (it
    refuses to start without one), no database. Returns at once (it takes ~25 s to start: see
    :func:`litellm_wait`) with the group and the key to send."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    master_key = f"sk-bench-{secrets.token_hex(16)}"
    LOG_DIRECTORY.mkdir(parents=True, exist_ok=True)
    config = LOG_DIRECTORY / "litellm-config.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MOCK_MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MOCK_MODEL}\n"
        f"      api_base: {mock_url}/v1\n"
        "      api_key: mock-key\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {master_key}\n"
    )
    environment = {
        key: value for key, value in os.environ.items() if not key.startswith(("DJANGO_", "PARLEY_", "DATABASE_"))
    }
    environment |= {"LITELLM_LOG": "ERROR", "PYTHONUNBUFFERED": "1", "DISABLE_SCHEMA_UPDATE": "true"}
    process, log = _spawn(
        "litellm",
        [
            str(executable),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            str(LITELLM_WORKERS),
        ],
        env=environment,
        cwd=LOG_DIRECTORY,
    )
    return ServerGroup(name="litellm", urls=[url], processes=[process], logs=[log]), master_key


def litellm_wait(group: ServerGroup, *, workers: int) -> None:
    _wait_until(_answers(f"{group.urls[0]}/health/liveliness"), group, "GET /health/liveliness")
    _wait_for_workers(group, workers)
