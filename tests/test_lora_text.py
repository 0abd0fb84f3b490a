"""The text sources (datasets/text.py) and the torchvision LoRA model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from datasets import SourceOptions, load_source
from datasets.text import IGNORE_INDEX, group_partitions
from flower_app.config import parse_run_config
from flower_app.data import client_data
from flower_app.inprocess import run_rounds
from flower_app.server_app import build_strategy
from tests.lora_utils import VOCAB, make_clients, write_tokenizer

ID = {w: i for i, w in enumerate(VOCAB)}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer(directory)
    return directory


def options(path: str, tokenizer: Path, **kw: object) -> SourceOptions:
    return SourceOptions(path=path, tokenizer=str(tokenizer), **kw)  # type: ignore[arg-type]


def test_labelled_txt_files_are_groups_with_token_ids(tmp_path: Path, tokenizer_dir: Path) -> None:
    (tmp_path / "a.txt").write_text("the movie was good\t1\nbad phone  \t0\n" * 10)
    (tmp_path / "b.txt").write_text('it is "very" nice\t1\nawful food\t0\n' * 5)
    source = load_source("text", options(str(tmp_path / "*.txt"), tokenizer_dir, max_length=8, test_fraction=0.2, num_partitions=3))
    assert source.task == "classification" and source.num_classes == 2 and source.input_shape == (8,)
    x = torch.cat([source.train.x, source.test.x])
    y = torch.cat([source.train.y, source.test.y])
    assert x.dtype == torch.int64 and x.shape == (30, 8)
    rows = {tuple(r) for r in x.tolist()}
    good = (ID["[CLS]"], ID["the"], ID["movie"], ID["was"], ID["good"], ID["[SEP]"], 0, 0)
    quoted = (ID["[CLS]"], ID["it"], ID["is"], ID["[UNK]"], ID["very"], ID["[UNK]"], ID["nice"], ID["[SEP]"])
    assert good in rows and quoted in rows  # quotes are kept as text, not parsed as CSV quoting
    assert y[x.tolist().index(list(good))] == 1
    # Test split stratified by (file, label): 6 of 30, so 4 from a.txt (2 per label) and 2 from b.txt.
    assert len(source.test) == 6 and int(source.test.y.sum()) == 3
    # Natural partitions: 3 clients over 2 files -> clients 0 and 2 share a.txt, client 1 has b.txt.
    parts = source.natural_partitions
    assert parts is not None and len(parts) == 3
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(source.train)))
    assert len(parts[1]) == 8 and len(parts[0]) + len(parts[2]) == 16 and abs(len(parts[0]) - len(parts[2])) <= 1


def test_group_partitions_both_ways() -> None:
    groups = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2])
    many = group_partitions(groups, 5, seed=0)  # clients 0, 3 <- group 0; 1, 4 <- group 1; 2 <- group 2
    assert [sorted(set(groups[p])) for p in many] == [[0], [1], [2], [0], [1]]
    assert sorted(np.concatenate(many).tolist()) == list(range(9))
    few = group_partitions(groups, 2, seed=0)  # group g -> client g % 2
    assert [p.tolist() for p in few] == [[0, 1, 2, 3, 6, 7, 8], [4, 5]]
    assert [p.tolist() for p in group_partitions(groups, 5, seed=0)] == [p.tolist() for p in many]  # seeded


def test_csv_and_jsonl_with_named_columns_and_string_labels(tmp_path: Path, tokenizer_dir: Path) -> None:
    pd.DataFrame({"review": ["good movie", "bad movie", "nice food", "poor food"], "stars": ["pos", "neg", "pos", "neg"]}).to_csv(
        tmp_path / "a.csv", index=False
    )
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"review": t, "stars": s}) for t, s in [("great", "pos"), ("awful", "neg")]))
    source = load_source(
        "text", options(str(tmp_path / "*"), tokenizer_dir, text_column="review", label_column="stars", max_length=4, test_fraction=0.34)
    )
    x = torch.cat([source.train.x, source.test.x]).tolist()
    y = torch.cat([source.train.y, source.test.y]).tolist()
    by_text = {tuple(r): label for r, label in zip(x, y)}
    assert by_text[(ID["[CLS]"], ID["great"], ID["[SEP]"], 0)] == 1  # "neg" < "pos": pos is class 1
    assert by_text[(ID["[CLS]"], ID["bad"], ID["movie"], ID["[SEP]"])] == 0


@pytest.mark.parametrize(
    ("files", "kw", "error", "message"),
    [
        ({}, {}, FileNotFoundError, "no text file matches"),
        ({"a.txt": "good\t1\n", "notes.md": "x"}, {}, ValueError, "unsupported text file"),
        ({"a.csv": "body,label\nhi,1\n"}, {}, ValueError, "column\\(s\\) text not found.*available: body, label"),
        ({"a.txt": "just a sentence\n"}, {}, ValueError, "'text<TAB>label'"),
        ({"a.txt": "good\t1\nbad\t1\n"}, {"max_length": 1}, ValueError, "max_length must be >= 2"),
    ],
)
def test_text_errors_name_the_problem(
    tmp_path: Path, tokenizer_dir: Path, files: dict[str, str], kw: dict[str, object], error: type, message: str
) -> None:
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    with pytest.raises(error, match=message):
        load_source("text", options(str(tmp_path / "*"), tokenizer_dir, **kw))


def test_text_lm_cuts_running_text_into_blocks(tmp_path: Path, tokenizer_dir: Path) -> None:
    words = ("the movie was very good . " * 4).split()  # 24 tokens, no special tokens
    (tmp_path / "one.txt").write_text(" ".join(words))
    (tmp_path / "two.txt").write_text("awful food")
    source = load_source("text-lm", options(str(tmp_path / "*.txt"), tokenizer_dir, max_length=10, test_fraction=0.25, num_partitions=2))
    assert source.task == "causal-lm" and source.num_classes is None
    x = torch.cat([source.train.x, source.test.x])
    y = torch.cat([source.train.y, source.test.y])
    assert x.shape == (3 + 1, 10)  # ceil(24 / 10) blocks of one.txt + 1 of two.txt
    rows = x.tolist()
    assert [ID[w] for w in words[:10]] in rows
    last = [ID[w] for w in words[20:]] + [0] * 6
    i = rows.index(last)
    assert y[i].tolist() == [ID[w] for w in words[20:]] + [IGNORE_INDEX] * 6
    assert ((y == IGNORE_INDEX) == (x == 0)).all()


def test_each_node_can_bring_its_own_text_file(tmp_path: Path, tokenizer_dir: Path) -> None:
    (tmp_path / "mine.txt").write_text("good movie\t1\nbad movie\t0\n" * 6)
    cfg = parse_run_config({"dataset": "text", "hf-model": str(tokenizer_dir), "max-length": 6})
    data = client_data(cfg, {"data-path": str(tmp_path / "mine.txt")})
    assert data.partition_id == -1 and data.info.input_kind == "tokens" and data.info.num_outputs == 2
    assert len(data.train) + len(data.val) == 12


def test_vit_lora_sends_adapters_and_head_only_and_learns_digits(tmp_path: Path) -> None:
    cfg = parse_run_config({
        "model": "vit-lora", "lora-rank": 4, "num-partitions": 2, "min-available-clients": 2, "min-fit-clients": 2,
        "fraction-evaluate": 0.0, "client-wait-timeout": 1.0, "partitioner": "iid", "num-server-rounds": 3,
        "client-optimizer": "adamw", "learning-rate": 0.003, "local-epochs": 2, "device": "cpu",
        "output-dir": str(tmp_path / "out"), "run-name": "run",
    })
    clients = make_clients(cfg)
    keys = clients[0].spec.keys
    assert keys and all(".lora_" in k or ".modules_to_save." in k for k in keys)
    assert sum(".mlp.0.lora_A" in k for k in keys) == 4  # one adapter pair per block's first MLP layer
    strategy, rounds = build_strategy(cfg)
    run_rounds(strategy, clients, rounds)
    metrics = pd.read_csv(tmp_path / "out" / "run" / "metrics.csv")
    assert metrics["central_accuracy"].iloc[-1] > metrics["central_accuracy"].iloc[0] + 0.2
    assert (tmp_path / "out" / "run" / "adapter" / "adapter_config.json").is_file()
