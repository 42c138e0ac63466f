"""The built-in extractive responder: quotes the best passage, cites it, admits when it knows nothing."""

from __future__ import annotations

import pytest

from chat.providers import local
from chat.providers.base import ChatRequest, Citation, Delta, Source, Usage, estimate_tokens
from chat.providers.local import NO_KNOWLEDGE_ANSWER, NO_MATCH_ANSWER, LocalProvider, stem

REFUNDS = Source(
    id="doc-refunds",
    title="Refund policy",
    text=(
        "We accept returns within 30 days of delivery. "
        "Refunds are issued to the original payment method within 5 business days after we receive the item. "
        "Gift cards cannot be returned."
    ),
)
SHIPPING = Source(
    id="doc-shipping",
    title="Shipping FAQ",
    text="Orders leave our warehouse within 2 business days. Express shipping costs $15 and takes one day.",
)


def ask(question: str, sources: list[Source], **request_fields) -> ChatRequest:
    return ChatRequest(messages=[{"role": "user", "content": question}], sources=sources, **request_fields)


async def test_quotes_the_most_relevant_passage_and_cites_it():
    provider = LocalProvider(seconds_per_word=0)

    completion = await provider.complete(ask("How quickly are refunds issued?", [SHIPPING, REFUNDS]))

    quote = "Refunds are issued to the original payment method within 5 business days after we receive the item."
    # Cited by its number in the prompt (the second source), as a model would.
    assert completion.text == f"{local.INTRODUCTION}> {quote} [2]\n\nSources: [2] Refund policy"
    assert completion.citations == (Citation(index=2, source_id="doc-refunds", title="Refund policy", quote=quote),)
    assert "Parley's built-in extractive responder" in completion.text
    assert completion.usage.finish_reason == "stop"
    assert completion.usage.provider == "local"
    assert completion.usage.model == "parley-extractive-1"


async def test_cites_each_source_it_quotes():
    provider = LocalProvider(seconds_per_word=0)

    completion = await provider.complete(ask("Express shipping and refunds: how many days?", [REFUNDS, SHIPPING]))

    assert [(citation.index, citation.source_id) for citation in completion.citations] == [
        (2, "doc-shipping"),
        (1, "doc-refunds"),
    ]
    assert completion.text.endswith("Sources: [2] Shipping FAQ; [1] Refund policy")
    for citation in completion.citations:
        assert f"> {citation.quote} [{citation.index}]" in completion.text


async def test_says_it_has_no_knowledge_without_sources():
    provider = LocalProvider(seconds_per_word=0)

    completion = await provider.complete(ask("How quickly are refunds issued?", []))

    assert completion.text == NO_KNOWLEDGE_ANSWER
    assert "no knowledge to answer from" in completion.text
    assert completion.citations == ()


async def test_says_nothing_matches_when_no_passage_shares_a_term():
    provider = LocalProvider(seconds_per_word=0)

    completion = await provider.complete(ask("Do you sell umbrellas?", [REFUNDS, SHIPPING]))

    assert completion.text == NO_MATCH_ANSWER
    assert completion.citations == ()


async def test_follow_up_question_borrows_the_previous_question_terms():
    provider = LocalProvider(seconds_per_word=0)
    request = ChatRequest(
        messages=[
            {"role": "user", "content": "Tell me about express shipping."},
            {"role": "assistant", "content": "Express shipping costs $15."},
            {"role": "user", "content": "What does it cost?"},
        ],
        sources=[REFUNDS, SHIPPING],
    )

    completion = await provider.complete(request)

    assert [citation.source_id for citation in completion.citations] == ["doc-shipping"]


async def test_streams_word_by_word_then_citations_then_usage():
    provider = LocalProvider(seconds_per_word=0)

    events = [event async for event in provider.stream(ask("How quickly are refunds issued?", [REFUNDS]))]

    deltas = [event for event in events if isinstance(event, Delta)]
    text = "".join(delta.text for delta in deltas)
    assert len(deltas) == len(text.split())
    assert all(len(delta.text.split()) == 1 for delta in deltas)
    kinds = [type(event).__name__ for event in events]
    runs = [kind for index, kind in enumerate(kinds) if index == 0 or kinds[index - 1] != kind]
    assert runs == ["Delta", "Citation", "Delta", "Usage"]
    usage = events[-1]
    assert isinstance(usage, Usage)
    assert usage.completion_tokens == estimate_tokens(text)
    assert usage.prompt_tokens == estimate_tokens("How quickly are refunds issued?") + 4 + estimate_tokens(REFUNDS.text)
    assert usage.is_estimated is True


async def test_streams_at_the_configured_pace(monkeypatch):
    pauses: list[float] = []

    async def record_sleep(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(local.asyncio, "sleep", record_sleep)
    provider = LocalProvider(seconds_per_word=0.03)

    events = [event async for event in provider.stream(ask("Anything?", []))]

    words = len([event for event in events if isinstance(event, Delta)])
    assert pauses == [0.03] * (words - 1)


async def test_complete_does_not_pace(monkeypatch):
    pauses: list[float] = []

    async def record_sleep(seconds: float) -> None:
        pauses.append(seconds)

    monkeypatch.setattr(local.asyncio, "sleep", record_sleep)

    await LocalProvider(seconds_per_word=0.03).complete(ask("Anything?", []))

    assert pauses == []


async def test_max_tokens_cuts_the_answer_with_finish_reason_length():
    provider = LocalProvider(seconds_per_word=0)

    completion = await provider.complete(ask("How quickly are refunds issued?", [REFUNDS], max_tokens=10))

    assert completion.usage.finish_reason == "length"
    assert completion.usage.completion_tokens <= 10
    assert completion.text == "I am Parley's built-in "


async def test_stop_sequence_cuts_the_answer():
    provider = LocalProvider(seconds_per_word=0)

    completion = await provider.complete(ask("Anything?", [], stop=[":"]))

    assert completion.text == "I am Parley's built-in extractive responder"
    assert completion.usage.finish_reason == "stop"


STEMS = [
    ("refunds", "refund"),
    ("refunded", "refund"),
    ("refunding", "refund"),
    ("shipping", "ship"),
    ("shipped", "ship"),
    ("policies", "policy"),
    ("prices", "price"),
    ("boxes", "box"),
    ("status", "status"),
    ("class", "class"),
]


@pytest.mark.parametrize(("word", "expected"), STEMS, ids=[f"{word}_case" for word, _ in STEMS])
def test_stemming_folds_inflections(word, expected):
    assert stem(word) == expected
