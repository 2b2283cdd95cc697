"""Every method x pattern x model family: exact sparsity per comparison group; Wanda against a direct computation."""

import copy
import math

import pytest
import torch

from tests.prune.conftest import calib_ids, tiny_model
from zolm.blocks import decoder_blocks, linear_layers, out_in
from zolm.errors import ZolmError
from zolm.prune import PruneConfig, prune_
from zolm.prune.sparsegpt import expected_zeros

METHODS = {  # name -> PruneConfig keywords
    "magnitude": {"method": "magnitude"},
    "wanda": {"method": "wanda"},
    "sparsegpt": {"method": "sparsegpt", "blocksize": 16},
    "wanda++rgs": {"method": "wanda++", "ro_rounds": 0},
    "wanda++": {"method": "wanda++", "ro_rounds": 2, "ro_samples": 3, "ro_lr": 1e-4},
}
PATTERNS = {"50%": {"sparsity": 0.5}, "30%": {"sparsity": 0.3}, "2:4": {"nm": "2:4"}, "4:8": {"nm": "4:8"}}
MATRIX = [(m, p, "llama") for m in METHODS for p in PATTERNS] + \
    [(m, p, k) for m in METHODS for p in ("50%", "2:4") for k in ("opt", "gpt2")]


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method,pattern,kind", MATRIX)
def test_sparsity_is_exact_per_comparison_group(method, pattern, kind):
    model = tiny_model(kind)
    before = weights(model)
    cfg = PruneConfig(**METHODS[method], **PATTERNS[pattern])
    report = prune_(model, cfg, calib_ids(6, 16))
    pruned = set()
    for i, block in enumerate(decoder_blocks(model)):
        for name, layer in linear_layers(block).items():
            w = out_in(layer)
            zeros = (w == 0)
            if cfg.nm is not None:
                n, m = cfg.pattern
                assert torch.all(zeros.view(w.shape[0], -1, m).sum(-1) == m - n), (i, name)
            elif cfg.method == "magnitude":
                assert int(zeros.sum()) == round(cfg.sparsity * w.numel())
            elif cfg.method == "sparsegpt":
                assert int(zeros.sum()) == expected_zeros(*w.shape, cfg.sparsity, cfg.blocksize)
            else:  # Wanda and Wanda++ compare within output rows
                assert torch.all(zeros.sum(1) == round(cfg.sparsity * w.shape[1])), (i, name)
            pruned.add(id(layer.weight))
    after = dict(model.named_parameters())
    for name, value in before.items():  # embeddings, LM head, norms and biases are untouched
        if id(after[name]) not in pruned:
            assert torch.equal(after[name], value), name
    reported = {lay.name: lay.sparsity for lay in report.layers()}
    assert len(reported) == len(pruned)
    assert math.isclose(report.sparsity, cfg.target, abs_tol=0.02)
    assert all(b.rel_error is None if method == "magnitude" else b.rel_error > 0 for b in report.blocks)


def test_wanda_matches_a_direct_computation():
    """Recompute every block's mask from hooks on the full model: its inputs come from the pruned blocks before
    it, its sublayers see the dense block, ||X_j|| = sqrt(sum over sequences and tokens of x_j^2 / N)."""
    dense = tiny_model("llama", layers=3)
    ids = calib_ids(5, 12)
    pruned = copy.deepcopy(dense)
    prune_(pruned, PruneConfig(method="wanda", sparsity=0.5, batch_size=2), ids)
    for b in range(3):
        ref = copy.deepcopy(dense)
        for j in range(b):  # upstream blocks as the method left them
            ref.model.layers[j].load_state_dict(pruned.model.layers[j].state_dict())
        layers = linear_layers(ref.model.layers[b])
        seen = {n: [] for n in layers}
        hooks = [m.register_forward_hook(lambda mod, a, o, store=seen[n]: store.append(a[0].detach()))
                 for n, m in layers.items()]
        with torch.no_grad():
            ref(input_ids=ids)
        for h in hooks:
            h.remove()
        for n, m in layers.items():
            x = torch.cat(seen[n]).reshape(-1, m.in_features).double()
            score = m.weight.double().abs() * (x.pow(2).sum(0) / len(ids)).sqrt()
            drop = score.argsort(dim=1)[:, : m.in_features // 2]
            expected = m.weight.detach().clone().scatter_(1, drop, 0.0)
            got = linear_layers(pruned.model.layers[b])[n].weight
            assert torch.equal(got, expected), (b, n)


def test_wanda_pp_with_alpha_0_and_no_ro_is_wanda():
    ids = calib_ids(6, 16)
    a, b = tiny_model("llama"), tiny_model("llama")
    prune_(a, PruneConfig(method="wanda", nm="2:4"), ids)
    prune_(b, PruneConfig(method="wanda++", nm="2:4", alpha=0.0, ro_rounds=0), ids)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_report_lists_every_layer_with_its_sparsity():
    model = tiny_model("opt")
    report = prune_(model, PruneConfig(method="wanda", nm="4:8"), calib_ids(4, 8))
    names = [lay.name for lay in report.layers()]
    assert names[:2] == ["model.decoder.layers.0.self_attn.k_proj", "model.decoder.layers.0.self_attn.v_proj"]
    assert len(names) == 12 and all(lay.sparsity == 0.5 and lay.nm_violations == 0 for lay in report.layers())
    assert report.to_dict()["config"]["nm"] == "4:8" and report.params_pruned == 2 * (4 * 32 * 32 + 2 * 32 * 64)


@pytest.mark.parametrize("kwargs,message", [
    ({"method": "obs"}, r"unknown pruning method 'obs'; valid: magnitude, sparsegpt, wanda, wanda\+\+"),
    ({"sparsity": 1.0}, r"sparsity must be in \[0, 1\), got 1.0"),
    ({"sparsity": -0.1}, r"sparsity must be in \[0, 1\), got -0.1"),
    ({"sparsity": float("nan")}, r"sparsity must be in \[0, 1\)"),
    ({"nm": "3:2"}, "needs 0 < N < M"),
    ({"nm": "2-4"}, "must look like 2:4"),
    ({"nm": "0:4"}, "needs 0 < N < M"),
    ({"nm": "2:4", "sparsity": 0.5}, "either a sparsity or an N:M pattern, not both"),
    ({"ro_samples": 0}, "ro_samples must be >= 1"),
    ({"ro_lr": -1.0}, "ro_lr must be >= 0"),
    ({"ro_stats": "round"}, "unknown ro_stats 'round'; valid: pass, steps"),
    ({"nm": "4:8", "blocksize": 12}, "blocksize 12 must be a multiple of M"),
])
def test_bad_config_gets_one_line_errors(kwargs, message):
    with pytest.raises(ZolmError, match=message) as info:
        PruneConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_calibrated_methods_need_calibration_and_models_need_blocks():
    with pytest.raises(ZolmError, match="method wanda needs calibration token ids"):
        prune_(tiny_model("llama"), PruneConfig(method="wanda"))
    from tests.test_blocks import NoBlocks

    with pytest.raises(ZolmError, match="cannot find the decoder blocks of NoBlocks"):
        prune_(NoBlocks(), PruneConfig(method="magnitude"))


def test_nm_needs_inputs_divisible_by_m():
    model = tiny_model("opt", hidden=36)  # 36 inputs: 2:4 fits, 4:8 does not
    with pytest.raises(ZolmError, match="has 36 inputs, not a multiple of 8"):
        prune_(model, PruneConfig(method="magnitude", nm="4:8"))
