"""The registry of sources by name, and :func:`load_source`, the one entry point that reads it."""

from __future__ import annotations

import logging
from collections.abc import Callable

from . import instructions, sources, text
from .core import Source, SourceOptions

__all__ = ["SOURCES", "load_source"]

logger = logging.getLogger(__name__)

SOURCES: dict[str, Callable[[SourceOptions], Source]] = {
    "breast-cancer": sources.load_breast_cancer_source,
    "cifar10": sources.load_cifar10_source,
    "csv": sources.load_csv_source,
    "diabetes": sources.load_diabetes_source,
    "digits": sources.load_digits_source,
    "fashion-mnist": sources.load_fashion_mnist_source,
    "image-folder": sources.load_image_folder_source,
    "linear": sources.load_linear_source,
    "mnist": sources.load_mnist_source,
    "synthetic": sources.load_synthetic_source,
    "text": text.load_text_source,
    "text-lm": text.load_text_lm_source,
    "instructions": instructions.load_instructions_source,
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
