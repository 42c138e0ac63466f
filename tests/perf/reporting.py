"""What every benchmark reports: distributions, a printed table, JSON under var/bench/, and its
section of tests/perf/RESULTS.md (replaced in place, so the committed file shows the latest run).

Benchmarks report; they never assert on timings, which would flake on a busy machine.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings
from django.db import connection

from tenants.redis import get_redis

_NUMBER_OR_RANGE = re.compile(r"-?[\d,]+(\.\d+)?(-[\d,]+(\.\d+)?)?")
RESULTS_MARKDOWN = Path(__file__).with_name("RESULTS.md")
JSON_DIRECTORY = Path(settings.BASE_DIR) / "var" / "bench"
BENCH_COMMAND = "make bench"
_RESULTS_HEADER = """# Benchmark results

Written by the benchmarks in `tests/perf/` (`make bench`); each section is replaced by its
benchmark's latest run. Raw figures of the latest run are in `var/bench/<name>.json`.
Timings come from one machine, often shared with other work: compare runs on the same
machine, and read the load average next to them.
"""


@dataclass(frozen=True)
class Distribution:
    """Summary of timings in seconds; percentiles by nearest rank."""

    count: int
    p50: float
    p90: float
    p99: float
    max: float
    mean: float

    @classmethod
    def of(cls, samples: Sequence[float]) -> Distribution:
        ordered = sorted(samples)
        return cls(
            count=len(ordered),
            p50=percentile(ordered, 0.50),
            p90=percentile(ordered, 0.90),
            p99=percentile(ordered, 0.99),
            max=ordered[-1],
            mean=sum(ordered) / len(ordered),
        )

    def as_dict(self, *, unit: str) -> dict[str, float | int]:
        scale = {"s": 1.0, "ms": 1e3, "us": 1e6}[unit]
        return {name: value if name == "count" else round(value * scale, 3) for name, value in asdict(self).items()}


def percentile(ordered: Sequence[float], fraction: float) -> float:
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def format_duration(seconds: float, unit: str) -> str:
    if unit == "us":
        return f"{seconds * 1e6:.1f}"
    if unit == "ms":
        return f"{seconds * 1e3:.3f}"
    return f"{seconds:.3f}"


def _is_numeric(cell: str) -> bool:
    return _NUMBER_OR_RANGE.fullmatch(cell) is not None


def _numeric_columns(rows: Sequence[Sequence[Any]], width: int) -> list[bool]:
    return [all(_is_numeric(str(row[column])) for row in rows) for column in range(width)]


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(cell) for cell in row] for row in [headers, *rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(headers))]
    numeric = _numeric_columns(rows, len(headers))

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if is_numeric else cell.ljust(width)
            for cell, width, is_numeric in zip(row, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * width for width in widths), *(line(row) for row in cells[1:])])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    alignment = ["---:" if is_numeric else "---" for is_numeric in _numeric_columns(rows, len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(alignment) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_environment(config: pytest.Config) -> dict[str, Any]:
    """Where and how the figures were taken: enough to tell whether two runs are comparable."""
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        postgres_version = cursor.fetchone()[0]
    return {
        "date": datetime.now(tz=UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "load_average_1m": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "postgresql": postgres_version,
            "redis": get_redis().info("server")["redis_version"],
        },
        "command": BENCH_COMMAND,
        "invocation": "pytest " + " ".join(config.invocation_params.args),
        "database": settings.DATABASES["default"]["NAME"],
    }


def environment_markdown(environment: dict[str, Any]) -> str:
    machine = environment["machine"]
    return (
        f"- Date: {environment['date']}\n"
        f"- Machine: {machine['cores']} cores ({machine['cpu']}), load average {machine['load_average_1m']} "
        f"at start; {machine['platform']}; Python {machine['python']}; PostgreSQL {machine['postgresql']}; "
        f"Redis {machine['redis']}\n"
        f"- Command: `{environment['command']}` (ran as `{environment['invocation']}`); "
        f"database `{environment['database']}`"
    )


def report_write(*, name: str, title: str, results: dict[str, Any], markdown: str) -> Path:
    """Write var/bench/<name>.json and replace (or add) this benchmark's RESULTS.md section."""
    JSON_DIRECTORY.mkdir(parents=True, exist_ok=True)
    json_path = JSON_DIRECTORY / f"{name}.json"
    json_path.write_text(json.dumps(results, indent=2) + "\n")

    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{start}\n## {title}\n\n{markdown.strip()}\n{end}"
    existing = RESULTS_MARKDOWN.read_text() if RESULTS_MARKDOWN.exists() else _RESULTS_HEADER
    pattern = re.compile(rf"{re.escape(start)}.*?{re.escape(end)}", re.DOTALL)
    if pattern.search(existing):
        updated = pattern.sub(lambda _match: section, existing)
    else:
        updated = existing.rstrip("\n") + "\n\n" + section
    RESULTS_MARKDOWN.write_text(updated.rstrip("\n") + "\n")
    return json_path
