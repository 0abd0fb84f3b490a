"""Answer a prompt with a base causal LM and, optionally, a LoRA adapter that a federated run saved.

    python -m flower_app.generate --base /work/models/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --adapter outputs/adapter --prompt "Is this review positive or negative? ..."

``--base`` is what ``hf-model`` was in the run: a GGUF file (converted once into ``--model-cache-dir``, as the
clients do), a model directory or a hub id. The prompt is formatted as in training (`datasets.instructions`:
the tokenizer's chat template, or ``prompt\\n`` without one); decoding is greedy unless ``--sample``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

from flower_app.hf_models import DTYPES

log = logging.getLogger(__name__)


def load(base: str, adapter: str = "", dtype: str = "float32", cache_dir: str = "") -> tuple[Any, Any]:
    """(model, tokenizer): the base (a GGUF file is converted once), with the adapter on it when given."""
    from transformers import AutoModelForCausalLM

    from datasets.text import load_tokenizer
    from flower_app.gguf_cache import resolve_model

    path = resolve_model(base, cache_dir)
    tokenizer = load_tokenizer(path)
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


@torch.no_grad()
def answer(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, sample: bool = False,
           temperature: float = 1.0, seed: int = 0) -> str:
    """The model's reply to ``prompt`` (special tokens removed)."""
    from datasets.instructions import encode_prompt

    ids = torch.tensor([encode_prompt(tokenizer, prompt)], dtype=torch.int64)
    end = [t for t in (tokenizer.eos_token_id, tokenizer.pad_token_id) if t is not None]
    options: dict[str, Any] = {"do_sample": sample, "temperature": temperature if sample else None,
                               "top_p": None, "top_k": None}
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        eos_token_id=end or None, pad_token_id=(end or [0])[0], **options,
    )
    return str(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)).strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flower_app.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the run's hf-model: a GGUF file, a model directory or a hub id")
    parser.add_argument("--adapter", default="", help="a saved LoRA adapter directory (output-dir/adapter); none: the base alone")
    parser.add_argument("--prompt", action="append", required=True, help="the instruction (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="with --sample")
    parser.add_argument("--seed", type=int, default=0, help="with --sample")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--model-cache-dir", default="", help="where a GGUF base is converted to (default ~/.cache/flower_app/models)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    logging.basicConfig(level=logging.WARNING)
    model, tokenizer = load(args.base, args.adapter, args.dtype, args.model_cache_dir)
    for prompt in args.prompt:
        reply = answer(model, tokenizer, prompt, args.max_new_tokens, args.sample, args.temperature, args.seed)
        print(reply if len(args.prompt) == 1 else f"> {prompt}\n{reply}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
