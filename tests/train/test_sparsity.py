"""Fine-tuning a pruned model keeps its zeros: ZO, full first order and LoRA merged back."""

import pytest
import torch
from safetensors.torch import load_file

from zolm import models
from zolm.train.config import FinetuneConfig
from zolm.train.loop import finetune
from zolm.train.sparsity import sparsity_masks


@pytest.fixture(scope="module")
def pruned_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with half of every block linear weight zeroed (smallest magnitudes per row)."""
    model, tok = models.load(tiny_llama_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                k = p.shape[1] // 2
                idx = p.abs().argsort(dim=1)[:, :k]
                p.scatter_(1, idx, 0.0)
    out = tmp_path_factory.mktemp("pruned")
    models.save(model, tok, out)
    return str(out)


def _zeros(path) -> dict[str, torch.Tensor]:
    w = load_file(str(path))
    return {k: v == 0 for k, v in w.items() if ".layers." in k and v.dim() == 2}


@pytest.mark.parametrize("method,lr", [("mezo", 1e-2), ("fo-adamw", 1e-2), ("fo-sgd", 1e-1), ("fo-lora", 1e-2)])
def test_fine_tuning_keeps_the_pruned_zeros(pruned_dir, data_dir, tmp_path, method, lr):
    before = _zeros(f"{pruned_dir}/model.safetensors")
    assert all(z.float().mean() >= 0.5 for z in before.values())
    cfg = FinetuneConfig.of(out=str(tmp_path / "run"), model=pruned_dir, task="sst2", data_dir=data_dir, method=method,
                         lr=lr, steps=4, batch_size=4, num_train=16, num_dev=4, num_test=4, eval_every=0,
                         weight_decay=0.1 if method != "fo-lora" else 0.0)
    finetune(cfg)
    after_w = load_file(str(tmp_path / "run" / "model" / "model.safetensors"))
    moved = 0
    base = load_file(f"{pruned_dir}/model.safetensors")
    for name, zero in before.items():
        assert torch.equal(after_w[name] == 0, zero), f"{name}: the zero pattern changed"
        moved += int((after_w[name] != base[name]).sum())
    assert moved > 0, "the non-zero weights must still train"


def test_dense_models_get_no_masks(tiny_llama_dir):
    model, _ = models.load(tiny_llama_dir)
    assert sparsity_masks(dict(model.named_parameters())) == {}


def test_all_zero_tensors_are_initialisations_not_pruned():
    """LoRA's B starts at zero: masking it would freeze it forever."""
    half = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    masks = sparsity_masks({"b": torch.zeros(4, 4), "w": half})
    assert list(masks) == ["w"] and torch.equal(masks["w"], half != 0)


@pytest.mark.parametrize("bits", [8, 4])
def test_quzo_on_a_pruned_model_keeps_its_zeros_on_the_grid(pruned_dir, data_dir, tmp_path, bits):
    """Compress-then-recover: the pruning mask is stored with the low-bit codes; QuZO never moves a zero."""
    from zolm.quant import quantize_
    from zolm.quant.primitives import unpack_int4

    before = _zeros(f"{pruned_dir}/model.safetensors")
    cfg = FinetuneConfig.of(out=str(tmp_path / "run"), model=pruned_dir, task="sst2", data_dir=data_dir, method="quzo",
                         bits=bits, group_size=16 if bits == 4 else None, lr=5e-2, steps=4, batch_size=4,
                         num_train=16, num_dev=4, num_test=4, eval_every=0)
    finetune(cfg)
    model, _ = models.load(str(tmp_path / "run" / "model"))
    start, _ = models.load(pruned_dir)
    quantize_(start, cfg.quant_config())  # the codes training started from (round to nearest: deterministic)
    changed = 0
    for name, zero in before.items():
        module, first = (m.get_submodule(name.rsplit(".", 1)[0]) for m in (model, start))
        codes, codes0 = (unpack_int4(x.qweight) if bits == 4 else x.qweight for x in (module, first))
        assert module.sparsity_mask is not None, f"{name}: the pruning mask was not saved"
        assert (codes[zero] == 0).all(), f"{name}: a pruned weight moved"
        changed += int((codes != codes0).sum())
    assert changed > 0, "the unpruned codes must still train"
