"""Recipe files are checked against the config dataclasses before any work: one line naming file, key and type."""

import pytest

from zolm.errors import ZolmError
from zolm.pipeline import Recipe

GOOD_STAGES = "stages:\n  - prune: {method: wanda, nm: '2:4'}\n  - finetune: {method: mezo, steps: 2}\n"


@pytest.mark.parametrize("text,message", [
    ("- a\n- b\n", "a recipe must be a mapping"),
    ("out: o\nstages:\n  - prune: [wanda]\n", r"stage 1 \(prune\) options must be a mapping"),
    ("out: o\nstages:\n  - prune: {method: wanda, foo: 1}\n", r"stage 1 \(prune\): unknown key\(s\) foo"),
    ("out: o\nstages:\n  - quantize: {bits: 4, foo: 1}\n", r"stage 1 \(quantize\): unknown key\(s\) foo"),
    ("out: o\nstages:\n  - finetune: {method: mezo, foo: 1}\n", r"stage 1 \(finetune\): unknown key 'foo'"),
    ("out: o\nstages:\n  - finetune: {method: mezo, steps: 2.5}\n", r"steps: expected an integer, got 2.5"),
    ("out: o\nstages:\n  - finetune: {method: mezo, steps: '10'}\n", r"steps: expected an integer, got '10'"),
    ("out: o\nstages:\n  - finetune: {method: mezo, eval_before: 'no'}\n", "eval_before: expected true/false"),
    ("out: o\nstages:\n  - finetune: {method: mezo-lora, lora_targets: q_proj}\n", "expected a list of strings"),
    ("out: o\nstages:\n  - prune: {method: wanda, nsamples: 3.5}\n", "nsamples: expected an integer"),
    ("out: o\nreport: {tasks: sst2}\n" + GOOD_STAGES, r"report.tasks: expected a list of strings, got 'sst2'"),
    ("out: o\nreport: {task: [sst2]}\n" + GOOD_STAGES, r"report: unknown key\(s\) task"),
    ("out: [o]\n" + GOOD_STAGES, "out must be a string"),
])
def test_bad_recipes_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(ZolmError, match=message) as e:
        Recipe.from_file(path)
    assert "\n" not in str(e.value) and (str(path) in str(e.value) or "recipe" in str(e.value))


def test_a_good_recipe_reads(tmp_path):
    (tmp_path / "r.yaml").write_text("out: o\nreport: {tasks: [sst2], num_test: 10}\n" + GOOD_STAGES)
    r = Recipe.from_file(tmp_path / "r.yaml")
    assert [k for k, _ in r.stages] == ["prune", "finetune"]
