"""Knowledge ingestion throughput of one worker process, and where its time goes.

A generated corpus of about 1,100 pages (four 250-page PDFs with an outline, a DOCX and a Markdown
handbook; see tests/perf/knowledge_corpus.py) is uploaded with ``document_create`` into a fresh,
committed knowledge base of tenant A, then each document is ingested with ``document_ingest`` run
inline, one after the other: exactly what one Celery worker process does with the queued tasks
(the queued messages themselves go to the benchmarks' Redis database, which no worker reads).

Stages are timed by wrapping the functions ``document_ingest`` calls:

- extract: ``knowledge.extractors.extract`` (pypdf / python-docx / the Markdown parser);
- chunk: ``knowledge.chunking.chunk_sections`` (real MiniLM tokens);
- embed: ``knowledge.services._embed`` (the local all-MiniLM-L6-v2 on the CPU, batches of 64,
  with the progress heartbeat it writes about once a second);
- store: from the end of embedding to the return of ``document_ingest``: the transaction that
  swaps the chunks in (delete, bulk insert with its HNSW, GIN and generated-tsvector upkeep,
  document update, version bump) and its commit;
- other: the rest (reading the source bytes, the first progress write, finding the embedder).

The model is loaded before timing starts (a worker loads it once per process; the load is
reported apart). The generated files are cached under var/bench/ (the generator is seeded, so
the cache is only a shortcut). The knowledge base is deleted at the end.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from django.conf import settings
from django_tenants.utils import tenant_context

from knowledge import services
from knowledge.embedders import get_embedder
from knowledge.models import Chunk, Document, KnowledgeBase
from knowledge.services import document_create, document_ingest, knowledge_base_create, knowledge_base_delete
from tests.perf import knowledge_corpus
from tests.perf.reporting import (
    JSON_DIRECTORY,
    environment_markdown,
    markdown_table,
    report_write,
    run_environment,
    text_table,
)

CORPUS_SEED = 20261121
PDF_DOCUMENTS = 4
PDF_PAGES = 250
# Pages of generated prose in each of the DOCX and Markdown files (~400 words each); their
# extractors estimate pages at 500 words, so they count as ~80% as many.
DOCX_PAGES = 50
MARKDOWN_PAGES = 50
STAGES = ("extract", "chunk", "embed", "store", "other")
KNOWLEDGE_BASE_NAME = "benchmark: ingestion"


@dataclass(frozen=True, slots=True)
class CorpusFile:
    filename: str
    data: bytes


def _corpus() -> tuple[list[CorpusFile], float]:
    """The corpus files and the seconds spent generating them now (0 when read from the cache)."""
    layout = [("pdf", PDF_PAGES)] * PDF_DOCUMENTS + [("docx", DOCX_PAGES), ("md", MARKDOWN_PAGES)]
    directory = JSON_DIRECTORY / f"knowledge-corpus-{knowledge_corpus.fingerprint(CORPUS_SEED, layout)}"
    writers: dict[str, Callable[..., bytes]] = {
        "pdf": knowledge_corpus.pdf_bytes,
        "docx": knowledge_corpus.docx_bytes,
        "md": knowledge_corpus.markdown_bytes,
    }
    files = []
    started = time.perf_counter()
    generated = False
    for number, (extension, page_count) in enumerate(layout, start=1):
        path = directory / f"handbook-{number}.{extension}"
        if not path.exists():
            pages = list(knowledge_corpus.pages(CORPUS_SEED + number, page_count))
            data = writers[extension](pages, title=f"Company handbook, volume {number}")
            directory.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(".partial")
            partial.write_bytes(data)
            partial.rename(path)
            generated = True
        files.append(CorpusFile(filename=path.name, data=path.read_bytes()))
    return files, (time.perf_counter() - started) if generated else 0.0


@dataclass
class StageClock:
    """Seconds per stage of the document being ingested (wrappers installed with monkeypatch)."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    embed_ended: float = 0.0

    def timed(self, stage: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                ended = time.perf_counter()
                self.seconds[stage] += ended - started
                if stage == "embed":
                    self.embed_ended = ended

        return wrapper


@dataclass(frozen=True, slots=True)
class IngestedDocument:
    filename: str
    kind: str
    size_bytes: int
    pages: int
    chunks: int
    tokens: int
    seconds: float
    stages: dict[str, float]


def _ingest_timed(knowledge_base, corpus_file: CorpusFile, clock: StageClock) -> IngestedDocument:
    document, created = document_create(
        knowledge_base=knowledge_base, title="", data=corpus_file.data, filename=corpus_file.filename
    )
    assert created
    clock.seconds.clear()
    started = time.perf_counter()
    outcome = document_ingest(document_id=document.pk, ingestion_id=str(document.ingestion_id))
    ended = time.perf_counter()
    assert outcome == "ready", outcome
    document.refresh_from_db()
    stages = {stage: clock.seconds.get(stage, 0.0) for stage in ("extract", "chunk", "embed")}
    stages["store"] = ended - clock.embed_ended
    stages["other"] = (ended - started) - sum(stages.values())
    return IngestedDocument(
        filename=corpus_file.filename,
        kind=document.kind,
        size_bytes=document.size_bytes,
        pages=document.page_count,
        chunks=document.chunk_count,
        tokens=document.token_count,
        seconds=ended - started,
        stages=stages,
    )


def _rate(count: float, seconds: float) -> str:
    return f"{count / seconds:.1f}" if seconds else "-"


def test_knowledge_ingestion_throughput(tenant_pair, django_db_blocker, monkeypatch, request):
    import torch

    clock = StageClock()
    monkeypatch.setattr(services, "extract", clock.timed("extract", services.extract))
    monkeypatch.setattr(services, "chunk_sections", clock.timed("chunk", services.chunk_sections))
    monkeypatch.setattr(services, "_embed", clock.timed("embed", services._embed))

    corpus_files, generation_seconds = _corpus()
    embedder = get_embedder({"kind": "local"})
    load_started = time.perf_counter()
    embedder.embed_documents(["The model loads once per worker process."])
    model_load_seconds = time.perf_counter() - load_started
    torch_threads = torch.get_num_threads()

    with django_db_blocker.unblock(), tenant_context(tenant_pair.a):
        environment = run_environment(request.config)
        for stale in KnowledgeBase.objects.filter(name=KNOWLEDGE_BASE_NAME):  # left by an interrupted run
            knowledge_base_delete(knowledge_base=stale)
        knowledge_base = knowledge_base_create(name=KNOWLEDGE_BASE_NAME)
        try:
            started = time.perf_counter()
            documents = [_ingest_timed(knowledge_base, corpus_file, clock) for corpus_file in corpus_files]
            total_seconds = time.perf_counter() - started
            stored_chunks = Chunk.objects.filter(knowledge_base=knowledge_base).count()
            statuses = set(Document.objects.filter(knowledge_base=knowledge_base).values_list("status", flat=True))
        finally:
            knowledge_base_delete(knowledge_base=knowledge_base)

    pages = sum(document.pages for document in documents)
    chunks = sum(document.chunks for document in documents)
    tokens = sum(document.tokens for document in documents)
    assert statuses == {Document.Status.READY}
    assert stored_chunks == chunks > 0
    assert pages >= 1000
    stage_seconds = {stage: sum(document.stages[stage] for document in documents) for stage in STAGES}
    assert abs(sum(stage_seconds.values()) - sum(document.seconds for document in documents)) < 1e-6

    document_headers = ["document", "kind", "KiB", "pages", "chunks", "tokens/chunk", "s", "pages/s", "chunks/s"]
    document_rows = [
        [
            document.filename,
            document.kind,
            f"{document.size_bytes / 1024:,.0f}",
            f"{document.pages:,}",
            f"{document.chunks:,}",
            f"{document.tokens / document.chunks:.0f}",
            f"{document.seconds:.1f}",
            _rate(document.pages, document.seconds),
            _rate(document.chunks, document.seconds),
        ]
        for document in documents
    ]
    document_rows.append(
        [
            "all",
            "-",
            f"{sum(document.size_bytes for document in documents) / 1024:,.0f}",
            f"{pages:,}",
            f"{chunks:,}",
            f"{tokens / chunks:.0f}",
            f"{total_seconds:.1f}",
            _rate(pages, total_seconds),
            _rate(chunks, total_seconds),
        ]
    )
    stage_headers = ["stage", "s", "share", "ms/page", "ms/chunk"]
    stage_rows = [
        [
            stage,
            f"{seconds:.1f}",
            f"{seconds / total_seconds:.1%}",
            f"{seconds * 1e3 / pages:.1f}",
            f"{seconds * 1e3 / chunks:.1f}",
        ]
        for stage, seconds in stage_seconds.items()
    ]
    pdf_documents = [document for document in documents if document.kind == "pdf"]
    pdf_extract = sum(document.stages["extract"] for document in pdf_documents)
    summary = (
        f"{len(documents)} generated documents ({pages:,} pages: {PDF_DOCUMENTS} PDFs of {PDF_PAGES} pages, "
        f"a DOCX and a Markdown file of ~{DOCX_PAGES} pages of prose each, counted by their extractors at 500 "
        f"words a page) ingested one after the other with `document_ingest` inline in one process, as one Celery "
        f"worker process runs them: {pages / total_seconds:.1f} pages/s, {chunks / total_seconds:.1f} chunks/s "
        f"({tokens / total_seconds:,.0f} tokens/s) in {total_seconds:.0f} s. Embedder: local all-MiniLM-L6-v2 on the "
        f"CPU, torch using {torch_threads} threads (KNOWLEDGE_EMBED_THREADS="
        f"{getattr(settings, 'KNOWLEDGE_EMBED_THREADS', None)}), model loaded beforehand in {model_load_seconds:.1f} "
        f"s. PDF extraction alone: {pdf_extract * 1e3 / sum(d.pages for d in pdf_documents):.1f} ms/page."
    )
    generation_line = (
        f"Corpus generated in {generation_seconds:.0f} s (cached under var/bench/ for later runs)."
        if generation_seconds
        else "Corpus read from its cache under var/bench/ (seeded generator: the same files every run)."
    )

    print(f"\nKnowledge ingestion: {summary}")
    print(text_table(document_headers, document_rows))
    print()
    print(text_table(stage_headers, stage_rows))
    print(generation_line)

    results = {
        "environment": environment,
        "method": {
            "service": "knowledge.services.document_ingest(document_id, ingestion_id), inline, one process",
            "corpus": {
                "generator": "tests/perf/knowledge_corpus.py",
                "generator_version": knowledge_corpus.GENERATOR_VERSION,
                "seed": CORPUS_SEED,
                "pdf_documents": PDF_DOCUMENTS,
                "pdf_pages": PDF_PAGES,
                "docx_pages_of_prose": DOCX_PAGES,
                "markdown_pages_of_prose": MARKDOWN_PAGES,
            },
            "chunk_tokens": settings.KNOWLEDGE_CHUNK_TOKENS,
            "chunk_overlap": settings.KNOWLEDGE_CHUNK_OVERLAP,
            "embed_batch_size": services.EMBED_BATCH_SIZE,
            "stages": "extract, chunk and embed by wrapping the functions; store = end of embed to return",
        },
        "torch_threads": torch_threads,
        "model_load_s": round(model_load_seconds, 2),
        "corpus_generation_s": round(generation_seconds, 1),
        "total_s": round(total_seconds, 2),
        "pages": pages,
        "chunks": chunks,
        "tokens": tokens,
        "pages_per_s": round(pages / total_seconds, 2),
        "chunks_per_s": round(chunks / total_seconds, 2),
        "tokens_per_s": round(tokens / total_seconds, 1),
        "stages_s": {stage: round(seconds, 3) for stage, seconds in stage_seconds.items()},
        "stage_shares": {stage: round(seconds / total_seconds, 4) for stage, seconds in stage_seconds.items()},
        "documents": [
            {
                "filename": document.filename,
                "kind": document.kind,
                "size_bytes": document.size_bytes,
                "pages": document.pages,
                "chunks": document.chunks,
                "tokens": document.tokens,
                "seconds": round(document.seconds, 3),
                "stages_s": {stage: round(seconds, 3) for stage, seconds in document.stages.items()},
            }
            for document in documents
        ],
    }
    markdown = "\n\n".join(
        [
            environment_markdown(environment),
            summary + " No numeric target: the figures say where a worker's time goes.",
            markdown_table(document_headers, document_rows),
            "Where the time goes (store: the chunk-swap transaction and its commit; other: reading the source "
            "bytes, the first progress write, finding the embedder):",
            markdown_table(stage_headers, stage_rows),
            generation_line,
        ]
    )
    report_write(name="knowledge_ingestion", title="Knowledge ingestion throughput", results=results, markdown=markdown)
