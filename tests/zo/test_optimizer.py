"""The ZO optimiser: MeZO lowers the loss, replays bit-identically, freezes what it must."""

import copy

import pytest
import torch
from torch import nn

from tests.helpers import Quadratic
from zolm import models
from zolm.data.encode import encode_all, training_batch
from zolm.data.tasks import load_splits
from zolm.eval.scoring import task_loss
from zolm.zo.optimizer import DivergenceError, ZOConfig, ZOOptimizer
from zolm.zo.spsa import ParamSet


def test_mezo_minimises_a_quadratic():
    q = Quadratic(d=50, dtype=torch.float32)
    opt = ZOOptimizer(ParamSet(q), ZOConfig(eps=1e-3))
    start = q.value()
    for step in range(1, 301):
        opt.step(lambda: q.value(), step, lr=0.01)
    assert q.value() < 0.3 * start


def _tiny_batch(tok, data_dir):
    splits = load_splits("sst2", data_dir, num_train=16, num_dev=0, num_test=0)
    return training_batch(encode_all(tok, splits.train), "classification", tok.pad_token_id)


def test_mezo_lowers_the_loss_of_a_tiny_llama(tiny_llama_dir, data_dir):
    model, tok = models.load(tiny_llama_dir)
    batch = _tiny_batch(tok, data_dir)

    def loss() -> float:
        with torch.inference_mode():
            return float(task_loss(model, batch, "classification"))

    opt = ZOOptimizer(ParamSet(model), ZOConfig(eps=1e-3, queries=4))
    start = loss()
    for step in range(1, 41):
        opt.step(loss, step, lr=2e-3)
    assert loss() < start - 0.01


@pytest.mark.parametrize("queries,wd", [(1, 0.0), (3, 0.1)])
def test_replay_is_bit_identical(tiny_llama_dir, data_dir, queries, wd):
    model, tok = models.load(tiny_llama_dir)
    twin = copy.deepcopy(model)
    batch = _tiny_batch(tok, data_dir)
    cfg = ZOConfig(eps=1e-3, queries=queries, weight_decay=wd, seed=3)
    opt = ZOOptimizer(ParamSet(model), cfg)
    records = [opt.step(lambda: float(task_loss(model, batch, "classification")), s, 1e-3).to_json()
               for s in range(1, 6)]
    again = ZOOptimizer(ParamSet(twin), cfg)
    for r in records:
        again.replay_(r)
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n


def test_frozen_parameters_never_move(tiny_llama_dir, data_dir):
    model, tok = models.load(tiny_llama_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = _tiny_batch(tok, data_dir)
    params = ParamSet(model, include=[r"mlp\.up_proj"])
    opt = ZOOptimizer(params, ZOConfig(weight_decay=0.5))
    for s in range(1, 4):
        opt.step(lambda: float(task_loss(model, batch, "classification")), s, 1e-2)
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == ("mlp.up_proj" in n), n


def test_weight_decay_skips_bias_and_norm_names():
    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.input_layernorm = nn.LayerNorm(4)

    opt = ZOOptimizer(ParamSet(Tiny()), ZOConfig(weight_decay=0.1))
    assert dict(zip(opt.params.names, opt.decay)) == {
        "proj.weight": True, "proj.bias": False, "input_layernorm.weight": False, "input_layernorm.bias": False}


def test_divergence_raises_and_restores():
    q = Quadratic(d=20, dtype=torch.float32)
    before = q.theta.detach().clone()
    calls = iter([1.0, float("nan")])
    opt = ZOOptimizer(ParamSet(q), ZOConfig(eps=1e-3))
    with pytest.raises(DivergenceError, match="not finite at step 9"):
        opt.step(lambda: next(calls), 9, 0.1)
    assert torch.allclose(q.theta.detach(), before, atol=1e-6)
