"""The response cache: an exact layer and a semantic layer, both in Redis, both per tenant.

**Exact** (``exact``): a SHA-256 over the normalised request (tenant, bot, bot version, knowledge
signature, system prompt, the history the model would see, the user message, generation
parameters) names one stored answer: one GET, sub-millisecond.

**Semantic** (``semantic``): for turns whose answer does not depend on earlier turns (a first
turn, or a bot in FAQ mode) the engine also passes the question. Its embedding is compared with
the questions answered before in the same scope; candidates above the bot's similarity threshold
are then *verified* (``verification``) before one counts as a hit, because cosine similarity alone
serves wrong answers ("cancel" / "pause my subscription" score 0.80).

**Storage** (``storage``): everything lives under the tenant's Redis prefix (``t:<schema>:cache:``),
so two tenants never share an entry and deleting a tenant purges its cache; a per-tenant index by
expiry lets one atomic script drop expired entries and evict past the caps.

**Determinism** (``settings``): only requests whose answer is reproducible are cached
(:func:`is_cacheable`), unless the bot opts in with ``allow_nondeterministic``.
"""

# What the web side needs (keys, the exact layer, settings) imports no numpy and no model: the
# layers that do (``lookup``, ``storage``: the semantic layer) are imported by the worker from
# their modules.
from chat.response_cache.exact import exact_answer, exact_entry_key
from chat.response_cache.keys import CachedAnswer, CacheScope, exact_key, generation_digest
from chat.response_cache.settings import CACHE_SETTINGS_DEFAULTS, cache_settings_validate, is_cacheable

__all__ = [
    "CACHE_SETTINGS_DEFAULTS",
    "CacheScope",
    "CachedAnswer",
    "cache_settings_validate",
    "exact_answer",
    "exact_entry_key",
    "exact_key",
    "generation_digest",
    "is_cacheable",
]
