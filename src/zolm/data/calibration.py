"""Calibration token sequences for pruning: N sequences of L tokens from local text.

Sources (``source`` argument / ``zolm prune --calib-data``):

* ``c4``: ``<data_dir>/c4/validation.jsonl``, 1,480 C4 snippets of 320-1,554 characters (about 60-350 tokens).
  Wanda's loader draws one random document longer than L per sample; these snippets are shorter than a
  window, so instead the snippets are shuffled with ``seed``, joined with a blank line (``"\\n\\n"``, tokenised
  once, so no model-specific EOS token is needed) and the stream is cut into N consecutive windows of L tokens.
* ``wikitext2``: ``<data_dir>/wikitext2/wiki.train.raw`` (WikiText-2 *train*). The shared data folder only has
  the *test* text, which zolm evaluates perplexity on; calibrating on it would leak the evaluation data, so
  it is not used silently: pass its path explicitly if that is really wanted.
* a path: a ``.jsonl`` file with a ``text`` field per line (treated like C4), or any plain text file. A plain
  text file is tokenised whole, cut into floor(T / L) windows, and N of them are drawn with ``seed``.

Sequences carry no BOS token (Wanda's windows start mid-document, too).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from zolm.errors import ZolmError
from zolm.utils.io import read_jsonl

SOURCES = {"c4": ("c4", "validation.jsonl"), "wikitext2": ("wikitext2", "wiki.train.raw")}
SEPARATOR = "\n\n"


def calibration_source(source: str | Path, data_dir: str | Path | None = None) -> Path:
    """The file a calibration source names; checked to exist (one-line error otherwise)."""
    if str(source) in SOURCES:
        folder, name = SOURCES[str(source)]
        if data_dir is None:
            raise ZolmError(f"calibration data {source!r} needs a data directory holding {folder}/{name}")
        path = Path(data_dir).expanduser() / folder / name
        if not path.is_file():
            hint = ""
            if source == "wikitext2" and (path.parent / "wiki.test.raw").is_file():
                hint = " (only the test text is there: pass its path explicitly to calibrate on evaluation text)"
            raise ZolmError(f"no calibration file {path}{hint}")
        return path
    path = Path(source).expanduser()
    if not path.is_file():
        raise ZolmError(f"unknown calibration data {str(source)!r}: not c4, wikitext2 or an existing file")
    return path


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _from_documents(tokenizer, texts: list[str], nsamples: int, seqlen: int, seed: int, where: Path) -> torch.Tensor:
    need = nsamples * seqlen
    sep = _ids(tokenizer, SEPARATOR)
    stream: list[int] = []
    for i in np.random.default_rng(seed).permutation(len(texts)):
        stream.extend(_ids(tokenizer, texts[i]) + sep)
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ZolmError(f"{where} holds {len(stream)} tokens, fewer than nsamples x seqlen = {nsamples} x {seqlen}")
    return torch.tensor(stream[:need], dtype=torch.long).view(nsamples, seqlen)


def _from_text(tokenizer, text: str, nsamples: int, seqlen: int, seed: int, where: Path) -> torch.Tensor:
    ids = torch.tensor(_ids(tokenizer, text), dtype=torch.long)
    windows = ids.numel() // seqlen
    if windows < nsamples:
        raise ZolmError(f"{where} has {ids.numel()} tokens: {windows} windows of {seqlen}, fewer than {nsamples}")
    pick = np.random.default_rng(seed).permutation(windows)[:nsamples]
    return ids[: windows * seqlen].view(windows, seqlen)[torch.from_numpy(pick)]


def check_fits_positions(config, seqlen: int, what: str = "calibration seqlen") -> None:
    """Refuse ``seqlen``-token sequences longer than the model's ``max_position_embeddings`` (one-line error
    naming ``what``, the option the user set); no check when the config does not say."""
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, int) and seqlen > limit:
        raise ZolmError(f"{what} {seqlen} is longer than the model's {limit} positions (max_position_embeddings)")


def calibration_ids(tokenizer, source: str | Path = "c4", data_dir: str | Path | None = None, nsamples: int = 128,
                    seqlen: int = 2048, seed: int = 0) -> torch.Tensor:
    """``nsamples`` calibration sequences of ``seqlen`` tokens ([N, L] int64) from ``source`` (see module doc).

    Deterministic for a given tokenizer, file and seed.
    """
    if nsamples < 1 or seqlen < 2:
        raise ZolmError(f"calibration needs nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    path = calibration_source(source, data_dir)
    if path.suffix == ".jsonl":
        rows = read_jsonl(path)
        bad = next((i for i, r in enumerate(rows, start=1) if not isinstance(r.get("text"), str)), None)
        if bad is not None:
            raise ZolmError(f"{path}: row {bad} has no 'text' string (calibration rows need one)")
        return _from_documents(tokenizer, [r["text"] for r in rows], nsamples, seqlen, seed, path)
    return _from_text(tokenizer, path.read_text(encoding="utf-8"), nsamples, seqlen, seed, path)
