"""Shared fixtures: a tiny BPE tokenizer, tiny random Llama / OPT models and a tiny data folder.

Everything is built offline from configs and inline text; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["ZOLM_NO_PROGRESS"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# Handmade rows in the Hugging Face schemas (not copied from any data set).
SENTENCES = [
    ("a warm , funny and moving film", 1), ("dull , tedious and far too long", 0),
    ("the best thing i have seen all year", 1), ("a mess of a movie with no heart", 0),
    ("charming actors and a clever plot", 1), ("boring from start to finish", 0),
    ("a delight for the whole family", 1), ("the jokes fall flat every time", 0),
    ("beautifully shot and well acted", 1), ("i wanted to leave after ten minutes", 0),
    ("sweet , smart and surprising", 1), ("lazy writing and a weak ending", 0),
]
CORPUS = [s for s, _ in SENTENCES] + [
    "It was great . It was terrible .", "Does this mean that it is true ? Yes or No ?",
    "Suppose the cat sat . Can we infer that the cat sat ? Yes , No , or Maybe ?",
    "In the previous sentence , does the pronoun he refer to Tom ?",
    "Does the word bank have the same meaning in these two sentences ?",
    "Question : what is it ? I found this answer . Is that correct ?",
    "Title : Rivers Context : The Nile is long . Answer : the Nile",
    "the man fell so he broke his arm because the floor was wet",
    "The quick brown fox jumps over the lazy dog. 0123456789",
]


def pytest_collection_modifyitems(config, items):
    """Skip ``cuda``-marked tests cleanly on machines without a usable CUDA device (the default run deselects
    them anyway: ``-m 'not slow and not cuda'``; ``pytest -m cuda`` selects them)."""
    if not any(item.get_closest_marker("cuda") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


def make_tokenizer():
    """A byte-level BPE tokenizer (no unknown tokens) with BOS/EOS, trained on CORPUS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.padding_side = "left"
    return fast


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


def _save(model, tok, path: Path) -> str:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return _save(LlamaForCausalLM(cfg), tokenizer, tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_opt_dir(tmp_path_factory, tokenizer) -> str:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32,
                    bos_token_id=1, eos_token_id=2, pad_token_id=0, dropout=0.0, attention_dropout=0.0)
    return _save(OPTForCausalLM(cfg), tokenizer, tmp_path_factory.mktemp("tiny-opt"))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def tiny_rows() -> dict[str, dict[str, list[dict]]]:
    sst2 = [{"sentence": s + " ", "label": y, "idx": i} for i, (s, y) in enumerate(SENTENCES * 3)]
    rte = [{"premise": f"The {w} is on the table.", "hypothesis": f"A {w} is somewhere.", "idx": i,
            "label": i % 2} for i, w in enumerate(["cup", "book", "pen", "lamp", "key", "phone"] * 3)]
    copa = [{"premise": "The man fell.", "choice1": "He slipped on ice.", "choice2": "He ate lunch.",
             "question": "cause", "idx": i, "label": 0} for i in range(10)]
    squad = [{"id": str(i), "title": "Rivers", "context": "The Nile is the longest river in Africa.",
              "question": "Which river is the longest in Africa?",
              "answers": {"text": ["the Nile", "Nile"], "answer_start": [0, 4]}} for i in range(12)]
    multirc = [{"idx": p, "passage": {"text": f"Passage {p} says the sky is blue.", "questions": [
        {"question": "What colour is the sky?", "idx": q, "answers": [
            {"text": "blue", "idx": 0, "label": 1}, {"text": "green", "idx": 1, "label": 0}]}
        for q in range(2)]}} for p in range(4)]
    return {"sst2": {"train": sst2, "validation": sst2[:12]}, "rte": {"train": rte, "validation": rte[:6]},
            "copa": {"train": copa, "validation": copa[:4]}, "squad": {"validation": squad},
            "multirc": {"train": multirc, "validation": multirc[:2]}}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    for task, splits in tiny_rows().items():
        for split, rows in splits.items():
            write_jsonl(root / task / f"{split}.jsonl", rows)
    return str(root)


@pytest.fixture(scope="session")
def smollm2():
    """The real default model (slow tests only)."""
    from zolm import models

    return models.load("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's real tokenizer, read from the GGUF file (a few seconds, no weights)."""
    from zolm import models

    return models.load_tokenizer("smollm2-135m")
