"""Token counts for fitting a prompt into a model's context window.

What is known exactly is used: an assistant message's ``tokens_out`` is the provider's own count
for the model that wrote it. Everything else is estimated: no tokenizer of the models Parley calls
is available offline (tiktoken downloads its encodings at run time; a vLLM server's ``/tokenize``
costs a round trip per message), so text is counted with a conservative estimate that
over-counts rather than overflows: one token per 3.5 UTF-8 bytes, and at least one per word or
punctuation mark (dense text: code, numbers, non-Latin scripts). The provider's reported usage
stays the truth for metering.
"""

from __future__ import annotations

import math
import re
from typing import Any

BYTES_PER_TOKEN = 3.5
MESSAGE_OVERHEAD_TOKENS = 4  # role and separators, as chat templates add per message
_PIECES = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def estimate_tokens(text: str) -> int:
    if not text:
        return 0
    by_bytes = math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN)
    return max(by_bytes, len(_PIECES.findall(text)))


def message_tokens(record: dict[str, Any]) -> int:
    """A message's tokens in a prompt: the model's own count for its answers, else an estimate."""
    known = record.get("tokens_out") if record.get("role") == "assistant" else None
    body = known if isinstance(known, int) and known > 0 else estimate_tokens(record.get("content") or "")
    return body + MESSAGE_OVERHEAD_TOKENS
