"""The same bits everywhere: C kernel = eager torch = torch.compile'd torch (CPU, slow) = CUDA (cuda marker)."""

import pytest
import torch

from zolm.quant import primitives
from zolm.quant.formats import QuantFormat
from zolm.quant.linear import QuantLinear
from zolm.utils import compile as zcompile
from zolm.zo import halfprec, quzo, rng

N = 70_001
KEY, RKEY, UKEY = rng.tensor_key(7, 3), rng.tensor_key(8, 3), rng.tensor_key(9, 3)


def _weights(dtype=torch.float32, n=N):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, generator=g) * 0.02).to(dtype), torch.rand(n, generator=g) < 0.5


def _passes(device: str) -> list[torch.Tensor]:
    """Every kind of ZO pass on ``device``, results moved to the CPU (bit patterns of half tensors)."""
    out = []
    w32, mask = _weights()
    for m in (None, mask):
        p = w32.clone().to(device)
        rng.axpy_z_(p, KEY, 1e-3, mask=None if m is None else m.to(device), then=-3e-8)
        out.append(p.cpu())
    out.append(rng.draw(N, KEY, device=device).cpu())
    for dtype in (torch.bfloat16, torch.float16):
        w, _ = _weights(dtype)
        w, m = w.to(device), mask.to(device)
        d1 = torch.empty_like(w)
        halfprec.perturb_half_(d1, w.float(), KEY, 1e-3, mask=m)
        d2 = torch.empty_like(w)
        halfprec.perturb_half_(d2, w, KEY, -2e-3)
        master, d3 = w.float().clone(), torch.empty_like(w)
        halfprec.master_step_(master, d3, KEY, -3e-6, mask=m, mult=0.999)
        x = w.clone()
        halfprec.sr_step_(x, KEY, RKEY, -1e-6, mult=1.0)
        y = w.clone()
        rng.axpy_z_(y, KEY, 1e-3, mask=m, then=-2e-5)  # inplace mode on half weights
        out.append(y.view(torch.int16).cpu())
        out += [d1.view(torch.int16).cpu(), d2.view(torch.int16).cpu(), master.cpu(), d3.view(torch.int16).cpu(),
                x.view(torch.int16).cpu()]
    # QuZO: quantized perturbation of a dequantized weight and stochastically rounded code updates
    lin = torch.nn.Linear(64, 48, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.02, generator=torch.Generator().manual_seed(2))
    lin.weight.data[:, ::4] = 0.0
    for fmt in (QuantFormat("int", 8), QuantFormat("int", 4, group_size=32)):
        q = QuantLinear.from_linear(lin, fmt).to(device)
        wq = q.dequantize()
        quzo.perturb_weight_(wq, KEY, RKEY, 3e-4, 7, q.sparsity_mask)
        quzo.update_codes_(q, KEY, RKEY, UKEY, 2e-4, 7, rtn=False)
        out += [wq.cpu(), q.qweight.cpu().view(torch.uint8)]
    return out


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"pass {i} differs"


@pytest.mark.slow
def test_compiled_torch_kernels_give_the_c_bits_on_cpu(monkeypatch):
    """What CUDA runs (the chunk functions under torch.compile), run on the CPU against the C kernels."""
    reference = _passes("cpu")
    real = zcompile.compiled
    monkeypatch.setattr(zcompile, "_COMPILED", {})

    def always(fn, device):
        zcompile._COMPILED.setdefault(fn, zcompile.force_compiled(fn))
        return zcompile._COMPILED[fn]

    for mod in (rng, halfprec, quzo, primitives):
        monkeypatch.setattr(mod, "compiled", always)
    monkeypatch.setenv("ZOLM_KERNEL", "torch")  # no C kernel: every pass takes the (compiled) torch path
    compiled_out = _passes("cpu")
    monkeypatch.setattr(zcompile, "compiled", real)
    _assert_same(reference, compiled_out)


def test_eager_torch_kernels_give_the_c_bits(monkeypatch):
    reference = _passes("cpu")
    monkeypatch.setenv("ZOLM_KERNEL", "torch")
    _assert_same(reference, _passes("cpu"))


@pytest.mark.cuda
def test_cuda_kernels_give_the_c_bits():
    _assert_same(_passes("cpu"), _passes("cuda"))


@pytest.mark.cuda
def test_cuda_mezo_step_in_bf16_matches_cpu_bits():
    from zolm.zo.optimizer import ZOConfig, ZOOptimizer
    from zolm.zo.spsa import ParamSet

    results = []
    for device in ("cpu", "cuda"):
        w, _ = _weights(torch.bfloat16, 1 << 20)
        holder = torch.nn.Module()
        holder.w = torch.nn.Parameter(w.to(device))
        for mode in ("exact", "lean"):
            opt = ZOOptimizer(ParamSet(holder), ZOConfig(half_mode=mode, seed=4))
            for s in range(1, 4):
                values = iter([1.0 + 1e-3 * s, 1.0 - 1e-3 * s])
                opt.step(lambda v=values: next(v), s, 1e-4)
            results.append(holder.w.detach().view(torch.int16).cpu().clone())
            opt.store.close()
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])
