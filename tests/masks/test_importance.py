"""MaZO importance terms (papers.md 5.3): their formulas, zeros where the formula says so, and the probes."""

import pytest
import torch

from zolm import models
from zolm.data.encode import encode_all, training_batch
from zolm.data.tasks import load_splits
from zolm.errors import ZolmError
from zolm.eval.scoring import task_loss
from zolm.masks.calibrate import gradient_stats
from zolm.masks.importance import (
    GradStats,
    ImportanceConfig,
    global_term,
    greedy_term,
    magnitude_term,
    normalized_task_score,
    row_normalize,
    score_terms,
    task_score,
)


def stats_from(grads: list[torch.Tensor], inputs: torch.Tensor | None = None) -> GradStats:
    s = GradStats.zeros(grads[0], activations=inputs is not None)
    for g in grads:
        s.add_grad(g)
    if inputs is not None:
        s.add_inputs(inputs)
    return s


def test_terms_follow_the_formulas():
    g = torch.randn(3, 4, 6, dtype=torch.float32)  # three mini-batch gradients of a [4, 6] weight
    s = stats_from(list(g))
    mean, h = g.mean(0), (g * g).mean(0)
    lam = 1e-8 * h.mean()
    assert torch.allclose(s.mean_grad(), mean) and torch.allclose(s.curvature("fisher"), h)
    assert torch.allclose(greedy_term(mean), mean**2)
    assert torch.allclose(global_term(mean, h), mean**2 / (2 * (h + lam)))
    terms = score_terms(s, torch.ones(4, 6), ImportanceConfig(curvature="fisher"))
    assert set(terms) == {"global", "greedy", "magnitude"}
    # under the empirical Fisher S_global = (mean g_b)^2 / (2 mean g_b^2) lies in [0, 1/2] whatever the scale
    assert float(terms["global"].max()) <= 0.5 + 1e-6


def test_activation_curvature_is_the_row_wise_input_second_moment():
    x = torch.randn(3, 5, 6)  # [batch, tokens, in]
    s = stats_from([torch.randn(4, 6)], inputs=x)
    h = s.curvature("activation")
    assert h.shape == (1, 6) and torch.allclose(h[0], (x.reshape(-1, 6) ** 2).mean(0))
    with pytest.raises(ZolmError, match="activation curvature needs input statistics"):
        stats_from([torch.randn(4, 6)]).curvature("activation")


def test_importance_is_zero_where_the_formula_says_so():
    w = torch.randn(4, 6)
    w[0, :3] = 0.0
    w[1, 0] = -0.0
    g = torch.randn(4, 6)
    g[2, :] = 0.0  # a row whose gradient vanishes (e.g. a dead output neuron)
    s = stats_from([g, g * 0.5])
    assert torch.equal(magnitude_term(w) == 0, w == 0)  # |W| vanishes exactly at zero weights (-0.0 included)
    cfg = ImportanceConfig(alpha=1.0, beta=0.3, curvature="fisher")
    score = task_score(s, w, cfg)
    terms = score_terms(s, w, cfg)
    zero_w = w == 0
    # at zero weights only the gradient terms remain ...
    assert torch.equal(score[zero_w], (terms["global"] + cfg.alpha * terms["greedy"])[zero_w])
    # ... and where the gradient is zero too, the importance is exactly zero
    w2 = w.clone()
    w2[2, :] = 0.0
    assert torch.equal(task_score(s, w2, cfg)[2], torch.zeros(6))
    assert bool((score[~zero_w & (g != 0)] > 0).all())


def test_zero_gradients_give_zero_not_nan():
    s = stats_from([torch.zeros(3, 4)])
    out = normalized_task_score(s, torch.zeros(3, 4), ImportanceConfig(curvature="fisher"))
    assert torch.equal(out, torch.zeros(3, 4))


def test_row_normalisation_is_per_row_and_keeps_the_order():
    s = torch.tensor([[1.0, 3.0, 2.0], [0.0, 0.0, 0.0], [1e-6, 4e-6, 2e-6]])
    n = row_normalize(s)
    assert torch.allclose(n.amax(-1), torch.tensor([1.0, 0.0, 1.0]), atol=1e-5)
    assert torch.equal(n.argsort(-1)[[0, 2]], s.argsort(-1)[[0, 2]])
    assert torch.equal(n[0], s[0] / (3.0 + 1e-12))


def test_term_norm_makes_alpha_and_beta_relative_weights():
    g = [torch.randn(4, 8) * 1e-3 for _ in range(4)]
    w = torch.randn(4, 8)
    s = stats_from(g)
    plain = task_score(s, w, ImportanceConfig(alpha=1.0, beta=0.0, curvature="fisher"))
    only_global = task_score(s, w, ImportanceConfig(alpha=0.0, beta=0.0, curvature="fisher"))
    # without term_norm, S_greedy = g^2 (~1e-6) barely moves the score: the default is S_global in all but name
    assert torch.allclose(plain, only_global, rtol=1e-4)
    normed = task_score(s, w, ImportanceConfig(alpha=1.0, beta=0.0, term_norm=True, curvature="fisher"))
    t = {k: row_normalize(v) for k, v in score_terms(s, w, ImportanceConfig(curvature="fisher")).items()}
    assert torch.allclose(normed, t["global"] + t["greedy"])


@pytest.mark.parametrize("kw,match", [({"alpha": -1.0}, "importance alpha must be a finite number >= 0"),
                                      ({"beta": float("nan")}, "importance beta"),
                                      ({"curvature": "hessian"}, "unknown importance curvature 'hessian'; valid: "
                                                                 "activation, fisher")])
def test_bad_importance_options(kw, match):
    with pytest.raises(ZolmError, match=match):
        ImportanceConfig(**kw)


def test_gradient_stats_equal_autograd_and_restore_flags(tiny_llama_dir, data_dir):
    model, tok = models.load(tiny_llama_dir)
    splits = load_splits("sst2", data_dir, num_train=8, num_dev=0, num_test=0)
    items = encode_all(tok, splits.train)
    batches = [training_batch(items[i:i + 4], "classification", tok.pad_token_id) for i in (0, 4)]
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = gradient_stats(model, batches, lambda m, b: task_loss(m, b, "classification"), names, activations=True)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    params = dict(model.named_parameters())
    ref = []
    for b in batches:
        model.zero_grad()
        task_loss(model, b, "classification").backward()
        ref.append({n: params[n].grad.clone() for n in names})
    for n in names:
        assert stats[n].batches == 2
        assert torch.allclose(stats[n].mean_grad(), (ref[0][n] + ref[1][n]) / 2, atol=1e-7)
        assert torch.allclose(stats[n].curvature("fisher"), (ref[0][n] ** 2 + ref[1][n] ** 2) / 2, atol=1e-9)
        assert stats[n].tokens == sum(int(b["input_ids"].numel()) for b in batches)
    with pytest.raises(ZolmError, match="no parameter named 'nope'"):
        gradient_stats(model, batches, lambda m, b: task_loss(m, b, "classification"), ["nope"])


def test_default_importance_ranks_by_the_gradient_not_by_its_sign_consistency():
    """Column 0: a tiny gradient with the same sign in both mini-batches; column 1: a large mean gradient whose
    mini-batches disagree. The fisher curvature ranks column 0 first (S_global = 1/2 for any consistent sign); the
    default (activation curvature, equal inputs) ranks by the mean gradient, as a ZO update mask should."""
    from zolm.masks.multitask import topk_row_mask

    batches = [torch.tensor([[1e-3, 1.0]]), torch.tensor([[1e-3, -0.5]])]
    inputs = torch.ones(5, 2)  # both columns see the same activations
    s = stats_from(batches, inputs)
    assert ImportanceConfig().curvature == "activation"
    default = topk_row_mask(normalized_task_score(s, torch.ones(1, 2), ImportanceConfig()), 0.5)
    fisher = topk_row_mask(normalized_task_score(s, torch.ones(1, 2), ImportanceConfig(curvature="fisher")), 0.5)
    assert default.tolist() == [[False, True]]
    assert fisher.tolist() == [[True, False]]
