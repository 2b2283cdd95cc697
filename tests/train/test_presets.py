"""Methods as compositions of parts: presets reproduce the pre-redesign weights, every preset runs (or refuses
with one line) on a dense, a 2:4-pruned and an INT4 tiny model, and combinations no preset names work."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from zolm import models
from zolm.errors import ZolmError
from zolm.train.config import FinetuneConfig, composition_table
from zolm.train.loop import finetune
from zolm.train.presets import PRESETS

REFERENCE = json.loads((Path(__file__).parent / "preset_reference.json").read_text())
# learning rates of the reference runs (large enough to move a tiny model's weights in 3 steps)
REF_LR = {"mezo": 1e-3, "fo-adamw": 1e-3, "fo-sgd": 1e-2, "fo-lora": 1e-3, "quzo": 1e-2, "quant-mezo": 1e-2,
          "fo-ste": 1e-3, "adazeta": 1e-2, "mezo-lora": 1e-2, "fo-tt": 1e-3, "mazo": 1e-2, "mezo-random-mask": 1e-2,
          "mezo-magnitude-mask": 1e-2}
# defaults deliberately changed after the reference was written (each documented where it is set): the
# reference runs are reproduced with the old values pinned
PINNED = {"adazeta": {"tt_init": "reference"}, "fo-tt": {"tt_init": "reference"},  # identity-start TT adapters
          **{m: {"clip": "none"} for m in ("quzo", "quant-mezo")},  # INT4 scales clipped by default
          # a fake-quant base now also fake-quantizes the INT8 embedding it is saved with (it trained on a float one)
          "fo-ste": {"clip": "none", "embed_bits": None},
          "mazo": {"mazo_curvature": "fisher"}}  # MaZO's default importance is the activation curvature
CHANGED_FILES = {"fo-ste": {"model/zolm-quantized.safetensors"}}  # now saved with the float embedding it trained
# methods that train integer codes: on another CPU's kernels a last-bit change of one loss difference flips a few
# rounding decisions, each moving sum |codes| by 1 (quzo 192, quant-mezo 272 of ~1.1M on an AVX-512 machine, 2e-4);
# training at a tenth of the rate moves it by 2e4 (2%), so 1e-3 still tells the method's updates apart
CODE_REL = {"quzo": 1e-3, "quant-mezo": 1e-3}


def run(model_dir, data_dir, out, method, steps=3, **kw):
    cfg = dict(out=str(out), model=model_dir, task="sst2", data_dir=data_dir, method=method, steps=steps,
               batch_size=4, num_train=16, num_dev=4, num_test=4, eval_every=0, eval_before=False,
               mazo_calib_examples=8, mazo_calib_batch_size=4, **kw)
    return finetune(FinetuneConfig.from_dict(cfg))


def digest(folder: Path) -> dict[str, list]:
    """{file: [sha256 prefix of its tensors' bytes, sum of |values|]} of every safetensors file under folder."""
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        h = hashlib.sha256()
        t = load_file(str(f))
        for k in sorted(t):
            h.update(k.encode())
            h.update(t[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        total = sum(float(t[k].double().abs().sum()) for k in sorted(t))
        out[str(f.relative_to(folder))] = [h.hexdigest()[:16], total]
    return out


def probe(model_dir) -> str:
    """A fingerprint of this machine's float32 forward on the tiny model (the reference's bits depend on it)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return hashlib.sha256(m(torch.arange(1, 40).view(3, 13)).logits.numpy().tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("method", list(REF_LR))
def test_presets_reproduce_the_weights_of_the_flat_config_era(tiny_llama_dir, data_dir, tmp_path, method):
    """tests/train/preset_reference.json was written by the pre-redesign code (commit 7b06c6e, one FinetuneConfig
    of ~70 flat fields and a class per method) on the same tiny model, data and seed. Where this machine's
    forward gives the reference's bits (the probe), every weight file must match bit for bit; elsewhere (another
    CPU's kernels) the sums of |weights| must agree to 1e-6 (integer codes: 1e-3, CODE_REL)."""
    run(tiny_llama_dir, data_dir, tmp_path / method, method, lr=REF_LR[method], **PINNED.get(method, {}))
    got, want = digest(tmp_path / method), REFERENCE[method]
    assert set(want) <= set(got), sorted(set(want) - set(got))
    exact = probe(tiny_llama_dir) == REFERENCE["_probe"]
    for name, (sha, total) in want.items():
        if name in CHANGED_FILES.get(method, ()):
            continue
        if exact:
            assert got[name][0] == sha, f"{method} {name} differs from the pre-redesign weights"
        else:
            assert got[name][1] == pytest.approx(total, rel=CODE_REL.get(method, 1e-6)), name


@pytest.fixture(scope="module")
def pruned24_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with every block linear 2:4-pruned (the two smallest |w| of each group of 4 inputs)."""
    model, tok = models.load(tiny_llama_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".layers." in name and p.dim() == 2:
                g = p.view(p.shape[0], -1, 4)
                idx = g.abs().argsort(dim=-1)[..., :2]
                g.scatter_(-1, idx, 0.0)
    out = tmp_path_factory.mktemp("pruned24")
    models.save(model, tok, out)
    return str(out)


@pytest.fixture(scope="module")
def int4_dir(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama as a zolm INT4 (groups of 32) folder."""
    from zolm.quant.linear import quantize_
    from zolm.train.parts import BaseWeights

    model, tok = models.load(tiny_llama_dir)
    quantize_(model, BaseWeights(kind="low-bit", bits=4).quant_config())
    out = tmp_path_factory.mktemp("int4")
    models.save(model, tok, out)
    return str(out)


def block_weights(folder) -> dict[str, torch.Tensor]:
    """Dense block linear weights of a saved model (dequantized when it is low-bit; a LoRA folder merged)."""
    from zolm.adapters import is_lora_dir, load_model_or_adapters
    from zolm.quant.linear import QuantLinear

    model, _ = load_model_or_adapters(str(folder), merge=is_lora_dir(folder))
    out = {}
    for name, m in model.named_modules():
        if ".layers." in name and isinstance(m, QuantLinear):
            out[name] = m.dequantize()
        elif ".layers." in name and isinstance(m, torch.nn.Linear):
            out[name] = m.weight.detach()
    return out


# presets that run on a saved INT4 model: low-bit bases, and float masters on fixed scales (they start from its grid)
LOW_BIT = {name for name, p in PRESETS.items() if p.base.get("kind") == "low-bit"
           or (p.base.get("kind") == "fake-quant" and p.base.get("fake_scales") == "fixed")}
ADAPTER_DIR = {name for name, p in PRESETS.items() if p.train.get("kind") == "tt"}  # relu TT: an adapter folder


@pytest.mark.parametrize("model_kind", ["dense", "pruned24", "int4"])
@pytest.mark.parametrize("method", list(PRESETS))
def test_every_preset_runs_two_steps_or_refuses_in_one_line(tiny_llama_dir, pruned24_dir, int4_dir, data_dir,
                                                            tmp_path, method, model_kind):
    model_dir = {"dense": tiny_llama_dir, "pruned24": pruned24_dir, "int4": int4_dir}[model_kind]
    if model_kind == "int4" and method not in LOW_BIT:
        with pytest.raises(ZolmError, match="low-bit") as e:
            run(model_dir, data_dir, tmp_path / "r", method, steps=2, lr=1e-3)
        assert "\n" not in str(e.value)
        return
    results = run(model_dir, data_dir, tmp_path / "r", method, steps=2, lr=1e-3)
    assert results["status"] == "done" and results["steps"] == 2
    if model_kind == "pruned24" and method not in ADAPTER_DIR:
        before = block_weights(model_dir)
        after = block_weights(tmp_path / "r" / "model")
        for name, w in before.items():
            zeros = w == 0
            assert zeros.float().mean() >= 0.49, name
            assert torch.all(after[name][zeros] == 0), f"{method} moved pruned zeros of {name}"


def test_the_composition_table_names_every_preset_once():
    rows = composition_table()
    assert [r["method"] for r in rows] == list(PRESETS) and len(set(r["parts"] for r in rows)) == len(rows)
    assert {r["method"]: r["parts"] for r in rows}["quzo-lora"] == "low-bit int4 base x lora x spsa (4-bit " \
                                                                    "perturbations) x sgd"


@pytest.mark.parametrize("kw,why", [
    ({"method": "mezo", "optimizer": "adamw"}, "adamw needs backprop gradients"),
    ({"method": "fo-adamw", "perturb_bits": 4}, "backprop has none"),
    ({"method": "fo-lora", "q_schedule": "adaptive"}, "the adaptive query schedule is a ZO schedule"),
    ({"method": "quzo", "estimator": {"kind": "backprop", "perturb_bits": 0}, "optimizer": "adamw"},
     "backprop cannot train low-bit codes"),
    ({"method": "mezo", "update_rounding": "nearest"}, "applies only when the trained tensors are low-bit codes"),
    ({"method": "fo-ste", "trainable": "lora"}, "a fake-quant base trains its own float masters"),
    ({"method": "mazo", "base": "low-bit"}, "masks over low-bit codes are not supported"),
    ({"method": "quzo", "sampler": "rademacher"}, "quantizes the ih4 draw"),
    ({"method": "quzo", "weight_decay": 0.1}, "weight decay is not defined on low-bit codes"),
    ({"method": "quzo-lora", "sampler": "rademacher"}, "quantized perturbations round the ih4 draw"),
    ({"method": "mezo-lora", "train_params": ["q_proj"]}, "does not apply to trainable lora"),
    ({"method": "mezo", "base": "int4"}, "unknown base 'int4'; valid: fake-quant, float, low-bit"),
    ({"method": "mezo", "steps": 2.5}, "steps: expected an integer, got 2.5"),
    ({"method": "mezo", "lora_targets": "q_proj"}, "expected a list of strings, got 'q_proj'"),
    ({"method": "mezo", "eval_before": "no"}, "eval_before: expected true/false, got 'no'"),
    ({"method": "mezo", "train": {"lora": {"rank": 4}}}, r"train.lora: unknown key\(s\) rank; valid: alpha, r"),
    ({"method": "mezo", "train_params": ["("]}, "--train-params: '\\(' is not a valid regular expression"),
])
def test_combinations_that_make_no_sense_are_refused_in_one_line(kw, why):
    with pytest.raises(ZolmError, match=why) as e:
        FinetuneConfig.from_dict({"out": "x", **kw})
    assert "\n" not in str(e.value)


def test_config_files_nest_by_part_and_flags_override_them(tmp_path):
    (tmp_path / "c.yaml").write_text("method: quzo-lora\nbase: {bits: 8}\ntrain: {lora: {r: 4, targets: [q_proj]}}\n"
                                     "estimator: {perturb_bits: 2}\noptim: {lr: 3.0e-5}\n")
    c = FinetuneConfig.from_file(tmp_path / "c.yaml", out="o", lora_r=2)
    assert (c.base.kind, c.base.bits, c.train.kind, c.train.lora.r, c.train.lora.targets) == (
        "low-bit", 8, "lora", 2, ["q_proj"])
    assert (c.estimator.perturb_bits, c.estimator.eps, c.optim.lr) == (2, 2e-3, 3e-5)  # eps from the preset
    assert FinetuneConfig.from_dict(c.to_dict()).to_dict() == c.to_dict()
    assert set(c.to_dict()) >= {"base", "train", "estimator", "optim"}
    # an old flat config (what run_config.json and recipes held before the parts) means the same run
    flat = FinetuneConfig.from_dict({"out": "o", "method": "quzo-lora", "bits": 8, "lora_r": 2,
                                     "lora_targets": ["q_proj"], "perturb_bits": 2, "lr": 3e-5})
    assert flat.to_dict() == c.to_dict()


def test_finetune_help_groups_flags_by_part_with_help_for_every_flag(capsys):
    from zolm.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices["finetune"]
    titles = [g.title for g in sub._action_groups]
    for part in ("base weights", "trainable set", "gradient estimator", "optimiser"):
        assert any(t and t.startswith(part) for t in titles), titles
    undocumented = [a.option_strings for a in sub._actions if a.option_strings and not a.help]
    assert not undocumented
    with pytest.raises(SystemExit):
        parser.parse_args(["finetune", "--help"])
    text = capsys.readouterr().out
    assert "quzo-lora" in text and "low-bit int4 base x lora x spsa" in text


def test_readme_and_methods_doc_show_every_preset_in_the_composition_table():
    root = Path(__file__).resolve().parents[2]
    for doc in ("README.md", "docs/methods.md"):
        text = (root / doc).read_text()
        missing = [name for name in PRESETS if f"| `{name}` |" not in text]
        assert not missing, f"{doc} lacks composition rows for {missing}"


def test_a_kind_flag_does_not_wipe_the_file_s_part(tmp_path):
    (tmp_path / "c.yaml").write_text("method: mezo\nbase: {kind: low-bit, bits: 8}\nestimator: {perturb_bits: 4}\n")
    c = FinetuneConfig.from_file(tmp_path / "c.yaml", out="o", base="low-bit", estimator="spsa", eps=2e-3)
    assert (c.base.kind, c.base.bits, c.estimator.perturb_bits, c.estimator.eps) == ("low-bit", 8, 4, 2e-3)


def test_flat_records_written_before_the_parts_read_as_the_same_run():
    """run_config.json / replay headers of the flat era: None meant the method's default and q_schedule (then
    "adaptive" for every method) only applied to adazeta."""
    old = {"out": "o", "method": "mezo", "lr": 1e-6, "eps": 1e-3, "q_schedule": "adaptive", "q_beta": None,
           "perturb_bits": None, "update_rounding": None, "lora_r": 8, "tt_rank": 5, "mazo_alpha": 1.0,
           "group_size": None, "keep_sparsity": True}
    c = FinetuneConfig.from_dict(old)
    assert (c.estimator.schedule, c.estimator.perturb_bits, c.estimator.update_rounding) == ("fixed", 0, None)
    assert c.to_dict() == FinetuneConfig.of(out="o", method="mezo").to_dict()
    ada = FinetuneConfig.from_dict({**old, "method": "adazeta", "lr": 1e-4})
    assert ada.estimator.schedule == "adaptive"
