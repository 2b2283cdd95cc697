"""First-order probes for MaZO's importance: per-task gradient statistics from a few backward passes.

papers.md 5.3: on a small calibration set of each task, one backward pass per mini-batch gives the gradient
g_b of the task's loss with respect to every maskable weight; :class:`~zolm.masks.importance.GradStats` keeps
their sum and sum of squares (and, for the row-wise curvature, the input-feature second moments x_j^2 seen by
each layer). Nothing is stored in ``.grad``: gradients come from ``torch.autograd.grad`` for the named weights
only, and every ``requires_grad`` flag is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from zolm.errors import ZolmError
from zolm.masks.importance import GradStats


def owner_module(model: nn.Module, param_name: str) -> nn.Module:
    """The module that holds parameter ``param_name`` (``model.layers.0.mlp.up_proj.weight`` -> ``up_proj``)."""
    module_name = param_name.rsplit(".", 1)[0] if "." in param_name else ""
    return model.get_submodule(module_name)


def gradient_stats(model: nn.Module, batches: Iterable[dict], loss_fn: Callable[[nn.Module, dict], torch.Tensor],
                   names: Sequence[str], activations: bool = False) -> dict[str, GradStats]:
    """Statistics of d loss_fn(model, batch) / dW over ``batches`` for each weight named in ``names``.

    Args:
        model: a module in eval mode is assumed (dropout off, as for ZO's forward passes); it is put in eval
            mode for the probes and returned to its previous mode.
        batches: the task's calibration mini-batches.
        loss_fn: ``loss_fn(model, batch)`` -> scalar loss (the task's training loss).
        names: parameter names of 2-D weights (``[out, in]``).
        activations: also collect sum_tokens x_j^2 of each weight's layer input (forward pre-hook on its module).
    """
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise ZolmError(f"no parameter named {missing[0]!r} in the model")
    targets = [params[n] for n in names]
    # GPT-2's Conv1D stores its weight [in, out]: its input features are the rows
    stats = {n: GradStats.zeros(p, activations, transposed=activations and not isinstance(owner_module(model, n),
                                                                                         nn.Linear))
             for n, p in zip(names, targets)}
    flags = {n: p.requires_grad for n, p in params.items()}
    hooks = []
    if activations:
        for n in names:
            def hook(_module: nn.Module, args: tuple, s: GradStats = stats[n]) -> None:
                s.add_inputs(args[0])
            hooks.append(owner_module(model, n).register_forward_pre_hook(hook))
    was_training = model.training
    try:
        for p in params.values():
            p.requires_grad_(False)
        for p in targets:
            p.requires_grad_(True)
        model.eval()
        count = 0
        for batch in batches:
            loss = loss_fn(model, batch)
            grads = torch.autograd.grad(loss, targets)
            for n, g in zip(names, grads):
                stats[n].add_grad(g)
            count += 1
        if count == 0:
            raise ZolmError("no calibration batch: importance needs at least one example per task")
    finally:
        for h in hooks:
            h.remove()
        for n, p in params.items():
            p.requires_grad_(flags[n])
        model.train(was_training)
    return stats
