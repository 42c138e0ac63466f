"""Load for the chat-throughput benchmark: closed-loop HTTP clients, time to first token, and CPU.

* :func:`wrk_run` drives a fixed number of keep-alive connections with ``wrk`` (Debian's
  package; C, so the client takes little of a 2-core machine) for a fixed time. A Lua script
  checks every body — a streamed answer that ends in an error event still has status 200 — and
  spreads wrk's threads over several ports where the system under test has one port per process.
* :func:`aiohttp_run` does the same with aiohttp in a subprocess when wrk is not installed.
* :func:`ttft_probe` sends streamed requests one at a time, interleaving the targets, and times
  the first chunk carrying answer text (not the role chunk that servers send before it).
* :class:`CpuMeter` reads the CPU time of process trees and of the whole machine around a run.

No Django here: the aiohttp driver runs this file as a script.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import psutil

WRK_TIMEOUT_SECONDS = 30
ANSWER_MARKER = "fox"  # a word of the mock's answer: the answer went through, not only a status
_WRK_RESULT = re.compile(r"^WRK_RESULT (\{.*\})$", re.MULTILINE)


@dataclass(frozen=True)
class Target:
    """Where to send a chat completion: one URL per process, or one URL for all of them."""

    name: str
    urls: Sequence[str]
    headers: dict[str, str]
    path: str = "/v1/chat/completions"


@dataclass(frozen=True)
class LoadResult:
    """One closed-loop run: ``warmup_s`` of load first, then ``measured_s`` whose completions count.

    A system that shares itself among its clients (every answer progressing at once) completes
    its first answers only after about clients / throughput seconds: counted from the start, a
    short run would read as a slow one. Throughput is therefore counted over the measured window
    only; latency percentiles cover every response of the run (wrk keeps one histogram).
    """

    valid: int  # in the measured window: 200, the answer's text, its end marker, no error
    invalid: int  # in the measured window: any other response, plus socket errors and timeouts
    measured_s: float
    warmup_s: float
    latency_s: dict[str, float]  # p50, p90, p99, max, mean of every completed response
    driver: str
    driver_cpu_s: float

    @property
    def requests_per_second(self) -> float:
        return self.valid / self.measured_s if self.measured_s else 0.0


def request_body(*, stream: bool, model: str) -> str:
    """A short exchange, as an OpenAI client sends it: a system prompt and a user question."""
    return json.dumps(
        {
            "model": model,
            "stream": stream,
            "messages": [
                {"role": "system", "content": "You are a concise support assistant."},
                {"role": "user", "content": "How long do refunds take?"},
            ],
        },
        separators=(",", ":"),
    )


def _is_valid_body(body: str, *, stream: bool) -> bool:
    terminal = "data: [DONE]" in body if stream else re.search(r'"finish_reason":\s*"stop"', body) is not None
    return terminal and ANSWER_MARKER in body and '"error"' not in body


# --- wrk ---------------------------------------------------------------------------------------

_WRK_SCRIPT = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clock_id, bench_timespec *tp);
]]
local timespec = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, timespec)  -- CLOCK_MONOTONIC
  return tonumber(timespec.tv_sec) + tonumber(timespec.tv_nsec) * 1e-9
end

local ports = {%(ports)s}
local threads = {}
local next_port = 1
wrk.method = "POST"
wrk.body = %(body)s
wrk.headers["Content-Type"] = "application/json"
%(headers)s

function setup(thread)
  if #ports > 0 then
    thread.addr = wrk.lookup("127.0.0.1", ports[next_port])[1]
    next_port = next_port %% #ports + 1
  end
  table.insert(threads, thread)
end

function init(args)
  window_start = now() + %(warmup)f
  valid = 0
  invalid = 0
end

function response(status, headers, body)
  if now() < window_start then
    return
  end
  local terminal
  if %(stream)s then
    terminal = body:find("data: [DONE]", 1, true)
  else
    terminal = body:find('"finish_reason":%%s*"stop"')
  end
  if status == 200 and terminal and body:find("%(marker)s", 1, true) and not body:find('"error"', 1, true) then
    valid = valid + 1
  else
    invalid = invalid + 1
  end
end

function done(summary, latency, requests)
  local valid, invalid = 0, 0
  for _, thread in ipairs(threads) do
    valid = valid + thread:get("valid")
    invalid = invalid + thread:get("invalid")
  end
  local errors = summary.errors
  io.write(string.format(
    'WRK_RESULT {"duration_us":%%d,"requests":%%d,"valid":%%d,"invalid":%%d,"socket_errors":%%d,' ..
    '"p50":%%d,"p90":%%d,"p99":%%d,"max":%%d,"mean":%%f}\\n',
    summary.duration, summary.requests, valid, invalid,
    errors.connect + errors.read + errors.write + errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def _lua_string(text: str) -> str:
    return json.dumps(text)  # JSON string escapes are valid Lua string escapes for ASCII text


def wrk_path() -> str:
    return shutil.which("wrk") or ""


def wrk_available() -> bool:
    return bool(wrk_path())


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _drive(argv: list[str], *, warmup_s: float, seconds: float, meter: CpuMeter | None) -> tuple[str, str, float]:
    """Run a load driver; ``meter`` (if any) runs over the measured window only, from the end of
    the warm-up to the driver's exit. Returns its stdout, stderr and CPU seconds."""
    cpu_before = _children_cpu_seconds()
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if meter is not None:
            time.sleep(warmup_s)
            with meter:
                stdout, stderr = process.communicate(timeout=seconds + WRK_TIMEOUT_SECONDS + 30)
        else:
            stdout, stderr = process.communicate(timeout=warmup_s + seconds + WRK_TIMEOUT_SECONDS + 30)
    except BaseException:
        process.kill()
        process.wait()
        raise
    return stdout, stderr, _children_cpu_seconds() - cpu_before


def wrk_run(
    target: Target,
    *,
    body: str,
    stream: bool,
    connections: int,
    warmup_s: float,
    measured_s: float,
    meter: CpuMeter | None = None,
    threads: int = 2,
) -> LoadResult:
    ports = [urlsplit(url).port for url in target.urls] if len(target.urls) > 1 else []
    headers = "\n".join(
        f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}" for name, value in target.headers.items()
    )
    script = _WRK_SCRIPT % {
        "ports": ", ".join(map(str, ports)),
        "body": _lua_string(body),
        "headers": headers,
        "stream": "true" if stream else "false",
        "marker": ANSWER_MARKER,
        "warmup": warmup_s,
    }
    seconds = math.ceil(warmup_s + measured_s)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as file:
        file.write(script)
    try:
        stdout, stderr, cpu = _drive(
            [
                wrk_path(),
                f"-t{min(threads, connections)}",
                f"-c{connections}",
                f"-d{seconds}s",
                f"--timeout={WRK_TIMEOUT_SECONDS}s",
                "-s",
                file.name,
                target.urls[0].rstrip("/") + target.path,
            ],
            warmup_s=warmup_s,
            seconds=seconds - warmup_s,
            meter=meter,
        )
    finally:
        Path(file.name).unlink()
    match = _WRK_RESULT.search(stdout)
    if match is None:
        raise RuntimeError(f"wrk failed on {target.name}: {stdout[-500:]} {stderr[-500:]}")
    raw = json.loads(match.group(1))
    scale = 1e-6
    return LoadResult(
        valid=raw["valid"],
        invalid=raw["invalid"] + raw["socket_errors"],
        measured_s=raw["duration_us"] * scale - warmup_s,
        warmup_s=warmup_s,
        latency_s={name: raw[name] * scale for name in ("p50", "p90", "p99", "max", "mean")},
        driver="wrk",
        driver_cpu_s=cpu,
    )


# --- aiohttp (when wrk is missing) -------------------------------------------------------------


def aiohttp_run(
    target: Target,
    *,
    body: str,
    stream: bool,
    connections: int,
    warmup_s: float,
    measured_s: float,
    meter: CpuMeter | None = None,
    threads: int = 2,
) -> LoadResult:
    """The same closed loop with aiohttp, in a subprocess (this file as a script)."""
    del threads  # one event loop; kept for the same signature as wrk_run
    stdout, stderr, cpu = _drive(
        [
            sys.executable,
            __file__,
            "--urls",
            ",".join(target.urls),
            "--path",
            target.path,
            "--headers",
            json.dumps(target.headers),
            "--body",
            body,
            "--connections",
            str(connections),
            "--warmup",
            str(warmup_s),
            "--seconds",
            str(measured_s),
            *(["--stream"] if stream else []),
        ],
        warmup_s=warmup_s,
        seconds=measured_s,
        meter=meter,
    )
    if not stdout.strip():
        raise RuntimeError(f"load driver failed on {target.name}: {stderr[-800:]}")
    raw = json.loads(stdout)
    return LoadResult(
        valid=raw["valid"],
        invalid=raw["invalid"],
        measured_s=raw["measured_s"],
        warmup_s=warmup_s,
        latency_s=raw["latency_s"],
        driver="aiohttp",
        driver_cpu_s=cpu,
    )


def _summary(samples: list[float]) -> dict[str, float]:
    if not samples:
        return dict.fromkeys(("p50", "p90", "p99", "max", "mean"), math.nan)
    ordered = sorted(samples)

    def rank(fraction: float) -> float:
        return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]

    return {
        "p50": rank(0.5),
        "p90": rank(0.9),
        "p99": rank(0.99),
        "max": ordered[-1],
        "mean": sum(ordered) / len(ordered),
    }


async def _closed_loop(arguments: argparse.Namespace) -> dict:
    import aiohttp

    urls = arguments.urls.split(",")
    headers = {"Content-Type": "application/json", **json.loads(arguments.headers)}
    latencies: list[float] = []
    counts = {"valid": 0, "invalid": 0}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=WRK_TIMEOUT_SECONDS)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        window_start = started + arguments.warmup
        deadline = window_start + arguments.seconds

        async def client(index: int) -> None:
            url = urls[index % len(urls)].rstrip("/") + arguments.path
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    async with session.post(url, data=arguments.body, headers=headers) as response:
                        text = await response.text()
                        is_valid = response.status == 200 and _is_valid_body(text, stream=arguments.stream)
                except (aiohttp.ClientError, TimeoutError):
                    is_valid = False
                finished = time.perf_counter()
                latencies.append(finished - sent)
                if window_start <= finished <= deadline:
                    counts["valid" if is_valid else "invalid"] += 1

        await asyncio.gather(*(client(index) for index in range(arguments.connections)))
    return {**counts, "measured_s": arguments.seconds, "latency_s": _summary(latencies)}


def _main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="closed-loop chat-completion load (the benchmark's wrk stand-in)")
    parser.add_argument("--urls", required=True)
    parser.add_argument("--path", required=True)
    parser.add_argument("--headers", default="{}")
    parser.add_argument("--body", required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--stream", action="store_true")
    print(json.dumps(asyncio.run(_closed_loop(parser.parse_args(argv)))))


# --- time to first token -----------------------------------------------------------------------


@dataclass
class TtftSamples:
    first_token_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    invalid: int = 0


def _first_text(line: bytes) -> bool:
    """Whether an SSE line is a chunk that carries answer text."""
    if not line.startswith(b"data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool((choices[0].get("delta") or {}).get("content"))


async def _ttft_rounds(
    targets: Sequence[Target], bodies: dict[str, str], rounds: int, warmup: int
) -> dict[str, TtftSamples]:
    import aiohttp

    samples = {target.name: TtftSamples() for target in targets}
    timeout = aiohttp.ClientTimeout(total=WRK_TIMEOUT_SECONDS)
    sessions = {target.name: aiohttp.ClientSession(timeout=timeout) for target in targets}
    try:
        for round_number in range(warmup + rounds):
            for target in targets:
                url = target.urls[round_number % len(target.urls)].rstrip("/") + target.path
                headers = {"Content-Type": "application/json", **target.headers}
                sent = time.perf_counter()
                first = None
                text = bytearray()
                async with sessions[target.name].post(url, data=bodies[target.name], headers=headers) as response:
                    async for line in response.content:
                        text += line
                        if first is None and _first_text(line):
                            first = time.perf_counter() - sent
                total = time.perf_counter() - sent
                if round_number < warmup:
                    continue
                if response.status != 200 or first is None or not _is_valid_body(text.decode(), stream=True):
                    samples[target.name].invalid += 1
                    continue
                samples[target.name].first_token_s.append(first)
                samples[target.name].total_s.append(total)
    finally:
        for session in sessions.values():
            await session.close()
    return samples


def ttft_probe(
    targets: Sequence[Target], *, bodies: dict[str, str], rounds: int, warmup: int = 10
) -> dict[str, TtftSamples]:
    """One streamed request at a time, target after target, ``rounds`` times (after ``warmup``);
    ``bodies`` by target name (each names its own model)."""
    return asyncio.run(_ttft_rounds(targets, bodies, rounds, warmup))


# --- CPU ---------------------------------------------------------------------------------------


def tree_cpu_seconds(root_pids: Sequence[int]) -> float:
    """CPU seconds of process trees: each root, its live descendants, and the descendants it has
    already reaped (a database backend that served one connection and exited)."""
    total = 0.0
    for pid in root_pids:
        try:
            root = psutil.Process(pid)
            times = root.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
            for child in root.children(recursive=True):
                try:
                    child_times = child.cpu_times()
                except psutil.NoSuchProcess:
                    continue
                total += child_times.user + child_times.system
        except psutil.NoSuchProcess:
            continue
    return total


def postgres_and_redis_pids() -> dict[str, list[int]]:
    """The database server (its postmaster) and Redis server processes on this machine: shared
    with anything else that runs meanwhile."""
    found: dict[str, list[int]] = {"postgres": [], "redis": []}
    for process in psutil.process_iter(["name", "ppid"]):
        name = process.info["name"] or ""
        if name.startswith("postgres"):
            try:
                parent_name = psutil.Process(process.info["ppid"]).name()
            except psutil.NoSuchProcess:
                parent_name = ""
            if not parent_name.startswith("postgres"):
                found["postgres"].append(process.pid)
        elif name.startswith("redis-server"):
            found["redis"].append(process.pid)
    return found


class CpuMeter:
    """CPU seconds used by named process trees (given by their roots), and the machine's busy
    fraction, over a run."""

    def __init__(self, groups: dict[str, Sequence[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}

    def __enter__(self) -> CpuMeter:
        self._before = {name: tree_cpu_seconds(pids) for name, pids in self.groups.items()}
        self._machine_before = psutil.cpu_times()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.elapsed_s = time.perf_counter() - self._started
        self.seconds = {name: tree_cpu_seconds(pids) - self._before[name] for name, pids in self.groups.items()}
        after = psutil.cpu_times()
        busy = sum(
            getattr(after, name) - getattr(self._machine_before, name)
            for name in ("user", "nice", "system", "irq", "softirq", "steal")
        )
        idle = (after.idle - self._machine_before.idle) + (after.iowait - self._machine_before.iowait)
        self.machine_busy_fraction = busy / (busy + idle) if busy + idle else math.nan


if __name__ == "__main__":
    _main()
