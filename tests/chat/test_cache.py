"""The response cache: exact keys, semantic paraphrase hits with verification, scoping, TTL and caps.

Real Redis and the real local embedding model; no database (schemas here are key prefixes only).
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from prometheus_client import REGISTRY

from chat.response_cache import (
    CACHE_SETTINGS_DEFAULTS,
    CacheScope,
    cache_settings_validate,
    exact_key,
    generation_digest,
    is_cacheable,
)
from chat.response_cache.lookup import cache_lookup
from chat.response_cache.storage import cache_store
from chat.response_cache.verification import _SYNONYM_GROUPS, _term, paraphrase_rejection
from tenants.errors import ValidationFailed
from tenants.redis import get_async_redis

SCHEMA_A = "cache_test_a"
SCHEMA_B = "cache_test_b"
SCOPE = CacheScope(schema_name=SCHEMA_A, bot_id=7, bot_version=3, knowledge_signature="3:7,5:2")
SETTINGS = cache_settings_validate({})
REQUEST = {
    "system_prompt": "You are the support bot of Example Ltd.",
    "history": [],
    "user_message": "How do I cancel my subscription?",
    "generation": {"temperature": 0.0, "max_tokens": 512},
}
USAGE = {"prompt_tokens": 120, "completion_tokens": 30, "provider": "mock", "model": "m", "finish_reason": "stop"}
CITATIONS = [{"index": 1, "document_id": 4, "quote": "Cancel under Settings > Plan."}]


@pytest.fixture
async def redis():
    client = get_async_redis()
    yield client
    await client.aclose()


async def _store(redis, question: str | None, *, scope=SCOPE, text="answer", cache_settings=SETTINGS, **request):
    key = exact_key(scope, **{**REQUEST, "user_message": question or REQUEST["user_message"], **request})
    await cache_store(
        scope,
        exact=key,
        question=question,
        text=text,
        citations=CITATIONS,
        usage=USAGE,
        cache_settings=cache_settings,
        redis=redis,
    )
    return key


async def _lookup(redis, question: str | None, *, scope=SCOPE, cache_settings=SETTINGS, **request):
    key = exact_key(scope, **{**REQUEST, "user_message": question or REQUEST["user_message"], **request})
    return await cache_lookup(scope, exact=key, question=question, cache_settings=cache_settings, redis=redis)


async def _keys(redis, schema_name: str) -> list[str]:
    return sorted(key.decode() for key in await redis.keys(f"t:{schema_name}:*"))


def _lookups(layer: str, outcome: str, tenant: str = SCHEMA_A) -> float:
    value = REGISTRY.get_sample_value(
        "parley_cache_lookups_total", {"tenant": tenant, "layer": layer, "outcome": outcome}
    )
    return value or 0.0


# --- exact layer -------------------------------------------------------------------------------


async def test_identical_request_is_an_exact_hit(redis):
    await _store(redis, None, text="Go to Settings > Plan and press Cancel.")

    answer = await _lookup(redis, None)

    assert answer is not None
    assert answer.layer == "exact"
    assert answer.text == "Go to Settings > Plan and press Cancel."
    assert answer.citations == CITATIONS
    assert answer.usage == USAGE
    assert answer.similarity is None


@pytest.mark.parametrize(
    ("scope", "request_change"),
    [
        pytest.param(dataclasses.replace(SCOPE, bot_version=4), {}, id="bot_version_case"),
        pytest.param(dataclasses.replace(SCOPE, bot_id=8), {}, id="bot_case"),
        pytest.param(dataclasses.replace(SCOPE, knowledge_signature="3:8,5:2"), {}, id="knowledge_case"),
        pytest.param(SCOPE, {"system_prompt": "You are terse."}, id="system_prompt_case"),
        pytest.param(
            SCOPE, {"history": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            id="history_case",
        ),
        pytest.param(SCOPE, {"generation": {"temperature": 0.0, "max_tokens": 256}}, id="generation_case"),
        pytest.param(SCOPE, {"user_message": "How do I cancel my subscription"}, id="user_message_case"),
    ],
)  # fmt: skip
async def test_any_difference_in_the_request_misses_the_exact_layer(redis, scope, request_change):
    await _store(redis, None)

    key = exact_key(scope, **{**REQUEST, **request_change})
    answer = await cache_lookup(scope, exact=key, question=None, cache_settings=SETTINGS, redis=redis)

    assert key != exact_key(SCOPE, **REQUEST)
    assert answer is None


def test_exact_key_ignores_dict_order_and_extra_message_fields():
    reordered = {**REQUEST, "generation": {"max_tokens": 512, "temperature": 0.0}}
    with_extra = {**REQUEST, "history": [{"content": "hi", "role": "user", "id": "m1"}]}
    plain = {**REQUEST, "history": [{"role": "user", "content": "hi"}]}

    assert exact_key(SCOPE, **reordered) == exact_key(SCOPE, **REQUEST)
    assert exact_key(SCOPE, **with_extra) == exact_key(SCOPE, **plain)
    assert len(exact_key(SCOPE, **REQUEST)) == 64


# --- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("generation", "cache_settings", "expected"),
    [
        pytest.param({"temperature": 0.0}, {}, True, id="greedy_case"),
        pytest.param({"temperature": 0.2, "seed": 42}, {}, True, id="seeded_case"),
        pytest.param({"temperature": 0.2}, {}, False, id="sampled_case"),
        pytest.param({}, {}, False, id="provider_default_temperature_case"),
        pytest.param({"temperature": 0.7}, {"allow_nondeterministic": True}, True, id="opted_in_case"),
        pytest.param({"temperature": 0.0}, {"enabled": False}, False, id="disabled_case"),
        pytest.param({"temperature": 0.7}, {"enabled": False, "allow_nondeterministic": True}, False, id="off_case"),
    ],
)
def test_only_deterministic_requests_are_cacheable_unless_opted_in(generation, cache_settings, expected):
    assert is_cacheable(generation, cache_settings=cache_settings_validate(cache_settings)) is expected


def test_cache_settings_defaults():
    assert cache_settings_validate({}) == {
        "enabled": True,
        "semantic": True,
        "similarity_threshold": 0.5,
        "ttl_seconds": 86_400,
        "allow_nondeterministic": False,
        "faq_mode": False,
    }
    assert cache_settings_validate({"similarity_threshold": 1, "ttl_seconds": 60})["similarity_threshold"] == 1.0


@pytest.mark.parametrize(
    ("value", "param"),
    [
        pytest.param([], "cache", id="not_an_object_case"),
        pytest.param({"size": 10}, "cache.size", id="unknown_field_case"),
        pytest.param({"enabled": "yes"}, "cache.enabled", id="enabled_not_boolean_case"),
        pytest.param({"faq_mode": 1}, "cache.faq_mode", id="faq_mode_not_boolean_case"),
        pytest.param({"similarity_threshold": 0.4}, "cache.similarity_threshold", id="threshold_low_case"),
        pytest.param({"similarity_threshold": 1.01}, "cache.similarity_threshold", id="threshold_high_case"),
        pytest.param({"similarity_threshold": "0.9"}, "cache.similarity_threshold", id="threshold_text_case"),
        pytest.param({"similarity_threshold": True}, "cache.similarity_threshold", id="threshold_boolean_case"),
        pytest.param({"similarity_threshold": float("nan")}, "cache.similarity_threshold", id="threshold_nan_case"),
        pytest.param({"ttl_seconds": 0}, "cache.ttl_seconds", id="ttl_zero_case"),
        pytest.param({"ttl_seconds": 1.5}, "cache.ttl_seconds", id="ttl_fraction_case"),
        pytest.param({"ttl_seconds": 31 * 86_400}, "cache.ttl_seconds", id="ttl_too_long_case"),
    ],
)
def test_bad_cache_settings_are_rejected(value, param):
    with pytest.raises(ValidationFailed) as raised:
        cache_settings_validate(value)

    assert raised.value.param == param


async def test_a_disabled_cache_never_stores_nor_answers(redis):
    disabled = cache_settings_validate({"enabled": False})
    await _store(redis, "How do I cancel my subscription?", cache_settings=disabled)
    stored_while_disabled = await _keys(redis, SCHEMA_A)
    await _store(redis, "How do I cancel my subscription?")

    answer = await _lookup(redis, "How do I cancel my subscription?", cache_settings=disabled)

    assert stored_while_disabled == []
    assert answer is None


async def test_an_empty_answer_is_not_stored(redis):
    await _store(redis, "How do I cancel my subscription?", text="")

    assert await _keys(redis, SCHEMA_A) == []


# --- semantic layer ----------------------------------------------------------------------------

PARAPHRASES = [
    pytest.param("How do I cancel my subscription?", "How can I terminate my membership?", id="cancel_plan_case"),
    pytest.param("How do I delete my account?", "I want to get rid of my profile.", id="delete_account_case"),
    pytest.param("Can I upgrade my plan to Pro?", "Is it possible to move up to the Pro tier?", id="upgrade_case"),
    pytest.param("Do you offer a student discount?", "Is there a discount for students?", id="discount_case"),
    pytest.param("How do I enable dark mode?", "How do I turn on dark mode?", id="turn_on_case"),
    pytest.param("Do you have a mobile app?", "Is there an app for my phone?", id="mobile_app_case"),
]


@pytest.mark.parametrize(("cached", "asked"), PARAPHRASES)
async def test_a_paraphrase_of_a_cached_question_is_a_semantic_hit(redis, cached, asked):
    await _store(redis, cached, text=f"answer to {cached}")

    answer = await _lookup(redis, asked)

    assert answer is not None
    assert answer.layer == "semantic"
    assert answer.text == f"answer to {cached}"
    assert answer.question == cached
    assert answer.citations == CITATIONS
    assert 0.5 <= answer.similarity <= 1.0


NEAR_MISSES = [
    pytest.param("How do I cancel my subscription?", "How do I pause my subscription?", id="cancel_pause_case"),
    pytest.param("Can I upgrade my plan to Pro?", "Can I downgrade my plan from Pro?", id="upgrade_downgrade_case"),
    pytest.param("How do I reset my password?", "How do I reset my username?", id="object_case"),
    pytest.param("Why was I charged twice this month?", "Why was I not charged this month?", id="negation_case"),
    pytest.param("Can I add 5 users to my plan?", "Can I add 50 users to my plan?", id="quantity_case"),
    pytest.param("Do you ship to Canada?", "Do you ship from Canada?", id="direction_case"),
    pytest.param("How do I enable notifications?", "How do I disable notifications?", id="enable_disable_case"),
    pytest.param("How do I add a payment method?", "How do I remove a payment method?", id="add_remove_case"),
    pytest.param(
        "How do I share a document with my team?", "How do I stop sharing a document with my team?", id="stop_case"
    ),
]


@pytest.mark.parametrize(("cached", "asked"), NEAR_MISSES)
async def test_a_near_miss_of_a_cached_question_is_rejected(redis, cached, asked):
    await _store(redis, cached)
    rejected_before = _lookups("semantic", "rejected")

    answer = await _lookup(redis, asked)

    assert answer is None
    assert _lookups("semantic", "rejected") == rejected_before + 1


async def test_a_distinct_question_misses(redis):
    await _store(redis, "How do I cancel my subscription?")
    misses_before = _lookups("semantic", "miss")

    answer = await _lookup(redis, "What payment methods do you accept?")

    assert answer is None
    assert _lookups("semantic", "miss") == misses_before + 1


async def test_the_best_verified_candidate_wins_over_a_closer_near_miss(redis):
    await _store(redis, "How do I pause my subscription?", text="pause answer")
    await _store(redis, "How do I cancel my subscription?", text="cancel answer")

    answer = await _lookup(redis, "How can I cancel my plan?")

    assert answer is not None
    assert answer.text == "cancel answer"


async def test_semantic_layer_is_skipped_without_a_question_or_when_off(redis):
    await _store(redis, "How do I cancel my subscription?")
    semantic_off = cache_settings_validate({"semantic": False})

    without_question = await cache_lookup(
        SCOPE,
        exact=exact_key(SCOPE, **{**REQUEST, "user_message": "How can I cancel my plan?"}),
        question=None,
        cache_settings=SETTINGS,
        redis=redis,
    )
    switched_off = await _lookup(redis, "How can I cancel my plan?", cache_settings=semantic_off)
    exact_still = await _lookup(redis, "How do I cancel my subscription?", cache_settings=semantic_off)

    assert without_question is None
    assert switched_off is None
    assert exact_still is not None
    assert exact_still.layer == "exact"


async def test_a_lookup_sees_answers_stored_after_it_read_the_scope(redis):
    await _store(redis, "Do you ship to Canada?")
    before = await _lookup(redis, "How can I cancel my plan?")  # this process now holds the scope's vectors

    await _store(redis, "How do I cancel my subscription?")
    after = await _lookup(redis, "How can I cancel my plan?")

    assert before is None
    assert after is not None
    assert after.question == "How do I cancel my subscription?"


async def test_a_long_message_skips_the_semantic_layer(redis):
    long_question = "How do I cancel my subscription? " + "Some context about my account. " * 20
    await _store(redis, long_question)

    answer = await _lookup(redis, long_question.replace("How do I cancel", "How can I cancel"))

    assert len(long_question) > 500
    assert answer is None
    assert await redis.keys(f"t:{SCHEMA_A}:cache:s:*") == []


async def test_a_higher_threshold_turns_a_paraphrase_away(redis):
    await _store(redis, "How do I cancel my subscription?")
    strict = cache_settings_validate({"similarity_threshold": 0.95})

    assert await _lookup(redis, "How can I cancel my plan?", cache_settings=strict) is None
    assert await _lookup(redis, "How can I cancel my plan?") is not None


async def test_a_knowledge_update_invalidates_both_layers(redis):
    await _store(redis, "How do I cancel my subscription?")
    updated = dataclasses.replace(SCOPE, knowledge_signature="3:8,5:2")

    same_request = await _lookup(redis, "How do I cancel my subscription?", scope=updated)
    paraphrase = await _lookup(redis, "How can I cancel my plan?", scope=updated)

    assert same_request is None
    assert paraphrase is None


async def test_a_new_bot_version_invalidates_the_semantic_layer(redis):
    await _store(redis, "How do I cancel my subscription?")

    answer = await _lookup(redis, "How can I cancel my plan?", scope=dataclasses.replace(SCOPE, bot_version=4))

    assert answer is None


async def test_other_generation_parameters_do_not_share_semantic_answers(redis):
    short = dataclasses.replace(SCOPE, generation_signature=generation_digest({"max_tokens": 50}))
    await _store(redis, "How do I cancel my subscription?", scope=short)

    long = dataclasses.replace(SCOPE, generation_signature=generation_digest({"max_tokens": 500}))
    answer = await _lookup(redis, "How can I cancel my plan?", scope=long)

    assert answer is None
    assert await _lookup(redis, "How can I cancel my plan?", scope=short) is not None


async def test_two_tenants_asking_the_same_question_never_share_an_answer(redis):
    await _store(redis, "How do I cancel my subscription?", text="tenant A's answer")
    scope_b = dataclasses.replace(SCOPE, schema_name=SCHEMA_B)

    same_request = await _lookup(redis, "How do I cancel my subscription?", scope=scope_b)
    paraphrase = await _lookup(redis, "How can I cancel my plan?", scope=scope_b)

    assert same_request is None
    assert paraphrase is None
    assert await _keys(redis, SCHEMA_B) == []
    assert all(key.startswith(f"t:{SCHEMA_A}:cache:") for key in await _keys(redis, SCHEMA_A))
    assert (await _lookup(redis, "How do I cancel my subscription?")).text == "tenant A's answer"


# --- storage -----------------------------------------------------------------------------------


async def test_every_stored_key_has_a_ttl(redis):
    await _store(
        redis, "How do I cancel my subscription?", cache_settings=cache_settings_validate({"ttl_seconds": 600})
    )

    keys = await _keys(redis, SCHEMA_A)
    ttls = [await redis.ttl(key) for key in keys]

    # The exact entry, the tenant index, the scope's vectors, answers, index and generation counter.
    assert len(keys) == 6
    assert all(0 < ttl <= 600 for ttl in ttls)


async def test_expired_entries_are_not_served_and_are_dropped_by_the_next_store(redis):
    await _store(redis, "How do I cancel my subscription?", cache_settings=cache_settings_validate({"ttl_seconds": 1}))
    await asyncio.sleep(1.1)

    exact = await _lookup(redis, "How do I cancel my subscription?", cache_settings=SETTINGS)
    paraphrase = await _lookup(redis, "How can I cancel my plan?")
    await _store(redis, "What payment methods do you accept?")
    index = await redis.zrange(f"t:{SCHEMA_A}:cache:index", 0, -1)

    assert exact is None
    assert paraphrase is None
    assert len(index) == 2  # the new exact and semantic entries only
    assert all(b"subscription" not in value for value in (await redis.hgetall(_answers_key(redis))).values())


def _answers_key(_redis) -> str:
    from chat.response_cache.keys import _semantic_member

    return f"t:{SCHEMA_A}:cache:{_semantic_member(SCOPE)}:a"


async def test_the_tenant_cap_evicts_the_oldest_entries(redis, settings):
    settings.PARLEY_CACHE_MAX_ENTRIES_PER_TENANT = 3
    for minute in range(5):
        await _store(redis, None, generation={"temperature": 0.0, "max_tokens": 100 + minute})

    kept = [
        await _lookup(redis, None, generation={"temperature": 0.0, "max_tokens": 100 + minute}) for minute in range(5)
    ]

    assert [answer is not None for answer in kept] == [False, False, True, True, True]
    assert await redis.zcard(f"t:{SCHEMA_A}:cache:index") == 3


async def test_the_scope_cap_keeps_the_newest_questions(redis, settings):
    settings.PARLEY_CACHE_MAX_ENTRIES_PER_SCOPE = 2
    questions = ["How do I cancel my subscription?", "Do you ship to Canada?", "Is my data encrypted?"]
    for question in questions:
        await _store(redis, question)

    vectors = await redis.hkeys(_answers_key(redis).removesuffix(":a") + ":v")
    first = await _lookup(redis, "How can I cancel my plan?")
    last = await _lookup(redis, "Do you encrypt my data?")

    assert len(vectors) == 2
    assert first is None
    assert last is not None
    assert last.question == "Is my data encrypted?"


LAYER_OUTCOMES = [("exact", "hit"), ("exact", "miss"), ("semantic", "hit")]


async def test_lookups_are_counted_per_layer_and_outcome(redis):
    before = {(layer, outcome): _lookups(layer, outcome) for layer, outcome in LAYER_OUTCOMES}
    await _store(redis, "How do I cancel my subscription?")

    await _lookup(redis, "How do I cancel my subscription?")
    await _lookup(redis, "How can I cancel my plan?")

    assert _lookups("exact", "hit") == before[("exact", "hit")] + 1
    assert _lookups("exact", "miss") == before[("exact", "miss")] + 1
    assert _lookups("semantic", "hit") == before[("semantic", "hit")] + 1


# --- verification ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cached", "asked", "reason"),
    [
        pytest.param("Why can't I log in?", "Why can I log in?", "negation", id="negation_case"),
        pytest.param("Is there a 30-day guarantee?", "Is there a 60-day guarantee?", "numbers", id="numbers_case"),
        pytest.param(
            "Can I use one license on two devices?", "Can I use two licenses on one device?", "numbers",
            id="counted_case",
        ),
        pytest.param(
            "Is the premium plan cheaper than the basic plan?", "Is the basic plan cheaper than the premium plan?",
            "relation", id="moved_relation_case",
        ),
        pytest.param(
            "I was charged after I cancelled", "I was charged before I cancelled", "relation", id="before_after_case"
        ),
        pytest.param("How do I lock my account?", "How do I unlock my account?", "opposites", id="prefix_case"),
        pytest.param("Why can't I log in?", "Why can't I log out?", "opposites", id="login_logout_case"),
        pytest.param("Where can I download the Windows app?", "Where can I download the Mac app?", "substitution",
                     id="substitution_case"),
        pytest.param("How do I share a file?", "How do I stop sharing a file?", "extra words", id="extra_action_case"),
        pytest.param("How do I disable notifications?", "How do I turn off email notifications?", "extra words",
                     id="extra_detail_case"),
        pytest.param("Where is my refund?", "How do I get a refund?", "question type", id="status_case"),
        pytest.param("Why did I get a confirmation email?", "How do I get a confirmation email?", "question type",
                     id="reason_case"),
        pytest.param("Is express shipping available?", "Do you have a faster delivery option?", None,
                     id="context_word_case"),
        pytest.param("How do I return an item?", "How do I return a damaged item bought in store?", "extra words",
                     id="extra_words_case"),
        pytest.param("How do I cancel my subscription?", "I want to stop my plan, how?", None, id="paraphrase_case"),
        pytest.param("Can I add 5 users?", "Can I add five users?", None, id="number_word_case"),
        pytest.param("Où est ma commande ?", "Ou est ma commande?", None, id="accents_case"),
        pytest.param("注文はどこですか", "注文をキャンセルするには", "nothing shared", id="no_latin_words_case"),
    ],
)  # fmt: skip
def test_verification_reasons(cached, asked, reason):
    assert paraphrase_rejection(cached, asked) == reason
    assert paraphrase_rejection(asked, cached) == reason


def test_every_synonym_folds_into_its_own_group():
    folded = {word: _term(word) for group in _SYNONYM_GROUPS for word in group}

    assert {word: head for word, head in folded.items() if head != _group_head(word)} == {}


def _group_head(word: str) -> str:
    return next(group[0] for group in _SYNONYM_GROUPS if word in group)


def test_default_settings_are_valid():
    assert cache_settings_validate(dict(CACHE_SETTINGS_DEFAULTS)) == CACHE_SETTINGS_DEFAULTS
