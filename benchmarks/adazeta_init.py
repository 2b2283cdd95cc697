"""How far TT adapters move the model at initialisation: SST-2 loss of the base model vs the adapted model.

    .venv/bin/python benchmarks/adazeta_init.py [--examples 64]

Prints one JSON line: the mean MeZO-protocol training loss on the first ``--examples`` SST-2 training examples
of SmolLM2-135M, without adapters and with AdaZeta's adapters (rank 5, bottleneck 64, gate/up/down placement)
under each initialisation (reference = AdaZeta's code; zero-up = zolm's default, TT_up's last core and bias zero),
and each one's shift in nats. Goal (issue 13): the default's shift < 0.05 nats.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA  # noqa: E402


def mean_loss(model, batches, kind: str) -> float:
    from zolm.eval.scoring import loss_count, task_loss_sum

    total = count = 0.0
    with torch.inference_mode():
        for b in batches:
            total += float(task_loss_sum(model, b, kind))
            count += loss_count(b, kind)
    return total / count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=64)
    args = ap.parse_args()
    from zolm import models
    from zolm.adapters import TTAdapterConfig, add_tt_adapters
    from zolm.data.encode import encode_all, training_batch
    from zolm.data.tasks import load_splits

    model, tok = models.load(args.model)
    split = load_splits("sst2", str(DATA), 1000, 0, 0, 0)
    items = encode_all(tok, split.train[:args.examples], 1024)
    batches = [training_batch(items[i:i + 16], split.task.kind, tok.pad_token_id) for i in range(0, len(items), 16)]
    out = {"model": args.model, "examples": len(items), "base": round(mean_loss(model, batches, split.task.kind), 4)}
    for init in ("reference", "zero-up"):
        m, _ = models.load(args.model)
        add_tt_adapters(m, TTAdapterConfig(init=init))
        loss = mean_loss(m, batches, split.task.kind)
        out[init] = {"loss": round(loss, 4), "shift_nats": round(loss - out["base"], 4)}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
