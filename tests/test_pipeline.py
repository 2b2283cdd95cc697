"""Recipes: stages run in order, complete stages are skipped, an interrupted run restarts where it stopped."""

import json

import pytest
import torch
from safetensors.torch import load_file

from zolm.errors import ZolmError
from zolm.pipeline import Recipe, run_recipe
from zolm.quant.serialize import WEIGHTS


def _recipe(tmp_path, model_dir, data_dir, steps=4, method="quzo") -> str:
    text = f"""
model: {model_dir}
data_dir: {data_dir}
out: {tmp_path / "out"}
report: {{tasks: [sst2], num_test: 6}}
stages:
  - prune: {{method: magnitude, nm: "2:4"}}
  - quantize: {{bits: 4, group_size: 16, embed_bits: 8}}
  - finetune: {{method: {method}, task: sst2, steps: {steps}, lr: 0.05, batch_size: 4, num_train: 16, num_dev: 4,
               num_test: 6, eval_every: 2}}
  - eval: {{}}
"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


def test_recipe_runs_every_stage_and_keeps_sparsity_and_grid(tmp_path, tiny_llama_dir, data_dir):
    from zolm import models
    from zolm.quant.primitives import unpack_int4

    summaries = run_recipe(Recipe.from_file(_recipe(tmp_path, tiny_llama_dir, data_dir)), echo=lambda s: None)
    assert [s["stage"] for s in summaries] == ["input", "prune", "quantize", "finetune", "eval"]
    assert summaries[0]["sparsity"]["pruned"] == 0.0
    assert all(s["sparsity"]["pruned"] == pytest.approx(0.5) for s in summaries[1:])
    assert summaries[2]["tensor_mib"] < 0.5 * summaries[1]["tensor_mib"]
    final, _ = models.load(str(tmp_path / "out" / "3-finetune" / "run" / "model"))
    for name, mod in final.named_modules():
        if hasattr(mod, "sparsity_mask") and mod.sparsity_mask is not None:
            codes = unpack_int4(mod.qweight)  # only grid values: 4-bit codes
            assert codes.min() >= -8 and codes.max() <= 7
            groups = codes.view(codes.shape[0], -1, 4)
            assert ((groups != 0).sum(-1) <= 2).all(), f"{name} breaks 2:4 after fine-tuning"
    assert json.loads((tmp_path / "out" / "pipeline.json").read_text())["stages"][3]["stage"] == "finetune"


def test_a_lora_recovery_keeps_the_compressed_base_and_is_measured_with_its_adapter(tmp_path, tiny_llama_dir,
                                                                                    data_dir):
    from zolm.adapters import is_lora_dir

    recipe = _recipe(tmp_path, tiny_llama_dir, data_dir, method="fo-lora, base: low-bit")
    summaries = run_recipe(Recipe.from_file(recipe), echo=lambda s: None)
    recovered = summaries[3]
    assert is_lora_dir(tmp_path / "out" / "3-finetune" / "run" / "model")
    assert recovered["sparsity"]["pruned"] == pytest.approx(0.5)
    size = lambda d: sum(f.stat().st_size for f in (tmp_path / "out" / d).rglob("*.safetensors"))  # noqa: E731
    assert size("2-quantize/model") < size("3-finetune/run/model") < 1.5 * size("2-quantize/model")  # + adapter
    assert recovered["tensor_mib"] < summaries[1]["tensor_mib"] * 0.5
    assert summaries[4]["sst2"] == recovered["sst2"]  # the eval stage measures the same folder


def test_an_interrupted_recipe_restarts_where_it_stopped(tmp_path, tiny_llama_dir, data_dir, monkeypatch):
    import zolm.train.loop as loop

    straight = tmp_path / "a"
    straight.mkdir()
    run_recipe(Recipe.from_file(_recipe(straight, tiny_llama_dir, data_dir)), echo=lambda s: None)
    broken = tmp_path / "b"
    broken.mkdir()
    recipe = Recipe.from_file(_recipe(broken, tiny_llama_dir, data_dir))

    class Stop(Exception):
        pass

    real = loop.finetune

    def interrupted(config, overwrite=False, callbacks=()):
        def cb(step, record):
            if step == 3:
                raise Stop
        return real(config, overwrite, callbacks=[cb])

    monkeypatch.setattr(loop, "finetune", interrupted)
    with pytest.raises(Stop):
        run_recipe(recipe, echo=lambda s: None)
    monkeypatch.setattr(loop, "finetune", real)
    lines = []
    run_recipe(recipe, echo=lines.append)
    skipped = [line for line in lines if line.endswith("complete, skipped")]
    assert skipped == ["[0] input: complete, skipped", "[1] prune: complete, skipped",
                       "[2] quantize: complete, skipped"]
    a = load_file(str(straight / "out" / "3-finetune" / "run" / "model" / WEIGHTS))  # a low-bit folder
    b = load_file(str(broken / "out" / "3-finetune" / "run" / "model" / WEIGHTS))
    as_bits = lambda t: t.view(torch.uint8) if t.dtype.itemsize == 1 else t  # noqa: E731
    assert all(torch.equal(as_bits(a[k]), as_bits(b[k])) for k in a)


@pytest.mark.parametrize("text,message", [
    ("out: o\nstages:\n  - distill: {}\n", "unknown stage type \\(stage 1\\) 'distill'; valid: eval, finetune"),
    ("out: o\nstages:\n  - prune: {method: wanda, sparsity: 1.5}\n", "sparsity must be in \\[0, 1\\)"),
    ("out: o\nstages:\n  - finetune: {method: quzo, bits: 3}\n", "unsupported bit width 3"),
    ("out: o\nstage: []\n", "unknown recipe key\\(s\\) stage"),
    (None, "no such recipe file"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    p = tmp_path / "r.yaml"
    if text is not None:
        p.write_text(text)
    with pytest.raises(ZolmError, match=message):
        Recipe.from_file(p)


def test_summary_table_shows_each_stage_and_what_the_recovery_changed():
    from zolm.pipeline import summary_table

    stages = [{"stage": "input", "sst2": 0.5, "perplexity": 30.0, "sparsity": {"pruned": 0.0}, "tensor_mib": 500.0,
               "seconds": 1.0},
              {"stage": "quantize", "sst2": 0.52, "perplexity": 100.0, "sparsity": {"pruned": 0.5}, "disk_mib": 100.0,
               "format": "int4-g32", "seconds": 2.0},
              {"stage": "finetune", "sst2": 0.7, "perplexity": 103.0, "sparsity": {"pruned": 0.5}, "disk_mib": 100.0,
               "before": {}, "after": {}, "train_time_s": 3.0, "seconds": 4.0}]
    lines = summary_table(stages)
    assert lines[0] == "| stage | sst2 | perplexity | pruned | MiB | s |"
    assert lines[3] == "| 1 quantize | 0.52 | 100 | 0.50 | 100.0 | 2 |"
    assert lines[-1] == ("stage 2 (finetune) against its start: sst2 0.520 -> 0.700 (+0.180), "
                         "perplexity 100.00 -> 103.00 (+3.0%)")


def test_a_prune_stage_longer_than_the_model_positions_is_a_one_line_error(tmp_path, tiny_llama_dir, data_dir):
    p = tmp_path / "r.yaml"
    p.write_text(f"model: {tiny_llama_dir}\ndata_dir: {data_dir}\nout: {tmp_path / 'out'}\n"
                 "stages:\n  - prune: {method: wanda, sparsity: 0.5, nsamples: 2, seqlen: 100000}\n")
    with pytest.raises(ZolmError, match=r"^prune stage: seqlen 100000 is longer than the model's \d+ positions"):
        run_recipe(Recipe.from_file(p))
