"""Class labels: from the cells of a file to class indices, and whether two data owners agree on them.

A classification source maps each label to an index. Without an agreed list each file's own sorted
distinct labels define the indices, so two data owners whose label sets differ would map different
labels to the same index and train one model on contradicting targets. Every classification
:class:`~datasets.core.Source` therefore reports ``class_names`` (the label of each index, as text),
and :func:`compare_class_names` / :func:`check_class_names` say whether a node's labels fit an agreed
list: the ``class-names`` run-config key, or the class names of the server's source.

Labels, as every loader reads them (:func:`label_name`):

* surrounding spaces are dropped; an empty cell or a missing-value marker (``NA``, ``nan``, ``null``,
  ... :data:`MISSING_MARKERS`) is a missing label, and refused;
* an integer is a class by its value (``7``, ``07``, ``7.0`` and JSON ``7`` are the class ``"7"``);
  a number that is not an integer (``1.5``, ``inf``, ``1e400``) is refused: it is a regression target
  or a broken file, not a class;
* anything else is a class name, compared as text.

A single class (decided for federated use):

* a data owner may hold only some of the classes, a single one included, when ``class-names`` lists
  them all: it is accepted and logged;
* without ``class-names`` a file holding a single class is refused: its one class would get index 0
  and a one-output model, which disagrees with every other owner and learns nothing;
* a ``class-names`` list of fewer than two names is refused (:func:`parse_class_names`), and so is a
  server held-out set holding fewer than two classes (:func:`check_held_out`).

Agreeing on the classes across nodes (federated preprocessing): each node reports the class names it
holds (:func:`present_class_names`), sent as text with :func:`pack_class_names`; the server merges the
reports into the agreed list with :func:`agree_class_names` (sorted as one file holding all of them
would sort its labels, so the result does not depend on which node reports first), or, with
``class-names`` set, takes that list and checks every report with :func:`check_node_labels`. Nodes then
load their data with ``class_names=class_names_option(agreed)``. Class names are text, not sums:
secure aggregation cannot hide which labels a node holds; fixing ``class-names`` in the run config
avoids sending them at all.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .core import CLASSIFICATION, DataFileError, Source

__all__ = [
    "MISSING_MARKERS",
    "LabelMismatch",
    "agree_class_names",
    "check_class_names",
    "check_held_out",
    "check_node_labels",
    "class_names_option",
    "compare_class_names",
    "encode_labels",
    "label_name",
    "pack_class_names",
    "parse_class_names",
    "present_class_names",
    "unpack_class_names",
]

logger = logging.getLogger(__name__)

MISSING_MARKERS = frozenset(
    {
        "", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>",
        "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null",
    }
)
"""Cell values that mean "no value" (pandas' default list): a label or feature holding one is missing."""


def parse_class_names(text: str) -> tuple[str, ...]:
    """The agreed class names of ``text`` (the ``class-names`` run-config key).

    Two forms: comma-separated (``cat,dog``), or, for names that contain a comma, a JSON list of
    strings (``["benign, small", "malignant"]``; recognised by its leading ``[``). Surrounding spaces of
    each name are dropped in both forms, as they are from the labels of a file (:func:`label_name`).

    Raises:
        ValueError: If a JSON list is malformed or holds something other than strings, a name is empty
            or repeated, or there are fewer than two names.
    """
    if text.lstrip().startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                f"class_names starts with '[' but is not a JSON list of strings ({err.msg} at character {err.pos}): "
                f"'{text}'; write e.g. [\"benign, small\", \"malignant\"]"
            ) from None
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise ValueError(f"class_names as JSON must be a list of strings, got '{text}'")
        names = tuple(n.strip() for n in value)
    else:
        names = tuple(n.strip() for n in text.split(","))
    if "" in names or len(set(names)) != len(names):
        raise ValueError(
            f"class_names must be distinct, non-empty names (comma-separated, or a JSON list of strings), got '{text}'"
        )
    if len(names) < 2:
        raise ValueError(f"class_names lists a single class ('{text}'); a classifier needs two or more")
    return names


def label_name(value: object) -> str | None:
    """The class name of one label value (a cell's text, or a JSON value); ``None`` when it is missing.

    Raises:
        ValueError: If ``value`` is a number that is not an integer, a boolean, or not text or a number.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        # A data error, so a ValueError like every other (callers catch ValueError and OSError).
        raise ValueError(f"a label is a name or an integer, got {type(value).__name__} {value!r}")  # noqa: TRY004
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        text = value.strip()
        if text in MISSING_MARKERS:
            return None
        try:
            return str(int(text))
        except ValueError:
            pass
        try:
            value = float(text)
        except ValueError:
            return text
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"label {value!r} is a number but not an integer; labels are integers or names")
    return str(int(value))


def encode_labels(
    names: Sequence[str],
    class_names: str,
    *,
    where: str,
    example_at: Callable[[int], str] | None = None,
    numeric_order: bool = True,
) -> tuple[tuple[str, ...], np.ndarray]:
    """The classes and the ``int64`` class index of each label name.

    With ``class_names`` (the agreed comma-separated list) a label's index is its place in that list.
    Without it the classes are the sorted distinct names, by value when every name is an integer and
    ``numeric_order`` (CSV and text labels; folder names sort as text, as in torchvision).

    Args:
        names: Label names from :func:`label_name` (or folder names).
        class_names: The agreed list, or ``""``.
        where: The file(s) the labels come from, for messages.
        example_at: Where example ``i`` is (``"a.csv, line 7"``), to point at the first unknown label.
        numeric_order: Sort integer names by value.

    Raises:
        DataFileError: If a label is not in ``class_names`` (the message names the labels and where
            the first one is), or, without ``class_names``, the data hold a single class.
        ValueError: If ``class_names`` is malformed (:func:`parse_class_names`).
    """
    distinct = set(names)
    if class_names:
        agreed = parse_class_names(class_names)
        mismatch = compare_class_names(sorted(distinct), agreed)
        if mismatch.extra:
            first = next(i for i, n in enumerate(names) if n in set(mismatch.extra))
            at = f" (first: '{names[first]}' at {example_at(first)})" if example_at is not None else ""
            raise DataFileError(
                where, f"labels not in class_names ({', '.join(agreed)}): {', '.join(mismatch.extra[:10])}{at}"
            )
        if mismatch.missing:
            logger.info("%s holds %d of the %d classes (none of: %s)", where, len(distinct), len(agreed), ", ".join(mismatch.missing))
        classes = agreed
    else:
        if numeric_order and all(_is_integer(n) for n in distinct):
            classes = tuple(sorted(distinct, key=int))
        else:
            classes = tuple(sorted(distinct))
        if len(classes) < 2:
            raise DataFileError(
                where,
                f"holds a single class ({', '.join(repr(c) for c in classes) or 'none'}); a classifier needs two or "
                "more. A data owner that holds only some of the classes sets class-names to the full list",
            )
    index = {name: i for i, name in enumerate(classes)}
    return classes, np.fromiter((index[n] for n in names), dtype=np.int64, count=len(names))


def _is_integer(name: str) -> bool:
    try:
        return str(int(name)) == name
    except ValueError:
        return False


@dataclass(frozen=True)
class LabelMismatch:
    """How a node's class names differ from the agreed ones.

    Attributes:
        extra: The node's labels that the agreed list lacks (sorted): always a disagreement.
        missing: Agreed labels the node does not have (in agreed order): fine for a node that holds
            some classes only under an agreed list, a disagreement when indices come from each file.
        reordered: Same labels, different order: the same index means different labels.
    """

    extra: tuple[str, ...]
    missing: tuple[str, ...]
    reordered: bool

    @property
    def agrees(self) -> bool:
        """Whether the node maps every label to the agreed index (no extra, missing or reordered label)."""
        return not (self.extra or self.missing or self.reordered)


def compare_class_names(found: Sequence[str], agreed: Sequence[str]) -> LabelMismatch:
    """Compare a node's class names (in index order, or the labels it holds) with the agreed list. Pure."""
    found_set, agreed_set = set(found), set(agreed)
    return LabelMismatch(
        extra=tuple(sorted(found_set - agreed_set)),
        missing=tuple(n for n in agreed if n not in found_set),
        reordered=found_set == agreed_set and list(found) != list(agreed),
    )


def check_class_names(
    found: Sequence[str], agreed: Sequence[str], *, where: str, allow_missing: bool = False
) -> LabelMismatch:
    """Refuse a node whose class names disagree with the agreed list; return the (harmless) mismatch.

    Use ``allow_missing=True`` when labels are mapped through an agreed ``class-names`` list (then
    ``found`` is the labels the node holds, and holding some only is fine), ``False`` when each node's
    indices come from its own file (then ``found`` is its ``Source.class_names`` and must equal the
    server's exactly).

    Raises:
        ValueError: Naming the node (``where``), its extra labels, and, unless ``allow_missing``, the
            labels it lacks or the reordering.
    """
    mismatch = compare_class_names(found, agreed)
    problems = []
    if mismatch.extra:
        problems.append(f"labels not in class_names ({', '.join(agreed)}): {', '.join(mismatch.extra[:10])}")
    if not allow_missing and mismatch.missing:
        problems.append(f"lacks the labels {', '.join(mismatch.missing[:10])} of ({', '.join(agreed)})")
    if not allow_missing and mismatch.reordered:
        problems.append(f"orders its labels as ({', '.join(found)}), not ({', '.join(agreed)})")
    if problems:
        hint = "" if allow_missing else "; set class-names to the full list so every data owner maps a label to the same index"
        raise ValueError(f"{where}: " + "; ".join(problems) + hint)
    return mismatch


def present_class_names(source: Source) -> tuple[str, ...]:
    """The class names of the labels that ``source`` holds (train and test), in index order."""
    if source.task != CLASSIFICATION or source.class_names is None:
        return ()
    held = np.union1d(np.unique(source.train.y.numpy()), np.unique(source.test.y.numpy()))
    return tuple(source.class_names[int(i)] for i in held)


def check_held_out(source: Source) -> None:
    """Refuse a classification source whose test split (the server's held-out set) holds fewer than two classes.

    Raises:
        ValueError: Naming the source and the one class it holds.
    """
    if source.task != CLASSIFICATION or source.class_names is None:
        return
    held = np.unique(source.test.y.numpy())
    if held.size < 2:
        names = ", ".join(repr(source.class_names[int(i)]) for i in held) or "none"
        raise ValueError(
            f"the held-out set of source '{source.name}' holds {held.size} class(es) ({names}); centralized "
            "accuracy needs two or more: give the server a held-out file with every class"
        )


# ----------------------------------------------------------------------------------------------
# Agreeing on the classes across nodes
# ----------------------------------------------------------------------------------------------


def _check_reported(name: object, node: str) -> str:
    """A reported class name, which must be what :func:`label_name` makes of itself."""
    if not isinstance(name, str):
        raise ValueError(f"{node}: class names are text, got {type(name).__name__} {name!r}")  # noqa: TRY004 - data error
    try:
        canonical = label_name(name)
    except ValueError as err:
        raise ValueError(f"{node}: class name {name!r}: {err}") from None
    if canonical != name:
        raise ValueError(
            f"{node}: class name {name!r} is not a label as the loaders read it "
            f"({'a missing value' if canonical is None else repr(canonical)}); report Source.class_names"
        )
    return name


def agree_class_names(reports: Iterable[Sequence[str]], *, nodes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The agreed class list: every class name some node reports, sorted. Pure and deterministic.

    Sorted as :func:`encode_labels` sorts one file's labels (by value when every name is an integer,
    as text otherwise), so the agreed list is what a single file holding all the data would give,
    whatever the order of the reports and of the names within them.

    Args:
        reports: Each node's class names (the labels it holds, e.g. :func:`present_class_names`).
        nodes: Names of the nodes, in the order of ``reports``, for messages (default ``node 0``, ...).

    Raises:
        ValueError: Naming the node: a name that is not a label as the loaders read it (not text,
            empty, a missing-value marker, surrounding spaces, a non-integer number); and if fewer than
            two classes are reported in all (a classifier needs two).
    """
    found: set[str] = set()
    for i, names in enumerate(reports):
        node = nodes[i] if nodes is not None else f"node {i}"
        found.update(_check_reported(n, node) for n in names)
    if all(_is_integer(n) for n in found):
        agreed = tuple(sorted(found, key=int))
    else:
        agreed = tuple(sorted(found))
    if len(agreed) < 2:
        raise ValueError(
            f"the nodes report {len(agreed)} class(es) in all ({', '.join(repr(n) for n in agreed) or 'none'}); "
            "a classifier needs two or more"
        )
    return agreed


def check_node_labels(node: str, labels: Sequence[str], agreed: Sequence[str]) -> LabelMismatch:
    """Refuse a node holding a label outside the agreed list; holding only some of the classes is fine.

    Returns the mismatch (its ``missing`` are the agreed classes the node does not hold).

    Raises:
        ValueError: ``"<node>: labels not in class_names (<agreed>): <labels>"``.
    """
    return check_class_names(labels, agreed, where=node, allow_missing=True)


def class_names_option(agreed: Sequence[str]) -> str:
    """The agreed list as the ``class_names`` option (and run-config value) nodes load their data with.

    Raises:
        ValueError: If a name holds a comma (the option is comma-separated) or the list is not two or
            more distinct names (:func:`parse_class_names`).
    """
    with_comma = [n for n in agreed if "," in n]
    if with_comma:
        raise ValueError(
            f"class names {with_comma[:10]} hold a comma and cannot be listed in class-names (comma-separated); "
            "rename those labels"
        )
    text = ",".join(agreed)
    if parse_class_names(text) != tuple(agreed):
        raise ValueError(f"class names {list(agreed)} do not survive the comma-separated form")
    return text


def pack_class_names(names: Sequence[str]) -> str:
    """Class names as one string (a JSON list), for a Flower reply whose values are scalars."""
    return json.dumps(list(names), ensure_ascii=False)


def unpack_class_names(text: str) -> tuple[str, ...]:
    """The class names of :func:`pack_class_names`' string.

    Raises:
        ValueError: If ``text`` is not a JSON list of strings.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"class names must be a JSON list of strings, got {text[:200]!r} ({err})") from None
    if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
        raise ValueError(f"class names must be a JSON list of strings, got {text[:200]!r}")
    return tuple(value)
