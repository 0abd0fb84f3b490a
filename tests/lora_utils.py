"""Tiny, randomly initialised transformers and text files for the LoRA tests (built in the test; no download)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
from flwr.common import RecordDict

from flower_app.client_app import FlowerClient
from flower_app.config import AppConfig, parse_run_config
from flower_app.data import client_data

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["good", "great", "fine", "nice", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "boring", "broken"]
FILLER = ["the", "a", "movie", "food", "phone", "was", "is", "it", "this", "very", "and", "so", "."]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + FILLER


def write_tokenizer(directory: Path) -> Any:
    """A WordPiece tokenizer over `VOCAB` ([PAD] = 0), saved in ``directory``."""
    from transformers import BertTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    tokenizer.save_pretrained(str(directory))
    return tokenizer


def make_encoder(directory: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A 2-layer BERT for sequence classification (width 32) with its tokenizer, in ``directory``."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=num_labels, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,  # no dropout: runs repeat bit for bit
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).save_pretrained(str(directory))
    write_tokenizer(directory)
    return directory


def make_decoder(directory: Path, seed: int = 0) -> Path:
    """A 2-layer GPT-2 (width 32) with the same tokenizer, in ``directory``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(VOCAB), n_positions=64, n_embd=32, n_layer=2, n_head=2, pad_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        # Logits are h . wte (tied): with the usual 0.02 init a frozen embedding caps how far any adapter can
        # move them. A wider init stands in for a pretrained model's scale.
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).save_pretrained(str(directory))
    write_tokenizer(directory)
    return directory


def sentence(rng: random.Random, label: int) -> str:
    words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words)


def write_sentences(directory: Path, groups: int = 3, per_group: int = 40, seed: int = 0) -> str:
    """``site_<g>.txt`` files of ``sentence<TAB>label`` lines; returns the glob naming them."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for g in range(groups):
        lines = [f"{sentence(rng, i % 2)}\t{i % 2}" for i in range(per_group)]
        (directory / f"site_{g}.txt").write_text("\n".join(lines) + "\n")
    return str(directory / "site_*.txt")


def write_stories(directory: Path, groups: int = 2, sentences: int = 60, seed: int = 0) -> str:
    """One running-text file per client, each with its own vocabulary habits; returns their glob."""
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for g in range(groups):
        words = POSITIVE if g % 2 == 0 else NEGATIVE
        text = " ".join(f"the {rng.choice(['movie', 'food', 'phone'])} was very {rng.choice(words)} ." for _ in range(sentences))
        (directory / f"story_{g}.txt").write_text(text)
    return str(directory / "story_*.txt")


def text_config(tmp_path: Path, model_dir: Path, data: str, num_clients: int = 3, **overrides: Any) -> AppConfig:
    """An in-process run over ``num_clients`` natural (per-file) partitions of ``data``."""
    base: dict[str, Any] = {
        "dataset": "text", "data-path": data, "hf-model": str(model_dir), "partitioner": "natural",
        "num-partitions": num_clients, "min-available-clients": num_clients, "min-fit-clients": num_clients,
        "fraction-evaluate": 0.0, "client-wait-timeout": 1.0, "min-partition-size": 5, "max-length": 16,
        "batch-size": 8, "learning-rate": 0.1, "client-momentum": 0.9, "device": "cpu", "num-server-rounds": 3,
        "output-dir": str(tmp_path / "out"), "run-name": "run", "test-fraction": 0.25,
    }
    base.update(overrides)
    return parse_run_config(base)


def make_clients(cfg: AppConfig) -> list[FlowerClient]:
    n = cfg.num_partitions
    return [FlowerClient(cfg, client_data(cfg, {"partition-id": i, "num-partitions": n}), RecordDict()) for i in range(n)]
