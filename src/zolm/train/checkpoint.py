"""Checkpoints for resuming: trainable tensors, optimiser state and loop state, written atomically.

Only trainable tensors are saved (the frozen ones are the base model's); optimiser state is flattened into
safetensors plus JSON, so nothing is pickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from zolm.utils.io import atomic_dir, atomic_write_json
from zolm.zo.optimizer import DivergenceError


def flatten_optimizer(opt: torch.optim.Optimizer | None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state_dict as {'<param index>.<key>': tensor} plus a JSON-able remainder."""
    if opt is None:
        return {}, {}
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: str | Path, weights: dict[str, torch.Tensor], state: dict[str, Any],
                    opt: torch.optim.Optimizer | None = None) -> None:
    """Write weights, optimiser and loop state to ``path`` (replaced atomically).

    Only finite state is written: a non-finite weight or optimiser tensor (an update that overflowed, e.g. in
    float16) raises DivergenceError and leaves the previous checkpoint at ``path`` as the last good one.
    """
    otensors, ometa = flatten_optimizer(opt)
    bad = nonfinite({**weights, **{f"optimizer.{k}": v for k, v in otensors.items()}})
    if bad:
        raise DivergenceError(f"{len(bad)} tensor(s) are not finite after step {state.get('step')} (e.g. {bad[0]}); "
                              f"{Path(path).name} not written")
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        if opt is not None:
            save_file(otensors, str(tmp / "optimizer.safetensors"))
            atomic_write_json(tmp / "optimizer.json", ometa)
        atomic_write_json(tmp / "state.json", state)


def load_checkpoint(path: str | Path, opt: torch.optim.Optimizer | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Return (weights, loop state); restores ``opt`` in place when given."""
    path = Path(path)
    weights = load_file(str(path / "weights.safetensors"))
    state = json.loads((path / "state.json").read_text())
    if opt is not None and (path / "optimizer.safetensors").is_file():
        unflatten_optimizer(opt, load_file(str(path / "optimizer.safetensors")),
                            json.loads((path / "optimizer.json").read_text()))
    return weights, state


@torch.no_grad()
def nonfinite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity."""
    return [n for n, t in tensors.items() if t.is_floating_point()
            and not bool(torch.isfinite(t if t.element_size() > 1 else t.float()).all())]  # fp8: no isfinite


@torch.no_grad()
def copy_into(named: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> None:
    """Copy saved tensors into live parameters, by name (shapes must match)."""
    missing = sorted(set(named) - set(weights))
    if missing:
        raise KeyError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[0]}")
    for name, p in named.items():
        p.data.copy_(weights[name])
