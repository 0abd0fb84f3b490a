"""Text sources: labelled sentences for sequence classification, running text for causal language modelling.

Files are read with pandas; the text is turned into token ids with the tokenizer of the model that will
read them (``SourceOptions.tokenizer``: a local model directory or a Hugging Face hub id), so ``x`` is an
``int64`` tensor ``N x max_length`` of right-padded token ids. ``transformers`` is imported only when a
text source is loaded.

``SourceOptions.path`` is one file or a glob pattern (``data/*_labelled.txt``). Every matched file is a
*group* (a site, a user, a book): the source's natural partitions give each client the examples of one
group (``num_partitions >= groups``: client ``c`` gets a share of group ``c % groups``) or several whole
groups (``num_partitions < groups``: group ``g`` goes to client ``g % num_partitions``).

File formats, by extension:

``.txt``
    ``text``: one example per line, ``sentence<TAB>label``, no header (the format of Kotzias et al.,
    "From Group to Individual Labels using Deep Features", KDD 2015, "Sentiment Labelled Sentences").
    ``text-lm``: the whole file is running text.
``.csv`` / ``.tsv``
    A header row; the columns ``text_column`` and (``text``) ``label_column``.
``.jsonl`` / ``.json``
    One JSON object per line with the keys ``text_column`` and (``text``) ``label_column``.

``text`` (sequence classification): labels are mapped to the codes of their sorted distinct values over
all files. The test split is stratified by (group, label). ``text-lm`` (causal language modelling): each
group's documents are joined by a blank line, tokenized without special tokens and cut into blocks of
``max_length`` tokens (Radford et al. 2019 style packing); ``y`` holds the same ids with ``-100`` at
padding, the label Hugging Face's losses ignore.
"""

from __future__ import annotations

import csv
import glob
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .core import CAUSAL_LM, CLASSIFICATION, Source, SourceOptions, split_indices, take

__all__ = [
    "IGNORE_INDEX",
    "TEXT_EXTENSIONS",
    "encode_blocks",
    "encode_texts",
    "group_partitions",
    "load_text_lm_source",
    "load_text_source",
    "load_tokenizer",
    "read_texts",
    "resolve_text_files",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of positions the causal-LM loss skips (padding), as in Hugging Face's ``labels``."""

TEXT_EXTENSIONS = (".txt", ".csv", ".tsv", ".jsonl", ".json")


def resolve_text_files(pattern: str) -> list[Path]:
    """The sorted files that ``pattern`` (a path or a glob) names; raises when there is none."""
    if not pattern:
        raise FileNotFoundError("the text sources need data-path: a file or a glob pattern such as 'data/*.txt'")
    expanded = os.path.expanduser(pattern)
    files = sorted(Path(p) for p in glob.glob(expanded) if Path(p).is_file())
    if not files:
        raise FileNotFoundError(f"no text file matches '{pattern}' (data-path: a file or a glob pattern)")
    bad = [str(f) for f in files if f.suffix.lower() not in TEXT_EXTENSIONS]
    if bad:
        raise ValueError(
            f"unsupported text file(s) {', '.join(bad)}; extensions: {', '.join(TEXT_EXTENSIONS)} "
            "(narrow data-path's glob to the data files)"
        )
    return files


def _read_frame(path: Path, columns: list[str], labelled: bool) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if not labelled:
            return pd.DataFrame({columns[0]: [path.read_text(encoding="utf-8")]})
        frame = pd.read_csv(
            path, sep="\t", header=None, quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False,
            encoding="utf-8", on_bad_lines="error",
        )
        if frame.shape[1] != 2:
            raise ValueError(f"{path}: a labelled .txt file has lines 'text<TAB>label'; found {frame.shape[1]} columns")
        frame.columns = columns
        return frame
    if suffix in (".csv", ".tsv"):
        return pd.read_csv(path, sep="\t" if suffix == ".tsv" else ",", dtype=str, keep_default_na=False)
    return pd.read_json(path, lines=True, dtype=False)


def read_texts(
    files: list[Path], text_column: str, label_column: str | None
) -> tuple[list[str], list[Any] | None, np.ndarray]:
    """Texts, raw labels (None when ``label_column`` is None) and the group (file index) of each example.

    Raises:
        ValueError: If a column is missing (the message lists the file's columns) or a value is empty.
    """
    texts: list[str] = []
    labels: list[Any] = []
    groups: list[np.ndarray] = []
    for g, path in enumerate(files):
        wanted = [text_column] + ([label_column] if label_column is not None else [])
        frame = _read_frame(path, wanted, label_column is not None)
        missing = [c for c in wanted if c not in frame.columns]
        if missing:
            raise ValueError(
                f"{path}: column(s) {', '.join(missing)} not found (text-column / label-column); "
                f"available: {', '.join(map(str, frame.columns))}"
            )
        column = frame[text_column].astype(str).str.strip()
        if label_column is not None:
            if (column == "").any():
                raise ValueError(f"{path}: empty text in row {int(np.flatnonzero(column == '')[0])}")
            raw = frame[label_column]
            if raw.isna().any() or (raw.astype(str).str.strip() == "").any():
                raise ValueError(f"{path}: missing label in column '{label_column}'")
            labels.extend(raw.astype(str).str.strip().tolist())
        texts.extend(column.tolist())
        groups.append(np.full(len(frame), g, dtype=np.int64))
    return texts, (labels if label_column is not None else None), np.concatenate(groups)


def _label_codes(labels: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Class names (sorted; numerically when every label is an integer) and each example's code."""
    values = np.asarray(labels, dtype=object)
    try:
        numeric = np.asarray([int(v) for v in values], dtype=np.int64)
    except ValueError:
        classes, codes = np.unique(values.astype(str), return_inverse=True)
        return classes, codes.astype(np.int64).reshape(-1)
    classes, codes = np.unique(numeric, return_inverse=True)
    return classes, codes.astype(np.int64).reshape(-1)


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


def load_text_source(options: SourceOptions) -> Source:
    """Labelled texts for sequence classification (see the module docstring)."""
    _check_length(options)
    files = resolve_text_files(options.path)
    texts, raw_labels, groups = read_texts(files, options.text_column, options.label_column)
    assert raw_labels is not None
    classes, codes = _label_codes(raw_labels)
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
    )


def load_text_lm_source(options: SourceOptions) -> Source:
    """Running text for causal language modelling, in blocks of ``max_length`` tokens."""
    _check_length(options)
    files = resolve_text_files(options.path)
    texts, _, groups = read_texts(files, options.text_column, None)
    tokenizer = load_tokenizer(options.tokenizer)
    xs, ys, block_groups = [], [], []
    for g in range(len(files)):
        document = "\n\n".join(t for t, gg in zip(texts, groups) if gg == g and t)
        x, y = encode_blocks(tokenizer, document, options.max_length)
        xs.append(x)
        ys.append(y)
        block_groups.append(np.full(len(x), g, dtype=np.int64))
    x, y, blocks = torch.cat(xs), torch.cat(ys), np.concatenate(block_groups)
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
