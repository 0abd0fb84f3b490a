"""Text sources: labelled sentences for sequence classification, running text for causal language modelling.

Files are UTF-8 (:mod:`datasets.files`); the text is turned into token ids with the tokenizer of the model
that will read them (``SourceOptions.tokenizer``: a local model directory or a Hugging Face hub id), so ``x``
is an ``int64`` tensor ``N x max_length`` of right-padded token ids. ``transformers`` is imported only when a
text source is loaded.

``SourceOptions.path`` is one file or a glob pattern (``data/*_labelled.txt``). Every matched regular file
is a *group* (a site, a user, a book): the source's natural partitions give each client the examples of one
group (``num_partitions >= groups``: client ``c`` gets a share of group ``c % groups``) or several whole
groups (``num_partitions < groups``: group ``g`` goes to client ``g % num_partitions``). Folders matched by
the glob are ignored; special files (FIFO, socket, device) and broken links are skipped with a warning.

File formats, by extension:

``.txt``
    ``text``: one example per line, ``sentence<TAB>label``, no header (the format of Kotzias et al.,
    "From Group to Individual Labels using Deep Features", KDD 2015, "Sentiment Labelled Sentences");
    quotes are text, blank lines are skipped, a line with another number of tabs is refused.
    ``text-lm``: the whole file is running text.
``.csv`` / ``.tsv``
    A header row; the columns ``text_column`` and (``text``) ``label_column``; every row as many fields as
    the header.
``.jsonl`` / ``.json``
    One JSON object per line with the keys ``text_column`` (a string) and (``text``) ``label_column``; a
    ``.json`` file may instead hold one JSON array of such objects.

``text`` (sequence classification): labels are names or integers (:mod:`datasets.labels`); they are mapped
to the codes of their sorted distinct values over all files, or to their place in ``class_names``. A
missing label or text, a non-integer number as label, and (without ``class_names``) a single class are
refused, naming the file and line. The test split is stratified by (group, label). ``text-lm`` (causal
language modelling): each group's documents are joined by a blank line, tokenized without special tokens
and cut into blocks of ``max_length`` tokens (Radford et al. 2019 style packing); ``y`` holds the same ids
with ``-100`` at padding, the label Hugging Face's losses ignore. A file without a token is refused.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import CAUSAL_LM, CLASSIFICATION, DataFileError, Source, SourceOptions, split_indices, take
from .files import decode_text, file_kind, read_bytes, read_table
from .labels import encode_labels, label_name

__all__ = [
    "IGNORE_INDEX",
    "TEXT_EXTENSIONS",
    "encode_blocks",
    "encode_texts",
    "group_partitions",
    "load_text_lm_source",
    "load_text_source",
    "load_tokenizer",
    "read_columns",
    "read_texts",
    "resolve_text_files",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of positions the causal-LM loss skips (padding), as in Hugging Face's ``labels``."""

TEXT_EXTENSIONS = (".txt", ".csv", ".tsv", ".jsonl", ".json")


def resolve_text_files(pattern: str) -> list[Path]:
    """The sorted regular files that ``pattern`` (a path or a glob) names; raises when there is none.

    Folders are ignored; special files and broken links are skipped with a warning (never opened).
    """
    if not pattern:
        raise FileNotFoundError("the text sources need data-path: a file or a glob pattern such as 'data/*.txt'")
    expanded = os.path.expanduser(pattern)
    files: list[Path] = []
    skipped: list[str] = []
    for match in sorted(glob.glob(expanded)):
        try:
            kind = file_kind(os.stat(match).st_mode)
        except OSError as err:  # a broken link, a link loop
            skipped.append(f"{match} ({err.strerror or err})")
            continue
        if kind == "a regular file":
            files.append(Path(match))
        elif kind != "a directory":
            skipped.append(f"{match} ({kind})")
    if skipped:
        logger.warning("text data %s: skipped %d entries: %s", pattern, len(skipped), "; ".join(skipped[:10]))
    if not files:
        also = f"; skipped: {'; '.join(skipped[:10])}" if skipped else ""
        raise FileNotFoundError(f"no text file matches '{pattern}' (data-path: a file or a glob pattern){also}")
    bad = [str(f) for f in files if f.suffix.lower() not in TEXT_EXTENSIONS]
    if bad:
        raise ValueError(
            f"unsupported text file(s) {', '.join(bad)}; extensions: {', '.join(TEXT_EXTENSIONS)} "
            "(narrow data-path's glob to the data files)"
        )
    return files


# Where an example is, for messages: (line, None) in a line-based file, (None, item) in a JSON array.
_Where = tuple[int | None, int | None]


def _error(path: Path, problem: str, where: _Where | None = None, column: str | None = None) -> DataFileError:
    line, row = where if where is not None else (None, None)
    return DataFileError(path, problem, line=line, row=row, column=column)


def _check_columns(path: Path, wanted: list[str], available: list[str], where: _Where | None) -> None:
    missing = [c for c in wanted if c not in available]
    if missing:
        problem = f"column(s) {', '.join(missing)} not found (text-column / label-column); available: {', '.join(available)}"
        raise _error(path, problem, where, missing[0])


def _read_records(
    path: Path, wanted: list[str], labelled: bool, optional: tuple[str, ...] = ()
) -> list[tuple[list[Any], _Where]]:
    """The values of the ``wanted`` columns (then the ``optional`` ones, None where absent) of each
    example of one file, with where it is."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        table = read_table(path, "\t" if suffix == ".tsv" else ",")
        _check_columns(path, wanted, list(table.header), None)
        index = [table.header.index(c) if c in table.header else None for c in [*wanted, *optional]]
        return [
            ([row[j] if j is not None else None for j in index], (line, None))
            for row, line in zip(table.rows, table.lines, strict=True)
        ]
    text = decode_text(read_bytes(path), path)
    if suffix == ".txt":
        if not labelled:
            return [([text], (1, None))]
        records: list[tuple[list[Any], _Where]] = []
        for number, raw in enumerate(text.split("\n"), start=1):
            line = raw.removesuffix("\r")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                problem = f"a labelled .txt file has lines 'text<TAB>label'; found {len(fields)} fields"
                raise _error(path, problem, (number, None))
            records.append((list(fields), (number, None)))
        return records
    objects: list[tuple[Any, _Where]]
    if suffix == ".json" and text.lstrip().startswith("["):
        items = _parse_json(path, text, None)
        if not isinstance(items, list):
            raise _error(path, "a .json file holds one JSON object per line, or one array of objects")
        objects = [(item, (None, i)) for i, item in enumerate(items, start=1)]
    else:
        objects = [
            (_parse_json(path, raw, number), (number, None))
            for number, raw in enumerate(text.split("\n"), start=1)
            if raw.strip()
        ]
    records = []
    for obj, where in objects:
        if not isinstance(obj, dict):
            raise _error(path, f"a JSON object is expected, found {type(obj).__name__}", where)
        _check_columns(path, wanted, [str(k) for k in obj], where)
        records.append(([obj[c] for c in wanted] + [obj.get(c) for c in optional], where))
    return records


def read_columns(
    path: Path, required: list[str], optional: tuple[str, ...] = ()
) -> list[tuple[dict[str, Any], tuple[int | None, int | None]]]:
    """The named columns of each example of a .csv, .tsv, .jsonl or .json file, and where it is.

    Each example is a dict of the ``required`` columns and the ``optional`` ones (None where the file
    or the record lacks them), with its place, ``(line, None)``, or ``(None, item)`` in a JSON array
    (the ``line`` and ``row`` of a :class:`~datasets.core.DataFileError`).

    Raises:
        DataFileError: (a ValueError) naming the file and line: a required column is missing (the
            message lists the file's columns), the file is ragged, not UTF-8 or not valid JSON.
        OSError: If the file cannot be read, or is not a regular file.
    """
    if path.suffix.lower() not in (".csv", ".tsv", ".jsonl", ".json"):
        raise _error(path, "column files are .csv, .tsv, .jsonl or .json")
    names = [*required, *optional]
    return [(dict(zip(names, values, strict=True)), where) for values, where in _read_records(path, required, True, optional)]


def _parse_json(path: Path, text: str, line: int | None) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as err:  # RecursionError: "[[[[..." nested too deep
        raise _error(path, f"is not valid JSON ({type(err).__name__}: {err})", (line, None)) from None


def _read_examples(
    files: list[Path], text_column: str, label_column: str | None
) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """:func:`read_texts`, plus where each example is (``"a.txt, line 3"``) for messages."""
    texts: list[str] = []
    labels: list[str] = []
    groups: list[np.ndarray] = []
    places: list[str] = []
    wanted = [text_column] + ([label_column] if label_column is not None else [])
    for g, path in enumerate(files):
        records = _read_records(path, wanted, label_column is not None)
        if not records:
            raise _error(path, "holds no example (an empty file?)")
        for values, where in records:
            text = values[0]
            if not isinstance(text, str):
                what = "missing" if text is None else f"{type(text).__name__} {text!r}, not a string"
                raise _error(path, f"text in column '{text_column}' is {what}", where, text_column)
            text = text.strip()
            if label_column is not None:
                if not text:
                    raise _error(path, f"empty text in column '{text_column}'", where, text_column)
                try:
                    label = label_name(values[1])
                except ValueError as err:
                    raise _error(path, f"label column '{label_column}': {err}", where, label_column) from None
                if label is None:
                    raise _error(path, f"missing label in column '{label_column}'", where, label_column)
                labels.append(label)
            texts.append(text)
            places.append(f"{path}, line {where[0]}" if where[0] is not None else f"{path}, row {where[1]}")
        groups.append(np.full(len(records), g, dtype=np.int64))
    return texts, labels, np.concatenate(groups), places


def read_texts(
    files: list[Path], text_column: str, label_column: str | None
) -> tuple[list[str], list[str] | None, np.ndarray]:
    """Texts, label names (None when ``label_column`` is None) and the group (file index) of each example.

    Texts are stripped; label names follow :func:`datasets.labels.label_name`.

    Raises:
        DataFileError: (a ValueError) naming the file and line: a column is missing (the message lists the
            file's columns), a text is not a string or (labelled) empty, a label is missing or a
            non-integer number, the file is empty, ragged, not UTF-8 or not valid JSON.
        OSError: If a file cannot be read.
    """
    texts, labels, groups, _ = _read_examples(files, text_column, label_column)
    return texts, (labels if label_column is not None else None), groups


def load_tokenizer(name: str) -> Any:
    """The tokenizer of model ``name`` (a directory or hub id), padding on the right.

    A tokenizer without a padding token (GPT-2 style) pads with its end-of-text token; the models'
    attention mask comes from the same id (``flower_app.hf_models``).
    """
    if not name:
        raise ValueError("the text sources need a tokenizer: set hf-model to a model directory or hub id")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    tokenizer.padding_side = "right"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of '{name}' has neither a padding nor an end-of-text token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_texts(tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
    """``int64`` ids ``N x max_length``: each text with the tokenizer's special tokens, cut and right-padded."""
    ids = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def encode_blocks(tokenizer: Any, text: str, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Running text as blocks of ``max_length`` ids (the last one padded) and their LM labels."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError("a text-lm group holds no token")
    count = -(-len(ids) // max_length)
    blocks = np.full((count, max_length), tokenizer.pad_token_id, dtype=np.int64)
    labels = np.full((count, max_length), IGNORE_INDEX, dtype=np.int64)
    flat = np.asarray(ids, dtype=np.int64)
    blocks.reshape(-1)[: flat.size] = flat
    labels.reshape(-1)[: flat.size] = flat
    return torch.from_numpy(blocks), torch.from_numpy(labels)


def group_partitions(groups: np.ndarray, num_partitions: int, seed: int) -> tuple[np.ndarray, ...]:
    """One index array per client, following the groups (see the module docstring)."""
    num_groups = int(groups.max()) + 1
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    if num_partitions >= num_groups:
        for g in range(num_groups):
            clients = list(range(g, num_partitions, num_groups))
            members = np.random.default_rng([seed, 7, g]).permutation(np.flatnonzero(groups == g))
            for client, share in zip(clients, np.array_split(members, len(clients))):
                parts[client].append(share)
    else:
        for g in range(num_groups):
            parts[g % num_partitions].append(np.flatnonzero(groups == g))
    return tuple(np.sort(np.concatenate(p)).astype(np.int64) for p in parts)


def _check_length(options: SourceOptions) -> None:
    if options.max_length < 2:
        raise ValueError(f"max_length must be >= 2 tokens, got {options.max_length}")
    if options.normalization == "fixed":
        raise ValueError(
            "normalization 'fixed' applies a feature transform to float features; the text sources hold token "
            "ids: use 'local' or 'none' (both leave them as they are)"
        )


def load_text_source(options: SourceOptions) -> Source:
    """Labelled texts for sequence classification (see the module docstring)."""
    _check_length(options)
    files = resolve_text_files(options.path)
    texts, names, groups, places = _read_examples(files, options.text_column, options.label_column)
    where = str(files[0]) if len(files) == 1 else f"{options.path} ({len(files)} files)"
    classes, codes = encode_labels(names, options.class_names, where=where, example_at=places.__getitem__)
    tokenizer = load_tokenizer(options.tokenizer)
    x = encode_texts(tokenizer, texts, options.max_length)
    y = torch.from_numpy(codes)
    strata = groups * len(classes) + codes
    train_idx, test_idx = split_indices(len(codes), strata, options.test_fraction, options.seed)
    natural = group_partitions(groups[train_idx], options.num_partitions, options.seed)
    logger.info(
        "text source: %d examples from %d file(s), %d classes %s, max_length %d",
        len(codes), len(files), len(classes), list(classes), options.max_length,
    )
    return Source(
        name="text",
        task=CLASSIFICATION,
        num_classes=len(classes),
        input_shape=(options.max_length,),
        train=take(x, y, train_idx),
        test=take(x, y, test_idx),
        natural_partitions=natural,
        class_names=classes,
    )


def load_text_lm_source(options: SourceOptions) -> Source:
    """Running text for causal language modelling, in blocks of ``max_length`` tokens."""
    _check_length(options)
    files = resolve_text_files(options.path)
    texts, _, groups = read_texts(files, options.text_column, None)
    tokenizer = load_tokenizer(options.tokenizer)
    xs, ys, block_groups = [], [], []
    for g, path in enumerate(files):
        document = "\n\n".join(t for t, gg in zip(texts, groups, strict=True) if gg == g and t)
        try:
            x, y = encode_blocks(tokenizer, document, options.max_length)
        except ValueError as err:
            raise DataFileError(path, f"holds no text to learn from ({err})") from None
        xs.append(x)
        ys.append(y)
        block_groups.append(np.full(len(x), g, dtype=np.int64))
    x, y, blocks = torch.cat(xs), torch.cat(ys), np.concatenate(block_groups)
    if len(x) < 2:
        raise DataFileError(
            files[0], f"holds a single block of max_length={options.max_length} tokens; a train/test split needs "
            "two or more (give more text, or lower max-length)",
        )
    train_idx, test_idx = split_indices(len(x), blocks, options.test_fraction, options.seed)
    natural = group_partitions(blocks[train_idx], options.num_partitions, options.seed)
    logger.info("text-lm source: %d blocks of %d tokens from %d file(s)", len(x), options.max_length, len(files))
    return Source(
        name="text-lm",
        task=CAUSAL_LM,
        num_classes=None,
        input_shape=(options.max_length,),
        train=take(x, y, train_idx),
        test=take(x, y, test_idx),
        natural_partitions=natural,
    )
