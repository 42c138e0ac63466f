"""The embedded default provider: an extractive responder that quotes the bot's knowledge.

No network, no GPU, no weights. It splits the retrieved passages into sentences, scores each
against the user's question with BM25 over lightly stemmed terms, and answers with the best
few sentences as quotes, each cited (``[n]``) to the passage it came from. With nothing to
quote it says so rather than invent an answer. The answer streams word by word at a
configurable pace, so the demo feels like a model and exercises the same streaming path.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass

from chat.providers.base import (
    SOURCES_MESSAGE_NAME,
    ChatRequest,
    Citation,
    Completion,
    Delta,
    Provider,
    Source,
    StreamEvent,
    Usage,
    collect,
    estimate_prompt_tokens,
    estimate_tokens,
    message_text,
)

MODEL_NAME = "parley-extractive-1"
DEFAULT_SECONDS_PER_WORD = 0.03  # ~33 words/s: the pace of a fast hosted model

INTRODUCTION = (
    "I am Parley's built-in extractive responder: I answer by quoting the passages of this bot's "
    "knowledge that best match your question, rather than writing an answer of my own.\n\n"
)
NO_KNOWLEDGE_ANSWER = (
    "I am Parley's built-in extractive responder: I can only answer by quoting this bot's knowledge, "
    "and I have no knowledge to answer from for this question. Add documents to the bot's knowledge "
    "base, or connect a language model provider, to get answers."
)
NO_MATCH_ANSWER = (
    "I am Parley's built-in extractive responder: I can only answer by quoting this bot's knowledge, "
    "and none of the passages I have match your question. Try asking with the words your documents use."
)

_STOPWORD_TEXT = """a about above after again against all also am an and any are aren as at be because been before
    being below between both but by can cannot could did do does doing don down during each either
    else ever few for from further get got had has have having he her here hers herself him himself
    his how i if in into is isn it its itself just let me more most much must my myself no nor not
    now of off on once only or other ought our ours ourselves out over own please same shall she
    should so some such tell than that the their theirs them themselves then there these they this
    those through to too under until up upon us very was we were what when where which while who whom
    whose why will with within without would yes yet you your yours yourself yourselves"""
STOPWORDS = frozenset(_STOPWORD_TEXT.split())

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
# Sentence ends: . ! ? followed by space; also line breaks, since list items and headings rarely end in a period.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\s*\n\s*")
_MAX_SENTENCE_WORDS = 60  # text without punctuation (tables, PDF extracts) is cut into readable pieces
_DOUBLED_CONSONANT = re.compile(r"([b-df-hj-np-tv-z])\1$")

BM25_K1 = 1.2
BM25_B = 0.75
MAX_QUOTES = 3
RELATIVE_SCORE_FLOOR = 0.35  # quote a sentence only if it scores ≥ 35% of the best one: no filler quotes
PREVIOUS_QUESTION_WEIGHT = 0.3  # a follow-up ("and in Europe?") borrows terms from the turn before
TITLE_MATCH_BOOST = 0.25


def stem(word: str) -> str:
    """Stemming-lite: fold the common English inflections so 'refunds'/'refunded' match 'refund'."""
    for suffix, replacement in (("ies", "y"), ("sses", "ss"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if not word.endswith(suffix):
            continue
        base = word[: -len(suffix)] + replacement
        if len(base) < 3 or (suffix == "s" and word.endswith(("ss", "us", "is"))):
            continue
        if suffix == "es" and not base.endswith(("s", "x", "z", "ch", "sh")):
            base = word[:-1]  # 'prices' → 'price', but 'boxes' → 'box'
        if suffix in ("ing", "ed") and _DOUBLED_CONSONANT.search(base) and not base.endswith(("ll", "ss", "zz")):
            base = base[:-1]  # 'shipping' → 'ship'
        return base
    return word


def terms(text: str) -> list[str]:
    return [stem(word) for word in _WORD.findall(text.lower()) if word not in STOPWORDS]


def split_sentences(text: str) -> list[str]:
    sentences: list[str] = []
    for piece in _SENTENCE_BREAK.split(text):
        words = piece.split()
        for start in range(0, len(words), _MAX_SENTENCE_WORDS):
            sentence = " ".join(words[start : start + _MAX_SENTENCE_WORDS])
            if sentence:
                sentences.append(sentence)
    return sentences


@dataclass(frozen=True, slots=True)
class ScoredSentence:
    source_index: int
    position: int  # order within its source
    text: str
    score: float


def question_terms(messages: list[dict]) -> dict[str, float]:
    """Query term weights: the last user message, plus a little of the one before it."""
    user_texts = [
        message_text(message)
        for message in messages
        if message.get("role") == "user" and message.get("name") != SOURCES_MESSAGE_NAME
    ]
    if not user_texts:
        return {}
    weights = dict.fromkeys(terms(user_texts[-2]) if len(user_texts) > 1 else (), PREVIOUS_QUESTION_WEIGHT)
    weights.update(dict.fromkeys(terms(user_texts[-1]), 1.0))
    return weights


def rank_sentences(query: dict[str, float], sources: list[Source]) -> list[ScoredSentence]:
    """Every sentence with a positive BM25 score against the query, best first."""
    documents: list[tuple[int, int, str, Counter[str]]] = []
    for source_index, source in enumerate(sources):
        for position, sentence in enumerate(split_sentences(source.text)):
            documents.append((source_index, position, sentence, Counter(terms(sentence))))
    if not documents or not query:
        return []
    document_frequency: Counter[str] = Counter()
    for *_, counts in documents:
        document_frequency.update(counts.keys())
    average_length = sum(sum(counts.values()) for *_, counts in documents) / len(documents) or 1.0
    total = len(documents)
    title_terms = [set(terms(source.title)) for source in sources]

    ranked: list[ScoredSentence] = []
    for source_index, position, sentence, counts in documents:
        length = sum(counts.values())
        score = 0.0
        for term, weight in query.items():
            frequency = counts.get(term, 0)
            if not frequency:
                continue
            idf = math.log(1 + (total - document_frequency[term] + 0.5) / (document_frequency[term] + 0.5))
            norm = frequency + BM25_K1 * (1 - BM25_B + BM25_B * length / average_length)
            score += weight * idf * frequency * (BM25_K1 + 1) / norm
        if score <= 0:
            continue
        title_overlap = sum(weight for term, weight in query.items() if term in title_terms[source_index])
        score *= 1 + TITLE_MATCH_BOOST * title_overlap / sum(query.values())
        ranked.append(ScoredSentence(source_index, position, sentence, score))
    ranked.sort(key=lambda item: (-item.score, item.source_index, item.position))
    return ranked


@dataclass(frozen=True, slots=True)
class Segment:
    """A run of answer text, with the citation to emit once it has been streamed."""

    text: str
    citation: Citation | None = None


def compose_answer(query: dict[str, float], sources: list[Source]) -> list[Segment]:
    if not sources:
        return [Segment(NO_KNOWLEDGE_ANSWER)]
    ranked = rank_sentences(query, sources)
    if not ranked:
        return [Segment(NO_MATCH_ANSWER)]
    floor = ranked[0].score * RELATIVE_SCORE_FLOOR
    chosen = [sentence for sentence in ranked[:MAX_QUOTES] if sentence.score >= floor]

    # One quote per source, sources in order of their best sentence, sentences in document order.
    by_source: dict[int, list[ScoredSentence]] = {}
    for sentence in chosen:
        by_source.setdefault(sentence.source_index, []).append(sentence)
    segments = [Segment(INTRODUCTION)]
    references: list[str] = []
    for source_index, sentences in by_source.items():
        number = source_index + 1  # the source's number in the prompt, as a model would cite it
        source = sources[source_index]
        quote = _join_quote(sorted(sentences, key=lambda item: item.position))
        citation = Citation(index=number, source_id=source.id, title=source.title, quote=quote)
        segments.append(Segment(f"> {quote} [{number}]\n\n", citation))
        page = f", p. {source.page}" if source.page is not None else ""
        references.append(f"[{number}] {source.title or source.id}{page}")
    segments.append(Segment("Sources: " + "; ".join(references)))
    return segments


def _join_quote(sentences: Iterable[ScoredSentence]) -> str:
    """Adjacent sentences read as one passage; a gap between them is marked with an ellipsis."""
    text = ""
    previous: int | None = None
    for sentence in sentences:
        if previous is None:
            text = sentence.text
        elif sentence.position == previous + 1:
            text += " " + sentence.text
        else:
            text += " … " + sentence.text
        previous = sentence.position
    return text


_WORD_WITH_SPACE = re.compile(r"\s*\S+\s*")


class LocalProvider(Provider):
    """Parley's built-in extractive responder (see the module docstring)."""

    kind = "local"

    def __init__(self, *, seconds_per_word: float = DEFAULT_SECONDS_PER_WORD, model: str = MODEL_NAME) -> None:
        self.seconds_per_word = seconds_per_word
        self.model = model

    def stream(self, request: ChatRequest) -> AsyncGenerator[StreamEvent, None]:
        return self._generate(request, seconds_per_word=self.seconds_per_word if request.is_streamed else 0.0)

    async def complete(self, request: ChatRequest) -> Completion:
        # Pacing imitates a model's streaming; a caller waiting for the whole answer gains nothing from it.
        return await collect(self._generate(request, seconds_per_word=0.0))

    async def _generate(self, request: ChatRequest, *, seconds_per_word: float) -> AsyncGenerator[StreamEvent, None]:
        segments = compose_answer(question_terms(request.messages), request.sources)
        budget = request.max_tokens if request.max_tokens is not None else math.inf
        remaining_chars = _chars_before_stop(segments, request.stop)
        completion_tokens = 0
        finish_reason = "stop"
        is_first_word = True
        for segment in segments:
            # The citation goes out with the segment's first word, before its "[n]" marker.
            pending_citation = segment.citation
            for word in _WORD_WITH_SPACE.findall(segment.text):
                if remaining_chars <= 0:
                    break
                word = word[: int(min(remaining_chars, len(word)))]
                remaining_chars -= len(word)
                tokens = estimate_tokens(word)
                if completion_tokens + tokens > budget:
                    finish_reason = "length"
                    remaining_chars = 0
                    break
                if seconds_per_word and not is_first_word:
                    await asyncio.sleep(seconds_per_word)
                is_first_word = False
                completion_tokens += tokens
                if pending_citation is not None:
                    yield pending_citation
                    pending_citation = None
                yield Delta(word)
            else:
                continue
            break
        prompt_tokens = estimate_prompt_tokens(request.messages) + sum(
            estimate_tokens(source.text) for source in request.sources
        )
        yield Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            finish_reason=finish_reason,
            provider=self.kind,
            model=self.model,
            is_estimated=True,
        )


def _chars_before_stop(segments: list[Segment], stop: list[str] | None) -> float:
    text = "".join(segment.text for segment in segments)
    positions = [text.find(sequence) for sequence in stop or () if sequence and sequence in text]
    return min(positions) if positions else math.inf
