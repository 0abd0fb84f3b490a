"""LLM instruction tuning: GGUF models converted once per node, instruction data with response-only labels,
perplexity and candidate scoring, federated LoRA on a tiny Llama, adapters, generation, max-local-steps.

Every model is a tiny random Llama built here; the GGUF file is written here with the `gguf` package.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.common import RecordDict

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("gguf")

from datasets import SourceOptions, TensorData, load_source
from datasets.instructions import IGNORE_INDEX, encode_pair, load_instruction_eval
from flower_app import gguf_cache, hf_models
from flower_app.client_app import FlowerClient, finetune_options
from flower_app.config import ConfigError, parse_run_config
from flower_app.data import client_data, model_info, server_source
from flower_app.generate import answer, load
from flower_app.generate import main as generate_main
from flower_app.inprocess import run_rounds
from flower_app.instruct import perplexity, pick_candidates, sequence_nll
from flower_app.server_app import build_strategy
from flower_app.task import (
    CausalLMLoss,
    ModelInfo,
    TrainOptions,
    build_model,
    make_loader,
    set_weights,
    train,
    weight_spec,
)
from strategies import STRATEGIES
from tests.llm_utils import PAD_ID, make_llama, make_tokenizer, write_gguf, write_instructions

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory, llama: Path) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf", llama)


@pytest.fixture(scope="module")
def instructions(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_instructions(tmp_path_factory.mktemp("instructions"), groups=3, per_group=24)


def _state(path: str | Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).state_dict()


# ---------------------------------------------------------------------------------------- GGUF
def test_gguf_is_converted_once_then_loaded_from_the_cache(
    tmp_path: Path, llama: Path, gguf_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    first = Path(gguf_cache.resolve_model(str(gguf_file), str(cache)))
    assert first.parent == cache and first.name.startswith("tiny-llama.F32-")
    assert (first / "model.safetensors").is_file() and (first / gguf_cache.SOURCE_RECORD).is_file()
    original = _state(llama)
    converted = _state(first)
    assert converted.keys() == original.keys()
    for key, value in original.items():  # dequantized float32: the very same weights (q/k un-permuted)
        assert torch.equal(converted[key], value), key
    assert not list(cache.glob(".*tmp-*"))

    # Later processes: the GGUF file is neither converted nor read again (only its fingerprint).
    def refuse(*args: object) -> None:
        raise AssertionError("converted twice")

    monkeypatch.setattr(gguf_cache, "convert_gguf", refuse)
    assert Path(gguf_cache.resolve_model(str(gguf_file), str(cache))) == first
    info = ModelInfo("causal-lm", (16,), 1, "tokens")
    options = hf_models.FineTuneOptions(hf_model=str(gguf_file), model_cache_dir=str(cache), lora=hf_models.LoraOptions(rank=0))
    model = build_model("hf-causal-lm", info, finetune=options)
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in original.items())
    assert model.pad_token_id == PAD_ID  # the tokenizer came along (SmolLM2 style: pad = <|im_end|>)
    # Directories and hub ids pass through untouched.
    assert gguf_cache.resolve_model(str(llama), str(cache)) == str(llama)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        gguf_cache.resolve_model(str(tmp_path / "missing.gguf"), str(cache))


def test_concurrent_conversions_convert_once_and_a_changed_file_converts_again(
    tmp_path: Path, llama: Path, gguf_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(gguf_file.read_bytes())
    # An interrupted conversion left its temporary directory behind.
    stale = cache / f".{gguf_cache.converted_dir(gguf, cache).name}.tmp-dead"
    stale.mkdir()
    calls: list[Path] = []
    real = gguf_cache.convert_gguf

    def counting(path: Path, directory: Path) -> None:
        calls.append(directory)
        real(path, directory)

    monkeypatch.setattr(gguf_cache, "convert_gguf", counting)
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(gguf_cache.resolve_model(str(gguf), str(cache)))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3
    assert not stale.exists() and not list(cache.glob(".*tmp-*"))
    # Rewriting the file (other content) gives it another fingerprint: a second conversion.
    data = bytearray(gguf.read_bytes())
    data[-1] ^= 0xFF
    gguf.write_bytes(bytes(data))
    assert gguf_cache.resolve_model(str(gguf), str(cache)) != results[0] and len(calls) == 2


# --------------------------------------------------------------------------------- instructions
def test_chat_formatted_example_has_labels_on_the_response_only(tmp_path: Path) -> None:
    tokenizer = make_tokenizer(tmp_path / "tok")
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt, response = encode_pair(tokenizer, "Sentiment of: good", "positive")
    assert prompt == ids("<|im_start|>user\nSentiment of: good<|im_end|>\n<|im_start|>assistant\n")
    assert response == ids("positive<|im_end|>\n")  # the model also learns to end its turn
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"prompt": "Sentiment of: good", "response": "positive"}\n' * 4)
    source = load_source("instructions", SourceOptions(path=str(tmp_path / "d" / "*.jsonl"), tokenizer=str(tmp_path / "tok"),
                                                       max_length=64, test_fraction=0.25))
    x, y = source.train.x[0].tolist(), source.train.y[0].tolist()
    n, m = len(prompt), len(response)
    assert x == prompt + response + [PAD_ID] * (64 - n - m)
    assert y == [IGNORE_INDEX] * n + response + [IGNORE_INDEX] * (64 - n - m)
    # <|im_end|> is also the padding id: inside the text it is a token, only the trailing run is padding.
    model = hf_models.TokenModel(torch.nn.Identity(), PAD_ID)
    mask = model.attention_mask(source.train.x[:1])[0].tolist()
    assert mask == [1] * (n + m) + [0] * (64 - n - m) and x.count(PAD_ID) > 64 - n - m


def test_plain_format_without_a_chat_template_and_cutting_to_max_length(tmp_path: Path) -> None:
    tokenizer = make_tokenizer(tmp_path / "tok", chat_template=False)
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt, response = encode_pair(tokenizer, "Say hi", "hi there")
    assert prompt == [tokenizer.bos_token_id, *ids("Say hi\n")] and response == [*ids("hi there"), tokenizer.eos_token_id]
    (tmp_path / "d").mkdir()
    rows = ['{"q": "Say hi", "a": "hi there"}'] * 3 + ['{"q": "' + "long " * 20 + '", "a": "x"}']
    (tmp_path / "d" / "a.jsonl").write_text("\n".join(rows) + "\n")
    options = SourceOptions(path=str(tmp_path / "d" / "a.jsonl"), tokenizer=str(tmp_path / "tok"), max_length=len(prompt) + 3,
                            prompt_column="q", response_column="a", test_fraction=0.34)
    source = load_source("instructions", options)  # the long prompt leaves no room for its answer: dropped
    assert len(source.train) + len(source.test) == 3
    y = source.train.y[0].tolist()
    assert y == [IGNORE_INDEX] * len(prompt) + response[:3]  # the response loses its end first


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"question": "a", "response": "b"}\n', "column\\(s\\) prompt not found.*available: question, response"),
        ('{"prompt": "a", "response": "maybe", "candidates": ["yes", "no"]}\n', "'maybe' is not one of its candidates"),
        ('{"prompt": "a", "response": ""}\n', "response in column 'response' is empty"),
        ('{"prompt": "a", "response": "yes", "candidates": "yes"}\n', "must be a list of strings"),
    ],
)
def test_bad_instruction_files_name_the_problem(tmp_path: Path, content: str, message: str) -> None:
    make_tokenizer(tmp_path / "tok")
    (tmp_path / "a.jsonl").write_text(content.replace('"candidates": "yes"', '"candidates": 3'))
    with pytest.raises(ValueError, match=message):
        load_source("instructions", SourceOptions(path=str(tmp_path / "a.jsonl"), tokenizer=str(tmp_path / "tok")))


class FixedLogits(torch.nn.Module):
    """logits[t] = table[token at t]: a bigram model whose probabilities a test can compute by hand."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


def test_perplexity_is_exp_of_the_token_weighted_mean_nll_over_labelled_tokens() -> None:
    # Vocabulary of 2; after token 0 the model says p(1) = 0.8, after token 1 it says p(1) = 0.5.
    table = torch.log(torch.tensor([[0.2, 0.8], [0.5, 0.5]]))
    x = torch.tensor([[0, 1, 1, 0], [1, 0, 1, 1]])
    y = torch.tensor([[-100, 1, 1, -100], [-100, -100, 1, -100]])  # labelled: (0->1), (1->1) ; (0->1)
    nll, count = sequence_nll(FixedLogits(table), TensorData(x, y), batch_size=1, device=torch.device("cpu"))
    assert count.tolist() == [2, 1]
    np.testing.assert_allclose(nll, [-math.log(0.8) - math.log(0.5), -math.log(0.8)], rtol=1e-6)
    expected = math.exp((-2 * math.log(0.8) - math.log(0.5)) / 3)  # per token, not per row
    assert perplexity(nll, count) == pytest.approx(expected, rel=1e-6)
    assert math.isnan(perplexity(np.zeros(0), np.zeros(0, dtype=np.int64)))


def test_candidates_are_picked_by_sum_or_mean_log_likelihood() -> None:
    # Example 0: candidate 0 (1 token, nll 1.0) vs candidate 1 (3 tokens, nll 2.4): sum -> 0, mean (0.8) -> 1.
    # Example 1: nll 0.5 vs 0.7, one token each: both -> 0. Example 2 has no candidates.
    nll = np.array([1.0, 2.4, 0.5, 0.7])
    count = np.array([1, 3, 1, 1])
    rows, cands = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    assert pick_candidates(nll, count, rows, cands, 3, "sum").tolist() == [0, 0, -1]
    assert pick_candidates(nll, count, rows, cands, 3, "mean").tolist() == [1, 0, -1]
    with pytest.raises(ValueError, match="choose one of: sum, mean"):
        pick_candidates(nll, count, rows, cands, 3, "max")


def test_evaluation_view_rows_score_each_candidate_after_the_prompt(llama: Path, instructions: str) -> None:
    options = SourceOptions(path=instructions, tokenizer=str(llama), max_length=48, test_fraction=0.25, num_partitions=3)
    source = load_source("instructions", options)
    view = load_instruction_eval(options)
    assert view.tasks == ("review", "sentiment") and len(view.test_task) == len(source.test) == 21  # 7 per file: 2 + 2 + 3
    closed = np.flatnonzero(view.answer >= 0)
    assert len(closed) == 12 and (view.test_task[closed] == 1).all()
    assert len(view.rows) == 2 * len(closed) and view.row_example.tolist() == np.repeat(closed, 2).tolist()
    # The row of the right candidate is the test example itself.
    for e in closed[:3]:
        row = int(np.flatnonzero((view.row_example == e) & (view.row_candidate == view.answer[e]))[0])
        assert torch.equal(view.rows.x[row], source.test.x[e]) and torch.equal(view.rows.y[row], source.test.y[e])
    assert source.natural_partitions is not None and len(source.natural_partitions) == 3


# ---------------------------------------------------------------------- federated instruction tuning
def _llm_config(tmp_path: Path, model: Path | str, data: str, **overrides: object):  # type: ignore[no-untyped-def]
    base: dict[str, object] = {
        "dataset": "instructions", "data-path": data, "hf-model": str(model), "partitioner": "natural",
        "num-partitions": 3, "min-available-clients": 3, "min-fit-clients": 3, "fraction-evaluate": 0.0,
        "client-wait-timeout": 1.0, "min-partition-size": 5, "max-length": 48, "batch-size": 8, "local-epochs": 2,
        "client-optimizer": "adamw", "learning-rate": 0.02, "lora-rank": 4,
        "lora-target-modules": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj", "device": "cpu", "num-server-rounds": 2, "test-fraction": 0.25, "output-dir": str(tmp_path / "out"), "run-name": "run",
    }
    base.update(overrides)
    return parse_run_config(base)


def test_federated_lora_on_a_gguf_base_learns_and_its_adapter_reproduces_the_server(
    tmp_path: Path, gguf_file: Path, instructions: str
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cache = tmp_path / "models"
    cfg = _llm_config(tmp_path, gguf_file, instructions, **{"model-cache-dir": str(cache), "send-delta": True, "compression": "int8"})
    clients = [FlowerClient(cfg, client_data(cfg, {"partition-id": i, "num-partitions": 3}), RecordDict()) for i in range(3)]
    assert all(".lora_" in k for k in clients[0].spec.keys)  # a causal LM has no new head: adapters only
    strategy, rounds = build_strategy(cfg)
    run_rounds(strategy, clients, rounds)
    metrics = pd.read_csv(tmp_path / "out" / "run" / "metrics.csv")
    assert {"central_perplexity", "central_perplexity_review", "central_accuracy_sentiment"} <= set(metrics.columns)
    np.testing.assert_allclose(metrics["central_perplexity"], np.exp(metrics["central_loss"]), rtol=1e-9)
    assert metrics["central_perplexity"].iloc[-1] < 0.1 * metrics["central_perplexity"].iloc[0]  # ~1000 -> ~40
    assert metrics["central_perplexity_review"].iloc[-1] < 0.1 * metrics["central_perplexity_review"].iloc[0]
    assert metrics["central_accuracy_sentiment"].between(0, 1).all()  # scoring itself: by hand, above

    # The saved adapter on the base (the converted GGUF) gives the server model's logits.
    info = model_info(server_source(cfg))
    server = build_model(cfg.model, info, seed=cfg.seed, finetune=finetune_options(cfg, cache=False))
    set_weights(server, weight_spec(server), strategy.weights)
    base_dir = gguf_cache.resolve_model(str(gguf_file), str(cache))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), str(tmp_path / "out" / "run" / "adapter")).eval()
    x = server_source(cfg).test.x[:4]
    with torch.no_grad():
        expected = server.eval()(x)
        got = reloaded(input_ids=x[:, : expected.shape[1]], attention_mask=server.attention_mask(x)[:, : expected.shape[1]]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    # Generation with that adapter: greedy is deterministic and is the argmax, token by token.
    model, tokenizer = load(str(gguf_file), str(tmp_path / "out" / "run" / "adapter"), cache_dir=str(cache))
    prompt = "Sentiment of: the food was lovely"
    reply = answer(model, tokenizer, prompt, max_new_tokens=6)
    assert reply and reply == answer(model, tokenizer, prompt, max_new_tokens=6)
    from datasets.instructions import encode_prompt

    ids = encode_prompt(tokenizer, prompt)
    manual: list[int] = []
    with torch.no_grad():
        for _ in range(6):
            token = int(model(input_ids=torch.tensor([ids + manual])).logits[0, -1].argmax())
            manual.append(token)
            if token == tokenizer.eos_token_id:
                break
    assert tokenizer.decode(manual, skip_special_tokens=True).strip() == reply


def test_generate_command_answers_each_prompt(tmp_path: Path, llama: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert generate_main(["--base", str(llama), "--prompt", "Say hi", "--max-new-tokens", "3"]) == 0
    once = capsys.readouterr().out
    generate_main(["--base", str(llama), "--prompt", "Say hi", "--max-new-tokens", "3"])
    assert capsys.readouterr().out == once  # greedy: the same answer every time
    generate_main(["--base", str(llama), "--prompt", "a", "--prompt", "b", "--max-new-tokens", "2"])
    out = capsys.readouterr().out
    assert "> a\n" in out and "> b\n" in out
    with pytest.raises(SystemExit):
        generate_main(["--base", str(llama), "--prompt", "a", "--max-new-tokens", "0"])


# ------------------------------------------------------------------------------ memory and speed
def _one_step_grads(llama: Path, batch: TensorData, **options: object) -> tuple[list[torch.Tensor], list[torch.dtype]]:
    lora = hf_models.LoraOptions(rank=4, target_modules=("q_proj", "v_proj"))
    finetune = hf_models.FineTuneOptions(hf_model=str(llama), lora=lora, **options)  # type: ignore[arg-type]
    model = build_model("hf-causal-lm", ModelInfo("causal-lm", (48,), 1, "tokens"), finetune=finetune)
    for name, p in model.named_parameters():  # B = 0 at the start would give A no gradient: make it 1e-2
        if "lora_B" in name:
            torch.nn.init.constant_(p, 1e-2)
    model.train()
    CausalLMLoss()(model(batch.x).float(), batch.y).backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    return [p.grad.detach().clone() for p in trained], [*frozen, *{p.dtype for p in trained}]


def test_bf16_base_and_gradient_checkpointing_give_the_float32_adapter_gradients(llama: Path, instructions: str) -> None:
    source = load_source("instructions", SourceOptions(path=instructions, tokenizer=str(llama), max_length=48))
    batch = TensorData(source.train.x[:4], source.train.y[:4])
    reference, dtypes = _one_step_grads(llama, batch)
    checkpointed, _ = _one_step_grads(llama, batch, gradient_checkpointing=True)
    for a, b in zip(reference, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # recomputed activations: the same gradients
    bf16, bf16_dtypes = _one_step_grads(llama, batch, dtype="bfloat16")
    assert dtypes == [torch.float32, torch.float32] and bf16_dtypes == [torch.bfloat16, torch.float32]
    cosine = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in reference]), torch.cat([g.flatten() for g in bf16]), dim=0)
    assert cosine > 0.99  # a bf16 base: the adapters' float32 gradients point the same way


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_max_local_steps_caps_local_training_for_every_rule(strategy: str) -> None:
    extra = {"aggregator": "mean"} if strategy == "fednova" else {}
    cfg = parse_run_config({
        "strategy": strategy, "model": "mlp", "num-partitions": 2, "partitioner": "iid", "batch-size": 8,
        "max-local-steps": 5, "device": "cpu", **extra,
        **({} if STRATEGIES[strategy].client_mode == "gradient" else {"local-epochs": 3}),  # fedsgd reads no epochs
    })
    data = client_data(cfg, {"partition-id": 0})
    assert len(data.train) > 8 * 5  # an epoch alone is longer than the cap
    client = FlowerClient(cfg, data, RecordDict())
    batches: list[int] = []
    client.model.register_forward_hook(lambda *args: batches.append(1))
    weights = client.get_parameters({})
    control = [np.zeros_like(w) for w, t in zip(weights, client.spec.trainable) if t] if STRATEGIES[strategy].scaffold else []
    arrays, _, metrics = client.fit(weights + control, {"server-round": 1, "proximal-mu": 0.01})
    assert len(batches) == 5  # forward passes: 5 optimizer steps (fedsgd: a gradient over 5 batches)
    assert metrics["local_steps"] == (1 if strategy == "fedsgd" else 5)
    if STRATEGIES[strategy].scaffold:  # c_i+ - c_i = (x - y) / (K lr) with K the steps taken (c = c_i = 0)
        n = len(client.spec)
        x = [w for w, t in zip(weights, client.spec.trainable) if t]
        y = [w for w, t in zip(arrays[:n], client.spec.trainable) if t]
        for delta, xi, yi in zip(arrays[n:], x, y):
            np.testing.assert_allclose(delta.ravel(), (xi.ravel() - yi.ravel()) / (5 * cfg.learning_rate), rtol=1e-4, atol=1e-5)


def test_train_stops_after_max_steps_across_epochs() -> None:
    model = torch.nn.Linear(3, 2)
    loader = make_loader(torch.randn(20, 3), torch.randint(0, 2, (20,)), batch_size=4, shuffle=False)
    assert train(model, loader, "classification", TrainOptions(epochs=3, max_steps=7), torch.device("cpu")).num_steps == 7
    assert train(model, loader, "classification", TrainOptions(epochs=3), torch.device("cpu")).num_steps == 15
    accumulated = TrainOptions(epochs=3, max_steps=4, grad_accumulation_steps=2)
    assert train(model, loader, "classification", accumulated, torch.device("cpu")).num_steps == 4


# -------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"prompt-column": "q"}, "prompt-column apply to dataset 'instructions'"),
        ({"answer-scoring": "max"}, "choose one of: sum, mean, greedy"),
        ({"gradient-checkpointing": True}, "gradient-checkpointing applies to the hf-\\* models"),
        ({"dataset": "instructions", "hf-model": "/m", "model-cache-dir": "/c"}, "model-cache-dir holds conversions of GGUF"),
        ({"dataset": "instructions", "hf-model": "/m", "model": "hf-sequence-classification"}, "'auto' or 'hf-causal-lm'"),
        ({"max-local-steps": -1}, "'max-local-steps' must be >= 0"),
    ],
)
def test_config_rejects_llm_settings_that_cannot_work(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_run_config(overrides)
