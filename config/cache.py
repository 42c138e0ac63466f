"""Django's Redis cache with one connection pool per process.

Django keeps cache instances per thread, and under ASGI every request runs its sync code on a
fresh thread, so the stock backend opens a new Redis connection (and pool) for every request.
Sharing the pool (redis-py pools are thread-safe) makes a cache hit one round trip on a warm
connection.
"""

from __future__ import annotations

import threading

from django.core.cache.backends.redis import RedisCache, RedisCacheClient

_pools: dict[str, object] = {}
_pools_lock = threading.Lock()


class SharedPoolRedisCacheClient(RedisCacheClient):
    def _get_connection_pool(self, write):
        url = self._servers[self._get_connection_pool_index(write)]
        pool = _pools.get(url)
        if pool is None:
            with _pools_lock:
                pool = _pools.get(url)
                if pool is None:
                    pool = _pools[url] = self._pool_class.from_url(url, **self._pool_options)
        return pool


class SharedPoolRedisCache(RedisCache):
    def __init__(self, server, params):
        super().__init__(server, params)
        self._class = SharedPoolRedisCacheClient
