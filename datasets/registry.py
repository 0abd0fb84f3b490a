"""The registry of sources by name, and :func:`load_source`, the one entry point that reads it."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from . import sources
from .core import Source, SourceOptions

__all__ = ["SOURCES", "SOURCE_KINDS", "SourceKind", "load_source"]

logger = logging.getLogger(__name__)


def _lazy_source(module: str, loader: str) -> Callable[[SourceOptions], Source]:
    """A loader of ``datasets.<module>`` (text sources: tokenizers, transformers), imported only when called."""

    def load(options: SourceOptions) -> Source:
        return getattr(importlib.import_module(f"{__package__}.{module}"), loader)(options)  # type: ignore[no-any-return]

    load.__name__ = load.__qualname__ = loader
    load.__doc__ = f"datasets.{module}.{loader}, imported on first use."
    return load


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
    "text": _lazy_source("text", "load_text_source"),
    "text-lm": _lazy_source("text", "load_text_lm_source"),
    "instructions": _lazy_source("instructions", "load_instructions_source"),
}
"""Registry of sources by name; :func:`load_source` is the entry point."""


@dataclass(frozen=True)
class SourceKind:
    """What a source holds, known without loading it.

    Attributes:
        task: ``"classification"``, ``"regression"`` or ``"causal-lm"``.
        input_kind: ``"dense"`` (float32 features) or ``"tokens"`` (int64 token ids).
        labels_from_files: classification labels come from each data owner's own files, so owners agree
            on what an index means only through ``class_names`` (or a held-out file everyone shares).
    """

    task: str
    input_kind: str = "dense"
    labels_from_files: bool = False


SOURCE_KINDS: dict[str, SourceKind] = {
    "breast-cancer": SourceKind("classification"),
    "cifar10": SourceKind("classification"),
    "csv": SourceKind("classification", labels_from_files=True),
    "diabetes": SourceKind("regression"),
    "digits": SourceKind("classification"),
    "fashion-mnist": SourceKind("classification"),
    "image-folder": SourceKind("classification", labels_from_files=True),
    "linear": SourceKind("regression"),
    "mnist": SourceKind("classification"),
    "synthetic": SourceKind("classification"),
    "text": SourceKind("classification", "tokens", labels_from_files=True),
    "text-lm": SourceKind("causal-lm", "tokens"),
    "instructions": SourceKind("causal-lm", "tokens"),
}
"""Per source in :data:`SOURCES`: its task and input kind (a test loads the sources and compares)."""


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
