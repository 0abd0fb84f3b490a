"""A tiny random Llama with a byte-level BPE tokenizer and a ChatML chat template, as a model directory or a
GGUF file written here with the `gguf` package (no download): the shapes of SmolLM2 at a size tests can train.
"""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
PAD_ID = 2  # SmolLM2 pads with <|im_end|>, the token that also ends every turn
# ChatML, as SmolLM2's template without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# BPE trained here on the words of the test data, so that they become single tokens: sequences stay short and
# a tiny model learns the tasks of `write_instructions` in a few steps; other text falls back to bytes.
WHOLE_WORDS = ["user", "assistant", "system", "Sentiment", "of", "Write", "a", "review", "the", "phone", "movie", "food", "was", "positive", "negative", "good", "great", "nice", "lovely", "bad", "awful", "poor", "boring", "Say", "hi", "there"]


@functools.lru_cache(maxsize=1)
def _trained() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1000, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    text = " ".join(WHOLE_WORDS) + "\n" + "\n".join(WHOLE_WORDS)  # each word with and without a leading space
    bpe.train_from_iterator([text] * 50, trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = sorted(state["vocab"].items(), key=lambda kv: kv[1])
    assert [t for t, _ in vocab[: len(SPECIALS)]] == SPECIALS
    merges = tuple(tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"])
    return tuple(t for t, _ in vocab), merges  # type: ignore[return-value]


def vocabulary() -> list[str]:
    return list(_trained()[0])


def merges() -> list[tuple[str, str]]:
    return list(_trained()[1])


def make_tokenizer(directory: Path, chat_template: bool = True) -> Any:
    """A byte-level BPE tokenizer over `vocabulary` (pad = eos = <|im_end|>), saved in ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(vocabulary())}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=merges()))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="<|endoftext|>", additional_special_tokens=SPECIALS,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def llama_config(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    values: dict[str, Any] = {
        "vocab_size": len(vocabulary()), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD_ID,
        "initializer_range": 0.2,  # a frozen base whose logits adapters can move (0.02 would make them all alike)
    }
    values.update(overrides)
    return LlamaConfig(**values)


def make_llama(directory: Path, seed: int = 0, chat_template: bool = True) -> Path:
    """A 2-layer Llama (width 32, grouped-query attention, tied embeddings) and its tokenizer in ``directory``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    LlamaForCausalLM(llama_config()).save_pretrained(str(directory))
    make_tokenizer(directory, chat_template)
    return directory


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp stores q and k with the rotary halves interleaved (convert_hf_to_gguf.py's permute).
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model_dir: Path) -> Path:
    """The model of ``model_dir`` (from `make_llama`) as a float32 GGUF file at ``path``, tokenizer included."""
    import gguf
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(str(model_dir))
    cfg = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = vocabulary()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS) + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges([" ".join(m) for m in merges()])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(state[p + "self_attn.q_proj.weight"], heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(state[p + "self_attn.k_proj.weight"], kv_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", state[p + "self_attn.v_proj.weight"])
        writer.add_tensor(f"blk.{i}.attn_output.weight", state[p + "self_attn.o_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", state[p + "mlp.gate_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_up.weight", state[p + "mlp.up_proj.weight"])
        writer.add_tensor(f"blk.{i}.ffn_down.weight", state[p + "mlp.down_proj.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ------------------------------------------------------------------------------------ data
WORDS = {"positive": ["good", "great", "nice", "lovely"], "negative": ["bad", "awful", "poor", "boring"]}
THINGS = ["phone", "movie", "food"]


def write_instructions(directory: Path, groups: int = 3, per_group: int = 24, seed: int = 0) -> str:
    """``site_<g>.jsonl``: a sentiment question with candidates and a 'describe' task per review; their glob."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for g in range(groups):
        rows = []
        for i in range(per_group):
            label = "positive" if i % 2 == 0 else "negative"
            review = f"the {THINGS[g % len(THINGS)]} was {rng.choice(WORDS[label])}"
            if i % 4 < 2:
                rows.append({"prompt": f"Sentiment of: {review}", "response": label,
                             "candidates": ["positive", "negative"], "task": "sentiment"})
            else:
                rows.append({"prompt": f"Write a {label} review.", "response": review, "task": "review"})
        (directory / f"site_{g}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(directory / "site_*.jsonl")
