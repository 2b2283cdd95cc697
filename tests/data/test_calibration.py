"""Calibration sequences: shape, determinism, sources and their errors."""

import pytest
import torch

from tests.conftest import CORPUS, SHARED_DATA, write_jsonl
from zolm.data.calibration import calibration_ids, calibration_source, check_fits_positions
from zolm.errors import ZolmError


@pytest.fixture
def c4_dir(tmp_path):
    write_jsonl(tmp_path / "c4" / "validation.jsonl", [{"text": t, "prefix_chars": 3} for t in CORPUS * 3])
    return tmp_path


def test_c4_windows_are_seeded_and_cut_from_joined_snippets(tokenizer, c4_dir):
    ids = calibration_ids(tokenizer, "c4", c4_dir, nsamples=6, seqlen=16, seed=0)
    assert ids.shape == (6, 16) and ids.dtype == torch.long
    assert torch.equal(ids, calibration_ids(tokenizer, "c4", c4_dir, nsamples=6, seqlen=16, seed=0))
    assert not torch.equal(ids, calibration_ids(tokenizer, "c4", c4_dir, nsamples=6, seqlen=16, seed=1))
    assert tokenizer.bos_token_id not in ids.tolist()[0][:1]  # no BOS: windows start mid-stream
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    flat = ids.view(-1).tolist()
    assert any(flat[i:i + len(sep)] == sep for i in range(len(flat)))  # snippets joined by a blank line


def test_text_file_windows_are_drawn_without_overlap(tokenizer, tmp_path):
    text = tmp_path / "train.txt"
    text.write_text(" ".join(CORPUS) * 4)
    ids = calibration_ids(tokenizer, text, nsamples=4, seqlen=8, seed=3)
    stream = torch.tensor(tokenizer(text.read_text(), add_special_tokens=False)["input_ids"])
    windows = stream[: stream.numel() // 8 * 8].view(-1, 8)
    rows = [next(i for i in range(len(windows)) if torch.equal(windows[i], r)) for r in ids]
    assert len(set(rows)) == 4


def test_errors_are_one_line(tokenizer, tmp_path, c4_dir):
    with pytest.raises(ZolmError, match="needs a data directory holding c4/validation.jsonl"):
        calibration_ids(tokenizer, "c4", None)
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "wiki.test.raw").write_text("x")
    with pytest.raises(ZolmError, match=r"wiki.train.raw \(only the test text is there"):
        calibration_source("wikitext2", tmp_path)
    with pytest.raises(ZolmError, match="unknown calibration data 'pile'"):
        calibration_source("pile", tmp_path)
    with pytest.raises(ZolmError, match=r"tokens, fewer than nsamples x seqlen = 1000 x 64"):
        calibration_ids(tokenizer, "c4", c4_dir, nsamples=1000, seqlen=64)
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(ZolmError, match=r"bad.jsonl: row 2 has no 'text' string"):
        calibration_ids(tokenizer, tmp_path / "bad.jsonl")
    with pytest.raises(ZolmError, match="nsamples >= 1 and seqlen >= 2"):
        calibration_ids(tokenizer, "c4", c4_dir, nsamples=0)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data beside the checkout")
def test_shared_c4_gives_the_requested_shape(smollm2_tokenizer):
    ids = calibration_ids(smollm2_tokenizer, "c4", SHARED_DATA, nsamples=8, seqlen=512)
    assert ids.shape == (8, 512) and int(ids.max()) < len(smollm2_tokenizer)


def test_sequences_longer_than_the_positions_are_refused_by_name():
    from transformers import GPT2Config, LlamaConfig

    check_fits_positions(LlamaConfig(max_position_embeddings=256), 256)  # exactly the limit is fine
    with pytest.raises(ZolmError, match=r"^--seqlen 257 is longer than the model's 256 positions "
                                        r"\(max_position_embeddings\)$"):
        check_fits_positions(LlamaConfig(max_position_embeddings=256), 257, "--seqlen")
    with pytest.raises(ZolmError, match="^calibration seqlen 65 is longer than the model's 64 positions"):
        check_fits_positions(GPT2Config(n_positions=64), 65)  # GPT-2 names it n_positions
    check_fits_positions(object(), 10**6)  # a config that does not say: no check
