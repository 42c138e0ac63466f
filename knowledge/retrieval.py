"""The one narrow function the chat engine calls to ground an answer in a bot's knowledge.

Full-text ranking over the bot's chunks for now; hybrid vector + full-text retrieval fused by
reciprocal rank replaces the inside of this function without changing its signature.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.db import connection

# Questions share only some words with the passage that answers them, so the query's lexemes
# are OR-ed (plainto_tsquery AND-s them) and ts_rank_cd orders by how many match, and how close.
_QUERY = """
SELECT c.id, c.document_id, d.title, c.text, ts_rank_cd(c.search_vector, q.query) AS score
FROM knowledge_chunk c
JOIN knowledge_document d ON d.id = c.document_id,
     (SELECT replace(plainto_tsquery('english', %s)::text, '&', '|')::tsquery AS query) q
WHERE d.knowledge_base_id = ANY(%s) AND c.search_vector @@ q.query
ORDER BY score DESC, c.id
LIMIT %s
"""


@dataclass(frozen=True, slots=True)
class RetrievedChunk:
    chunk_id: int
    document_id: int
    title: str
    text: str
    score: float


def retrieve(*, knowledge_base_ids: list[int], query: str, limit: int = 5) -> list[RetrievedChunk]:
    """Top chunks of the given knowledge bases for ``query`` (runs in the caller's tenant schema)."""
    if not knowledge_base_ids or not query.strip():
        return []
    with connection.cursor() as cursor:
        cursor.execute(_QUERY, [query, list(knowledge_base_ids), limit])
        rows = cursor.fetchall()
    return [
        RetrievedChunk(chunk_id=row[0], document_id=row[1], title=row[2], text=row[3], score=float(row[4]))
        for row in rows
    ]
