"""Instruction data: prompt/response pairs for instruction tuning of a causal language model.

Files (``SourceOptions.path``, one file or a glob; every file is a *group*, partitioned as the text sources
are, see :func:`datasets.text.group_partitions`): ``.jsonl``/``.json`` (one object per line) or ``.csv``/``.tsv``
(a header row), with the columns

``prompt_column`` (default ``prompt``) and ``response_column`` (default ``response``)
    The instruction and the answer the model should learn to give.
``candidates`` (optional; a JSON list, or ``|``-separated in csv/tsv)
    The closed answer set of this instruction, e.g. ``["positive", "negative"]``; it must contain the
    response. Such examples are also scored: the answer is the candidate with the highest
    log-likelihood given the prompt (:mod:`flower_app.instruct`).
``task`` (optional)
    A name per example (``sentiment``, ``review``) that the evaluation breaks its metrics down by.

Formatting. With a chat template (the tokenizer's ``chat_template``) the prompt is the template applied to
``[{"role": "user", "content": prompt}]`` with the generation prompt, and the response is what the template
adds after it for ``[user, {"role": "assistant", "content": response}]`` (for SmolLM2:
``positive<|im_end|>\\n``, so the model also learns to end its turn). Without a template the text is
``prompt\\nresponse`` with the tokenizer's begin and end tokens around it. Prompt and response are tokenized
separately, exactly as a generating model sees the prompt.

Tensors. ``x``: prompt + response ids, cut to ``max_length`` (the response loses its end first), right-padded
with the tokenizer's padding id. ``y``: the response ids at their positions and ``-100`` on the prompt and the
padding, so the causal-LM loss (``flower_app.task.CausalLMLoss``) counts response tokens only. The padding id
may also occur inside the text (SmolLM2 pads with ``<|im_end|>``, which ends every turn): only a *trailing*
run of it is padding (``flower_app.hf_models.TokenModel``). Examples whose prompt leaves no room for a
response token are dropped with a warning.

Split. The test split (``test_fraction``) is stratified by (file, task, answer of closed-answer examples).
:func:`load_instruction_eval` gives the test split's evaluation view: each example's task, prompt ids and
candidates, and one row per candidate (prompt + candidate, labels on the candidate) for scoring.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import DataFileError, Source, SourceOptions, TensorData
from .text import group_partitions, load_tokenizer, read_columns, resolve_text_files

__all__ = [
    "CANDIDATES_COLUMN",
    "IGNORE_INDEX",
    "TASK_COLUMN",
    "Instruction",
    "InstructionEval",
    "encode_pair",
    "encode_prompt",
    "load_instruction_eval",
    "load_instructions_source",
    "read_instructions",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of positions the loss skips (Hugging Face's convention)
CANDIDATES_COLUMN = "candidates"
TASK_COLUMN = "task"
CAUSAL_LM = "causal-lm"  # Source.task of token data with next-token labels


@dataclass(frozen=True)
class Instruction:
    """One example: what is asked, the answer, the closed answer set (if any) and its task."""

    prompt: str
    response: str
    candidates: tuple[str, ...] = ()
    task: str = ""


@dataclass(frozen=True, eq=False)
class InstructionEval:
    """The test split as the evaluation needs it (equality by identity, like `Source`).

    Attributes:
        tasks: Task names, sorted; ``test_task`` indexes into them.
        test_task: Task of each example of ``Source.test`` (``int64``, ``N``).
        prompt_ids: Each test example's formatted prompt as token ids (for generation).
        candidates: Each test example's closed answer set (``()`` for open-ended examples).
        answer: Index of the right candidate per test example; ``-1`` for open-ended examples.
        rows: One row per (closed-answer test example, candidate): prompt + candidate, labels on the candidate.
        row_example: Test example of each row; ``row_candidate``: which of its candidates.
    """

    tasks: tuple[str, ...]
    test_task: np.ndarray
    prompt_ids: tuple[tuple[int, ...], ...]
    candidates: tuple[tuple[str, ...], ...]
    answer: np.ndarray
    rows: TensorData
    row_example: np.ndarray
    row_candidate: np.ndarray


# ------------------------------------------------------------------------------------- reading
def _candidates(value: Any, path: Path, where: tuple[int | None, int | None]) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [v for v in value.split("|")] if value.strip() else []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DataFileError(path, f"'{CANDIDATES_COLUMN}' must be a list of strings (or 'a|b' in a table), got {value!r}",
                            line=where[0], row=where[1], column=CANDIDATES_COLUMN)
    return tuple(v.strip() for v in value)


def read_instructions(
    files: list[Path], prompt_column: str, response_column: str
) -> tuple[list[Instruction], np.ndarray]:
    """The examples of ``files`` and the group (file index) of each.

    Raises:
        DataFileError: (a ValueError) naming the file and line: a missing column (the message lists the
            file's columns), an empty or non-text prompt or response, a response that is not among its
            candidates, an empty, ragged, non-UTF-8 or non-JSON file.
        OSError: a file that cannot be read or is not a regular file.
    """
    examples: list[Instruction] = []
    groups: list[int] = []
    for g, path in enumerate(files):
        records = read_columns(path, [prompt_column, response_column], (CANDIDATES_COLUMN, TASK_COLUMN))
        if not records:
            raise DataFileError(path, "holds no example (an empty file?)")
        for record, (line, row) in records:
            fields = {}
            for key, column in (("prompt", prompt_column), ("response", response_column)):
                value = record[column]
                if not isinstance(value, str) or not value.strip():
                    what = "empty" if isinstance(value, str) else ("missing" if value is None else f"not text: {value!r}")
                    raise DataFileError(path, f"{key} in column '{column}' is {what}", line=line, row=row, column=column)
                fields[key] = value.strip()
            candidates = _candidates(record[CANDIDATES_COLUMN], path, (line, row))
            if candidates and fields["response"] not in candidates:
                raise DataFileError(path, f"response {fields['response']!r} is not one of its candidates {list(candidates)}",
                                    line=line, row=row, column=response_column)
            task = record[TASK_COLUMN]
            if task is not None and not isinstance(task, (str, int)):
                raise DataFileError(path, f"'{TASK_COLUMN}' must be text, got {task!r}", line=line, row=row, column=TASK_COLUMN)
            examples.append(Instruction(fields["prompt"], fields["response"], candidates, "" if task is None else str(task).strip()))
            groups.append(g)
    return examples, np.asarray(groups, dtype=np.int64)


# ------------------------------------------------------------------------------------ encoding
def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _prompt_text(tokenizer: Any, prompt: str) -> str:
    messages = [{"role": "user", "content": prompt}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The ids a model is given to answer ``prompt`` (chat template with generation prompt, or ``prompt\\n``)."""
    if _has_template(tokenizer):
        return _ids(tokenizer, _prompt_text(tokenizer, prompt))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + _ids(tokenizer, prompt + "\n")


def encode_pair(tokenizer: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one example, formatted as the module docstring says."""
    prompt_ids = encode_prompt(tokenizer, prompt)
    if _has_template(tokenizer):
        head = _prompt_text(tokenizer, prompt)
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
        full = str(tokenizer.apply_chat_template(messages, tokenize=False))
        if not full.startswith(head):
            raise ValueError(
                "the tokenizer's chat template does not extend the prompt it builds with the answer, so the response "
                f"tokens cannot be told apart: prompt {head!r}, conversation {full!r}"
            )
        return prompt_ids, _ids(tokenizer, full[len(head):])
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return prompt_ids, _ids(tokenizer, response) + eos


def _pack(pairs: list[tuple[list[int], list[int]]], max_length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """x, y (``N x max_length``) and which pairs kept at least one response token."""
    x = np.full((len(pairs), max_length), pad_id, dtype=np.int64)
    y = np.full((len(pairs), max_length), IGNORE_INDEX, dtype=np.int64)
    kept = np.zeros(len(pairs), dtype=bool)
    for i, (prompt, response) in enumerate(pairs):
        ids = (prompt + response)[:max_length]
        x[i, : len(ids)] = ids
        start = len(prompt)
        if start < len(ids):
            y[i, start : len(ids)] = ids[start:]
            kept[i] = True
    return torch.from_numpy(x), torch.from_numpy(y), kept


# --------------------------------------------------------------------------------------- split
def _split(strata: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split, stratified: round(test_fraction * size) of each stratum (one at least, all but one at most)."""
    rng = np.random.default_rng([seed, 11])
    test: list[np.ndarray] = []
    for stratum in np.unique(strata):
        members = rng.permutation(np.flatnonzero(strata == stratum))
        k = 0 if len(members) < 2 else min(max(round(test_fraction * len(members)), 1), len(members) - 1)
        test.append(members[:k])
    test_idx = np.sort(np.concatenate(test)) if test else np.zeros(0, dtype=np.int64)
    train_idx = np.setdiff1d(np.arange(len(strata)), test_idx)
    return train_idx.astype(np.int64), test_idx.astype(np.int64)


# -------------------------------------------------------------------------------------- loading
@functools.lru_cache(maxsize=2)
def _prepare(options: SourceOptions) -> tuple[Source, InstructionEval]:
    if options.max_length < 2:
        raise ValueError(f"max_length must be >= 2 tokens, got {options.max_length}")
    files = resolve_text_files(options.path)
    examples, groups = read_instructions(files, options.prompt_column, options.response_column)
    tokenizer = load_tokenizer(options.tokenizer)
    pad = int(tokenizer.pad_token_id)
    pairs = [encode_pair(tokenizer, e.prompt, e.response) for e in examples]
    x, y, kept = _pack(pairs, options.max_length, pad)
    if not kept.all():
        logger.warning(
            "instructions: %d of %d examples have prompts of max-length (%d) tokens or more and are dropped; "
            "raise max-length", int((~kept).sum()), len(kept), options.max_length,
        )
        examples = [e for e, k in zip(examples, kept) if k]
        keep = torch.from_numpy(np.flatnonzero(kept))
        x, y, groups = x[keep], y[keep], groups[kept]
    if len(examples) < 2:
        found = "no example" if not examples else "only 1 example"
        raise DataFileError(
            options.path, f"{found} fits in max-length {options.max_length} tokens; a train and a test split need 2 "
            "or more (raise max-length or add examples)",
        )
    tasks = tuple(sorted({e.task for e in examples}))
    task_of = np.asarray([tasks.index(e.task) for e in examples], dtype=np.int64)
    answer = np.asarray([e.candidates.index(e.response) if e.candidates else -1 for e in examples], dtype=np.int64)
    strata = (groups * len(tasks) + task_of) * (int(answer.max()) + 2) + answer + 1
    train_idx, test_idx = _split(strata, options.test_fraction, options.seed)
    if not len(train_idx) or not len(test_idx):
        raise DataFileError(options.path, f"{len(examples)} examples leave an empty train or test split at "
                            f"test-fraction {options.test_fraction}; add examples")
    natural = group_partitions(groups[train_idx], options.num_partitions, options.seed)
    take = lambda idx: TensorData(x[torch.from_numpy(idx)], y[torch.from_numpy(idx)])
    source = Source(
        name="instructions",
        task=CAUSAL_LM,
        num_classes=None,
        input_shape=(options.max_length,),
        train=take(train_idx),
        test=take(test_idx),
        natural_partitions=natural,
    )
    test = [examples[i] for i in test_idx]
    row_pairs, row_example, row_candidate = [], [], []
    for e, example in enumerate(test):
        for c, candidate in enumerate(example.candidates):
            row_pairs.append(encode_pair(tokenizer, example.prompt, candidate))
            row_example.append(e)
            row_candidate.append(c)
    rx, ry, row_kept = _pack(row_pairs, options.max_length, pad)
    if not row_kept.all():  # every candidate of a kept example fits its prompt: only the candidate's end is cut
        raise DataFileError(options.path, f"a candidate answer leaves no token within max-length {options.max_length}; "
                            "raise max-length")
    evaluation = InstructionEval(
        tasks=tasks,
        test_task=task_of[test_idx],
        prompt_ids=tuple(tuple(p) for p, _ in (pairs[i] for i in np.flatnonzero(kept)[test_idx])),
        candidates=tuple(example.candidates for example in test),
        answer=answer[test_idx],
        rows=TensorData(rx, ry),
        row_example=np.asarray(row_example, dtype=np.int64),
        row_candidate=np.asarray(row_candidate, dtype=np.int64),
    )
    logger.info(
        "instructions: %d examples (%d train, %d test; %d closed-answer test examples) from %d file(s), tasks %s",
        len(examples), len(train_idx), len(test_idx), int((evaluation.answer >= 0).sum()), len(files), list(tasks),
    )
    return source, evaluation


def load_instructions_source(options: SourceOptions) -> Source:
    """Instruction examples as token ids with response-only labels (see the module docstring)."""
    return _prepare(options)[0]


def load_instruction_eval(options: SourceOptions) -> InstructionEval:
    """The evaluation view of the test split that `load_instructions_source` makes with the same options."""
    return _prepare(options)[1]
