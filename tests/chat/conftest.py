"""Chat fixtures: a port nobody listens on, a fake clock (mock model servers: tests/conftest.py)."""

from __future__ import annotations

import socket

import pytest


@pytest.fixture
def refused_url() -> str:
    """An http URL on a loopback port where nothing listens: connections are refused."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class FakeClock:
    """A wall clock the test moves by hand, so cool-downs take no real time."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
