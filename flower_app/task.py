"""Models, weight exchange and training loops in plain PyTorch (no Flower import).

The client sends only what is trained: trainable parameters and floating-point buffers, under
their `state_dict` keys, in `state_dict` order (`weight_spec`). Integer buffers such as
BatchNorm's `num_batches_tracked` stay local.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flower_app.sgd import SGD
from strategies.client_rules import proximal_term
from strategies.tensors import tensor_view

if TYPE_CHECKING:
    from flower_app.hf_models import FineTuneOptions

log = logging.getLogger(__name__)

NDArrays = list[np.ndarray]


# ----------------------------------------------------------------------------------- models
class SmallCNN(nn.Module):
    """Two conv blocks with BatchNorm and a two-layer head; any H x W via adaptive pooling."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class MLP(nn.Module):
    """Flatten, two hidden ReLU layers, linear output."""

    def __init__(self, in_features: int, out_features: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LinearRegression(nn.Module):
    """y = W x + b: the multivariate linear model."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))


@dataclass(frozen=True)
class ModelInfo:
    """What a model needs to know about its data: the argument of every model factory (public API).

    A factory named in the run config (``model = "my_package.models:build"``, `flower_app.model_factory`)
    is called as ``build(info)`` and returns a ``torch.nn.Module`` whose output fits the task:

    Attributes:
        task: ``"classification"`` (output: logits ``(batch, num_outputs)``, cross-entropy loss),
            ``"regression"`` (output ``(batch, num_outputs)``, mean squared error) or ``"causal-lm"``
            (output: next-token logits ``(batch, length, vocabulary)``).
        input_shape: the shape of one example, without the batch dimension: ``(C, H, W)`` for images,
            ``(features,)`` for tables, ``(max_length,)`` for token ids.
        num_outputs: the number of classes, or of regression targets (1 for causal-lm).
        input_kind: ``"dense"`` (float32 features or images) or ``"tokens"`` (int64 token ids).
    """

    task: str
    input_shape: tuple[int, ...]
    num_outputs: int
    input_kind: str = "dense"

    def describe(self) -> str:
        """One line for messages: ``classification, input shape (1, 8, 8) (dense), 10 outputs``."""
        return f"{self.task}, input shape {self.input_shape} ({self.input_kind}), {self.num_outputs} outputs"


def _build_cnn(info: ModelInfo, hidden: int) -> nn.Module:
    if len(info.input_shape) != 3:
        raise ValueError(f"model 'cnn' needs image input (C, H, W), got input shape {info.input_shape}")
    return SmallCNN(info.input_shape[0], info.num_outputs)


def _build_mlp(info: ModelInfo, hidden: int) -> nn.Module:
    return MLP(math.prod(info.input_shape), info.num_outputs, hidden)


def _build_linear(info: ModelInfo, hidden: int) -> nn.Module:
    return LinearRegression(math.prod(info.input_shape), info.num_outputs)


MODELS: dict[str, Callable[[ModelInfo, int], nn.Module]] = {
    "cnn": _build_cnn,
    "mlp": _build_mlp,
    "linear": _build_linear,
}


# Models built from more than (info, hidden): transformers and LoRA (flower_app.hf_models, which imports
# transformers and peft only when one is built). build_model passes them its `finetune` options.
FINETUNE_MODELS: tuple[str, ...] = ("hf-sequence-classification", "hf-causal-lm", "vit-lora")


def resolve_model_name(name: str, info: ModelInfo) -> str:
    """`auto`: hf-causal-lm / hf-sequence-classification for text, cnn for images, linear for regression, mlp otherwise."""
    if name != "auto":
        return name
    if info.task == "causal-lm":
        return "hf-causal-lm"
    if info.input_kind == "tokens":
        return "hf-sequence-classification"
    if info.task == "regression":
        return "linear"
    return "cnn" if len(info.input_shape) == 3 else "mlp"


def build_model(
    name: str, info: ModelInfo, hidden: int = 128, seed: int = 0, finetune: FineTuneOptions | None = None
) -> nn.Module:
    """Build a registered model, or the user's own from ``package.module:factory``, with a seeded
    initialisation (same seed -> same weights).

    The FINETUNE_MODELS need ``finetune`` (`flower_app.hf_models.FineTuneOptions`); other models ignore it.
    """
    name = resolve_model_name(name, info)
    if ":" in name:  # "package.module:factory": the user's own model (flower_app.model_factory checks it)
        from flower_app.model_factory import build_from_factory

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_from_factory(name, info)
    if name in FINETUNE_MODELS:
        from flower_app.hf_models import FineTuneOptions, build_finetune_model

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_finetune_model(name, info, finetune or FineTuneOptions())
    if name not in MODELS:
        raise ValueError(
            f"unknown model '{name}'; choose one of: auto, {', '.join(sorted([*MODELS, *FINETUNE_MODELS]))}, "
            "or your own factory as 'package.module:factory'"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MODELS[name](info, hidden)


# --------------------------------------------------------------------------- weight exchange
@dataclass(frozen=True)
class WeightSpec:
    """The canonical list of arrays that travel: keys, shapes, and which are trainable."""

    keys: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    trainable: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


def weight_spec(model: nn.Module) -> WeightSpec:
    """Trainable parameters and floating-point buffers, in `state_dict` order."""
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    buffer_names = {n for n, b in model.named_buffers() if b.is_floating_point()}
    keys, shapes, flags = [], [], []
    for key, tensor in model.state_dict(keep_vars=True).items():
        if key in trainable_names or key in buffer_names:
            keys.append(key)
            shapes.append(tuple(tensor.shape))
            flags.append(key in trainable_names)
    return WeightSpec(tuple(keys), tuple(shapes), tuple(flags))


def get_weights(model: nn.Module, spec: WeightSpec) -> NDArrays:
    """The spec's tensors as float32 numpy arrays.

    A CPU float32 contiguous tensor comes back as a view of its memory (no copy: a 100M-parameter
    model is not duplicated to be sent); other tensors (GPU, other dtypes) as converted copies. The
    arrays follow the model: copy them before changing the model if the old values are needed.
    """
    state = model.state_dict()
    out: NDArrays = []
    for key in spec.keys:
        tensor = state[key].detach()
        if tensor.device.type == "cpu" and tensor.dtype == torch.float32 and tensor.is_contiguous():
            out.append(tensor.numpy())
        else:
            out.append(tensor.to("cpu", torch.float32).contiguous().numpy())
    return out


def set_weights(model: nn.Module, spec: WeightSpec, arrays: Sequence[np.ndarray]) -> None:
    """Load arrays in spec order into the model, checking count and shapes.

    Each array is copied straight into its tensor (read-only arrays, e.g. views of a received
    message, are read through a torch view, not copied first).
    """
    if len(arrays) != len(spec):
        raise ValueError(f"expected {len(spec)} arrays, got {len(arrays)}")
    state = model.state_dict()
    with torch.no_grad():
        for key, shape, array in zip(spec.keys, spec.shapes, arrays):
            if tuple(array.shape) != shape:
                raise ValueError(f"array for '{key}' has shape {tuple(array.shape)}, expected {shape}")
            state[key].copy_(tensor_view(np.asarray(array), key))


# ------------------------------------------------------------------------------- training
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but CUDA is not available on this node")
    return torch.device(name)


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=generator)


class CausalLMLoss(nn.Module):
    """Mean next-token cross-entropy: logits at position t predict the label at t + 1; label -100 is skipped.

    The model may have cut trailing padding (`hf_models.TokenModel`): labels past the logits' length are
    padding (-100) and are dropped.
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        labels = labels[:, : logits.shape[1]]
        return nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )


def loss_fn(task: str) -> nn.Module:
    if task == "causal-lm":
        return CausalLMLoss()
    return nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 1
    learning_rate: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_accumulation_steps: int = 1
    proximal_mu: float = 0.0  # FedProx: adds (mu/2) ||w - w_global||^2 over trainable parameters
    optimizer: str = "sgd"  # "sgd" | "adamw" (moments start from zero every round; transformers train faster)
    max_steps: int = 0  # stop after this many optimizer steps (0 = all epochs); an epoch of a large set is too long


@dataclass(frozen=True)
class TrainResult:
    loss: float
    accuracy: float | None
    num_examples: int
    num_steps: int


def _autocast(device: torch.device) -> torch.autocast:
    # bf16 autocast on CUDA halves activation memory and uses tensor cores; CPU stays fp32.
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def make_optimizer(params: list[nn.Parameter], options: TrainOptions) -> torch.optim.Optimizer | SGD:
    """AdamW from `torch.optim`; plain SGD from `flower_app.sgd` (same result, no `torch._dynamo` import)."""
    if options.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=options.learning_rate, weight_decay=options.weight_decay)
    return SGD(params, lr=options.learning_rate, momentum=options.momentum, weight_decay=options.weight_decay)


def train(
    model: nn.Module,
    loader: DataLoader,
    task: str,
    options: TrainOptions,
    device: torch.device,
    control_correction: Sequence[torch.Tensor] | None = None,
    params: Sequence[nn.Parameter] | None = None,
    anchor: Sequence[torch.Tensor | None] | None = None,
) -> TrainResult:
    """Local SGD.

    ``options.epochs`` passes over ``loader``, or ``options.max_steps`` optimizer steps if that comes first
    (``TrainResult.num_steps`` is the count taken, which FedNova and SCAFFOLD use).

    With ``options.proximal_mu > 0`` the loss gains FedProx's (mu/2)||w - w_start||^2 (Li et al. 2020;
    `strategies.client_rules.proximal_term`).
    ``control_correction`` (SCAFFOLD, Karimireddy et al. 2020) is ``c - c_i`` per trained
    parameter, added to each gradient before the step.

    ``params`` are the parameters trained (default: every parameter with ``requires_grad``); the model's
    other trainable parameters are held fixed for the call (personalization: FedRep trains the head, then
    the body). ``control_correction`` and ``anchor`` follow ``params``. ``anchor`` is the proximal term's
    centre per trained parameter (default: its value at the start of the call, FedProx; Ditto pulls the
    personal model towards the received global one); a None entry has no term.
    """
    model.to(device).train()
    frozen: list[nn.Parameter] = []
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        chosen = {id(p) for p in params}
        frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in chosen]
    try:
        for p in frozen:  # no gradient is computed for them (and none is left behind)
            p.requires_grad_(False)
        return _train(model, loader, task, options, device, control_correction, list(params), anchor)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _train(
    model: nn.Module,
    loader: DataLoader,
    task: str,
    options: TrainOptions,
    device: torch.device,
    control_correction: Sequence[torch.Tensor] | None,
    params: list[nn.Parameter],
    anchor: Sequence[torch.Tensor | None] | None,
) -> TrainResult:
    optimizer = make_optimizer(params, options)
    start: list[torch.Tensor] | None = None
    proximal: list[nn.Parameter] = []
    if options.proximal_mu > 0:
        if anchor is None:
            proximal, start = list(params), [p.detach().clone() for p in params]
        else:
            if len(anchor) != len(params):
                raise ValueError(f"anchor has {len(anchor)} entries for {len(params)} trained parameters")
            pairs = [(p, a) for p, a in zip(params, anchor) if a is not None]
            proximal = [p for p, _ in pairs]
            start = [a.detach().to(device=p.device, dtype=p.dtype) for p, a in pairs] if pairs else None
    criterion = loss_fn(task)
    corrections = [c.to(device) for c in control_correction] if control_correction is not None else None
    if corrections is not None and len(corrections) != len(params):
        raise ValueError(f"control_correction has {len(corrections)} tensors for {len(params)} trained parameters")
    total_loss, correct, seen, steps = 0.0, 0, 0, 0
    accum = options.grad_accumulation_steps
    optimizer.zero_grad(set_to_none=True)
    for _ in range(options.epochs):
        if options.max_steps and steps >= options.max_steps:
            break
        for i, (x, y) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(device):
                out = model(x)
                loss = criterion(out.float(), y)
            objective = loss
            if start is not None:
                objective = objective + proximal_term(proximal, start, options.proximal_mu)
            (objective / accum).backward()
            total_loss += loss.item() * len(y)
            seen += len(y)
            if task == "classification":
                correct += int((out.argmax(1) == y).sum())
            last = i == len(loader) - 1
            if (i + 1) % accum == 0 or last:
                if corrections is not None:
                    for p, c in zip(params, corrections):
                        if p.grad is not None:
                            p.grad.add_(c)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
                if options.max_steps and steps >= options.max_steps:
                    break
    num_examples = len(loader.dataset)  # type: ignore[arg-type]
    return TrainResult(
        loss=total_loss / max(seen, 1),
        accuracy=correct / seen if task == "classification" and seen else None,
        num_examples=num_examples,
        num_steps=steps,
    )


def full_gradient(
    model: nn.Module, loader: DataLoader, task: str, device: torch.device, max_batches: int = 0
) -> tuple[list[torch.Tensor], float]:
    """Gradient of the mean loss over all of ``loader`` at the current weights (FedSGD's client step).

    Batches are weighted by their size so the result equals the full-batch gradient; with
    ``max_batches > 0`` it is the gradient of the mean loss over the first ``max_batches`` batches
    (a shuffled loader makes that an unbiased estimate). Returns the per-trainable-parameter gradients
    (CPU, float32) and the mean loss.
    """
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    criterion = loss_fn(task)
    n = len(loader.dataset)  # type: ignore[arg-type]
    if max_batches and max_batches < len(loader):
        n = max_batches * int(loader.batch_size or 1)  # only a loader's last batch can be short
    model.zero_grad(set_to_none=True)
    total = 0.0
    for i, (x, y) in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        x, y = x.to(device), y.to(device)
        loss = criterion(model(x).float(), y)
        (loss * (len(y) / n)).backward()
        total += loss.item() * len(y)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().to("cpu", torch.float32) for p in params]
    model.zero_grad(set_to_none=True)
    return grads, total / max(n, 1)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, task: str, device: torch.device) -> tuple[float, float | None, int]:
    """Mean loss, accuracy (classification) and example count.

    Causal LM: the mean over the predicted (labelled) tokens, so that ``exp(loss)`` is the perplexity.
    """
    model.to(device).eval()
    criterion = loss_fn(task)
    total, weight, correct, n = 0.0, 0, 0, 0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        with _autocast(device):
            out = model(x)
        w = int(y[:, 1:].ne(-100).sum()) if task == "causal-lm" else len(y)
        if w:
            total += criterion(out.float(), y).item() * w
        weight += w
        if task == "classification":
            correct += int((out.argmax(1) == y).sum())
        n += len(y)
    if n == 0 or weight == 0:
        return float("nan"), None, n
    return total / weight, (correct / n if task == "classification" else None), n
