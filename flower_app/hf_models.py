"""Transformers and LoRA adapters for the federated app (plain PyTorch, transformers and peft; no Flower import).

Models built here (names registered in `flower_app.task.FINETUNE_MODELS`):

``hf-sequence-classification``
    ``AutoModelForSequenceClassification`` from ``hf-model`` (a local directory or a hub id) with a new head
    for the data's classes. Input: token ids ``N x L`` (`datasets.text`).
``hf-causal-lm``
    ``AutoModelForCausalLM`` from ``hf-model``; trained with the shifted next-token loss (`task.CausalLMLoss`).
``vit-lora``
    A small torchvision ``VisionTransformer`` (4 blocks, width 64) sized for the data's square images,
    randomly initialised; adapters go on the blocks' MLP layers unless ``lora-target-modules`` says otherwise.

With ``lora-rank > 0`` the base model is frozen and LoRA adapters (Hu et al. 2022, "LoRA: Low-Rank Adaptation
of Large Language Models") are added to the modules named in ``lora-target-modules``: a frozen ``W x``
becomes ``W x + (alpha / r) B A x`` with ``A`` (r x in) random and ``B`` (out x r) zero at the start. Only
``A``, ``B`` and the task head (``modules_to_save``: the classifier is new, so it must train) have
``requires_grad``, so `task.weight_spec` sends exactly those and the frozen base never travels. With
``lora-rank = 0`` every weight trains (full fine-tuning).

Keys. The arrays travel in `state_dict` order of the wrapper; `peft_key` maps a wrapper key to the key of
``peft.get_peft_model_state_dict`` (no ``net.`` prefix, no adapter name), the names under which
`save_pretrained` writes ``adapter_model.safetensors``.

Loading once. Flower's simulation keeps client processes (Ray actors) alive across rounds, so with
``FineTuneOptions.cache`` the built model is kept in this module and handed out again for the same options:
its travelling weights are whatever the last user set, and every client sets them from the server's
arrays before it trains or evaluates. In deployment each message runs in a fresh process; the base then
loads lazily (on the first message that needs it), from safetensors when the directory has them.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

HF_TASK_MODELS = {"hf-sequence-classification": "classification", "hf-causal-lm": "causal-lm"}
VISION_MODELS = ("vit-lora",)
PEFT_TASK_TYPES = {"hf-sequence-classification": "SEQ_CLS", "hf-causal-lm": "CAUSAL_LM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_NAME = "default"
# vit-lora's defaults: the two linear layers of every encoder block's MLP get adapters, the head trains.
VIT_TARGETS = ("mlp.0", "mlp.3")
VIT_HEAD = ("heads",)
_CACHE_SIZE = 1  # models kept by the in-process cache (the most recent); big models make 2 copies costly


def split_names(value: str) -> tuple[str, ...]:
    """``"query, value"`` -> ``("query", "value")``: run-config lists are comma-separated strings."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class LoraOptions:
    """LoRA settings (peft's ``LoraConfig``): rank 0 means no adapters, every weight trains."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()  # () = peft's default for the architecture
    modules_to_save: tuple[str, ...] = ()  # () = the task's head

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise ValueError(f"lora-rank must be >= 0, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora-alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora-dropout must be in [0, 1), got {self.dropout}")


@dataclass(frozen=True)
class FineTuneOptions:
    """What a fine-tuning model needs besides the data's `ModelInfo`."""

    hf_model: str = ""  # local directory, hub id or GGUF file (hf-* models)
    dtype: str = "float32"  # hf-* models: of the loaded weights (peft keeps LoRA adapters in float32)
    lora: LoraOptions = field(default_factory=LoraOptions)
    model_cache_dir: str = ""  # where GGUF files are converted to ('' = flower_app.gguf_cache.default_cache_dir)
    gradient_checkpointing: bool = False  # hf-* models: recompute activations in the backward pass
    cache: bool = False  # hand out the model built before with the same options (client processes)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"hf-dtype: unknown value {self.dtype!r}; choose one of: {', '.join(DTYPES)}")


# ------------------------------------------------------------------------------------ wrappers
class TokenModel(nn.Module):
    """Token ids ``N x L`` (int64, right-padded) -> logits, for `task.train` / `task.evaluate`.

    Padding is each row's *trailing* run of ``pad_token_id``: the same id inside the text is a token (SmolLM2
    pads with ``<|im_end|>``, which also ends every chat turn; `datasets.instructions`). The attention mask
    is 0 on the padding. Columns after the batch's last non-padding token but one are cut before the forward
    pass: with right padding the other positions' outputs do not change, short sentences in a long
    ``max-length`` cost only their own length, and the one padding column kept gives the logits that predict
    a last token which equals the padding id (an end-of-text label).
    """

    def __init__(self, net: nn.Module, pad_token_id: int) -> None:
        super().__init__()
        self.net = net
        self.pad_token_id = int(pad_token_id)

    def attention_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """1 up to each row's last non-padding token, 0 on the trailing padding."""
        real = input_ids.ne(self.pad_token_id).long()
        return real.flip(1).cumsum(1).flip(1).gt(0).long()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dtype != torch.int64 or input_ids.dim() != 2:
            raise ValueError(f"expected int64 token ids of shape (N, L), got {input_ids.dtype} {tuple(input_ids.shape)}")
        mask = self.attention_mask(input_ids)
        used = torch.nonzero(mask.any(0))
        length = min(int(used.max()) + 2, input_ids.shape[1]) if used.numel() else 1
        if length < input_ids.shape[1]:
            input_ids, mask = input_ids[:, :length], mask[:, :length]
        return self.net(input_ids=input_ids, attention_mask=mask).logits


class ImageModel(nn.Module):
    """Images ``N x C x H x W`` -> logits, through a (LoRA-wrapped) torchvision model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def is_finetune_model(model: nn.Module) -> bool:
    return isinstance(model, (TokenModel, ImageModel))


def peft_model(model: nn.Module) -> Any | None:
    """The ``peft.PeftModel`` inside a fine-tuning model, or None (full fine-tuning, other models)."""
    net = getattr(model, "net", None)
    return net if net is not None and hasattr(net, "peft_config") else None


def peft_key(key: str, adapter_name: str = ADAPTER_NAME) -> str:
    """A wrapper `state_dict` key as ``peft.get_peft_model_state_dict`` names it.

    ``net.base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight`` ->
    ``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``;
    ``net.base_model.model.classifier.modules_to_save.default.bias`` -> ``base_model.model.classifier.bias``.
    """
    key = key.removeprefix("net.")
    key = key.replace(f".modules_to_save.{adapter_name}.", ".")
    return key.replace(f".{adapter_name}.", ".")


# ---------------------------------------------------------------------------------- building
_CACHE: OrderedDict[tuple[Any, ...], nn.Module] = OrderedDict()


def clear_cache() -> None:
    """Forget the cached model (frees its memory)."""
    _CACHE.clear()


def build_finetune_model(name: str, info: Any, options: FineTuneOptions) -> nn.Module:
    """Build model ``name`` for data ``info`` (`task.ModelInfo`); seeding is the caller's (`task.build_model`)."""
    key = (name, info, replace(options, cache=False))
    if options.cache and key in _CACHE:
        _CACHE.move_to_end(key)
        log.debug("reusing the cached %s model", name)
        return _CACHE[key]
    if name in HF_TASK_MODELS:
        model: nn.Module = _build_hf(name, info, options)
    elif name == "vit-lora":
        model = _build_vit(info, options)
    else:
        raise ValueError(f"unknown fine-tuning model '{name}'; choose one of: {', '.join([*HF_TASK_MODELS, *VISION_MODELS])}")
    if options.cache:
        _CACHE[key] = model
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return model


def _from_pretrained(cls: Any, path: str, options: FineTuneOptions, **kwargs: Any) -> nn.Module:
    import transformers

    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs[dtype_key] = DTYPES[options.dtype]
    directory = Path(path).expanduser()
    if directory.is_dir():
        # Memory-mapped safetensors load fastest (a fresh process per message in deployment).
        kwargs["use_safetensors"] = any(directory.glob("*.safetensors")) or None
        path = str(directory)
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as err:
        raise OSError(
            f"hf-model '{path}' could not be loaded ({err}); give a model directory or a hub id "
            "(a hub id downloads unless it is in the Hugging Face cache)"
        ) from err


def _build_hf(name: str, info: Any, options: FineTuneOptions) -> TokenModel:
    if not options.hf_model:
        raise ValueError(f"model '{name}' needs hf-model: a model directory, a hub id or a GGUF file")
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from datasets.text import load_tokenizer
    from flower_app.gguf_cache import resolve_model

    expected = HF_TASK_MODELS[name]
    if info.task != expected:
        raise ValueError(f"model '{name}' is for {expected} data, but the data's task is '{info.task}'")
    path = resolve_model(options.hf_model, options.model_cache_dir)  # a GGUF file: its converted copy
    pad_id = load_tokenizer(path).pad_token_id
    if name == "hf-sequence-classification":
        # A checkpoint with another head size gets a new head (the body's weights load as they are).
        net: Any = _from_pretrained(
            AutoModelForSequenceClassification, path, options,
            num_labels=info.num_outputs, ignore_mismatched_sizes=True,
        )
        net.config.pad_token_id = pad_id
    else:
        net = _from_pretrained(AutoModelForCausalLM, path, options)
    if options.gradient_checkpointing:
        # Non-reentrant checkpointing also works when only adapters need gradients (frozen inputs).
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        net.config.use_cache = False
    net = _with_lora(net, name, options.lora, default_head=None)
    return TokenModel(net, pad_id)


def _patch_size(size: int) -> int:
    for patch in (16, 8, 4, 2, 1):
        if size % patch == 0 and size // patch >= 2:
            return patch
    return 1


def _build_vit(info: Any, options: FineTuneOptions) -> ImageModel:
    from torchvision.models import VisionTransformer

    if len(info.input_shape) != 3 or info.input_shape[1] != info.input_shape[2]:
        raise ValueError(f"model 'vit-lora' needs square images (C, H, H), got input shape {info.input_shape}")
    channels, size = info.input_shape[0], info.input_shape[1]
    hidden = 64
    patch = _patch_size(size)
    net = VisionTransformer(
        image_size=size, patch_size=patch, num_layers=4, num_heads=4, hidden_dim=hidden, mlp_dim=4 * hidden,
        num_classes=info.num_outputs,
    )
    if channels != 3:  # torchvision's patch embedding expects RGB
        net.conv_proj = nn.Conv2d(channels, hidden, kernel_size=patch, stride=patch)
    lora = options.lora
    if lora.rank > 0 and not lora.target_modules:
        lora = replace(lora, target_modules=VIT_TARGETS)
    return ImageModel(_with_lora(net, "vit-lora", lora, default_head=VIT_HEAD))


def _with_lora(net: nn.Module, name: str, lora: LoraOptions, default_head: tuple[str, ...] | None) -> nn.Module:
    """Freeze ``net`` and add LoRA adapters (rank 0: return it unchanged, every weight trainable)."""
    if lora.rank == 0:
        return net
    from peft import LoraConfig, get_peft_model

    modules_to_save = list(lora.modules_to_save or default_head or ()) or None
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,  # type: ignore[arg-type]  # annotated int; LoRA scales by alpha / r as a float
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) or None,
        modules_to_save=modules_to_save,  # None: peft adds the head of the task type (classifier, score)
        task_type=PEFT_TASK_TYPES.get(name),
    )
    try:
        wrapped = get_peft_model(net, config)
    except ValueError as err:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in net.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"LoRA on '{name}' failed: {err}. Set lora-target-modules to (suffixes of) module names; "
            f"this model's linear layers end in: {', '.join(linear)}"
        ) from err
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info("LoRA r=%d on %s: %d of %d parameters train (%.3f%%)", lora.rank, name, trainable, total, 100 * trainable / total)
    return wrapped


# ------------------------------------------------------------------------------------ saving
def save_pretrained(model: nn.Module, directory: Path) -> Path | None:
    """Save a fine-tuning model the way its library loads it back; None for other models.

    LoRA: ``directory/adapter`` (``adapter_model.safetensors`` + ``adapter_config.json``), which
    ``peft.PeftModel.from_pretrained(base, path)`` puts back on the base model. Full fine-tuning of an hf-*
    model: ``directory/hf_model`` (``save_pretrained`` of the whole model). vit-lora without adapters: None.
    """
    if not is_finetune_model(model):
        return None
    adapted = peft_model(model)
    if adapted is not None:
        path = directory / "adapter"
        adapted.save_pretrained(str(path))
        return path
    net: Any = model.net
    if hasattr(net, "save_pretrained"):
        path = directory / "hf_model"
        net.save_pretrained(str(path))
        return path
    return None
