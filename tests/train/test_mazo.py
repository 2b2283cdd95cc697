"""MaZO and the masked MeZO baselines end to end on tiny models: frozen coordinates, exact ratios, replay."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zolm import models
from zolm.errors import ZolmError
from zolm.masks.build import MASKABLE, maskable_weights
from zolm.masks.multitask import MASK_FILE, META_FILE, check_rows, load_masks
from zolm.train.build import build_method
from zolm.train.config import FinetuneConfig
from zolm.train.loop import finetune
from zolm.train.replay import replay

MASKED = ["mazo", "mezo-random-mask", "mezo-magnitude-mask"]


def cfg(model_dir, data_dir, out, **kw) -> FinetuneConfig:
    base = dict(out=str(out), model=model_dir, task="sst2,rte,copa", data_dir=data_dir, method="mazo", lr=5e-3,
                steps=4, batch_size=6, num_train=12, num_dev=3, num_test=4, eval_every=2, eval_batch_size=4,
                mask_ratio=0.1, mazo_calib_examples=8, mazo_calib_batch_size=4)
    base.update(kw)
    return FinetuneConfig.of(**base)


def saved(out) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "model" / "model.safetensors"))


@pytest.mark.parametrize("method,wd", [("mazo", 0.0), ("mezo-random-mask", 0.1), ("mezo-magnitude-mask", 0.0)])
def test_frozen_coordinates_never_change_and_every_row_keeps_k(tiny_llama_dir, data_dir, tmp_path, method, wd):
    out = tmp_path / "run"
    results = finetune(cfg(tiny_llama_dir, data_dir, out, method=method, weight_decay=wd, eval_every=0))
    assert results["status"] == "done" and set(results["after"]) == {"sst2", "rte", "copa", "average"}
    masks, meta = load_masks(out)
    assert meta["recipe"]["kind"] == {"mazo": "importance", "mezo-random-mask": "random",
                                      "mezo-magnitude-mask": "magnitude"}[method]
    check_rows(masks, 0.1)  # exactly round(0.1 * d_in) per row: 3 of 32, 6 of 64
    base, _ = models.load(tiny_llama_dir)
    maskable = maskable_weights(base)
    assert set(masks) == set(maskable)
    after = saved(out)
    moved = 0
    for name, p in base.named_parameters():
        new = after[name]
        if name in masks:
            m = masks[name]
            assert torch.equal(new[~m], p.detach()[~m]), f"{name}: a frozen coordinate moved"
            moved += int((new[m] != p.detach()[m]).sum())
        else:
            assert torch.equal(new, p.detach()), f"{name} is not maskable and must stay frozen"
    assert moved > 0.9 * sum(int(m.sum()) for m in masks.values())


def test_importance_mask_records_how_it_was_made(tiny_llama_dir, data_dir, tmp_path):
    finetune(cfg(tiny_llama_dir, data_dir, tmp_path / "run", steps=1, eval_every=0, eval_before=False))
    meta = json.loads((tmp_path / "run" / META_FILE).read_text())
    assert meta["tasks"] == ["sst2", "rte", "copa"] and meta["recipe"]["importance"]["alpha"] == 1.0
    # 8 per task, but the tiny COPA split has only 7 training examples left after its 3 dev examples
    assert meta["calibration"]["examples"] == 8 + 8 + 7 and set(meta["term_means"]) == {"sst2", "rte", "copa"}
    assert set(meta["overlap"]["pairwise"]) == {"sst2|rte", "sst2|copa", "rte|copa"}
    assert sum(meta["overlap"]["final_votes"]) == pytest.approx(1.0)
    assert meta["packed_bytes"] == sum((n + 7) // 8 for n in (p.numel() for p in
                                       maskable_weights(models.load(tiny_llama_dir)[0]).values()))


def test_replay_is_bit_identical_and_the_mask_is_deterministic(tiny_llama_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    results = finetune(cfg(tiny_llama_dir, data_dir, out, steps=6, eval_every=2))
    first, _ = load_masks(out)
    for name in (MASK_FILE, META_FILE):  # replay must then recompute the very same mask from the data
        (out / name).rename(tmp_path / name)
    method, _, step = replay(out / "replay.jsonl", tiny_llama_dir)
    assert step == results["selected_step"]
    again, _ = load_masks(out)
    assert all(torch.equal(first[k], again[k]) for k in first)
    weights = saved(out)
    for name, p in method.model.named_parameters():
        assert torch.equal(p, weights[name]), name


def test_resume_equals_uninterrupted(tiny_llama_dir, data_dir, tmp_path):
    class Stop(Exception):
        pass

    def stop_at_3(step, record):
        if step == 3:
            raise Stop

    kw = dict(steps=4, eval_every=2)
    finetune(cfg(tiny_llama_dir, data_dir, tmp_path / "a", **kw))
    broken = cfg(tiny_llama_dir, data_dir, tmp_path / "b", **kw)
    with pytest.raises(Stop):
        finetune(broken, callbacks=[stop_at_3])
    finetune(broken)
    a, b = saved(tmp_path / "a"), saved(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_mask_from_another_recipe_is_refused(tiny_llama_dir, data_dir, tmp_path):
    finetune(cfg(tiny_llama_dir, data_dir, tmp_path / "run", steps=1, eval_every=0, eval_before=False))
    model, _ = models.load(tiny_llama_dir)
    other = cfg(tiny_llama_dir, data_dir, tmp_path / "run", mask_ratio=0.2)
    with pytest.raises(ZolmError, match="masks.safetensors was made by another recipe"):
        build_method(model, other, run_dir=tmp_path / "run")


def test_masked_methods_update_only_the_masked_dimension(tiny_llama_dir, data_dir):
    model, _ = models.load(tiny_llama_dir)
    method = build_method(model, cfg(tiny_llama_dir, data_dir, "unused", method="mezo-random-mask"))
    assert method.params.names == list(maskable_weights(model))
    assert method.params.numel() == sum(round(0.1 * p.shape[1]) * p.shape[0] for p in method.params.params)
    assert all(m is not None for m in method.optimizer.params.masks)  # every tensor is masked


def test_opt_models_have_maskable_weights(tiny_opt_dir, data_dir, tmp_path):
    model, _ = models.load(tiny_opt_dir)
    names = list(maskable_weights(model))
    assert names and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight",
                                     "fc1.weight", "fc2.weight")) for n in names)
    assert finetune(cfg(tiny_opt_dir, data_dir, tmp_path / "opt", task="sst2,rte", steps=2))["status"] == "done"


@pytest.mark.parametrize("kw,match", [
    ({"mask_ratio": 0.0}, r"mask_ratio must be in \(0, 1\], got 0.0"),
    ({"mask_ratio": 1.5}, r"mask_ratio must be in \(0, 1\], got 1.5"),
    ({"mask_ratio": float("nan")}, r"mask_ratio must be in \(0, 1\], got nan"),
    ({"mazo_alpha": -1.0}, "mazo_alpha must be >= 0"),
    ({"mazo_curvature": "hessian"}, "unknown mazo_curvature 'hessian'; valid: activation, fisher"),
    ({"mazo_calib_examples": 0}, "mazo_calib_examples must be >= 1"),
    ({"method": "maso"}, "unknown method 'maso'"
     "; valid: .*mazo, mezo, mezo-lora, mezo-magnitude-mask, mezo-random-mask"),
])
def test_bad_options_are_one_line_errors(kw, match):
    with pytest.raises(ZolmError, match=match) as e:
        cfg("m", "d", "o", **kw)
    assert "\n" not in str(e.value)


def test_unknown_task_and_unmatched_patterns(tiny_llama_dir, data_dir, tmp_path):
    with pytest.raises(ZolmError, match="unknown task 'nope'; valid: .*sst2"):
        finetune(cfg(tiny_llama_dir, data_dir, tmp_path / "a", task="sst2,nope"))
    model, _ = models.load(tiny_llama_dir)
    with pytest.raises(ZolmError, match=r"no parameter matches the maskable patterns \['xyz'\]; set mask_params"):
        build_method(model, cfg(tiny_llama_dir, data_dir, "unused", mask_params=["xyz"]))
    with pytest.raises(ZolmError, match="keeps no weight of rows of length 32"):
        build_method(model, cfg(tiny_llama_dir, data_dir, "unused", method="mezo-magnitude-mask", mask_ratio=0.01))
    assert MASKABLE  # the default patterns are what mask_params=[] means


def test_cli_rejects_a_bad_ratio(capsys, tmp_path):
    from zolm.cli import main

    code = main(["finetune", "--method", "mazo", "--mask-ratio", "0", "--out", str(tmp_path / "x")])
    assert code == 2 and "zolm: error: mask_ratio must be in (0, 1], got 0.0" in capsys.readouterr().err
