"""A deterministic, seeded corpus of company-handbook prose for the knowledge benchmarks.

Twenty-four topics (expenses, incident response, database backups, …), each with its own nouns,
verbs and adjectives, written into sentences from shared templates that also carry names, codes,
amounts and dates. Passages of one topic therefore resemble each other far more than passages of
two topics, as real chapters do, while every sentence is different: what the embedder and the
full-text index see is varied prose with a topical structure, not repeated text.

The same seed always gives the same text, so figures from two runs measure the same documents.
"""

from __future__ import annotations

import hashlib
import io
import random
from collections.abc import Iterator
from dataclasses import dataclass

import docx
from fpdf import FPDF
from fpdf.enums import XPos, YPos

from knowledge.extractors import Section

# Bump when the generated text changes: cached corpora and embeddings are keyed on it.
GENERATOR_VERSION = 1


@dataclass(frozen=True, slots=True)
class Topic:
    name: str
    team: str
    nouns: tuple[str, ...]
    verbs: tuple[str, ...]
    adjectives: tuple[str, ...]


TOPICS: tuple[Topic, ...] = (
    Topic(
        "Expense reimbursement",
        "Finance",
        ("receipt", "expense report", "per diem", "mileage claim", "corporate card", "hotel invoice", "cost centre"),
        ("submit", "approve", "reimburse", "itemise", "reconcile", "attach"),
        ("itemised", "eligible", "non-refundable", "monthly", "international", "pre-approved"),
    ),
    Topic(
        "Security incident response",
        "Security",
        ("incident ticket", "phishing report", "compromised laptop", "forensic image", "access log", "severity level"),
        ("contain", "triage", "escalate", "isolate", "investigate", "document"),
        ("suspicious", "critical", "confirmed", "external", "unauthorised", "low-severity"),
    ),
    Topic(
        "Passwords and account access",
        "IT",
        ("password", "hardware key", "recovery code", "single sign-on session", "account lockout", "access request"),
        ("reset", "rotate", "revoke", "enrol", "unlock", "grant"),
        ("temporary", "shared", "expired", "privileged", "second-factor", "dormant"),
    ),
    Topic(
        "Employee onboarding",
        "People",
        ("first-week plan", "buddy", "welcome pack", "laptop order", "orientation session", "probation review"),
        ("schedule", "prepare", "introduce", "assign", "complete", "welcome"),
        ("new", "remote", "part-time", "graduate", "contract", "senior"),
    ),
    Topic(
        "Parental leave",
        "People",
        ("leave request", "return-to-work plan", "statutory pay", "keeping-in-touch day", "cover arrangement"),
        ("request", "extend", "split", "notify", "plan", "confirm"),
        ("paid", "unpaid", "shared", "adoptive", "phased", "flexible"),
    ),
    Topic(
        "Database backups",
        "Platform",
        ("snapshot", "write-ahead log", "restore drill", "retention window", "replica", "backup bucket"),
        ("restore", "verify", "encrypt", "replicate", "prune", "schedule"),
        ("nightly", "incremental", "point-in-time", "offsite", "corrupted", "encrypted"),
    ),
    Topic(
        "Deployment pipeline",
        "Platform",
        ("release branch", "build artefact", "canary", "rollback", "feature flag", "migration step"),
        ("deploy", "promote", "roll back", "tag", "gate", "monitor"),
        ("failed", "blue-green", "staged", "automated", "hotfix", "nightly"),
    ),
    Topic(
        "Customer refunds",
        "Support",
        ("refund request", "chargeback", "store credit", "order number", "payment processor", "goodwill gesture"),
        ("refund", "decline", "process", "verify", "credit", "escalate"),
        ("partial", "full", "disputed", "duplicate", "late", "approved"),
    ),
    Topic(
        "Shipping and returns",
        "Logistics",
        ("parcel", "return label", "courier", "tracking number", "customs form", "delivery window"),
        ("ship", "return", "track", "collect", "label", "reroute"),
        ("damaged", "express", "international", "oversized", "missing", "prepaid"),
    ),
    Topic(
        "API rate limits",
        "Developer Relations",
        ("rate limit", "API token", "burst allowance", "retry header", "quota", "webhook"),
        ("throttle", "retry", "raise", "monitor", "batch", "authenticate"),
        ("per-minute", "sustained", "exceeded", "paginated", "idempotent", "sandbox"),
    ),
    Topic(
        "Data retention and privacy",
        "Legal",
        ("personal data", "deletion request", "retention schedule", "processing record", "consent form", "data map"),
        ("delete", "anonymise", "retain", "export", "disclose", "review"),
        ("sensitive", "pseudonymous", "archived", "lawful", "statutory", "cross-border"),
    ),
    Topic(
        "Office facilities",
        "Workplace",
        ("desk booking", "meeting room", "visitor badge", "parking space", "locker", "kitchen rota"),
        ("book", "cancel", "reserve", "register", "clean", "report"),
        ("quiet", "accessible", "shared", "hybrid", "ground-floor", "reserved"),
    ),
    Topic(
        "Performance reviews",
        "People",
        ("self-assessment", "calibration meeting", "goal", "peer feedback", "development plan", "rating"),
        ("assess", "calibrate", "discuss", "document", "agree", "revisit"),
        ("annual", "mid-year", "constructive", "written", "final", "informal"),
    ),
    Topic(
        "Hardware procurement",
        "IT",
        ("purchase order", "laptop model", "monitor", "supplier quote", "asset tag", "warranty claim"),
        ("order", "replace", "upgrade", "tag", "dispose of", "quote"),
        ("standard", "refurbished", "ergonomic", "leased", "faulty", "budgeted"),
    ),
    Topic(
        "On-call rotation",
        "Engineering",
        ("pager alert", "handover note", "runbook", "escalation policy", "shift swap", "postmortem"),
        ("acknowledge", "hand over", "page", "swap", "resolve", "write up"),
        ("overnight", "weekend", "noisy", "primary", "secondary", "unacknowledged"),
    ),
    Topic(
        "Billing plans and invoices",
        "Finance",
        ("invoice", "subscription plan", "seat count", "proration", "billing contact", "tax number"),
        ("invoice", "upgrade", "downgrade", "prorate", "bill", "update"),
        ("annual", "monthly", "overdue", "discounted", "enterprise", "tax-exempt"),
    ),
    Topic(
        "Single sign-on configuration",
        "Identity",
        ("identity provider", "SAML assertion", "SCIM token", "group mapping", "certificate", "login domain"),
        ("configure", "map", "provision", "deprovision", "rotate", "verify"),
        ("federated", "signed", "expiring", "just-in-time", "default", "misconfigured"),
    ),
    Topic(
        "Mobile app releases",
        "Mobile",
        ("app store review", "build number", "crash report", "beta group", "release note", "phased rollout"),
        ("submit", "release", "halt", "test", "localise", "sign"),
        ("rejected", "beta", "staged", "signed", "localised", "minimum-version"),
    ),
    Topic(
        "Warehouse inventory",
        "Operations",
        ("stock count", "pallet", "bin location", "reorder point", "cycle count", "goods receipt"),
        ("count", "restock", "pick", "receive", "adjust", "audit"),
        ("damaged", "seasonal", "perishable", "backordered", "bulk", "misplaced"),
    ),
    Topic(
        "Vendor contracts",
        "Procurement",
        ("master agreement", "statement of work", "renewal date", "liability cap", "purchase request", "vendor"),
        ("negotiate", "renew", "terminate", "sign", "assess", "onboard"),
        ("exclusive", "auto-renewing", "fixed-price", "non-standard", "strategic", "expiring"),
    ),
    Topic(
        "Accessibility standards",
        "Design",
        ("colour contrast", "screen reader", "alt text", "keyboard focus", "caption file", "audit checklist"),
        ("audit", "caption", "label", "test", "fix", "describe"),
        ("accessible", "decorative", "focusable", "compliant", "high-contrast", "missing"),
    ),
    Topic(
        "Marketing campaigns",
        "Marketing",
        ("campaign brief", "landing page", "email sequence", "ad budget", "audience segment", "conversion rate"),
        ("launch", "target", "measure", "pause", "segment", "brief"),
        ("seasonal", "paid", "organic", "regional", "underperforming", "evergreen"),
    ),
    Topic(
        "Sales commission",
        "Sales",
        ("commission plan", "quota attainment", "deal desk", "clawback", "accelerator", "booking"),
        ("calculate", "pay out", "claw back", "dispute", "forecast", "book"),
        ("quarterly", "multi-year", "split", "capped", "retroactive", "accelerated"),
    ),
    Topic(
        "VPN and remote network",
        "IT",
        ("VPN client", "split tunnel", "network certificate", "home router", "connection log", "gateway"),
        ("connect", "disconnect", "troubleshoot", "install", "renew", "route"),
        ("slow", "dropped", "corporate", "public", "always-on", "expired"),
    ),
)

_PEOPLE = (
    "Maria Chen",
    "Tomasz Nowak",
    "Aisha Bello",
    "James O'Connor",
    "Priya Raman",
    "Lucas Moreau",
    "Hana Sato",
    "Daniel Okafor",
    "Sofia Rossi",
    "Erik Lindqvist",
    "Fatima Haddad",
    "Noah Fischer",
)
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "the end of the month", "the quarter close")
_PERIODS = ("week", "month", "quarter", "sprint", "release", "year")
_ROLES = ("requester", "approver", "manager", "owner", "reviewer", "administrator")
_OPENERS = ("", "", "", "In practice, ", "As a rule, ", "Note that ", "Usually, ", "Since last year, ", "For now, ")
_TEMPLATES = (
    "{O}before you {v} the {n}, check that the {n2} is {a}.",
    "The {team} team will {v} any {a} {n} that arrives after {day}.",
    "If a {n} is {a}, the owner of the {n2} should {v} it and notify {p}.",
    "{p} from the {team} team can {v} the {n} on request, usually within {num} hours.",
    "Do not {v} a {n} without a {a} {n2}; this is the most common reason for delays.",
    "In {year}, the policy changed so that every {n} needs a {a} {n2}.",
    "Reference {code} describes how to {v} the {n} when the {n2} is unavailable.",
    "{O}most questions about the {n} are answered in the {a} {n2} guide.",
    "The {n2} keeps a record of each {n}, and auditors may ask to {v} it at any time.",
    "When a {n} exceeds {money}, a second {role} must {v} it.",
    "Customers often ask whether they can {v} a {a} {n}; the short answer is yes, with a {n2}.",
    "A {a} {n} is not the same as a {n2}, although the {team} team handles both.",
    "{O}you can {v} the {n} from the dashboard, under Settings, in the {a} {n2} section.",
    "Escalate to {p} if the {n} has not been handled by {day}.",
    "We recommend that teams {v} each {n} at least once per {period}.",
    "For {a} cases, the {role} may {v} the {n} by hand.",
    "Every {n} must name the {n2}, the date and the {role}.",
    "Questions about a {n} that spans several teams go to the #{channel} channel.",
    "Last {period}, {num} percent of the {a} cases were handled without a {n2}.",
    "{O}it is safe to {v} the {n} twice; nothing is duplicated.",
    "The {role} decides whether to {v} the {n}, and records the reason in ticket {code}.",
    "Allow {num} working days for the {team} team to {v} a {a} {n}.",
    "{O}a {n} that is {a} cannot be used to {v} the {n2}.",
    "The checklist for a {a} {n} has {num} steps; the last one is to {v} the {n2}.",
)
_HEADING_TEMPLATES = (
    "How to {v} a {n}",
    "{A} {n}s",
    "When the {n} is {a}",
    "Rules for the {n}",
    "{N} and {n2}",
    "Who can {v} the {n}",
    "Common problems with the {n}",
    "The {a} {n}",
)


def _fill(rng: random.Random, template: str, topic: Topic) -> str:
    noun, other = rng.sample(topic.nouns, 2)
    adjective = rng.choice(topic.adjectives)
    text = template.format(
        O=rng.choice(_OPENERS),
        v=rng.choice(topic.verbs),
        n=noun,
        n2=other,
        N=noun[0].upper() + noun[1:],
        a=adjective,
        A=adjective[0].upper() + adjective[1:],
        team=topic.team,
        p=rng.choice(_PEOPLE),
        day=rng.choice(_DAYS),
        num=rng.randint(2, 90),
        year=rng.randint(2016, 2025),
        code=f"{topic.team[:3].upper()}-{rng.randint(100, 9999)}",
        money=f"€{rng.randint(1, 60) * 50:,}",
        period=rng.choice(_PERIODS),
        role=rng.choice(_ROLES),
        channel=topic.name.lower().split()[0].replace(",", ""),
    )
    return text[0].upper() + text[1:]


def sentence(rng: random.Random, topic: Topic) -> str:
    return _fill(rng, rng.choice(_TEMPLATES), topic)


def heading(rng: random.Random, topic: Topic) -> str:
    return _fill(rng, rng.choice(_HEADING_TEMPLATES), topic)


def paragraph(rng: random.Random, topic: Topic, *, sentences: tuple[int, int] = (3, 7)) -> str:
    return " ".join(sentence(rng, topic) for _ in range(rng.randint(*sentences)))


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a generated document: (heading or None, paragraph) blocks, under a chapter."""

    chapter: str
    blocks: tuple[tuple[str | None, str], ...]

    @property
    def word_count(self) -> int:
        return sum(len(text.split()) + len((title or "").split()) for title, text in self.blocks)


def pages(seed: int, count: int, *, words: tuple[int, int] = (350, 450)) -> Iterator[Page]:
    """``count`` pages of ``words`` words each: a chapter (one topic) every 8-20 pages, a new heading
    every 2-5 paragraphs, paragraphs of 3-7 sentences."""
    rng = random.Random(seed)
    topic = rng.choice(TOPICS)
    chapter_left = 0
    for _ in range(count):
        if chapter_left == 0:
            topic = rng.choice(TOPICS)
            chapter_left = rng.randint(8, 20)
        chapter_left -= 1
        budget = rng.randint(*words)
        blocks: list[tuple[str | None, str]] = []
        written = 0
        until_heading = 0
        while written < budget:
            title = None
            if until_heading == 0:
                title = heading(rng, topic)
                until_heading = rng.randint(2, 5)
            until_heading -= 1
            text = paragraph(rng, topic)
            words_in = text.split()
            if written + len(words_in) > budget + 20:
                # The page's last paragraph stops at the budget (mid-sentence, as page ends do).
                kept = " ".join(words_in[: max(12, budget - written)])
                text = kept if kept.endswith(".") else kept + "."
            blocks.append((title, text))
            written += len(text.split()) + len((title or "").split())
        yield Page(chapter=topic.name, blocks=tuple(blocks))


def pdf_bytes(document_pages: list[Page], *, title: str) -> bytes:
    """A real PDF: one generated page per PDF page, chapters and headings in the outline (so the
    extractor finds them), body in 10 pt Helvetica."""
    pdf = FPDF(format="A4")
    pdf.set_title(title)
    pdf.set_auto_page_break(auto=True, margin=12)
    pdf.set_margins(15, 12, 15)
    next_line = {"new_x": XPos.LMARGIN, "new_y": YPos.NEXT}
    chapter = None
    for page in document_pages:
        pdf.add_page()
        if page.chapter != chapter:
            chapter = page.chapter
            pdf.set_font("Helvetica", style="B", size=14)
            pdf.start_section(chapter, level=0)
            pdf.multi_cell(0, 7, chapter, **next_line)
        for block_title, text in page.blocks:
            if block_title:
                pdf.set_font("Helvetica", style="B", size=11)
                pdf.start_section(block_title, level=1)
                pdf.multi_cell(0, 6, block_title, **next_line)
            pdf.set_font("Helvetica", size=10)
            pdf.multi_cell(0, 4.6, text.replace("€", "EUR "), **next_line)
            pdf.ln(1.5)
    return bytes(pdf.output())


def markdown_bytes(document_pages: list[Page], *, title: str) -> bytes:
    lines = [f"# {title}", ""]
    chapter = None
    for page in document_pages:
        if page.chapter != chapter:
            chapter = page.chapter
            lines += [f"## {chapter}", ""]
        for block_title, text in page.blocks:
            if block_title:
                lines += [f"### {block_title}", ""]
            lines += [text, ""]
    return "\n".join(lines).encode()


def docx_bytes(document_pages: list[Page], *, title: str) -> bytes:
    document = docx.Document()
    document.core_properties.title = title
    document.add_paragraph(title, style="Title")
    chapter = None
    for page in document_pages:
        if page.chapter != chapter:
            chapter = page.chapter
            document.add_paragraph(chapter, style="Heading 1")
        for block_title, text in page.blocks:
            if block_title:
                document.add_paragraph(block_title, style="Heading 2")
            document.add_paragraph(text, style="Normal")
    buffer = io.BytesIO()
    document.save(buffer)
    return buffer.getvalue()


def sections(document_pages: list[Page]) -> list[Section]:
    """The pages as the extractors would return them (one section per paragraph, with its page and
    heading path): for building chunks without a file."""
    result = []
    chapter, current = None, None
    for number, page in enumerate(document_pages, start=1):
        if page.chapter != chapter:
            chapter, current = page.chapter, None
        for block_title, text in page.blocks:
            if block_title:
                current = block_title
            heading_path = f"{page.chapter} \u203a {current}" if current else page.chapter
            result.append(Section(text=text, page=number, heading=heading_path))
    return result


def fingerprint(*parts: object) -> str:
    """A short digest naming generated data (for cache files): the generator version and its inputs."""
    return hashlib.sha256(repr((GENERATOR_VERSION, *parts)).encode()).hexdigest()[:12]
