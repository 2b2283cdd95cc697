"""Templates give MeZO's prompts, and encoding gives the right candidate tokens."""

import pytest

from zolm.data import templates
from zolm.data.encode import collate, encode_example
from zolm.data.tasks import TASKS


def test_prompts_and_candidates_match_mezo():
    ex = templates.sst2({"sentence": "a gorgeous film ", "label": 1})
    assert (ex.prompt, ex.candidates, ex.gold) == ("a gorgeous film It was", (" terrible", " great"), 1)
    ex = templates.rte({"premise": "P.", "hypothesis": "H.", "label": 1})
    assert ex.prompt == 'P.\nDoes this mean that "H." is true? Yes or No?\n' and ex.candidates == ("Yes", "No")
    ex = templates.cb({"premise": "P.", "hypothesis": "H", "label": 2})
    assert ex.prompt == 'Suppose P. Can we infer that "H"? Yes, No, or Maybe?\n'
    assert ex.candidates[ex.gold] == "Maybe"
    ex = templates.boolq({"passage": "Text.", "question": "is it true", "label": 1})
    assert ex.prompt == "Text. Is it true?\n" and ex.candidates[1] == "Yes"
    ex = templates.wsc({"text": "Tom said he was late.", "span1_text": "Tom", "span2_text": "He", "label": 1})
    assert ex.prompt == ('Tom said he was late.\nIn the previous sentence, does the pronoun "he" refer to Tom? '
                         'Yes or No?\n') and ex.candidates == ("No", "Yes")
    ex = templates.wic({"word": "bank", "sentence1": "A.", "sentence2": "B.", "label": 0})
    assert ex.prompt == 'Does the word "bank" have the same meaning in these two sentences? Yes, No?\nA.\nB.\n'
    ex = templates.multirc({"paragraph": "P", "question": "Q", "answer": "A", "label": 1})
    assert ex.prompt == 'P\nQuestion: Q\nI found this answer "A". Is that correct? Yes or No?\n'
    ex = templates.copa({"premise": "The man fell.", "choice1": "He slipped.", "choice2": "I pushed him.",
                         "question": "cause", "label": 0})
    assert ex.prompt == "The man fell because " and ex.candidates == ("he slipped.", "I pushed him.")
    ex = templates.copa({"premise": "It rained", "choice1": "A", "choice2": "B", "question": "effect", "label": 1})
    assert ex.prompt == "It rained so "
    ex = templates.squad({"title": "T", "context": "C", "question": " Q? ", "answers": {"text": ["x", "y"]}})
    assert ex.prompt == "Title: T\nContext: C\nQuestion: Q?\nAnswer:" and ex.candidates == (" x\n",)
    assert ex.answers == ("x", "y")


def test_every_task_has_a_template_and_kind():
    for spec in TASKS.values():
        assert spec.kind in ("classification", "multiple_choice", "generation")
        assert callable(spec.render)


@pytest.mark.parametrize("task,row,expected", [
    ("sst2", {"sentence": "a gorgeous film ", "label": 1}, [" terrible", " great"]),
    ("rte", {"premise": "P.", "hypothesis": "H.", "label": 0}, ["Yes", "No"]),
    ("cb", {"premise": "P.", "hypothesis": "H", "label": 0}, ["Yes", "No", "Maybe"]),
    ("copa", {"premise": "The man fell.", "choice1": "He slipped.", "choice2": "It rained.",
              "question": "cause", "label": 0}, [" he slipped.", " it rained."]),  # space merges into the option
])
def test_option_tokens_are_the_candidate(smollm2_tokenizer, task, row, expected):
    """The last option_len tokens of each sequence decode to the candidate text (SmolLM2's tokenizer)."""
    enc = encode_example(smollm2_tokenizer, TASKS[task].render(row))
    decoded = [smollm2_tokenizer.decode(s[-k:]) for s, k in zip(enc.seqs, enc.option_lens)]
    assert decoded == expected
    assert all(s[:-k] == enc.prompt_ids for s, k in zip(enc.seqs, enc.option_lens))


def test_sst2_candidates_are_single_tokens(smollm2_tokenizer):
    enc = encode_example(smollm2_tokenizer, templates.sst2({"sentence": "fine", "label": 0}))
    assert enc.option_lens == [1, 1]


def test_left_truncation_keeps_bos_and_the_option(tokenizer):
    ex = templates.sst2({"sentence": "word " * 200, "label": 0})
    enc = encode_example(tokenizer, ex, max_length=32)
    assert all(len(s) == 32 and s[0] == tokenizer.bos_token_id for s in enc.seqs)
    assert [tokenizer.decode(s[-k:]) for s, k in zip(enc.seqs, enc.option_lens)] == [" terrible", " great"]


def test_collate_left_pads_and_marks_options():
    b = collate([[5, 6, 7], [8, 9]], [1, 2], pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]
    assert b["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    assert b["option_mask"].tolist() == [[False, False, True], [False, True, True]]
