"""Prometheus counters of the response cache."""

from __future__ import annotations

from prometheus_client import Counter

LOOKUPS = Counter(
    "parley_cache_lookups",
    "Response cache lookups by layer (exact, semantic) and outcome (hit, miss; semantic also "
    "rejected: candidates above the threshold all failed verification).",
    ["tenant", "layer", "outcome"],
)
STORES = Counter("parley_cache_stores", "Answers stored in the response cache, by layer.", ["tenant", "layer"])
