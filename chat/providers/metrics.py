"""Prometheus metrics of provider calls, on the default registry (served at ``/metrics``).

Labels stay bounded: ``provider`` is a kind (local, openai, vllm_pool), ``target`` a route
target's configured name, ``outcome`` one of a fixed set. Tenant and bot labels are the chat
engine's to add on its own metrics, where it can bound their cardinality.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

# Seconds; fine-grained under 100 ms where a cached prefix or the local responder answers.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)

TIME_TO_FIRST_TOKEN = Histogram(
    "parley_provider_time_to_first_token_seconds",
    "Seconds from sending a request to a target until its first token arrived.",
    ["provider", "target"],
    buckets=TTFT_BUCKETS,
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "parley_provider_time_per_output_token_seconds",
    "Mean seconds between output tokens after the first, per answer.",
    ["provider", "target"],
    buckets=TPOT_BUCKETS,
)
PROMPT_TOKENS = Counter(
    "parley_provider_prompt_tokens",
    "Prompt (input) tokens sent to providers.",
    ["provider", "target"],
)
COMPLETION_TOKENS = Counter(
    "parley_provider_completion_tokens",
    "Completion (output) tokens received from providers.",
    ["provider", "target"],
)
REQUESTS = Counter(
    "parley_provider_requests",
    "Attempts to get an answer from a route target, by outcome "
    "(ok, rate_limited, unavailable, timeout, bad_request, context_too_long, interrupted, circuit_open).",
    ["provider", "target", "outcome"],
)
FAILOVERS = Counter(
    "parley_provider_failovers",
    "Times a route moved on from a target that failed before its first token, by the failure.",
    ["provider", "target", "outcome"],
)
CIRCUIT_STATE = Gauge(
    "parley_provider_circuit_state",
    "A target's circuit breaker as this process last saw it: 0 closed, 1 half-open, 2 open.",
    ["provider", "target"],
)
POOL_ENDPOINT_HEALTHY = Gauge(
    "parley_provider_pool_endpoint_healthy",
    "1 while a vLLM pool endpoint passes health checks and requests, else 0.",
    ["target", "endpoint"],
)
