"""Whether two questions say the same thing: the checks a semantic-cache candidate must pass."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field

from chat.response_cache.embeddings import word_vectors

WORD_SIMILARITY_MIN = 0.8  # single words this close are synonyms; antonyms reach 0.72 (enable/disable)
EXTRA_TERMS_MAX = 1  # context words allowed on one side only (see _CONTEXT_WORDS)
UNMATCHED_TERMS_MAX = 6  # more words on one side only than this rejects without embedding them

# Expanded before tokenising, so that "can't" carries its negation and "'s" does not become a word.
_CONTRACTIONS = [
    (re.compile(r"\b(can't|cannot|can not)\b"), "can not"),
    (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"\bshan't\b"), "shall not"),
    (re.compile(r"n't\b"), " not"),
    (re.compile(r"'s\b"), " is"),  # "where's" is "where is"; a possessive's "is" is a stop word anyway
    (re.compile(r"'(m|re|ve|ll|d)\b"), ""),
]

# Phrases folded into one word before tokenising (most specific first): multi-word expressions
# of one meaning, and the relation words that "instead of" / "rather than" stand for.
_PHRASE_TABLE: list[tuple[str, str]] = [
    (
        r"(two|2)[- ]?(factor|step)( authentication| verification| auth)?|2fa|mfa|multi[- ]?factor( authentication)?",
        "2fa",
    ),
    (r"(log|logs|logged|logging|sign|signs|signed|signing)[- ]?(in|into|on)\b|login", "login"),
    (r"(log|logs|logged|logging|sign|signs|signed|signing)[- ]?(out|off)\b|logout", "logout"),
    (r"(sign|signs|signed|signing)[- ]?up|register|registration", "signup"),
    (r"(turn|turns|turned|turning|switch|switches|switched|switching|toggle)( it)? on", "enable"),
    (r"(turn|turns|turned|turning|switch|switches|switched|switching|toggle)( it)? off", "disable"),
    (r"money[- ]back|(my|the|your) money back", "refund"),
    (
        r"(send|sending|sent|bring|ship|shipping|take)( it| them| this| something| an item| a product| items)? back",
        "return",
    ),
    (r"(set|setting|sets)[- ]?up", "setup"),
    (r"(call|calls|called|calling) off", "cancel"),
    (r"(put|putting|puts|place|placing)( \w+)?( \w+)? on hold|on hold", "pause"),
    (r"(move|moving|go|going) up", "upgrade"),
    (r"(move|moving|go|going) down", "downgrade"),
    (r"get(ting)? rid of", "delete"),
    (r"back(ed|ing)?[- ]?up|backups?", "backup"),
    (r"locked out|lock out", "locked"),
    (r"(credit|debit|bank) card", "card"),
    (r"e-?mail( address)?", "email"),
    (r"user[- ]?name|login name", "username"),
    (r"phone number|mobile number|cell number", "phone"),
    (r"(customer|tech|technical|help|support) (support|service|team|desk|center|centre)", "support"),
    (r"(real|live|human) (person|agent|being|representative)|human|representative", "agent"),
    (r"(promo|promotion|promotional|discount|coupon|voucher) codes?", "coupon"),
    (r"(without (an? )?|no )(internet|network|wifi|wi-fi)( connection| access)?", "offline"),
    (r"rather than|instead of", "instead"),
    (r"more than|over|above|at least", "over"),
    (r"less than|fewer than|under|below|at most", "under"),
    (r"how long|how much time|how many (days|hours|weeks)", "duration"),
    (r"at (the same time|once)", "simultaneously"),
    (r"everywhere|(on |from )?(all|every) (of )?(my |your |the )?devices?", "alldevices"),
    (r"for good|forever", "permanently"),
    (r"on file", ""),
]
_PHRASES = [(re.compile(rf"\b(?:{pattern})\b"), replacement) for pattern, replacement in _PHRASE_TABLE]


def _word_set(text: str) -> frozenset[str]:
    return frozenset(text.split())


_NEGATIONS = frozenset({"not", "no", "never", "without", "none", "nothing", "nobody", "neither", "nor"})
# Question words that change what kind of answer is wanted; "how do I …" (the usual support
# question, a procedure) and "where can I …" are not among them. "where" only as "where is …".
_QUESTION_TYPES = {"why": "reason", "when": "time", "duration": "time", "where": "status"}
# Relation words: what they govern (the next content word) must not move between the questions.
_MARKERS = frozenset({"to", "into", "from", "than", "instead", "before", "after"})
# After these words "to" starts an infinitive ("possible to add"), not a relation ("add to my plan").
_INFINITIVE_LEADS = _word_set(
    """want wants wanted need needs needed like possible able how way ways going try trying tried wish
    required require requires have has had order used supposed allowed easy hard best where what when
    who option options steps"""
)

_NUMBER_WORDS = {
    "zero": 0, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9,
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
    "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90, "hundred": 100, "thousand": 1000,
    "twice": 2, "double": 2, "dozen": 12,
}  # fmt: skip
# "one", "single", "once" are numbers only when they count something, and their absence is not a
# different number: "the same account" says what "one account" does.
_SOFT_ONES = frozenset({"one", "single", "once"})

_STOP_WORDS = _word_set(
    """a an the and or but if so of in on at by for with about as is am are was were be been being do does
    did doing have has had having i me my mine myself we us our ours you your yours he him his she her it
    its they them their this that these those there here what which who whom whose how why when where
    can could will would shall should may might must any some all each every other another such own same
    very too also just only really still already yet now then again ever even up down out off via per
    within until while because through during across around like as please hi hello thanks thank okay ok
    i'm im way ways possible able want wants wanted need needs needed wish would let know tell thing things
    something anything someone somebody anyone anybody help question questions step steps process option
    options use using used make making made go going get gets getting got gotten actually exactly currently
    just more most much many lot lots kind sort happen happens happened happening do done able"""
)

# Support-domain synonyms: every word of a group (and its stem) becomes the group's first word.
_SYNONYM_GROUPS: list[tuple[str, ...]] = [
    ("cancel", "cancellation", "terminate", "termination", "discontinue", "quit", "stop", "unsubscribe"),
    ("pause", "suspend", "suspension", "freeze"),
    ("resume", "unpause", "reactivate", "reactivation"),
    ("end", "expire", "expiry", "expiration", "finish"),
    ("start", "begin", "beginning", "create", "creation", "new"),
    ("delete", "deletion", "remove", "removal", "erase", "wipe"),
    ("add", "invite", "join", "put", "insert"),
    ("change", "update", "edit", "modify", "modification", "switch", "alter", "adjust", "amend"),
    ("buy", "purchase", "order", "bought", "purchases", "checkout"),
    ("item", "product", "article", "merchandise"),
    ("ship", "shipping", "shipment", "deliver", "delivery", "send", "sent", "package", "parcel", "mail"),
    ("track", "follow", "trace", "status"),
    ("plan", "subscription", "membership", "tier"),
    ("account", "profile"),
    ("user", "member", "people", "person", "seat", "colleague", "teammate", "coworker"),
    ("team", "workspace", "organization", "organisation"),
    ("phone", "mobile", "cellphone", "smartphone", "iphone", "android"),
    ("app", "application", "software", "program"),
    ("pay", "payment", "charge", "paid"),
    ("invoice", "bill", "billing", "receipt", "statement"),
    ("refund", "reimburse", "reimbursement"),
    ("data", "information", "info", "records", "record", "details"),
    ("secure", "safe", "security", "protected", "protect"),
    ("encrypt", "encrypted", "encryption"),
    ("password", "passcode", "passphrase"),
    ("contact", "reach", "talk", "speak", "call", "chat"),
    ("agent", "operator", "staff"),
    ("available", "offer", "provide", "include", "included", "access", "allowed", "allow"),
    ("hours", "open"),
    ("coupon", "discount", "promo", "voucher"),
    ("apply", "enter", "redeem"),
    ("slow", "laggy", "lag", "lagging", "sluggish"),
    ("express", "fast", "faster", "expedited", "quick", "quicker", "rush"),
    ("bug", "problem", "issue", "error", "glitch", "defect"),
    ("restore", "recover", "recovery", "undelete", "retrieve"),
    ("merge", "combine", "consolidate"),
    ("broken", "damaged", "damage", "defective", "faulty", "cracked"),
    ("wrong", "incorrect"),
    ("verify", "verification", "confirm", "confirmation", "validate"),
    ("receive", "received", "arrive", "arrived"),
    ("download", "export"),
    ("import", "upload"),
    ("limit", "maximum", "max", "largest", "cap", "large", "big"),
    ("minimum", "min", "smallest"),
    ("csv", "spreadsheet", "excel", "xlsx"),
    ("file", "document", "doc"),
    ("automatic", "automatically", "auto"),
    ("renew", "renewal", "renews"),
    ("annual", "annually", "yearly", "year"),
    ("month", "monthly"),
    ("price", "cost", "fee", "pricing", "costs"),
    ("standard", "regular", "normal"),
    ("view", "see", "find", "check", "locate", "show", "display", "list"),
    ("history", "past", "previous", "earlier"),
    ("picture", "photo", "avatar", "image"),
    ("fail", "failed", "decline", "declined", "rejected"),
    ("several", "multiple"),
    ("trial", "try"),
    ("close", "shut", "shutdown"),
    ("remaining", "remain", "left"),
    ("connect", "sync", "link", "integrate", "integration"),
    ("disconnect", "unlink", "unsync"),
    ("latest", "newest", "recent"),
    ("copy", "copies", "duplicate"),
]

# Opposites: two questions differing by such a pair never match, however close the words are.
_ANTONYM_PAIRS = [
    ("cancel", "pause"), ("cancel", "resume"), ("pause", "resume"), ("start", "end"), ("start", "cancel"),
    ("add", "delete"), ("enable", "disable"), ("login", "logout"), ("upgrade", "downgrade"),
    ("increase", "decrease"), ("import", "download"), ("limit", "minimum"), ("lock", "unlock"),
    ("locked", "unlock"), ("block", "unblock"), ("archive", "unarchive"), ("subscribe", "cancel"),
    ("buy", "sell"), ("buy", "refund"), ("refund", "exchange"), ("early", "late"), ("open", "close"),
    ("hours", "close"), ("hide", "view"), ("mute", "unmute"), ("free", "pay"), ("monthly", "annual"),
    ("month", "annual"), ("minute", "day"), ("day", "week"), ("week", "month"), ("online", "offline"),
    ("connect", "disconnect"), ("share", "unshare"), ("encrypt", "decrypt"), ("merge", "split"),
    ("restore", "delete"), ("return", "exchange"), ("deposit", "withdraw"), ("add", "withdraw"),
    ("quick", "slow"), ("express", "slow"), ("existing", "start"), ("opened", "unopened"),
]  # fmt: skip
_CONTRAST_PREFIXES = ("un", "dis", "de", "re", "non", "in", "im")

# Words that name the setting every support question is asked in (the product, the account, the
# plan, an order) rather than what is asked: one of them may appear in one question only ("Is
# express shipping available?" / "Do you have a faster delivery option?"). Any other word found on
# one side only makes it another question: "disable notifications" / "turn off email
# notifications", "return an item" / "return an unopened item".
_CONTEXT_WORDS = (
    "app", "application", "service", "website", "site", "platform", "product", "item", "account", "plan",
    "order", "pay", "available", "work", "works", "best", "data", "file", "login",
)  # fmt: skip


def _stem(word: str) -> str:
    """A light suffix stripper: enough to equate inflections (share/sharing/shared, plans/plan)."""
    if len(word) <= 3 or word.isdigit():
        return word
    for suffix, replacement, minimum in (
        ("ically", "ic", 4),
        ("ies", "y", 3),
        ("sses", "ss", 3),
        ("ing", "", 3),
        ("ed", "", 3),
        ("ly", "", 4),
        ("es", "", 4),
        ("s", "", 3),
    ):
        if word.endswith(suffix) and len(word) - len(suffix) >= minimum:
            if suffix == "s" and word.endswith(("ss", "us", "is")):
                return word
            word = word[: len(word) - len(suffix)] + replacement
            if suffix in ("ing", "ed") and len(word) > 3 and word[-1] == word[-2] and word[-1] not in "lsz":
                word = word[:-1]  # logging → logg → log
            break
    if len(word) > 4 and word.endswith("e"):
        word = word[:-1]  # share / shar(ing): compare the bare stems
    if len(word) > 4 and word.endswith("ll"):
        word = word[:-1]  # cancelled → cancel
    return word


def _build_synonyms() -> dict[str, str]:
    table: dict[str, str] = {}
    for group in _SYNONYM_GROUPS:
        head = group[0]
        for word in group:
            table.setdefault(word, head)
            table.setdefault(_stem(word), head)
    return table


_SYNONYMS = _build_synonyms()


def _term(word: str) -> str:
    if word in _SYNONYMS:
        return _SYNONYMS[word]
    stem = _stem(word)
    return _SYNONYMS.get(stem, stem)


# Compared as terms: "enable" / "disable" are the terms "enabl" / "disabl".
_ANTONYMS = frozenset(frozenset((_term(first), _term(second))) for first, second in _ANTONYM_PAIRS)
_CONTEXT_TERMS = frozenset(_term(word) for word in _CONTEXT_WORDS)


@dataclass(slots=True)
class QuestionTerms:
    """What a question says, reduced to what the verification compares."""

    terms: list[str] = field(default_factory=list)  # content terms, in order
    surfaces: dict[str, str] = field(default_factory=dict)  # term → first word it came from
    is_negated: bool = False
    question_type: set[str] = field(default_factory=set)  # reason, time, status: see _QUESTION_TYPES
    numbers: list[int] = field(default_factory=list)  # sorted, soft "one"s left out
    counted: dict[str, int] = field(default_factory=dict)  # term → the number counting it
    governed: dict[str, str] = field(default_factory=dict)  # term → the relation word governing it


def _normalised_text(question: str) -> str:
    text = unicodedata.normalize("NFKD", question).lower().replace("\u2019", "'").replace("\u2018", "'")
    text = "".join(character for character in text if not unicodedata.combining(character))  # café → cafe
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    for pattern, replacement in _PHRASES:
        text = pattern.sub(f" {replacement} ", text)
    return text


def question_terms(question: str) -> QuestionTerms:
    words = re.findall(r"[a-z0-9]+", _normalised_text(question))
    analysis = QuestionTerms()
    pending_marker: str | None = None
    pending_number: int | None = None
    for position, word in enumerate(words):
        following = words[position + 1] if position + 1 < len(words) else ""
        if word in _NEGATIONS:
            analysis.is_negated = True
            continue
        if word in _QUESTION_TYPES:
            if word != "where" or following in ("is", "are"):
                analysis.question_type.add(_QUESTION_TYPES[word])
            continue
        if word in _MARKERS:
            if not (word == "to" and position and words[position - 1] in _INFINITIVE_LEADS):
                pending_marker = word
            continue
        if word.isdigit() or word in _NUMBER_WORDS:
            pending_number = int(word) if word.isdigit() else _NUMBER_WORDS[word]
            analysis.numbers.append(pending_number)
            continue
        if word in _SOFT_ONES:
            if following and following not in _STOP_WORDS and following not in _MARKERS:
                pending_number = 1
            continue
        if word in _STOP_WORDS:
            continue
        term = _term(word)
        analysis.terms.append(term)
        analysis.surfaces.setdefault(term, word)
        if pending_marker is not None:
            analysis.governed.setdefault(term, pending_marker)
            pending_marker = None
        if pending_number is not None:
            analysis.counted.setdefault(term, pending_number)
            pending_number = None
    analysis.numbers.sort()
    return analysis


def _are_opposites(first: str, second: str) -> bool:
    if frozenset((first, second)) in _ANTONYMS:
        return True
    return any(first == prefix + second or second == prefix + first for prefix in _CONTRAST_PREFIXES)


def _relation_conflict(first: QuestionTerms, second: QuestionTerms, shared: set[str]) -> bool:
    for term in shared:
        marker_first, marker_second = first.governed.get(term), second.governed.get(term)
        if marker_first and marker_second and marker_first != marker_second:
            return True  # "ship to Canada" / "ship from Canada"
    for marker in set(first.governed.values()) & set(second.governed.values()):
        governed_first = {term for term in shared if first.governed.get(term) == marker}
        governed_second = {term for term in shared if second.governed.get(term) == marker}
        if governed_first - governed_second and governed_second - governed_first:
            return True  # "premium cheaper than basic" / "basic cheaper than premium"
    return False


def paraphrase_rejection(
    cached: str,
    asked: str,
    *,
    word_similarity: Callable[[list[tuple[str, str]]], list[float]] | None = None,
) -> str | None:
    """Why ``asked`` is not the same question as ``cached`` (a short reason), or None if it is.

    Blocking when words must be embedded (rarely: once per new word per process).
    ``word_similarity`` maps (word, word) pairs to their cosine; the bundled model by default.
    """
    first, second = question_terms(cached), question_terms(asked)
    if first.is_negated != second.is_negated:
        return "negation"
    if first.question_type != second.question_type:
        return "question type"  # "Where is my refund?" / "How do I get a refund?"
    if first.numbers != second.numbers:
        return "numbers"
    first_terms, second_terms = set(first.terms), set(second.terms)
    shared = first_terms & second_terms
    for term in shared:
        if term in first.counted and term in second.counted and first.counted[term] != second.counted[term]:
            return "numbers"  # "one license on two devices" / "two licenses on one device"
    if _relation_conflict(first, second, shared):
        return "relation"
    only_first = sorted(first_terms - second_terms)
    only_second = sorted(second_terms - first_terms)
    for term_first in only_first:
        for term_second in only_second:
            if _are_opposites(term_first, term_second):
                return "opposites"
    if len(only_first) > UNMATCHED_TERMS_MAX or len(only_second) > UNMATCHED_TERMS_MAX:
        return "substitution"  # far too different to be worth embedding every word
    paired_first: set[str] = set()
    paired_second: set[str] = set()
    if only_first and only_second:
        candidates = [(a, b) for a in only_first for b in only_second]
        surface_pairs = [(first.surfaces[a], second.surfaces[b]) for a, b in candidates]
        similarities = (word_similarity or _model_word_similarity)(surface_pairs)
        for (term_first, term_second), similarity in zip(candidates, similarities, strict=True):
            if similarity >= WORD_SIMILARITY_MIN:
                paired_first.add(term_first)
                paired_second.add(term_second)
    unpaired_first = [term for term in only_first if term not in paired_first]
    unpaired_second = [term for term in only_second if term not in paired_second]
    if unpaired_first and unpaired_second:
        return "substitution"
    extras = unpaired_first or unpaired_second
    if len(extras) > EXTRA_TERMS_MAX or any(term not in _CONTEXT_TERMS for term in extras):
        return "extra words"
    if not shared and not paired_first:
        return "nothing shared"
    return None


def _model_word_similarity(pairs: list[tuple[str, str]]) -> list[float]:
    vectors = word_vectors(word for pair in pairs for word in pair)
    return [float(vectors[a] @ vectors[b]) for a, b in pairs]
