"""Scoring: batching-invariant log-likelihoods, the right candidate on a handmade set, the losses."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from zolm import models
from zolm.data.encode import collate, encode_all, training_batch
from zolm.data.templates import Example
from zolm.eval.evaluate import evaluate_items
from zolm.eval.metrics import exact_match, normalize_answer, token_f1
from zolm.eval.perplexity import perplexity, read_wikitext
from zolm.eval.scoring import option_logprobs, task_loss

WORDS = ["<pad>", "<s>", "</s>", "what", "is", "the", "color", "of", "sky", "grass", "blood", "snow",
         "blue", "green", "red", "white", "light"]


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


class BigramLM(nn.Module):
    """next-token logits = table[current token]: a model whose preferences are written by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=None):
        logits = self.table[input_ids]
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


def handmade(mapping: dict[str, str]):
    tok = word_tokenizer()
    ids = {w: i for i, w in enumerate(WORDS)}
    table = torch.zeros(len(WORDS), len(WORDS))
    for noun, colour in mapping.items():
        table[ids[noun], ids[colour]] = 5.0
    table[ids["sky"], ids["light"]] = 3.0  # "light blue": 2 tokens, judged by their mean log-probability
    table[ids["light"], ids["blue"]] = 1.0
    colours = (" blue", " green", " red", " white", " light blue")
    examples = [Example(f"what is the color of the {noun}", colours, colours.index(" " + colour))
                for noun, colour in [("sky", "blue"), ("grass", "green"), ("blood", "red"), ("snow", "white")]]
    return BigramLM(table), tok, examples


def test_scoring_picks_the_right_candidate_on_a_handmade_set():
    model, tok, examples = handmade({"sky": "blue", "grass": "green", "blood": "red", "snow": "white"})
    items = encode_all(tok, examples)
    assert items[0].option_lens == [1, 1, 1, 1, 2]
    assert evaluate_items(model, tok, items, "multiple_choice", batch_size=3) == {"accuracy": 1.0, "n": 4}
    # Rewire the model: the same examples are now all wrong, so the metric follows the model.
    wrong, _, _ = handmade({"sky": "green", "grass": "red", "blood": "white", "snow": "blue"})
    assert evaluate_items(wrong, tok, items, "multiple_choice")["accuracy"] == 0.0


def test_scores_do_not_depend_on_padding_or_batching(tiny_llama_dir, tokenizer):
    model, _ = models.load(tiny_llama_dir)
    seqs = [tokenizer("a warm film It was great")["input_ids"], tokenizer("boring It was terrible")["input_ids"],
            tokenizer("the jokes fall flat every time It was")["input_ids"]]
    lens = [1, 2, 3]
    with torch.no_grad():
        together = option_logprobs(model, collate(seqs, lens, tokenizer.pad_token_id))
        alone = [option_logprobs(model, collate([s], [k], tokenizer.pad_token_id)) for s, k in zip(seqs, lens)]
    assert torch.allclose(together[0], torch.cat([a[0] for a in alone]), atol=1e-5)
    assert together[1].tolist() == lens


def test_classification_loss_is_cross_entropy_over_mean_option_logprobs(tiny_llama_dir, data_dir):
    from zolm.data.tasks import load_splits

    model, tok = models.load(tiny_llama_dir)
    splits = load_splits("sst2", data_dir, num_train=4, num_dev=0, num_test=0)
    items = encode_all(tok, splits.train)
    batch = training_batch(items, "classification", tok.pad_token_id)
    with torch.no_grad():
        loss = task_loss(model, batch, "classification")
        manual = []
        for it in items:  # unpadded, full logits, one candidate at a time
            scores = []
            for s, k in zip(it.seqs, it.option_lens):
                logp = torch.log_softmax(model(torch.tensor([s])).logits[0, :-1], -1)
                scores.append(logp[torch.arange(len(s) - k - 1, len(s) - 1), torch.tensor(s[-k:])].mean())
            manual.append(F.cross_entropy(torch.stack(scores)[None], torch.tensor([it.gold])))
    assert loss.item() == pytest.approx(torch.stack(manual).mean().item(), abs=1e-5)


def test_token_loss_averages_over_all_option_tokens(tiny_llama_dir, tokenizer):
    model, _ = models.load(tiny_llama_dir)
    seqs = [tokenizer("Title : Rivers Answer : the Nile")["input_ids"], tokenizer("Answer : Nile")["input_ids"]]
    batch = collate(seqs, [3, 1], tokenizer.pad_token_id)
    with torch.no_grad():
        total, count = option_logprobs(model, batch)
        assert task_loss(model, batch, "generation").item() == pytest.approx(-(total.sum() / 4).item())


def test_squad_metrics():
    assert normalize_answer("The  Nile!") == "nile"
    assert exact_match("the Nile", ("Nile",)) == 1.0
    assert token_f1("the river Nile", ("Nile",)) == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("Amazon", ("Nile", "the Nile")) == 0.0


def test_generation_eval_runs_on_a_tiny_model(tiny_llama_dir, data_dir):
    from zolm.data.tasks import load_splits

    model, tok = models.load(tiny_llama_dir)
    splits = load_splits("squad", data_dir, num_train=2, num_dev=0, num_test=3)
    res = evaluate_items(model, tok, encode_all(tok, splits.test), "generation")
    assert set(res) == {"f1", "em", "n"} and 0.0 <= res["f1"] <= 1.0 and res["n"] == 3


def test_perplexity_matches_a_direct_computation(tiny_llama_dir, tmp_path):
    model, _ = models.load(tiny_llama_dir)
    ids = torch.randint(3, 300, (130,), generator=torch.Generator().manual_seed(0))
    res = perplexity(model, ids, seq_len=32, batch_size=3)
    assert res["windows"] == 4
    with torch.no_grad():
        x = ids[:128].view(4, 32)
        nll = F.cross_entropy(model(x).logits[:, :-1].reshape(-1, model.config.vocab_size), x[:, 1:].reshape(-1))
    assert res["perplexity"] == pytest.approx(float(torch.exp(nll)), rel=1e-5)


def test_read_wikitext_joins_rows_like_the_hub(tmp_path):
    (tmp_path / "w.raw").write_text(" \n = Title = \n \n Text here . \n")
    # HF rows: "", " = Title = \n", "", " Text here . \n", joined by "\n\n"
    assert read_wikitext(tmp_path / "w.raw") == "\n\n = Title = \n\n\n\n\n Text here . \n"


def test_shared_prefix_fast_path_equals_one_row_per_candidate(tiny_llama_dir):
    """Single-token candidates after a shared prompt: one forward per example gives the same loss and scores."""
    from zolm.data.encode import candidate_batch
    from zolm.eval.evaluate import candidate_scores

    model, _ = models.load(tiny_llama_dir)
    tok = word_tokenizer()  # every word is one token, so " blue" / " green" are single-token candidates
    examples = [Example(f"what is the color of the {n}", (" blue", " green", " red"), g)
                for n, g in [("sky", 0), ("grass", 1), ("blood", 2), ("snow", 0)]]
    items = encode_all(tok, examples)
    assert all(it.shared_prefix() is not None for it in items)
    fast = training_batch(items, "classification", tok.pad_token_id)
    assert "candidate_ids" in fast and fast["input_ids"].shape[0] == 4
    slow = collate([s for it in items for s in it.seqs], [k for it in items for k in it.option_lens], 0)
    slow.update(labels=fast["labels"], num_candidates=torch.tensor(3))
    with torch.no_grad():
        assert task_loss(model, fast, "classification").item() == pytest.approx(
            task_loss(model, slow, "classification").item(), abs=1e-5)
        total, count = option_logprobs(model, slow)
        per_candidate = (total / count).view(4, 3)
        assert torch.allclose(torch.tensor(candidate_scores(model, items, 0)), per_candidate, atol=1e-5)
    assert candidate_batch(encode_all(tok, [Example("the sky", (" light blue", " red"), 0)]), 0) is None


def test_smollm2_verbalizers_take_the_fast_path(smollm2_tokenizer):
    from zolm.data.encode import encode_example
    from zolm.data.tasks import TASKS

    rows = {"sst2": {"sentence": "fine", "label": 0}, "rte": {"premise": "P.", "hypothesis": "H.", "label": 0},
            "boolq": {"passage": "P.", "question": "q", "label": 0},
            "wic": {"word": "w", "sentence1": "a", "sentence2": "b", "label": 0},
            "cb": {"premise": "P.", "hypothesis": "H", "label": 0}}
    for task, row in rows.items():
        assert encode_example(smollm2_tokenizer, TASKS[task].render(row)).shared_prefix() is not None, task
