"""Chat fixtures: mock model servers (real HTTP, on loopback) and a port nobody listens on."""

from __future__ import annotations

import socket

import pytest

from chat.mock_server import MockServerHandle, mock_servers_in_thread

MOCK_SERVER_COUNT = 3  # enough for a route of two targets, or a pool of three replicas


@pytest.fixture(scope="session")
def _mock_llm_servers():
    """Started once per session, in a background thread: a few milliseconds per test saved."""
    with mock_servers_in_thread(MOCK_SERVER_COUNT) as servers:
        yield servers


@pytest.fixture
def mock_llms(_mock_llm_servers) -> list[MockServerHandle]:
    """Mock OpenAI-compatible servers, with their start configuration and zeroed counters."""
    for server in _mock_llm_servers:
        server.reset()
    return _mock_llm_servers


@pytest.fixture
def mock_llm(mock_llms) -> MockServerHandle:
    return mock_llms[0]


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
