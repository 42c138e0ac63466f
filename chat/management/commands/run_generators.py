"""Run a generation worker process: ``manage.py run_generators [--concurrency N]``.

Start as many processes as generation capacity needs; they share the job stream through a
Redis consumer group. SIGTERM/SIGINT stop taking jobs and let running turns finish (30 s).
"""

import asyncio
import signal

import uvloop
from django.core.management.base import BaseCommand
from prometheus_client import start_http_server

from chat.generation import GenerationWorker
from knowledge.embedders import warm_up_local_embedder


class Command(BaseCommand):
    help = "Run a generation worker (consumes chat turns from Redis and streams their answers)."

    def add_arguments(self, parser):
        parser.add_argument("--concurrency", type=int, default=256, help="Turns run at once by this process.")
        parser.add_argument(
            "--metrics-port", type=int, default=0, help="Serve this worker's Prometheus metrics on this port (0: none)."
        )

    def handle(self, *args, **options):
        if options["metrics_port"]:
            start_http_server(options["metrics_port"])
        # uvloop: the worker is all event-loop work (Redis, the model's HTTP streams); measured
        # by tests/perf/test_chat_throughput.py, as the web processes' loop under uvicorn.
        uvloop.run(self._run(options["concurrency"]))

    async def _run(self, concurrency: int) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        worker = GenerationWorker(concurrency=concurrency)
        # Retrieval embeds each question: load the bundled model now, not on the first turn.
        loop.run_in_executor(None, warm_up_local_embedder)
        self.stdout.write(f"generation worker {worker.consumer} ready (concurrency {concurrency})")
        await worker.run(stop)
