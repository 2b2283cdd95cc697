"""QuZO: the two-draw estimator is unbiased, stochastic rounding moves low-bit weights, kernels agree."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from tests.helpers import Quadratic
from zolm import models
from zolm.data.encode import encode_all, training_batch
from zolm.data.tasks import load_splits
from zolm.eval.scoring import task_loss
from zolm.quant import QuantConfig, QuantFormat, QuantLinear, quantize_, quantized_modules
from zolm.quant.primitives import unpack_int4
from zolm.zo import quzo
from zolm.zo.optimizer import ZOConfig
from zolm.zo.quzo import STREAM_A, STREAM_B, QuZOOptimizer, QuZOSettings, direction, stream_key
from zolm.zo.rng import tensor_key


def _mean_estimate(q: Quadratic, settings: QuZOSettings, two_draws: bool, n: int) -> torch.Tensor:
    """Mean of g * u2 with g = (f(x + eps u1) - f(x - eps u1)) / 2eps (= u1^T A x for a quadratic).

    The directions of all n seeds are drawn at once: quzo.levels broadcasts over [n, 1] key tensors.
    """
    d = q.theta.numel()

    def keys(fn):
        k = [fn(seed) for seed in range(n)]
        return torch.tensor([a for a, _ in k]).view(-1, 1), torch.tensor([b for _, b in k]).view(-1, 1)

    key = keys(lambda s: tensor_key(s, 0))
    u1 = quzo.levels(0, d, key, keys(lambda s: stream_key(s, 0, STREAM_A)), settings.levels, "cpu")
    u2 = quzo.levels(0, d, key, keys(lambda s: stream_key(s, 0, STREAM_B)), settings.levels, "cpu") \
        if two_draws else u1
    u1, u2 = u1.double() * settings.unit, u2.double() * settings.unit
    assert torch.equal(u1[3], direction(3, 0, d, settings, STREAM_A))  # the same draws the optimiser uses
    return ((u1 @ q.grad()).unsqueeze(1) * u2).mean(0)


def test_two_draw_estimator_is_unbiased_where_one_draw_is_not():
    """papers.md 4.2 / 9.2(a): E[u1 u2^T] = I with independent roundings; E[u1 u1^T] = I + D (biased)."""
    q = Quadratic(d=10)
    truth = q.grad()
    settings = QuZOSettings(perturb_bits=2)  # 3 levels: a large rounding variance makes the bias visible
    two = _mean_estimate(q, settings, True, 20000)
    one = _mean_estimate(q, settings, False, 20000)
    err_two = ((two - truth).norm() / truth.norm()).item()
    gain_two = (two @ truth / (truth @ truth)).item()
    gain_one = (one @ truth / (truth @ truth)).item()
    assert err_two < 0.1 and abs(gain_two - 1) < 0.05
    assert gain_one > 2, f"one-draw estimate should be inflated by the rounding variance, got {gain_one:.2f}"


def test_perturbation_levels_are_unbiased_and_bounded():
    settings = QuZOSettings(perturb_bits=4)
    u1 = direction(7, 3, 1 << 18, settings)
    u = direction(7, 3, 1 << 18, QuZOSettings(perturb_bits=0))
    assert (u1 / settings.unit).round().abs().max() <= 7
    assert abs((u1 - u).mean().item()) < 4 * (u1 - u).std().item() / (1 << 9)
    assert abs(u.var().item() - 1) < 0.01


@pytest.mark.parametrize("fmt", [QuantFormat("int", 8), QuantFormat("int", 4, group_size=16)], ids=lambda f: f.name)
def test_c_and_torch_update_kernels_agree(monkeypatch, fmt):
    lin = nn.Linear(64, 48)
    a, b = QuantLinear.from_linear(lin, fmt), QuantLinear.from_linear(lin, fmt)
    for rtn in (False, True):
        quzo.update_codes_(a, (1, 2), (3, 4), (5, 6), 0.3, 7, rtn)
        monkeypatch.setenv("ZOLM_KERNEL", "torch")
        quzo.update_codes_(b, (1, 2), (3, 4), (5, 6), 0.3, 7, rtn)
        monkeypatch.delenv("ZOLM_KERNEL")
        assert torch.equal(a.qweight, b.qweight)
    w1, w2 = torch.randn(300, 7), None
    w2 = w1.clone()
    quzo.perturb_weight_(w1, (1, 2), (3, 4), 0.01, 7)
    monkeypatch.setenv("ZOLM_KERNEL", "torch")
    quzo.perturb_weight_(w2, (1, 2), (3, 4), 0.01, 7)
    assert torch.equal(w1, w2)


def _tiny_quantized(tiny_llama_dir, data_dir, fmt):
    model, tok = models.load(tiny_llama_dir)
    quantize_(model, QuantConfig(weight=fmt, embed_bits=None))
    splits = load_splits("sst2", data_dir, num_train=16, num_dev=0, num_test=0)
    batch = training_batch(encode_all(tok, splits.train), "classification", tok.pad_token_id)

    def loss() -> float:
        with torch.inference_mode():
            return float(task_loss(model, batch, "classification"))
    return model, loss


def _codes(model) -> list[torch.Tensor]:
    return [m.qweight.clone() for _, m in quantized_modules(model)]


@pytest.mark.parametrize("fmt", [QuantFormat("int", 8), QuantFormat("int", 4, group_size=16)], ids=lambda f: f.name)
def test_stochastic_updates_move_low_bit_weights_where_nearest_rounding_stalls(tiny_llama_dir, data_dir, fmt):
    """papers.md 9.2(b): ZO updates are far below a grid step; RTN leaves (almost) every code as it is."""
    moved = {}
    for rounding in ("nearest", "stochastic"):
        model, loss = _tiny_quantized(tiny_llama_dir, data_dir, fmt)
        before = _codes(model)
        opt = QuZOOptimizer(quantized_modules(model), ZOConfig(eps=1e-3, seed=1),
                            QuZOSettings(update_rounding=rounding))
        for step in range(1, 6):
            opt.step(loss, step, lr=1e-4)
        after = _codes(model)
        changed = sum(int((a != b).sum()) for a, b in zip(after, before))
        moved[rounding] = changed / sum(b.numel() for b in before)
        for m_ in (m for _, m in quantized_modules(model)):  # codes stay on the grid
            codes = unpack_int4(m_.qweight) if fmt.bits == 4 else m_.qweight
            assert codes.min() >= -(2 ** (fmt.bits - 1)) and codes.max() <= 2 ** (fmt.bits - 1) - 1
    assert moved["nearest"] < 0.01
    assert moved["stochastic"] > 10 * max(moved["nearest"], 1e-4)


def test_quzo_lowers_the_loss_of_a_tiny_int8_model(tiny_llama_dir, data_dir):
    model, loss = _tiny_quantized(tiny_llama_dir, data_dir, QuantFormat("int", 8))
    opt = QuZOOptimizer(quantized_modules(model), ZOConfig(eps=1e-2, seed=0, queries=4), QuZOSettings())
    start = loss()
    for step in range(1, 31):
        opt.step(loss, step, lr=5e-3)
    assert loss() < start - 0.01


def test_the_forward_sees_the_perturbation_but_codes_do_not(tiny_llama_dir, data_dir):
    model, loss = _tiny_quantized(tiny_llama_dir, data_dir, QuantFormat("int", 8))
    before = _codes(model)
    opt = QuZOOptimizer(quantized_modules(model), ZOConfig(eps=1e-2), QuZOSettings())
    base = loss()
    opt.apply_(5, 1e-2)
    assert loss() != base
    assert all(torch.equal(a, b) for a, b in zip(_codes(model), before))
    opt.apply_(5, -1e-2)
    assert loss() == base  # restoring is exact: nothing was written


def test_quzo_refuses_weight_decay_and_other_samplers(tiny_llama_dir, data_dir):
    from zolm.errors import ZolmError

    model, _ = _tiny_quantized(tiny_llama_dir, data_dir, QuantFormat("int", 8))
    with pytest.raises(ZolmError, match="weight decay"):
        QuZOOptimizer(quantized_modules(model), ZOConfig(weight_decay=0.1))
    with pytest.raises(ZolmError, match="sampler ih4"):
        QuZOOptimizer(quantized_modules(model), ZOConfig(sampler="rademacher"))


def test_quantize_command(tiny_llama_dir, tmp_path):
    out = subprocess.run([sys.executable, "-m", "zolm", "quantize", "--model", tiny_llama_dir, "--bits", "4",
                          "--group-size", "16", "--out", str(tmp_path / "q4")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["format"] == "int4-g16" and info["ratio"] < 0.35
    bad = subprocess.run([sys.executable, "-m", "zolm", "quantize", "--model", tiny_llama_dir, "--bits", "3",
                          "--out", str(tmp_path / "q3")], capture_output=True, text=True)
    assert bad.returncode == 2 and "unsupported bit width 3" in bad.stderr and "Traceback" not in bad.stderr
