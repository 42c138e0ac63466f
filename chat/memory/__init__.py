"""Conversation memory: the Redis hot store of recent turns, batched persistence of messages, and
the history strategies that decide what of a conversation the model sees.

- ``records``: a message as a JSON-safe record (what the hot store and the write stream carry);
- ``hot_store``: each conversation's recent messages in Redis, read on every turn, filled from
  PostgreSQL on a miss;
- ``persistence``: finished messages go to a Redis Stream; ``messages_flush`` (a Celery beat task)
  writes them to PostgreSQL in batches, idempotently; PostgreSQL directly when Redis is down;
- ``history``: full replay, sliding window and running summary, each fitted to the model's
  context window with token counts (``tokens``).
"""
