"""The semantic cache on paraphrases and near-misses: true-hit and false-hit rates, and hit latency.

The set (``semantic_cache_pairs.jsonl``) holds support-bot questions in pairs: paraphrases (the
same question reworded, which should hit), near-misses (most words shared, another intent:
cancel/pause, add/remove, 5/50 users, "ship to" / "ship from", a negation; which must not hit)
and distinct questions. Every pair is labelled ``tune`` or ``holdout``: the verification's word
lists and limits were tuned looking at the tune half only, so the holdout half shows what they
are worth on questions they were not fitted to (both were written by the same hand, before
tuning began).

Measured:

- **cosine only**: a hit whenever the two questions' embeddings (all-MiniLM-L6-v2) reach a
  threshold, at several thresholds;
- **verified** (the design): through ``cache_store`` / ``cache_lookup`` on Redis, one scope per
  pair holding the first question, the second asked: cosine gate at the default threshold, then
  the verification;
- **shared scope**: every first question of the set stored in one scope, every second one asked:
  does a paraphrase find its own question among ~170, and does any question get another's answer;
- **latency** (server-side, in-process on the event loop, Redis over loopback): an exact hit, a
  semantic hit including the question's embedding (the process's vector cache cleared before each),
  and a semantic hit in a scope filled to its cap (2,000 entries).

Target: fewer than 1 in 50 near-miss questions served a wrong answer while catching as many true
paraphrases as possible; exact hit p50 < 3 ms, semantic hit p50 < 20 ms.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import Counter
from pathlib import Path

import numpy as np

from chat.response_cache import (
    CacheScope,
    cache_settings_validate,
    embeddings,
    exact_key,
    keys,
    semantic,
    verification,
)
from chat.response_cache.lookup import cache_lookup
from chat.response_cache.storage import cache_store
from tenants.redis import get_async_redis, tenant_key, tenant_keys_purge
from tests.perf.reporting import (
    Distribution,
    environment_markdown,
    markdown_table,
    report_write,
    run_environment,
    text_table,
)

PAIRS_FILE = Path(__file__).with_name("semantic_cache_pairs.jsonl")
SCHEMA = "bench_semantic_cache"  # a key prefix only: the cache needs no tenant in the database
COSINE_THRESHOLDS = (0.80, 0.85, 0.90, 0.92, 0.95)
GATES = (0.5, 0.6, 0.7)  # verified design at other cosine gates (pure function, same pairs)
SPLITS = ("tune", "holdout", "all")
LATENCY_ROUNDS = 200
LATENCY_WARMUP = 20
FILLED_SCOPE_ENTRIES = 2_000
FALSE_HIT_TARGET = 0.02
TARGET_EXACT_P50_MS = 3.0
TARGET_SEMANTIC_P50_MS = 20.0
SETTINGS = cache_settings_validate({})
REQUEST = {"system_prompt": "You are the support bot of Example Ltd.", "history": [], "generation": {"temperature": 0}}
USAGE = {"prompt_tokens": 100, "completion_tokens": 40, "provider": "bench", "model": "bench", "finish_reason": "stop"}


def _pairs() -> list[dict]:
    return [json.loads(line) for line in PAIRS_FILE.read_text().splitlines() if line.strip()]


def _scope(bot_id: int) -> CacheScope:
    return CacheScope(schema_name=SCHEMA, bot_id=bot_id, bot_version=1, knowledge_signature="1:1")


def _exact(scope: CacheScope, question: str) -> str:
    return exact_key(scope, user_message=question, **REQUEST)


async def _store(redis, scope: CacheScope, question: str) -> None:
    await cache_store(
        scope,
        exact=_exact(scope, question),
        question=question,
        text=f"answer to: {question}",
        citations=[],
        usage=USAGE,
        cache_settings=SETTINGS,
        redis=redis,
    )


async def _ask(redis, scope: CacheScope, question: str):
    return await cache_lookup(
        scope, exact=_exact(scope, question), question=question, cache_settings=SETTINGS, redis=redis
    )


def _rate(hits: int, total: int) -> str:
    return f"{hits}/{total} ({100 * hits / total:.1f}%)" if total else "-"


def _upper_95(hits: int, total: int) -> float:
    """One-sided 95% upper bound of a rate (Clopper-Pearson; 3/n, the rule of three, at 0 hits)."""
    if total == 0:
        return 1.0
    if hits == 0:
        return 1 - 0.05 ** (1 / total)
    low, high = hits / total, 1.0
    for _ in range(60):  # bisection on the binomial tail P(X <= hits | p) = 0.05
        middle = (low + high) / 2
        tail = sum(math.comb(total, k) * middle**k * (1 - middle) ** (total - k) for k in range(hits + 1))
        low, high = (middle, high) if tail > 0.05 else (low, middle)
    return high


def _in_split(pairs: list[dict], split: str, kind: str) -> list[dict]:
    return [pair for pair in pairs if pair["kind"] == kind and (split == "all" or pair["split"] == split)]


def _cosine_rows(pairs: list[dict], similarity: dict[str, float]) -> list[list[str]]:
    rows = []
    for threshold in COSINE_THRESHOLDS:
        row = [f"cosine >= {threshold:.2f}"]
        for split in SPLITS:
            paraphrases = _in_split(pairs, split, "paraphrase")
            near_misses = _in_split(pairs, split, "near_miss")
            row.append(_rate(sum(similarity[pair["id"]] >= threshold for pair in paraphrases), len(paraphrases)))
            row.append(_rate(sum(similarity[pair["id"]] >= threshold for pair in near_misses), len(near_misses)))
        rows.append(row)
    return rows


def _gate_rows(pairs: list[dict], similarity: dict[str, float]) -> list[list[str]]:
    rows = []
    for gate in GATES:
        hit = {
            pair["id"]: similarity[pair["id"]] >= gate
            and verification.paraphrase_rejection(pair["a"], pair["b"]) is None
            for pair in pairs
        }
        row = [f"verified, gate {gate:.2f}"]
        for split in SPLITS:
            paraphrases = _in_split(pairs, split, "paraphrase")
            near_misses = _in_split(pairs, split, "near_miss")
            row.append(_rate(sum(hit[pair["id"]] for pair in paraphrases), len(paraphrases)))
            row.append(_rate(sum(hit[pair["id"]] for pair in near_misses), len(near_misses)))
        rows.append(row)
    return rows


async def _pairwise(redis, pairs: list[dict]) -> dict[str, dict]:
    """Each pair in its own scope: the first question stored, the second asked."""
    outcomes = {}
    for bot_id, pair in enumerate(pairs, start=1):
        scope = _scope(bot_id)
        await _store(redis, scope, pair["a"])
        answer = await _ask(redis, scope, pair["b"])
        similarity = float(embeddings.question_vector(pair["a"]) @ embeddings.question_vector(pair["b"]))
        reason = (
            verification.paraphrase_rejection(pair["a"], pair["b"])
            if similarity >= SETTINGS["similarity_threshold"]
            else "below gate"
        )
        outcomes[pair["id"]] = {"hit": answer is not None, "layer": answer.layer if answer else None, "reason": reason}
    return outcomes


def _groups(pairs: list[dict]) -> dict[str, str]:
    """Questions of one intent share a group: paraphrase pairs joined, identical texts merged."""
    parent: dict[str, str] = {}

    def find(text: str) -> str:
        parent.setdefault(text, text)
        while parent[text] != text:
            parent[text] = parent[parent[text]]
            text = parent[text]
        return text

    for pair in pairs:
        first, second = find(pair["a"]), find(pair["b"])
        if pair["kind"] == "paraphrase":
            parent[first] = second
    return {text: find(text) for text in list(parent)}


async def _shared_scope(redis, pairs: list[dict]) -> dict:
    scope = _scope(10_000)
    group = _groups(pairs)
    stored = sorted({pair["a"] for pair in pairs})
    for question in stored:
        await _store(redis, scope, question)
    results: dict[str, Counter] = {"paraphrase": Counter(), "near_miss": Counter()}
    wrong: list[dict] = []
    for pair in pairs:
        if pair["kind"] not in results or pair["b"] in stored:
            continue
        answer = await _ask(redis, scope, pair["b"])
        if answer is None:
            outcome = "miss"
        elif group[answer.question] == group[pair["b"]]:
            outcome = "right"
        else:
            outcome = "wrong"
            wrong.append({"asked": pair["b"], "served": answer.question, "kind": pair["kind"]})
        results[pair["kind"]][outcome] += 1
    return {
        "stored": len(stored),
        "results": {kind: dict(counter) for kind, counter in results.items()},
        "wrong": wrong,
    }


async def _timed(function, rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        await function()
        samples.append(time.perf_counter() - started)
    return samples


async def _latency(redis) -> dict[str, Distribution]:
    small, filled = _scope(20_000), _scope(20_001)
    cached, asked = "How do I cancel my subscription?", "How can I terminate my membership?"
    for scope in (small, filled):
        await _store(redis, scope, cached)
        assert (await _ask(redis, scope, asked)).layer == "semantic"
    # The filled scope's other entries: random unit vectors (never above the gate), written
    # straight into its hashes; embedding 2,000 questions would only slow the set-up.
    generator = np.random.default_rng(7)
    vectors = generator.standard_normal((FILLED_SCOPE_ENTRIES - 1, embeddings.EMBEDDING_DIMENSIONS)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    scope_key = tenant_key(SCHEMA, "cache", keys._semantic_member(filled))
    async with redis.pipeline(transaction=False) as pipe:
        for index, vector in enumerate(vectors):
            pipe.hset(scope_key + ":v", f"filler{index}", vector.tobytes())
        pipe.set(scope_key + ":g", "filled")  # a new generation: processes re-read the scope
        await pipe.execute()
    assert await redis.hlen(scope_key + ":v") == FILLED_SCOPE_ENTRIES

    async def exact_hit() -> None:
        assert (await _ask(redis, small, cached)).layer == "exact"

    async def semantic_hit(scope: CacheScope, *, words: bool = False, scopes: bool = False) -> None:
        # The question is embedded every time (a new question's path); the verification's word
        # vectors and the scope's vectors stay in a running process unless cleared here.
        semantic.vector_caches_clear(questions=True, words=words, scopes=scopes)
        assert (await _ask(redis, scope, asked)).layer == "semantic"

    filled_name = f"semantic hit, {FILLED_SCOPE_ENTRIES:,} entries in scope"
    variants = {
        "exact hit": exact_hit,
        "semantic hit": lambda: semantic_hit(small),
        filled_name: lambda: semantic_hit(filled),
        f"{filled_name}, read from Redis": lambda: semantic_hit(filled, scopes=True),
        "semantic hit, every process cache cold": lambda: semantic_hit(small, words=True, scopes=True),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for function in variants.values():
        await _timed(function, LATENCY_WARMUP)
    for _ in range(LATENCY_ROUNDS // 10):  # interleaved in blocks: a busy neighbour slows all alike
        for name, function in variants.items():
            samples[name] += await _timed(function, 10)
    return {name: Distribution.of(values) for name, values in samples.items()}


async def _run(pairs: list[dict]) -> tuple[dict, dict, dict[str, Distribution]]:
    redis = get_async_redis()
    try:
        pairwise = await _pairwise(redis, pairs)
        shared = await _shared_scope(redis, pairs)
        latency = await _latency(redis)
    finally:
        await redis.aclose()
    return pairwise, shared, latency


def test_semantic_cache_hit_rates_and_latency(django_db_setup, django_db_blocker, request):
    with django_db_blocker.unblock():
        environment = run_environment(request.config)
    pairs = _pairs()
    counts = Counter(pair["kind"] for pair in pairs)
    similarity = {
        pair["id"]: float(embeddings.question_vector(pair["a"]) @ embeddings.question_vector(pair["b"]))
        for pair in pairs
    }
    tenant_keys_purge(SCHEMA)
    try:
        pairwise, shared, latency = asyncio.run(_run(pairs))
    finally:
        tenant_keys_purge(SCHEMA)

    design: dict[str, dict[str, int]] = {}
    verified_row = [f"**verified (design), gate {SETTINGS['similarity_threshold']:.2f}, via Redis**"]
    for split in SPLITS:
        figures = {}
        for kind in ("paraphrase", "near_miss", "distinct"):
            selected = _in_split(pairs, split, kind)
            figures[kind] = {"hits": sum(pairwise[pair["id"]]["hit"] for pair in selected), "total": len(selected)}
        design[split] = figures
        verified_row += [
            _rate(figures["paraphrase"]["hits"], figures["paraphrase"]["total"]),
            _rate(figures["near_miss"]["hits"], figures["near_miss"]["total"]),
        ]
    cosine_rows = _cosine_rows(pairs, similarity)
    gate_rows = _gate_rows(pairs, similarity)
    headers = ["method"] + [f"{split} {column}" for split in SPLITS for column in ("true hits", "false hits")]
    rate_rows = [*cosine_rows, *gate_rows, verified_row]
    print()
    print(text_table(headers, rate_rows))

    missed = Counter(
        pairwise[pair["id"]]["reason"]
        for pair in pairs
        if pair["kind"] == "paraphrase" and not pairwise[pair["id"]]["hit"]
    )
    rejected = Counter(
        pairwise[pair["id"]]["reason"]
        for pair in pairs
        if pair["kind"] == "near_miss" and not pairwise[pair["id"]]["hit"]
    )
    false_hits = [pair for pair in pairs if pair["kind"] != "paraphrase" and pairwise[pair["id"]]["hit"]]
    # Which pairs the word-embedding step decided: the verdict with every word pair scored 0.
    word_step_decided = [
        pair["id"]
        for pair in pairs
        if verification.paraphrase_rejection(pair["a"], pair["b"])
        != verification.paraphrase_rejection(pair["a"], pair["b"], word_similarity=lambda words: [0.0] * len(words))
    ]
    all_near = design["all"]["near_miss"]
    upper = _upper_95(all_near["hits"], all_near["total"])

    latency_rows = [
        [name, *(f"{value * 1e3:.2f}" for value in (stats.p50, stats.p90, stats.p99, stats.max))]
        for name, stats in latency.items()
    ]
    print(text_table(["variant", "p50 ms", "p90 ms", "p99 ms", "max ms"], latency_rows))
    print("paraphrases missed by reason:", dict(missed), "near-misses rejected by:", dict(rejected))
    print("shared scope:", shared)

    similarities = {
        kind: np.percentile([similarity[pair["id"]] for pair in pairs if pair["kind"] == kind], [10, 50, 90]).round(2)
        for kind in counts
    }
    shared_paraphrase = shared["results"]["paraphrase"]
    shared_near = shared["results"]["near_miss"]
    spread = {kind: " / ".join(map(str, values)) for kind, values in similarities.items()}
    design_all = design["all"]
    listed_false_hits = ", ".join(f"{pair['id']} ({pair['a']!r} / {pair['b']!r})" for pair in false_hits)
    missed_text = ", ".join(f"{reason} {count}" for reason, count in missed.most_common())
    rejected_text = ", ".join(f"{reason} {count}" for reason, count in rejected.most_common())
    shared_wrong = "".join(f" Wrong: {item['asked']!r} served {item['served']!r}." for item in shared["wrong"])
    markdown = f"""{environment_markdown(environment)}

{counts["paraphrase"]} paraphrase pairs, {counts["near_miss"]} near-miss pairs and {counts["distinct"]} distinct
pairs of support-bot questions (`tests/perf/semantic_cache_pairs.jsonl`), each labelled tune or holdout
(half each). The verification's synonym, opposite and phrase lists and its limits were tuned looking
at the tune half only; the holdout half is what they score on questions they were not fitted to.
Two rules came later and from the whole set: the shared-scope check below (questions of both halves)
first showed words added on one side only serving wrong answers (9 of 80 near-miss questions, e.g.
"How do I disable notifications?" served "How do I turn off email notifications?"), which led to
"one-sided words only from a short list of context words" and "why / when / where-is must agree".
A true hit: a paraphrase served the cached answer; a false hit: a near-miss question served the
other question's answer. Target: false hits < 2%; with 80 near-miss pairs, 0 false hits bounds the
rate below 3.7% (95%), so the set can show the target is plausible, not prove it.

Cosine similarity of the pairs (all-MiniLM-L6-v2), p10 / p50 / p90: paraphrases {spread["paraphrase"]},
near-misses {spread["near_miss"]}, distinct {spread["distinct"]}: near-misses score *higher* than
paraphrases, so no cosine threshold separates them.

{markdown_table(headers, rate_rows)}

- Verified design, all pairs: true hits {_rate(**design_all["paraphrase"])}, false hits
  {_rate(**design_all["near_miss"])} (95% upper bound {100 * upper:.1f}%), distinct pairs served
  {_rate(**design_all["distinct"])}. False hits: {listed_false_hits or "none"}.
- Paraphrases missed, by the first rule that turned them away: {missed_text}.
- Near-misses turned away by: {rejected_text}.
- Pairs whose verdict the word-embedding step (pairing words at cosine >= {verification.WORD_SIMILARITY_MIN}) decided:
  {", ".join(word_step_decided) or "none: the synonym lists already fold every pair it would join"}.
- Shared scope ({shared["stored"]} questions stored in one bot's cache, the second question of every
  pair asked): paraphrases got their own question's answer {shared_paraphrase.get("right", 0)} times,
  another's {shared_paraphrase.get("wrong", 0)} times, nothing {shared_paraphrase.get("miss", 0)} times;
  near-miss questions got another question's answer {shared_near.get("wrong", 0)} times, one of their
  own intent {shared_near.get("right", 0)} times, nothing {shared_near.get("miss", 0)} times.{shared_wrong}
  ("Wrong" means another pair's question; adding a person to a team may well be the same intent as
  "How do I add a team member?", which the set does not label.)

Hit latency, server-side: `cache_lookup` on the event loop with Redis over loopback, {LATENCY_ROUNDS}
lookups per variant interleaved in blocks of 10 after {LATENCY_WARMUP} warm-up lookups. A semantic hit
embeds the question every time (the process's question-vector cache is cleared before each lookup)
and reuses the scope's vectors and the verification's word vectors that a running process keeps;
"read from Redis" re-reads the scope's vectors (as after another store in it), "every process cache
cold" also embeds the words the verification compares. Targets: exact hit p50 <
{TARGET_EXACT_P50_MS:g} ms, semantic hit p50 < {TARGET_SEMANTIC_P50_MS:g} ms.

{markdown_table(["variant", "p50 ms", "p90 ms", "p99 ms", "max ms"], latency_rows)}
"""
    results = {
        "environment": environment,
        "pairs": dict(counts),
        "cosine_only": {
            f"{threshold:.2f}": {
                split: {
                    kind: sum(similarity[pair["id"]] >= threshold for pair in _in_split(pairs, split, kind))
                    for kind in ("paraphrase", "near_miss", "distinct")
                }
                for split in SPLITS
            }
            for threshold in COSINE_THRESHOLDS
        },
        "verified": design,
        "false_hit_upper_95": round(upper, 4),
        "paraphrases_missed_by_reason": dict(missed),
        "near_misses_rejected_by_reason": dict(rejected),
        "decided_by_word_embeddings": word_step_decided,
        "shared_scope": shared,
        "latency_ms": {name: stats.as_dict(unit="ms") for name, stats in latency.items()},
        "similarity_percentiles": {kind: values.tolist() for kind, values in similarities.items()},
    }
    path = report_write(
        name="semantic_cache", title="Semantic cache: paraphrases vs near-misses", results=results, markdown=markdown
    )
    print(f"written: {path}")

    # Sanity, not timing: every pair was looked up, and each variant hit as it should (asserted inside).
    assert len(pairwise) == len(pairs)
