"""Where a process's CPU goes, sampled with py-spy while the benchmark's load runs.

``py-spy record --gil --nonblocking --format raw``: only the thread holding the GIL is sampled
(the Python work; a thread waiting on a socket or the database holds no GIL), and the process is
never paused, so the load sees no profiler. Each sample is a stack, root first; a function's
*self* share is how often it is the leaf, its *inclusive* share how often it is anywhere on the
stack. Multiplied by the process's CPU per request, a share becomes milliseconds per request.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

SAMPLES_PER_SECOND = 250
_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*?)(?::\d+)?\)$")
_PROJECT_PACKAGES = ("chat", "tenants", "knowledge", "billing", "config")
# Components finer than a top-level package where the package is big.
_SPLIT_PACKAGES = {"django": 2, "twisted": 2}


@dataclass(frozen=True)
class Frame:
    function: str
    path: str  # shortened: site-packages/ and the project root removed

    @property
    def label(self) -> str:
        return f"{self.path}:{self.function}"

    @property
    def component(self) -> str:
        parts = self.path.split("/")
        if parts[0] in _PROJECT_PACKAGES:
            return self.path.removesuffix(".py")
        depth = _SPLIT_PACKAGES.get(parts[0], 1)
        return "/".join(part.removesuffix(".py") for part in parts[:depth])

    @property
    def is_project(self) -> bool:
        return self.path.split("/")[0] in _PROJECT_PACKAGES


@dataclass(frozen=True)
class Profile:
    samples: int
    self_by_component: list[tuple[str, float]]
    inclusive_by_component: list[tuple[str, float]]
    top_self: list[tuple[str, float]]
    top_project_inclusive: list[tuple[str, float]]

    def as_dict(self) -> dict:
        def rows(items: list[tuple[str, float]]) -> list[dict]:
            return [{"name": name, "share": round(share, 4)} for name, share in items]

        return {
            "samples": self.samples,
            "self_by_component": rows(self.self_by_component),
            "inclusive_by_component": rows(self.inclusive_by_component),
            "top_self": rows(self.top_self),
            "top_project_inclusive": rows(self.top_project_inclusive),
        }


def _shorten(path: str) -> str:
    base = str(settings.BASE_DIR) + "/"
    if "site-packages/" in path:
        return path.rsplit("site-packages/", 1)[1]
    if path.startswith(base):
        return path.removeprefix(base)
    if "/lib/python3" in path:  # the standard library
        return path.split("/lib/python3", 1)[1].split("/", 1)[1]
    return path


def _parse_frame(text: str) -> Frame:
    match = _FRAME.match(text)
    if match is None:
        return Frame(function=text, path="?")
    return Frame(function=match["function"], path=_shorten(match["path"]))


def parse_raw(text: str, *, top: int = 15) -> Profile:
    """py-spy's raw (collapsed-stack) output → shares."""
    total = 0
    self_component: Counter[str] = Counter()
    inclusive_component: Counter[str] = Counter()
    self_function: Counter[str] = Counter()
    project_inclusive: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_parse_frame(frame) for frame in stack.split(";")]
        total += count
        leaf = frames[-1]
        self_component[leaf.component] += count
        self_function[leaf.label] += count
        for component in {frame.component for frame in frames}:
            inclusive_component[component] += count
        for label in {frame.label for frame in frames if frame.is_project}:
            project_inclusive[label] += count

    def shares(counter: Counter[str], limit: int) -> list[tuple[str, float]]:
        return [(name, count / total) for name, count in counter.most_common(limit)] if total else []

    return Profile(
        samples=total,
        self_by_component=shares(self_component, top),
        inclusive_by_component=shares(inclusive_component, top),
        top_self=shares(self_function, top),
        top_project_inclusive=shares(project_inclusive, top),
    )


class Recorder:
    """py-spy attached to some processes for ``seconds``: start it, run the load, then ``result()``."""

    def __init__(self, py_spy: Path, pids: Sequence[int], *, seconds: int) -> None:
        self.outputs = []
        self.processes = []
        for pid in pids:
            output = Path(tempfile.mkstemp(suffix=".txt", prefix=f"py-spy-{pid}-")[1])
            self.outputs.append(output)
            self.processes.append(
                subprocess.Popen(
                    [
                        str(py_spy),
                        "record",
                        f"--pid={pid}",
                        f"--duration={seconds}",
                        f"--rate={SAMPLES_PER_SECOND}",
                        "--format=raw",
                        f"--output={output}",
                        "--gil",
                        "--nonblocking",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )

    def result(self) -> Profile:
        texts = []
        for process, output in zip(self.processes, self.outputs, strict=True):
            _stdout, stderr = process.communicate(timeout=120)
            if process.returncode != 0:
                raise RuntimeError(f"py-spy failed: {stderr.decode(errors='replace')[-500:]}")
            texts.append(output.read_text())
            output.unlink()
        return parse_raw("\n".join(texts))
