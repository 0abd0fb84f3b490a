"""The registry of sources by name, and :func:`load_source`, the one entry point that reads it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from . import sources
from .core import Source, SourceOptions

__all__ = ["SOURCES", "load_source"]

logger = logging.getLogger(__name__)


def _text_source(loader: str) -> Callable[[SourceOptions], Source]:
    """A text source's loader, importing :mod:`datasets.text` (tokenizers, transformers) only when called."""

    def load(options: SourceOptions) -> Source:
        from . import text

        return getattr(text, loader)(options)  # type: ignore[no-any-return]

    load.__name__ = load.__qualname__ = loader
    load.__doc__ = f"datasets.text.{loader}, imported on first use."
    return load


SOURCES: dict[str, Callable[[SourceOptions], Source]] = {
    "cifar10": sources.load_cifar10_source,
    "csv": sources.load_csv_source,
    "digits": sources.load_digits_source,
    "fashion-mnist": sources.load_fashion_mnist_source,
    "image-folder": sources.load_image_folder_source,
    "linear": sources.load_linear_source,
    "mnist": sources.load_mnist_source,
    "synthetic": sources.load_synthetic_source,
    "text": _text_source("load_text_source"),
    "text-lm": _text_source("load_text_lm_source"),
}
"""Registry of sources by name; :func:`load_source` is the entry point."""


def load_source(name: str, options: SourceOptions) -> Source:
    """Load the source registered as ``name`` with ``options``.

    Raises:
        ValueError: If ``name`` is not a key of :data:`SOURCES` (the message lists the valid names).
    """
    try:
        loader = SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown dataset '{name}'; choose one of: {', '.join(sorted(SOURCES))}") from None
    source = loader(options)
    logger.debug("source %s: %d train / %d test examples", name, len(source.train), len(source.test))
    return source
