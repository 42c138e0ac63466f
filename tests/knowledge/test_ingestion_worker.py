"""Ingestion through a real Celery worker process: a worker killed mid-document leaves it
re-processable, and the redelivered task finishes it with no duplicated chunks.

The embedder is the OpenAI-compatible one pointed at the mock server with a delay per batch, so
the document takes a few seconds: long enough to kill the worker in the middle of it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django_tenants.utils import tenant_context

from knowledge.models import Chunk, Document, KnowledgeBase
from knowledge.services import document_create, knowledge_base_create
from tests.chat.live import BASE_DIR, _die_with_parent
from tests.chat.live import test_database_url as database_url

pytestmark = pytest.mark.slow

PARAGRAPHS = 240
BATCH_LATENCY_SECONDS = 0.3  # per embedding request of 8 texts: a few seconds for the document


class CeleryWorker:
    """``celery worker`` (prefork, one child) on the test database and the test Redis."""

    def __init__(self, *, environment: dict[str, str] | None = None) -> None:
        self.log_path = BASE_DIR / "var" / "live" / f"celery-{os.getpid()}-{time.monotonic_ns()}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "celery"),
                "-A",
                "config",
                "worker",
                "--pool=prefork",
                "--concurrency=1",
                "--without-mingle",
                "--without-gossip",
                "--loglevel=INFO",
            ],
            cwd=BASE_DIR,
            env={
                **os.environ,
                "PARLEY_ENV": "test",
                "DATABASE_URL": database_url(),
                "REDIS_URL": settings.REDIS_URL,
                "PYTHONUNBUFFERED": "1",
                **(environment or {}),
            },
            stdout=self.log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )

    def children(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        return [int(pid) for pid in children.split()]

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def _wait_for(predicate, *, timeout: float, what: str, worker: CeleryWorker):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; worker log:\n{worker.log_text()[-4000:]}")


@pytest.fixture
def slow_embedding_kb(django_db_blocker, tenant_pair, mock_llm):
    """A committed knowledge base whose embedder (the mock server) takes a while per batch."""
    mock_llm.configure(embedding_latency=BATCH_LATENCY_SECONDS)
    with django_db_blocker.unblock(), tenant_context(tenant_pair.a):
        KnowledgeBase.objects.filter(name="worker-kill").delete()
        knowledge_base = knowledge_base_create(
            name="worker-kill",
            embedder={
                "kind": "openai",
                "base_url": mock_llm.base_url,
                "model": "mock-embed",
                "dimensions": 384,
                "batch_size": 8,
            },
        )
        yield knowledge_base
        KnowledgeBase.objects.filter(pk=knowledge_base.pk).delete()
    connection.set_schema_to_public()


def test_worker_killed_mid_document_is_redelivered_without_duplicates(
    django_db_blocker, tenant_pair, slow_embedding_kb, monkeypatch
):
    # Small chunks, so the document makes many embedding batches.
    worker = CeleryWorker(environment={"KNOWLEDGE_CHUNK_TOKENS": "40", "KNOWLEDGE_CHUNK_OVERLAP": "8"})
    try:
        text = "\n\n".join(
            f"Section {i}. The warehouse in zone {i} stores parts for model {i * 7} and ships them daily."
            for i in range(PARAGRAPHS)
        )
        with django_db_blocker.unblock(), tenant_context(tenant_pair.a):
            # Autocommit: the task is sent when this returns.
            document, _ = document_create(knowledge_base=slow_embedding_kb, title="manual", data=text.encode())

            def progress() -> float:
                row = Document.objects.filter(pk=document.pk).values("status", "progress").get()
                return row["status"] == "processing" and row["progress"] >= 0.4

            _wait_for(progress, timeout=90, what="the first run to pass 40%", worker=worker)
            (child,) = worker.children()
            os.kill(child, signal.SIGKILL)

            def finished():
                row = Document.objects.filter(pk=document.pk).values("status", "chunk_count").get()
                return row if row["status"] in ("ready", "failed") else None

            row = _wait_for(finished, timeout=120, what="the redelivered run to finish", worker=worker)
            positions = list(Chunk.objects.filter(document_id=document.pk).values_list("position", flat=True))
            version = KnowledgeBase.objects.get(pk=slow_embedding_kb.pk).version
    finally:
        worker.stop()
    log = worker.log_text()

    assert row["status"] == "ready", log[-4000:]
    assert row["chunk_count"] == len(positions) > 20
    assert sorted(positions) == list(range(len(positions)))  # no duplicates, no gaps
    assert version == slow_embedding_kb.version + 1  # one swap: the killed run wrote nothing
    assert "WorkerLostError" in log or "exited prematurely" in log
