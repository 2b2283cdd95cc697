"""Calibration statistics for activation-aware scale search (``clip: act``).

For a linear layer y = x W^T the output error of quantizing one row w to q is E||x (w - q)||^2 =
(w - q)^T E[x x^T] (w - q); its diagonal part is sum_j h_j (w_j - q_j)^2 with h_j = E[x_j^2], the mean square
of input feature j over calibration tokens. That vector is llama.cpp's importance matrix ("imatrix") and the
statistic AWQ scales by; :func:`zolm.quant.primitives.compute_scales` searches each group's clipping ratio on
the error it weights. One forward pass of the float (or pruned) model over the calibration sequences, with a
hook per linear layer; nothing but one [in] float64 sum per layer is kept.
"""

from __future__ import annotations

import torch
from torch import nn

from zolm.blocks import is_linear
from zolm.errors import ZolmError
from zolm.utils.devices import module_device
from zolm.utils.log import progress


@torch.no_grad()
def input_importance(model: nn.Module, ids: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``{linear layer name: h}``, h_j = mean over calibration tokens of x_j^2 ([in], float32), from ``ids``
    ([N, L] token ids: zolm.data.calibration.calibration_ids)."""
    if ids.dim() != 2 or ids.numel() == 0:
        raise ZolmError(f"calibration ids must be [sequences, tokens], got shape {tuple(ids.shape)}")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def add(_mod, args) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            sq = x.float().pow(2).sum(0).double().cpu()
            sums[name] = sums[name] + sq if name in sums else sq
            counts[name] = counts.get(name, 0) + x.shape[0]
        return add

    for name, mod in model.named_modules():
        if is_linear(mod):
            hooks.append(mod.register_forward_pre_hook(hook(name)))
    if not hooks:
        raise ZolmError("the model has no linear layer to calibrate")
    device = module_device(model.get_input_embeddings())
    was_training = model.training
    model.eval()
    try:
        for start in progress(range(0, ids.shape[0], batch_size), desc="calibrate (input mean squares)"):
            model(input_ids=ids[start:start + batch_size].to(device), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {name: (sums[name] / counts[name]).float() for name in sums}


def calibrated_importance(model: nn.Module, tokenizer, source: str = "c4", data_dir: str | None = None,
                          nsamples: int = 32, seqlen: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """:func:`input_importance` on ``nsamples`` x ``seqlen`` tokens of calibration text (``source``: c4, wikitext2
    or a path; zolm.data.calibration), after the checks that keep a bad request a one-line error."""
    from zolm.data.calibration import calibration_ids, check_fits_positions

    if getattr(model.config, "zolm_quantization", None):
        raise ZolmError("the model is already quantized")
    check_fits_positions(model.config, seqlen)
    return input_importance(model, calibration_ids(tokenizer, source, data_dir, nsamples, seqlen, seed))
