"""Evaluation of instruction-tuned causal LMs: perplexity on responses, closed-answer accuracy (no Flower import).

Perplexity of a set of responses is ``exp(sum of token NLLs / number of response tokens)``: the NLL of every
response token given everything before it, weighted by tokens (a long response counts for more than a short
one). Closed-answer accuracy (examples with ``candidates``, `datasets.instructions`): each candidate response is
scored by its log-likelihood given the prompt, summed over its tokens (``sum``) or averaged (``mean``, which
does not favour short candidates), and the best-scoring candidate is the answer; or the model generates greedily
(``greedy``) and is right when its text equals the right candidate (ignoring case and surrounding space).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from datasets import TensorData

IGNORE_INDEX = -100
SCORINGS = ("sum", "mean", "greedy")


def _autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def sequence_nll(model: nn.Module, data: TensorData, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``data``: the summed next-token NLL of its labelled tokens, and how many there are.

    ``model`` maps token ids to logits (`hf_models.TokenModel`). Rows go through in order of length, so a
    batch is cut to its own longest row.
    """
    model.to(device).eval()
    x, y = data.x, data.y
    lengths = (y != IGNORE_INDEX).to(torch.int64).cumsum(1).argmax(1)  # position of the last label
    order = torch.argsort(lengths, stable=True)
    nll = np.zeros(len(data), dtype=np.float64)
    count = np.zeros(len(data), dtype=np.int64)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        xb, yb = x[idx].to(device), y[idx].to(device)
        with _autocast(device):
            logits = model(xb)
        labels = yb[:, : logits.shape[1]][:, 1:]
        token_nll = nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        nll[idx.numpy()] = token_nll.sum(1).double().cpu().numpy()
        count[idx.numpy()] = labels.ne(IGNORE_INDEX).sum(1).cpu().numpy()
    return nll, count


def perplexity(nll: np.ndarray, count: np.ndarray) -> float:
    """``exp(sum(nll) / sum(count))``: the token-weighted perplexity of the rows; nan without tokens."""
    tokens = int(np.sum(count))
    return math.exp(float(np.sum(nll)) / tokens) if tokens else math.nan


def pick_candidates(
    nll: np.ndarray, count: np.ndarray, row_example: np.ndarray, row_candidate: np.ndarray, num_examples: int,
    scoring: str = "sum",
) -> np.ndarray:
    """Per example, the candidate with the highest log-likelihood (``-1`` for examples without candidates).

    ``sum``: ``-nll``; ``mean``: ``-nll / count``. Ties go to the lower candidate index.
    """
    if scoring not in ("sum", "mean"):
        raise ValueError(f"unknown scoring {scoring!r}; choose one of: sum, mean")
    score = -nll if scoring == "sum" else -nll / np.maximum(count, 1)
    best = np.full(num_examples, -1, dtype=np.int64)
    best_score = np.full(num_examples, -np.inf)
    for s, e, c in zip(score, row_example, row_candidate):
        if s > best_score[e] or (s == best_score[e] and c < best[e]):
            best[e], best_score[e] = c, s
    return best


@torch.no_grad()
def greedy_generate(net: Any, prompt_ids: Sequence[int], max_new_tokens: int, eos_token_ids: Sequence[int],
                    device: torch.device) -> list[int]:
    """Greedy decoding: the argmax token, one at a time, until an end token or ``max_new_tokens``.

    ``net`` is a Hugging Face causal LM (or a peft model around one); the KV cache makes each step one token.
    """
    net.eval()
    ids = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device)
    out = net.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
        eos_token_id=list(eos_token_ids) or None, pad_token_id=(list(eos_token_ids) or [0])[0],
        temperature=None, top_p=None, top_k=None,
    )
    return [int(t) for t in out[0, ids.shape[1] :].tolist()]


def _normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def generated_answers(
    net: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]], candidates: Sequence[Sequence[str]], device: torch.device
) -> np.ndarray:
    """Per example with candidates: the candidate the greedy answer equals (normalized), else ``-2``; ``-1`` without."""
    answers = np.full(len(prompt_ids), -1, dtype=np.int64)
    eos = [t for t in {tokenizer.eos_token_id, tokenizer.pad_token_id} if t is not None]
    for e, (prompt, options) in enumerate(zip(prompt_ids, candidates)):
        if not options:
            continue
        longest = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in options)
        text = _normalize(tokenizer.decode(greedy_generate(net, prompt, longest + 4, eos, device), skip_special_tokens=True))
        answers[e] = next((c for c, option in enumerate(options) if _normalize(option) == text), -2)
    return answers


class InstructionEvaluator:
    """Centralized evaluation on the test split of dataset ``instructions``.

    Called with the model (weights already set): returns ``(loss, metrics)`` as a strategy's evaluation
    function does, with ``loss`` the token-weighted mean NLL of the test responses and the metrics
    ``perplexity`` (``exp(loss)``), ``accuracy`` (closed-answer examples), and both per task
    (``perplexity_<task>``, ``accuracy_<task>``) when the data names tasks.
    """

    def __init__(self, test: TensorData, evaluation: Any, scoring: str, batch_size: int, device: torch.device,
                 tokenizer: Any = None) -> None:
        if scoring not in SCORINGS:
            raise ValueError(f"unknown answer scoring {scoring!r}; choose one of: {', '.join(SCORINGS)}")
        if scoring == "greedy" and tokenizer is None:
            raise ValueError("answer scoring 'greedy' needs the tokenizer")
        self.test = test
        self.eval = evaluation
        self.scoring = scoring
        self.batch_size = batch_size
        self.device = device
        self.tokenizer = tokenizer

    def __call__(self, model: nn.Module) -> tuple[float, dict[str, float]]:
        view, n = self.eval, len(self.test)
        closed = view.answer >= 0
        nll, count = np.zeros(n), np.zeros(n, dtype=np.int64)
        rest = np.arange(n)
        if closed.any() and self.scoring != "greedy":
            row_nll, row_count = sequence_nll(model, view.rows, self.batch_size, self.device)
            chosen = pick_candidates(row_nll, row_count, view.row_example, view.row_candidate, n, self.scoring)
            # The right candidate's row is the test example itself: its NLL counts for the perplexity too.
            right = view.row_candidate == view.answer[view.row_example]
            nll[view.row_example[right]], count[view.row_example[right]] = row_nll[right], row_count[right]
            rest = np.flatnonzero(~closed)
        elif closed.any():
            net = getattr(model, "net", model)
            chosen = generated_answers(net, self.tokenizer, view.prompt_ids, view.candidates, self.device)
        if len(rest):
            index = torch.from_numpy(rest)
            nll[rest], count[rest] = sequence_nll(model, TensorData(self.test.x[index], self.test.y[index]), self.batch_size, self.device)
        loss = float(np.sum(nll) / max(int(np.sum(count)), 1))
        metrics: dict[str, float] = {"perplexity": perplexity(nll, count)}
        if closed.any():
            hit = chosen == view.answer
            metrics["accuracy"] = float(hit[closed].mean())
        if any(view.tasks):  # the data names its tasks: metrics per task too
            for t, task in enumerate(view.tasks):
                members = view.test_task == t
                metrics[f"perplexity_{task or 'untitled'}"] = perplexity(nll[members], count[members])
                if (closed & members).any():
                    metrics[f"accuracy_{task or 'untitled'}"] = float(hit[closed & members].mean())
        return loss, metrics


def instruction_evaluator(cfg: Any, source: Any, device: torch.device, batch_size: int) -> InstructionEvaluator | None:
    """The evaluator of a run on dataset ``instructions`` (``cfg``: `AppConfig`); None for other datasets."""
    if cfg.dataset != "instructions":
        return None
    from datasets.instructions import load_instruction_eval
    from datasets.text import load_tokenizer
    from flower_app.data import source_options

    options = source_options(cfg)
    tokenizer = load_tokenizer(options.tokenizer) if cfg.answer_scoring == "greedy" else None
    return InstructionEvaluator(source.test, load_instruction_eval(options), cfg.answer_scoring, batch_size, device, tokenizer)
