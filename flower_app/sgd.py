"""Plain SGD (momentum, weight decay) without `torch.optim`, for the clients' hot path.

Why: every `torch.optim.Optimizer` wraps ``add_param_group``, ``zero_grad`` and ``state_dict`` in
``torch._disable_dynamo``, which imports ``torch._dynamo`` on its first call (torch 2.x,
``torch/_compile.py``). Constructing the optimizer therefore costs a cold ClientApp process about
1 s (several under load), for every message, in a deployment where each message gets a fresh
process. `SGD` does the same arithmetic as ``torch.optim.SGD`` on CPU (its single-tensor path:
``dampening=0``, ``nesterov=False``, ``maximize=False``), operation for operation, so the results
are bit-identical (``tests/test_sgd.py`` checks it against ``torch.optim.SGD`` step by step).

On CUDA ``torch.optim.SGD`` takes its multi-tensor (foreach) path, whose kernels may round
differently in the last bit; this class stays per tensor there too (same arithmetic, same result
up to rounding).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SGD:
    """``torch.optim.SGD(params, lr, momentum, weight_decay)``'s update, with the same two methods the loop uses.

    Parameters whose ``grad`` is None are skipped (no decay, no momentum), as ``torch.optim`` does.
    """

    def __init__(self, params: Iterable[torch.Tensor], lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if lr < 0.0 or momentum < 0.0 or weight_decay < 0.0:
            raise ValueError(f"lr, momentum and weight_decay must be >= 0, got {lr}, {momentum}, {weight_decay}")
        self.params = list(params)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.momentum_buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        for i, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            if self.weight_decay != 0:
                grad = grad.add(param, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.momentum_buffers[i]
                if buf is None:
                    buf = grad.detach().clone()
                    self.momentum_buffers[i] = buf
                else:
                    buf.mul_(self.momentum).add_(grad, alpha=1.0)  # 1 - dampening, dampening = 0
                grad = buf
            param.add_(grad, alpha=-self.lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            if param.grad is None:
                continue
            if set_to_none:
                param.grad = None
            else:
                param.grad.detach_()
                param.grad.zero_()
