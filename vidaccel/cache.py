"""Moved: the rollout KV caches are in :mod:`vidaccel.rollout` (``KVCache``, ``DenseKVCache``,
``RollingKVCache``) and TempCache's merged cache in :mod:`vidaccel.processors.tempcache`
(``MergedKVCache``, formerly ``TempCacheKV``). This module keeps the old names importable for one
release, with a ``DeprecationWarning`` at import."""

import warnings

from vidaccel.processors.tempcache import MergedKVCache as TempCacheKV
from vidaccel.rollout import DenseKVCache, KVCache, RollingKVCache

__all__ = ["DenseKVCache", "KVCache", "RollingKVCache", "TempCacheKV"]

warnings.warn(
    "vidaccel.cache is deprecated: import the caches from vidaccel.rollout (KVCache, DenseKVCache, "
    "RollingKVCache) and vidaccel.processors.tempcache (MergedKVCache, formerly TempCacheKV)",
    DeprecationWarning,
    stacklevel=2,
)
