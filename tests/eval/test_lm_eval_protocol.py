"""Zero-shot scoring as lm-evaluation-harness does it: its prompts, its tokenisation of (context,
continuation), acc = argmax of summed log-likelihoods, acc_norm = argmax of log-likelihood / len(choice)."""

import json

import pytest
import torch

from zolm import models
from zolm.data.zero_shot import request
from zolm.eval.zero_shot import encode_pair, evaluate_lm_eval, loglikelihoods, score

ROWS = {
    "arc_easy": {"question": "Which is a metal?", "answerKey": "C",
                 "choices": {"text": ["wood", "glass", "iron"], "label": ["A", "B", "C"]}},
    "piqa": {"goal": "Open a jar ", "sol1": "twist the lid ", "sol2": "bake the lid", "label": 0},
    "openbookqa": {"question_stem": "Predators eat", "answerKey": " B",
                   "choices": {"text": ["rocks", "prey", "air", "light"], "label": list("ABCD")}},
    "boolq": {"passage": "The sky is blue.", "question": "is the sky blue", "label": 1},
    "rte": {"premise": "A cat sat.", "hypothesis": "An animal sat.", "label": 0},
    "winogrande": {"sentence": "Tom gave _ a pen.", "option1": "Ann", "option2": "Bob", "answer": "2"},
}


def test_requests_are_lm_evals_templates_verbatim():
    r = request("arc_easy", ROWS["arc_easy"])
    assert r.contexts[0] == "Question: Which is a metal?\nAnswer:" and r.continuations == (" wood", " glass", " iron")
    assert r.gold == 2 and r.metrics == ("acc", "acc_norm")
    r = request("piqa", ROWS["piqa"])  # no stripping: whitespace is part of lm-eval's strings
    assert r.contexts[0] == "Question: Open a jar \nAnswer:"
    assert r.continuations == (" twist the lid ", " bake the lid")
    assert r.choices == ("twist the lid ", "bake the lid")
    r = request("openbookqa", ROWS["openbookqa"])
    assert r.contexts[0] == "Predators eat" and r.gold == 1
    r = request("boolq", ROWS["boolq"])
    assert r.contexts[0] == "The sky is blue.\nQuestion: is the sky blue?\nAnswer:"
    assert r.continuations == (" no", " yes")
    assert r.metrics == ("acc",)
    r = request("rte", ROWS["rte"])
    assert r.contexts[0] == "A cat sat.\nQuestion: An animal sat. True or False?\nAnswer:" and r.gold == 0
    assert r.continuations == (" True", " False")
    r = request("winogrande", ROWS["winogrande"])
    assert r.contexts == ("Tom gave Ann", "Tom gave Bob") and r.continuations == (" a pen.", " a pen.") and r.gold == 1


def test_encode_pair_moves_trailing_spaces_and_splits_the_whole_encoding(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Question: the cat \nAnswer: ", "dog")
    whole = tokenizer.encode("Question: the cat \nAnswer: dog", add_special_tokens=False)
    assert ctx + cont == whole and ctx == tokenizer.encode("Question: the cat \nAnswer:", add_special_tokens=False)
    assert tokenizer.bos_token_id not in ctx  # no special tokens, as lm-eval's HFLM for causal models


def test_loglikelihoods_equal_an_unbatched_sum_of_log_probabilities(tiny_llama_dir):
    model, tok = models.load(tiny_llama_dir)
    pairs = [("Question: the cat\nAnswer:", " the dog"), ("It was", " great"), ("a warm , funny", " and moving film")]
    got = loglikelihoods(model, tok, pairs, batch_size=2)
    for (c, t), value in zip(pairs, got):
        ctx, cont = encode_pair(tok, c, t)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ctx + cont])).logits[0].float(), -1)
        want = sum(logp[len(ctx) - 1 + i, tok_id].item() for i, tok_id in enumerate(cont))
        assert value == pytest.approx(want, abs=1e-4)


def test_acc_norm_divides_by_the_character_length_of_each_choice():
    r = request("arc_easy", {"question": "q", "answerKey": "B", "choices": {"text": ["ab", "abcdefgh"],
                                                                             "label": ["A", "B"]}})
    sums = score([r], [-2.0, -4.0])  # raw: choice A wins; per character: -1.0 vs -0.5, B wins
    assert sums == {"acc": 0.0, "acc_norm": 1.0}


def test_evaluate_reports_lm_evals_metrics(tiny_llama_dir):
    model, tok = models.load(tiny_llama_dir)
    arc = evaluate_lm_eval(model, tok, "arc_easy", [ROWS["arc_easy"]] * 3)
    assert set(arc) == {"acc", "acc_norm", "accuracy", "n", "protocol"} and arc["n"] == 3
    assert set(evaluate_lm_eval(model, tok, "winogrande", [ROWS["winogrande"]])) == {"acc", "accuracy", "n",
                                                                                     "protocol"}


def test_eval_cli_uses_the_lm_eval_protocol_for_the_suite(capsys, tiny_llama_dir, tmp_path):
    from tests.conftest import write_jsonl
    from zolm.cli import main

    write_jsonl(tmp_path / "piqa" / "validation.jsonl", [ROWS["piqa"]] * 4)
    code = main(["eval", "--model", tiny_llama_dir, "--tasks", "piqa", "--data-dir", str(tmp_path)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and out["tasks"]["piqa"]["protocol"] == "lm-eval" and "acc_norm" in out["tasks"]["piqa"]
    main(["eval", "--model", tiny_llama_dir, "--tasks", "piqa", "--data-dir", str(tmp_path), "--protocol", "zolm"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "protocol" not in out["tasks"]["piqa"] and out["tasks"]["piqa"]["n"] == 4
