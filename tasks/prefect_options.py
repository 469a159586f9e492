"""Prefect task options shared by every step that takes or returns live objects."""

from __future__ import annotations

from prefect.cache_policies import NO_CACHE

# A live model, DataLoader or HTTP client has nothing worth hashing for a cache key, and nothing worth persisting
# as a result: such tasks neither cache nor persist.
LIVE = {"cache_policy": NO_CACHE, "persist_result": False}
