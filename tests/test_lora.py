"""LoRA through peft: what travels, federated learning with adapters, adapter checkpoints, compressed updates.

Every model here is a tiny, randomly initialised transformer built in the test (no download).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from flower_app import hf_models
from flower_app.config import ConfigError, parse_run_config
from flower_app.data import model_info, server_source
from flower_app.inprocess import run_rounds
from flower_app.options import finetune_options
from flower_app.server_app import build_strategy
from flower_app.task import ModelInfo, build_model, get_weights, set_weights, weight_spec
from strategies import STRATEGIES
from tests.lora_utils import (
    make_clients,
    make_decoder,
    make_encoder,
    text_config,
    write_sentences,
    write_stories,
)
from tests.strategy_utils import packed_nbytes

ADAMW = {"client-optimizer": "adamw", "client-momentum": 0.0, "learning-rate": 0.01}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_decoder(tmp_path_factory.mktemp("decoder"))


@pytest.fixture(scope="module")
def sentences(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_sentences(tmp_path_factory.mktemp("sentences"), groups=3, per_group=60)


def _global_model(cfg, weights):  # type: ignore[no-untyped-def]
    """The server's model with the strategy's weights (a fresh build, as the ServerApp does)."""
    info = model_info(server_source(cfg))
    model = build_model(cfg.model, info, seed=cfg.seed, finetune=finetune_options(cfg, cache=False))
    set_weights(model, weight_spec(model), weights)
    return model.eval()


# ------------------------------------------------------------------------------- what travels
def test_numpyclient_sends_exactly_the_adapter_weights_under_peft_keys(tmp_path: Path, encoder: Path, sentences: str) -> None:
    from peft import get_peft_model_state_dict

    cfg = text_config(tmp_path, encoder, sentences, **{"lora-rank": 4})
    client = make_clients(cfg)[0]
    adapted = hf_models.peft_model(client.model)
    assert adapted is not None
    expected = get_peft_model_state_dict(adapted)
    keys = [hf_models.peft_key(k) for k in client.spec.keys]
    # Exactly peft's adapter keys: 2 layers x (query, value) x (A, B) + the new classifier head.
    assert sorted(keys) == sorted(expected)
    assert len(keys) == 2 * 2 * 2 + 2
    arrays = client.get_parameters({})
    for key, array in zip(keys, arrays):
        assert array.dtype == np.float32
        np.testing.assert_array_equal(array, expected[key].numpy())
    shapes = {k: a.shape for k, a in zip(keys, arrays)}
    assert shapes["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"] == (4, 32)
    assert shapes["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"] == (32, 4)
    assert shapes["base_model.model.classifier.weight"] == (2, 32)

    # Round trip through the NumPyClient: what goes in comes back out, array for array.
    rng = np.random.default_rng(0)
    sent = [rng.standard_normal(a.shape).astype(np.float32) for a in arrays]
    client.evaluate(sent, {})  # loads the arrays, then evaluates
    for got, want in zip(client.get_parameters({}), sent):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["hf-sequence-classification", "hf-causal-lm", "vit-lora"])
def test_frozen_base_never_travels(name: str, encoder: Path, decoder: Path) -> None:
    info = {
        "hf-sequence-classification": ModelInfo("classification", (16,), 2, "tokens"),
        "hf-causal-lm": ModelInfo("causal-lm", (16,), 1, "tokens"),
        "vit-lora": ModelInfo("classification", (1, 8, 8), 10),
    }[name]
    path = {"hf-sequence-classification": encoder, "hf-causal-lm": decoder}.get(name, "")
    model = build_model(name, info, finetune=hf_models.FineTuneOptions(hf_model=str(path)))
    spec = weight_spec(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(spec.keys) == trainable
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 0 and spec.num_elements < sum(p.numel() for p in model.parameters()) - frozen + 1
    for key in spec.keys:
        assert ".lora_A." in key or ".lora_B." in key or ".modules_to_save." in key, key
    heads = [k for k in spec.keys if ".modules_to_save." in k]
    if name == "hf-causal-lm":
        assert heads == []  # the language-model head is pretrained: it stays frozen
    else:
        assert len(heads) == 2  # the new classifier head (weight, bias) trains and travels


def test_rank_zero_is_full_fine_tuning(encoder: Path) -> None:
    info = ModelInfo("classification", (16,), 2, "tokens")
    lora = hf_models.FineTuneOptions(hf_model=str(encoder), lora=hf_models.LoraOptions(rank=0))
    model = build_model("hf-sequence-classification", info, finetune=lora)
    assert hf_models.peft_model(model) is None
    assert weight_spec(model).num_elements == sum(p.numel() for p in model.parameters())


def test_build_is_seeded_and_the_client_cache_reuses_the_model(encoder: Path) -> None:
    info = ModelInfo("classification", (16,), 2, "tokens")
    options = hf_models.FineTuneOptions(hf_model=str(encoder))
    a, b = (build_model("hf-sequence-classification", info, seed=3, finetune=options) for _ in range(2))
    assert a is not b
    for x, y in zip(get_weights(a, weight_spec(a)), get_weights(b, weight_spec(b))):
        np.testing.assert_array_equal(x, y)
    cached = hf_models.FineTuneOptions(hf_model=str(encoder), cache=True)
    first = build_model("hf-sequence-classification", info, seed=3, finetune=cached)
    assert build_model("hf-sequence-classification", info, seed=3, finetune=cached) is first
    other = hf_models.FineTuneOptions(hf_model=str(encoder), lora=hf_models.LoraOptions(rank=2), cache=True)
    assert build_model("hf-sequence-classification", info, seed=3, finetune=other) is not first


def test_token_model_cuts_padding_without_changing_outputs(encoder: Path) -> None:
    info = ModelInfo("classification", (16,), 2, "tokens")
    model = build_model("hf-sequence-classification", info, finetune=hf_models.FineTuneOptions(hf_model=str(encoder))).eval()
    ids = torch.zeros(3, 16, dtype=torch.int64)
    ids[0, :5] = torch.tensor([2, 5, 20, 21, 3])
    ids[1, :3] = torch.tensor([2, 11, 3])
    ids[2, :7] = torch.tensor([2, 6, 7, 18, 19, 20, 3])
    with torch.no_grad():
        cut = model(ids)
        full = model.net(input_ids=ids, attention_mask=ids.ne(0).long()).logits
    torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-6)


def test_causal_lm_loss_equals_the_models_own_shifted_loss(decoder: Path) -> None:
    from transformers import AutoModelForCausalLM

    from flower_app.task import loss_fn

    net = AutoModelForCausalLM.from_pretrained(str(decoder)).eval()
    ids = torch.tensor([[2, 17, 18, 19, 20, 0, 0], [2, 21, 22, 23, 24, 25, 26]])
    labels = ids.masked_fill(ids == 0, -100)
    with torch.no_grad():
        out = net(input_ids=ids, attention_mask=ids.ne(0).long(), labels=labels)
    torch.testing.assert_close(loss_fn("causal-lm")(out.logits, labels), out.loss)


# ------------------------------------------------------------------------------- learning
def test_federated_lora_lowers_the_loss(tmp_path: Path, encoder: Path, sentences: str) -> None:
    cfg = text_config(tmp_path, encoder, sentences, **ADAMW, **{"local-epochs": 6, "num-server-rounds": 3})
    strategy, rounds = build_strategy(cfg)
    run_rounds(strategy, make_clients(cfg), rounds)
    metrics = pd.read_csv(tmp_path / "out" / "run" / "metrics.csv")
    assert list(metrics["round"]) == [0, 1, 2, 3]
    assert (metrics["results"][1:] == 3).all() and (metrics["failures"] == 0).all()
    start, end = metrics["central_loss"].iloc[0], metrics["central_loss"].iloc[-1]
    assert start == pytest.approx(np.log(2), abs=0.02)  # a fresh head: chance level
    assert end < start - 0.15
    assert metrics["central_accuracy"].iloc[-1] >= 0.7


def test_federated_causal_lm_each_client_with_its_own_text(tmp_path: Path, decoder: Path) -> None:
    stories = write_stories(tmp_path / "stories", groups=2)
    cfg = text_config(
        tmp_path, decoder, stories, num_clients=2, dataset="text-lm",
        **{**ADAMW, "local-epochs": 3, "num-server-rounds": 2, "lora-rank": 4, "max-length": 12, "learning-rate": 0.03},
    )
    clients = make_clients(cfg)
    assert all(c.data.info.task == "causal-lm" for c in clients)
    vocab = [set(c.data.train.x.unique().tolist()) for c in clients]
    assert {6, 7} & vocab[0] and not {11, 12, 13, 14, 15, 16} & vocab[0]  # client 0 only read story 0
    strategy, rounds = build_strategy(cfg)
    run_rounds(strategy, clients, rounds)
    metrics = pd.read_csv(tmp_path / "out" / "run" / "metrics.csv")
    assert np.isnan(metrics["central_accuracy"]).all()
    assert metrics["central_loss"].iloc[-1] < 0.6 * metrics["central_loss"].iloc[0]


# ------------------------------------------------------------------------------- checkpoints
def test_saved_adapter_loads_with_peft_and_reproduces_the_outputs(tmp_path: Path, encoder: Path, sentences: str) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    cfg = text_config(tmp_path, encoder, sentences, **ADAMW, **{"local-epochs": 2, "num-server-rounds": 1})
    strategy, rounds = build_strategy(cfg)
    run_rounds(strategy, make_clients(cfg), rounds)
    adapter = tmp_path / "out" / "run" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16 and config["base_model_name_or_path"] == str(encoder)

    ours = _global_model(cfg, strategy.weights)
    torch.manual_seed(123)  # the reloaded base gets another random head: the adapter file must replace it
    base = AutoModelForSequenceClassification.from_pretrained(str(encoder), num_labels=2)
    reloaded = PeftModel.from_pretrained(base, str(adapter)).eval()
    ids = server_source(cfg).test.x[:12]
    mask = ids.ne(0).long()
    with torch.no_grad():
        expected = ours(ids)
        got = reloaded(input_ids=ids, attention_mask=mask).logits
        plain = AutoModelForSequenceClassification.from_pretrained(str(encoder), num_labels=2)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[:, :], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(plain, expected, atol=1e-3)  # the adapter and head did change the model
    # model.pt holds only what trained (not the frozen base).
    saved = torch.load(tmp_path / "out" / "run" / "model.pt", weights_only=True)
    assert list(saved) == list(weight_spec(ours).keys)


# ------------------------------------------------------------------------------- compression
def test_compression_off_is_bit_identical_to_uncompressed_fedavg(
    tmp_path: Path, encoder: Path, sentences: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """compression='none' through the real client and shell == the same run with the codec bypassed."""
    from flower_app import client_app
    from strategies import base

    def run(out: str) -> list[np.ndarray]:
        hf_models.clear_cache()
        cfg = text_config(tmp_path, encoder, sentences, **ADAMW, **{"num-server-rounds": 2, "output-dir": out})
        strategy, rounds = build_strategy(cfg)
        run_rounds(strategy, make_clients(cfg), rounds)
        return strategy.weights

    with_codec = run(str(tmp_path / "a"))
    monkeypatch.setattr(client_app, "compress", lambda arrays, config, residual: ([np.asarray(a, np.float32) for a in arrays], None))
    monkeypatch.setattr(base, "decompress", lambda wire, shapes, config: [np.array(w, dtype=np.float32) for w in wire])
    without = run(str(tmp_path / "b"))
    assert len(with_codec) == len(without) == 10
    for a, b in zip(with_codec, without):
        assert a.tobytes() == b.tobytes()


def _npy_nbytes(array: np.ndarray) -> int:
    from io import BytesIO

    buffer = BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return len(buffer.getvalue())


@pytest.mark.parametrize(("codec", "extra"), [("none", {}), ("int8", {"send-delta": True}), ("topk", {"send-delta": True, "topk-fraction": 0.25})])
def test_compressed_lora_updates_and_the_bytes_each_client_sends(
    tmp_path: Path, encoder: Path, sentences: str, codec: str, extra: dict[str, object]
) -> None:
    cfg = text_config(tmp_path, encoder, sentences, **ADAMW, **{"local-epochs": 6, "num-server-rounds": 3, "compression": codec}, **extra)
    strategy, rounds = build_strategy(cfg)
    run_rounds(strategy, make_clients(cfg), rounds)
    metrics = pd.read_csv(tmp_path / "out" / "run" / "metrics.csv").set_index("round")
    shapes = [tuple(s) for s in weight_spec(_global_model(cfg, strategy.weights)).shapes]
    numel = [int(np.prod(s)) for s in shapes]
    if codec == "none":
        sent = [np.zeros(s, np.float32) for s in shapes]
    elif codec == "int8":  # int8 values + one float32 scale per tensor
        sent = [a for n in numel for a in (np.zeros(n, np.int8), np.zeros(1, np.float32))]
    else:  # int32 indices + float32 values of k = ceil(0.25 n) entries per tensor
        ks = [int(np.ceil(0.25 * n)) for n in numel]
        sent = [a for k in ks for a in (np.zeros(k, np.int32), np.zeros(k, np.float32))]
    # the wire's bytes: the arrays packed into one buffer (pack-arrays, the default)
    assert cfg.pack_arrays
    upload = packed_nbytes(sent)
    download = packed_nbytes([np.zeros(s, np.float32) for s in shapes])
    assert sum(_npy_nbytes(a) for a in sent) != upload  # (one .npy an array would be another count)
    for rnd in (1, 2, 3):
        assert metrics.loc[rnd, "bytes_received_per_client"] == upload
        assert metrics.loc[rnd, "bytes_received"] == 3 * upload
        assert metrics.loc[rnd, "bytes_sent_per_client"] == download
    assert metrics["central_loss"].iloc[-1] < metrics["central_loss"].iloc[0] - 0.1  # it still learns


# ------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "hf-sequence-classification", "dataset": "text", "data-path": "x.txt"}, "need hf-model"),
        ({"model": "hf-sequence-classification"}, "set dataset='text'"),
        ({"dataset": "text", "hf-model": "m", "model": "mlp"}, "model must be 'auto' or 'hf-sequence-classification'"),
        ({"dataset": "text-lm", "hf-model": "m", "model": "hf-sequence-classification"}, "must be 'auto' or 'hf-causal-lm'"),
        ({"lora-rank": 4}, "lora-rank apply to the models"),
        ({"lora-target-modules": "fc"}, "lora-target-modules apply to the models"),
        ({"hf-dtype": "bfloat16"}, "hf-dtype applies to the hf-\\* models"),
        ({"client-optimizer": "adamw", "strategy": "scaffold"}, "does not fit strategy 'scaffold'"),
        ({"client-optimizer": "adamw", "client-momentum": 0.9}, "client-momentum is for client-optimizer 'sgd'"),
        ({"client-optimizer": "adam"}, "choose one of: sgd, adamw"),
        ({"hf-dtype": "int8"}, "choose one of: float32, bfloat16, float16"),
        ({"hf-model": "/models/x"}, "hf-model is read by the hf-\\* models and the text datasets"),
        ({"max-length": 64}, "max-length applies to the datasets text, text-lm, instructions"),
    ],
)
def test_config_rejects_what_cannot_work(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run_config(overrides)


def test_unknown_target_module_error_lists_the_linear_layers(encoder: Path) -> None:
    info = ModelInfo("classification", (16,), 2, "tokens")
    options = hf_models.FineTuneOptions(hf_model=str(encoder), lora=hf_models.LoraOptions(target_modules=("qkv",)))
    with pytest.raises(ValueError, match="lora-target-modules.*query.*value"):
        build_model("hf-sequence-classification", info, finetune=options)


@pytest.mark.parametrize("rule", sorted(STRATEGIES))
def test_every_registered_strategy_aggregates_adapters(tmp_path: Path, encoder: Path, sentences: str, rule: str) -> None:
    sgd_only = bool(STRATEGIES[rule].adamw_conflict)  # the rule assumes local SGD steps
    optimizer = {"client-optimizer": "sgd", "learning-rate": 0.05} if sgd_only else ADAMW
    if not STRATEGIES[rule].local_training:  # a gradient rule reads no local-training key: back to the defaults
        optimizer = {"client-momentum": 0.0, "learning-rate": 0.05}
    server = {"server-learning-rate": 0.01} if rule in ("fedadam", "fedyogi", "fedadagrad") else {}
    cfg = text_config(tmp_path, encoder, sentences, strategy=rule, **{**optimizer, **server, "num-server-rounds": 1})
    strategy, rounds = build_strategy(cfg)
    before = [w.copy() for w in strategy.weights]
    run_rounds(strategy, make_clients(cfg), rounds)
    row = pd.read_csv(tmp_path / "out" / "run" / "metrics.csv").iloc[-1]
    assert row["results"] == 3 and row["rejected"] == 0 and row["failures"] == 0 and bool(row["updated"])
    assert all(np.isfinite(w).all() for w in strategy.weights)
    assert any(not np.array_equal(a, b) for a, b in zip(before, strategy.weights))
    assert [w.shape for w in strategy.weights] == [w.shape for w in before]
