"""Language-model perplexity on a token stream (Wanda's protocol, papers.md section 7.1).

The text is tokenised once; ``floor(n_tokens / seq_len)`` non-overlapping windows of ``seq_len`` tokens are
scored; PPL = exp(total NLL / total predicted tokens). For WikiText-2 the raw test file is joined the way
the Hugging Face rows are ("\\n\\n".join of rows, each row being a line + "\\n" or "" for a blank line).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from zolm.errors import ZolmError
from zolm.utils.log import progress


def read_wikitext(path: str | Path) -> str:
    """WikiText raw file -> the text Wanda's evaluation tokenises ("\\n\\n".join of the HF rows)."""
    path = Path(path)
    if not path.is_file():
        raise ZolmError(f"no such text file: {path}")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    rows = ["" if not ln.strip() else ln + "\n" for ln in lines]
    return "\n\n".join(rows)


@torch.no_grad()
def perplexity(model, input_ids: torch.Tensor, seq_len: int, max_windows: int | None = None,
               batch_size: int = 1) -> dict[str, float]:
    """Perplexity of ``model`` over non-overlapping windows of a 1-D token tensor."""
    if seq_len < 2:
        raise ZolmError(f"seq_len must be >= 2, got {seq_len}")
    n = input_ids.numel() // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ZolmError(f"text has {input_ids.numel()} tokens, fewer than one window of {seq_len}")
    windows = input_ids[: n * seq_len].view(n, seq_len)
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    for start in progress(range(0, n, batch_size), desc="perplexity", leave=False):
        x = windows[start:start + batch_size]
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                 reduction="sum")
        nll += float(loss)
        count += x[:, 1:].numel()
    model.train(was_training)
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "windows": n, "seq_len": seq_len,
            "tokens": count}
