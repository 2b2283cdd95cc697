"""benchmarks/adazeta_gradnorm.py: the exact gradient norm it reports and the parameter groups it folds."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def gradnorm():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("adazeta_gradnorm", BENCH / "adazeta_gradnorm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_groups_fold_layer_indices(gradnorm):
    assert gradnorm.group_of("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight") == \
        "q_proj.lora_A"
    assert gradnorm.group_of("model.layers.11.mlp.tt_adapter.up.core_2") == "mlp.tt_adapter.up.core_2"


def test_the_norm_is_the_full_batch_gradient_and_lora_a_has_none_at_b_zero(gradnorm, tiny_llama_dir, data_dir):
    from zolm import models
    from zolm.data.encode import encode_all, training_batch
    from zolm.data.tasks import load_splits
    from zolm.eval.scoring import task_loss
    from zolm.train.build import build_method
    from zolm.train.config import FinetuneConfig

    model, tok = models.load(tiny_llama_dir)
    method = build_method(model, FinetuneConfig.of(out="x", model=tiny_llama_dir, method="mezo-lora"))
    split = load_splits("sst2", data_dir, 8, 0, 0, 0)
    items = encode_all(tok, split.train, 256)
    halves = [training_batch(items[i:i + 4], "classification", tok.pad_token_id) for i in (0, 4)]
    total, groups, loss = gradnorm.gradient_sq_norms(method, halves, "classification")
    assert not any(p.requires_grad for p in method.params.params)  # left frozen for the ZO replay

    params = method.params.params
    for p in params:
        p.requires_grad_(True)
    whole = task_loss(model, training_batch(items, "classification", tok.pad_token_id), "classification")
    expected = sum(float((g.double() ** 2).sum()) for g in torch.autograd.grad(whole, params))
    assert total == pytest.approx(expected, rel=1e-4) and loss == pytest.approx(float(whole.detach()), rel=1e-5)
    assert total > 0
    a = sum(v for k, v in groups.items() if k.endswith("lora_A"))
    b = sum(v for k, v in groups.items() if k.endswith("lora_B"))
    assert a == 0.0 and b == pytest.approx(total)  # B = 0: the loss does not see A (dL/dA is proportional to B)
