"""Your own model: ``model = "package.module:factory"`` in the run config (plain PyTorch, no Flower import).

The factory is any callable that takes the data's description, a `flower_app.task.ModelInfo`, and
returns a ``torch.nn.Module``::

    # my_models/models.py
    def build(info):                 # info.task, info.input_shape, info.num_outputs, info.input_kind
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(math.prod(info.input_shape), info.num_outputs))

When it is read. The run config is parsed on the server and on every node, and the server need not
be able to import a node's packages at that moment, so parsing checks only the syntax of the path
(`import_path_problem`). The module is imported when the model is built: by the ServerApp before
round 1 and by every ClientApp when it starts (`build_from_factory`). Its module must therefore be
importable on the SuperLink's machine (where the ServerApp runs) and on every SuperNode: installed
there, or shipped inside the FAB (README "Your own model").

What is checked, each with an error that names the path and what is wrong (`ModelFactoryError`):
the module imports (else the import's own error), the attribute exists and is callable, the call
returns an ``nn.Module`` without raising, the module has trainable parameters, and one forward pass
(eval mode, no gradient, on CPU) on a dummy batch of two examples of the data's input shape gives an
output that fits the task (`expected_output`).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from flower_app.task import ModelInfo

# module path ":" attribute path; both dotted Python identifiers (as in an entry point).
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
IMPORT_PATH = re.compile(rf"{_IDENTIFIER}(\.{_IDENTIFIER})*:{_IDENTIFIER}(\.{_IDENTIFIER})*")
DUMMY_BATCH = 2  # two examples: a model that squeezes the batch dimension away is caught


class ModelFactoryError(ValueError):
    """The own-model factory named by the run config's ``model`` cannot be used; the message says why."""


def is_import_path(name: str) -> bool:
    """Whether ``name`` is meant as an import path (holds a ':'), as opposed to a registered model name."""
    return ":" in name


def import_path_problem(name: str) -> str | None:
    """What is wrong with the syntax of ``name`` as ``package.module:factory``; None when it is well formed."""
    if IMPORT_PATH.fullmatch(name):
        return None
    return (f"'{name}' is not an import path of the form 'package.module:factory' (dotted Python identifiers "
            "on both sides of one ':')")


def load_factory(path: str) -> Callable[..., Any]:
    """Import ``package.module`` and return its attribute ``factory`` (dotted attributes allowed).

    Raises:
        ModelFactoryError: bad syntax, the module does not import (naming the import's own error),
            the attribute is missing, or it is not callable.
    """
    problem = import_path_problem(path)
    if problem is not None:
        raise ModelFactoryError(f"model {problem}")
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        missing = getattr(err, "name", None)
        if isinstance(err, ModuleNotFoundError) and missing is not None and _is_prefix(missing, module_name):
            raise ModelFactoryError(
                f"model '{path}': module '{module_name}' is not importable here ({type(err).__name__}: {err}); "
                "it must be importable on the server and on every node: install its package there, or put it in the "
                "app folder and add it to [tool.flwr.app] fab-include in pyproject.toml (README \"Your own model\")"
            ) from err
        raise ModelFactoryError(
            f"model '{path}': importing module '{module_name}' failed: {type(err).__name__}: {err}"
        ) from err
    except Exception as err:  # a user's module may raise anything on import
        raise ModelFactoryError(
            f"model '{path}': importing module '{module_name}' raised {type(err).__name__}: {err}"
        ) from err
    target: Any = module
    where, walked = f"module '{module_name}'", []
    for part in attribute.split("."):
        if not hasattr(target, part):
            names = sorted(n for n in dir(target) if not n.startswith("_") and callable(getattr(target, n, None)))
            offer = f"; its public callables: {', '.join(names[:20])}" if names else ""
            raise ModelFactoryError(f"model '{path}': {where} has no attribute '{part}'{offer}")
        target = getattr(target, part)
        walked.append(part)
        where = f"'{module_name}:{'.'.join(walked)}'"
    if not callable(target):
        raise ModelFactoryError(
            f"model '{path}': '{attribute}' is a {type(target).__name__}, not callable; it must be a function or "
            "class that takes the data's ModelInfo and returns a torch.nn.Module"
        )
    return target


def _is_prefix(missing: str, module_name: str) -> bool:
    """Whether the module that was not found is ``module_name`` or one of its parent packages."""
    return module_name == missing or module_name.startswith(missing + ".")


def build_from_factory(path: str, info: ModelInfo) -> nn.Module:
    """Call the factory at ``path`` with ``info`` and check what it returns (see the module docstring).

    Raises:
        ModelFactoryError: naming ``path`` and the problem.
    """
    factory = load_factory(path)
    try:
        model = factory(info)
    except Exception as err:  # the user's code: report whatever it raised
        raise ModelFactoryError(
            f"model '{path}' raised {type(err).__name__} when called with {info.describe()}: {err}"
        ) from err
    check_model(path, model, info)
    return model


def check_model(path: str, model: object, info: ModelInfo) -> None:
    """Refuse what a federated run cannot train: not a Module, nothing trainable, an output that misfits the task."""
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(
            f"model '{path}' returned a {type(model).__name__}, not a torch.nn.Module"
        )
    if not any(p.requires_grad for p in model.parameters()):
        count = sum(1 for _ in model.parameters())
        why = "it has no parameters" if count == 0 else f"all {count} of its parameters have requires_grad=False"
        raise ModelFactoryError(f"model '{path}' has no trainable parameters ({why}): nothing could be trained")
    x = dummy_batch(info)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(x)
    except Exception as err:  # the user's forward
        raise ModelFactoryError(
            f"model '{path}': a forward pass on a dummy batch of shape {tuple(x.shape)} ({x.dtype}, the data's "
            f"input shape {info.input_shape} with a batch of {DUMMY_BATCH}) raised {type(err).__name__}: {err}"
        ) from err
    finally:
        model.train(was_training)
    problem = output_problem(out, info)
    if problem is not None:
        raise ModelFactoryError(
            f"model '{path}': on a dummy batch of shape {tuple(x.shape)} {problem}; the task is {info.describe()}"
        )


def dummy_batch(info: ModelInfo) -> torch.Tensor:
    """Two examples of the data's input shape: seeded normal floats, or token id 0 for token input."""
    shape = (DUMMY_BATCH, *info.input_shape)
    if info.input_kind == "tokens":
        return torch.zeros(shape, dtype=torch.int64)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0))


def expected_output(info: ModelInfo, batch: int = DUMMY_BATCH) -> str:
    """The output shape the task needs, in words (for messages)."""
    if info.task == "causal-lm":
        return f"({batch}, sequence length <= {info.input_shape[-1]}, vocabulary size) next-token logits"
    return f"({batch}, {info.num_outputs})"


def output_problem(out: object, info: ModelInfo, batch: int = DUMMY_BATCH) -> str | None:
    """What is wrong with a forward pass's output for ``info``'s task; None when it fits.

    classification: logits ``(batch, num_outputs)`` (`torch.nn.CrossEntropyLoss`); regression:
    ``(batch, num_outputs)``, matching targets ``(N, num_outputs)`` (`torch.nn.MSELoss` would silently
    broadcast ``(batch,)`` against them); causal-lm: logits ``(batch, length, vocabulary)`` with
    length at most the input's.
    """
    if not isinstance(out, torch.Tensor):
        return (f"it returned a {type(out).__name__}, not a tensor; the training loop needs a tensor of shape "
                f"{expected_output(info, batch)}")
    if not out.is_floating_point():
        return f"it returned a {out.dtype} tensor; the loss needs floating-point outputs"
    shape = tuple(out.shape)
    if info.task == "causal-lm":
        if len(shape) != 3 or shape[0] != batch or not 2 <= shape[1] <= info.input_shape[-1]:
            return f"the output has shape {shape}, expected {expected_output(info, batch)}"
        return None
    if shape != (batch, info.num_outputs):
        return f"the output has shape {shape}, expected {expected_output(info, batch)}"
    return None
