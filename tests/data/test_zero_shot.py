"""Zero-shot multiple-choice tasks: templates, WinoGrande's partial scoring, and `zolm eval --tasks`."""

import json

import pytest

from tests.conftest import write_jsonl
from zolm.cli import main
from zolm.data import templates
from zolm.data.encode import encode_example
from zolm.data.tasks import TASKS, ZERO_SHOT

ARC_ROW = {"question": "Which is a metal? ", "answerKey": "3",
           "choices": {"text": ["wood", "glass", "iron"], "label": ["1", "2", "3"]}}


def test_question_answer_templates():
    ex = templates.piqa({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "bake the lid", "label": 0})
    assert (ex.prompt, ex.candidates, ex.gold) == ("Question: Open a jar\nAnswer:", (" twist the lid",
                                                                                     " bake the lid"), 0)
    ex = templates.arc_easy(ARC_ROW)  # numeric answer keys, three choices
    assert ex.prompt == "Question: Which is a metal?\nAnswer:" and ex.candidates[ex.gold] == " iron"
    ex = templates.openbookqa({"id": "1", "question_stem": "Predators eat", "answerKey": "B",
                               "choices": {"text": ["rocks", "prey", "air", "light"], "label": list("ABCD")}})
    assert ex.prompt == "Question: Predators eat\nAnswer:" and ex.candidates[ex.gold] == " prey"
    assert set(ZERO_SHOT) <= set(TASKS) and all(TASKS[t].kind != "generation" for t in ZERO_SHOT)


def test_winogrande_scores_the_continuation_after_each_filled_in_option(tokenizer):
    row = {"sentence": "The cat sat on the mat because _ was tired.", "option1": "the cat", "option2": "the mat",
           "answer": "1"}
    ex = templates.winogrande(row)
    assert ex.prompts == ("The cat sat on the mat because the cat", "The cat sat on the mat because the mat")
    assert ex.candidates == (" was tired.", " was tired.") and ex.gold == 0
    enc = encode_example(tokenizer, ex)
    assert enc.seqs[0] != enc.seqs[1] and enc.shared_prefix() is None
    assert [tokenizer.decode(s[-k:]) for s, k in zip(enc.seqs, enc.option_lens)] == [" was tired."] * 2
    for s, k, p in zip(enc.seqs, enc.option_lens, ex.prompts):
        assert s[:-k] == tokenizer(p)["input_ids"]


@pytest.fixture
def zs_dir(tmp_path):
    write_jsonl(tmp_path / "piqa" / "validation.jsonl",
                [{"goal": f"Goal {i}", "sol1": "the cat", "sol2": "the dog", "label": i % 2} for i in range(6)])
    write_jsonl(tmp_path / "arc_easy" / "test.jsonl", [ARC_ROW] * 5)
    write_jsonl(tmp_path / "winogrande" / "validation.jsonl",
                [{"sentence": "Tom gave _ a pen.", "option1": "Ann", "option2": "Bob", "answer": "2"}] * 4)
    return tmp_path


def test_eval_tasks_prints_each_accuracy_and_the_average(capsys, tiny_llama_dir, zs_dir):
    code = main(["eval", "--model", tiny_llama_dir, "--tasks", "piqa,arc_easy,winogrande", "--data-dir",
                 str(zs_dir), "--num-test", "5"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and list(out["tasks"]) == ["piqa", "arc_easy", "winogrande"]
    assert [out["tasks"][t]["n"] for t in out["tasks"]] == [5, 5, 4]
    accs = [out["tasks"][t]["accuracy"] for t in out["tasks"]]
    assert out["average_accuracy"] == pytest.approx(sum(accs) / 3)


def test_eval_tasks_errors_before_loading_the_model(capsys, tmp_path, zs_dir):
    code = main(["eval", "--model", str(tmp_path / "absent"), "--tasks", "piqa,hellaswag", "--data-dir", str(zs_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "unknown task 'hellaswag'" in err and len(err.strip().splitlines()) == 1
