"""What pyproject's dependencies are there for actually happens in the installed environment."""

from __future__ import annotations

import pytest
import redis
import redis.utils

from blockfilter.config import load_settings
from blockfilter.store.cache import open_cache
from tests.support.harness import REDIS_URL, reachable


def test_the_redis_cache_parses_replies_with_hiredis() -> None:
    # A warm cache's reads are MGETs of hundreds of statuses; redis-py picks hiredis's parser
    # when it can import it, and silently falls back to its pure-Python one when it cannot.
    if not reachable(REDIS_URL):
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    assert redis.utils.HIREDIS_AVAILABLE
    cache = open_cache(
        load_settings(
            environ={}, cache_url="redis://127.0.0.1:6379/15", cache_secret="deps-secret-0b7e"
        )
    )
    try:
        pool = cache._redis().connection_pool  # type: ignore[attr-defined]
        connection = pool.get_connection()
        try:
            assert type(connection._parser).__name__ == "_HiredisParser"
        finally:
            pool.release(connection)
    finally:
        cache.close()
