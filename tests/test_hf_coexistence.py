"""The app's top-level `datasets` package shadows Hugging Face's `datasets`: transformers and peft must still work.

Flower puts the app's root first on `sys.path` in every process that loads the app, so there `import datasets`
is ours. The check runs in a fresh interpreter with the repository root as working directory and first on
`sys.path`, as Flower does, and drives the whole path the app uses: tokenizer, model, LoRA, training step,
adapter save and reload.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys, tempfile
sys.path.insert(0, os.getcwd())
import datasets                                   # ours, as in a Flower process
import torch
import transformers, peft
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification, BertTokenizer
from transformers.utils import is_datasets_available
from peft import LoraConfig, PeftModel, get_peft_model

from flower_app.hf_models import FineTuneOptions, LoraOptions
from flower_app.task import ModelInfo, build_model, get_weights, weight_spec

out = {"datasets_file": datasets.__file__, "hf_thinks_datasets_available": is_datasets_available()}
d = tempfile.mkdtemp()
vocab = os.path.join(d, "vocab.txt")
open(vocab, "w").write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie"]) + "\n")
BertTokenizer(vocab).save_pretrained(d)
config = BertConfig(vocab_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                    max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
torch.manual_seed(0)
BertForSequenceClassification(config).save_pretrained(d)
tok = AutoTokenizer.from_pretrained(d)
ids = torch.tensor(tok(["good movie", "bad movie"], padding="max_length", max_length=6)["input_ids"])
out["ids"] = ids.tolist()

model = build_model("hf-sequence-classification", ModelInfo("classification", (6,), 2, "tokens"), seed=0,
                    finetune=FineTuneOptions(hf_model=d, lora=LoraOptions(rank=2)))
opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
loss = torch.nn.functional.cross_entropy(model(ids), torch.tensor([1, 0]))
loss.backward(); opt.step()
out["sent"] = weight_spec(model).num_elements
out["total"] = sum(p.numel() for p in model.parameters())
model.net.save_pretrained(os.path.join(d, "adapter"))
reloaded = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(d, num_labels=2), os.path.join(d, "adapter"))
with torch.no_grad():
    out["max_diff"] = float((model.eval()(ids) - reloaded.eval()(input_ids=ids, attention_mask=ids.ne(0).long()).logits).abs().max())
out["datasets_still_ours"] = sys.modules["datasets"] is datasets
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_transformers_and_peft_work_with_the_app_root_first_on_sys_path() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert Path(out["datasets_file"]) == ROOT / "datasets" / "__init__.py"
    assert out["datasets_still_ours"]
    # transformers sees a `datasets` on the path (ours): only its optional datasets features would break.
    assert out["hf_thinks_datasets_available"] is True
    assert out["ids"] == [[2, 5, 7, 3, 0, 0], [2, 6, 7, 3, 0, 0]]
    # 1 layer x (query, value) x (A 2x16 + B 16x2) + classifier 2x16 + 2
    assert out["sent"] == 2 * (2 * 16 + 16 * 2) + 2 * 16 + 2
    assert out["sent"] < out["total"] / 10
    assert out["max_diff"] < 1e-5
