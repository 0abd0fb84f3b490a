"""In-process memoization of whole sources.

Flower runs a ClientApp many times in one process (every round, every sampled client); reading and
converting CIFAR-10 each time would dominate a round. :func:`load_source_cached` keeps the last few
sources in memory, keyed by name and (frozen, hashable) options.
"""

from __future__ import annotations

import functools
import logging

from .core import Source, SourceOptions
from .registry import load_source

__all__ = ["load_source_cached"]

logger = logging.getLogger(__name__)

_MAX_CACHED_SOURCES = 4


@functools.lru_cache(maxsize=_MAX_CACHED_SOURCES)
def load_source_cached(name: str, options: SourceOptions) -> Source:
    """Like :func:`datasets.registry.load_source`, but memoized in-process by ``(name, options)``.

    The same :class:`~datasets.core.Source` object is returned for equal arguments, so its
    tensors are shared: do not modify them in place. Files changed on disk after the first call
    are not re-read; call ``load_source_cached.cache_clear()`` to forget cached sources.
    """
    logger.debug("loading source %s (not cached yet)", name)
    return load_source(name, options)
