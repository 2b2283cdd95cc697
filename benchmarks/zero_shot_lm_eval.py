"""Zero-shot suite on SmolLM2-135M: zolm's lm-eval protocol against lm-evaluation-harness itself.

For each task of the suite it takes the same seeded test documents ``zolm eval --tasks zero-shot --num-test N``
uses, builds lm-eval's requests (zolm.data.zero_shot), and scores them twice: with zolm (zolm.eval.zero_shot)
and, when the ``lm_eval`` package is installed, with lm-eval's own ``HFLM.loglikelihood`` on the same model
object. It reports acc / acc_norm from both and the largest difference of the per-request log-likelihoods.
(lm-eval's task loader needs the hub; here its scorer gets the requests directly, so the comparison covers the
tokenisation, the scoring and the metrics; the prompt strings are checked against lm-eval's YAMLs in
tests/eval/test_lm_eval_protocol.py.) It also reports the old zolm protocol (training templates, mean
log-probability per token) on the same documents. Prints one JSON line.

Reproduce:  .venv/bin/python benchmarks/zero_shot_lm_eval.py --num-test 200    (about 15 minutes on 2 cores)
            .venv/bin/pip install -c constraints.txt -e '.[harness]'          (first, for the lm-eval column)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import DATA  # noqa: E402

HARNESS_INSTALL = "pip install -c constraints.txt -e '.[harness]'  (lm-eval 0.4.13, an optional extra)"


def lm_eval_loglikelihoods(model, tok, pairs: list[tuple[str, str]], batch_size: int) -> list[float] | None:
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        print(f"lm-eval is not installed, only zolm's scores are printed: {HARNESS_INSTALL}", file=sys.stderr)
        return None
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size)
    reqs = [Instance(request_type="loglikelihood", doc={}, arguments=p, idx=i) for i, p in enumerate(pairs)]
    return [ll for ll, _ in lm.loglikelihood(reqs, disable_tqdm=True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-test", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--tasks", default="piqa,arc_easy,arc_challenge,winogrande,openbookqa,boolq,rte")
    args = ap.parse_args()
    from zolm import models
    from zolm.data.encode import encode_all
    from zolm.data.tasks import load_splits
    from zolm.data.zero_shot import request
    from zolm.eval.evaluate import evaluate_items
    from zolm.eval.zero_shot import loglikelihoods, sample_rows, score

    torch.set_num_threads(2)
    model, tok = models.load("smollm2-135m")
    out: dict = {}
    for task in args.tasks.split(","):
        t0 = time.perf_counter()
        rows = sample_rows(task, DATA, args.num_test)
        reqs = [request(task, r) for r in rows]
        pairs = [(c, t) for r in reqs for c, t in zip(r.contexts, r.continuations)]
        ours = loglikelihoods(model, tok, pairs, args.batch_size)
        n = len(reqs)
        row = {"n": n, "zolm": {k: round(v / n, 4) for k, v in score(reqs, ours).items()}}
        theirs = lm_eval_loglikelihoods(model, tok, pairs, args.batch_size)
        if theirs is not None:
            row["lm_eval"] = {k: round(v / n, 4) for k, v in score(reqs, theirs).items()}
            row["max_abs_ll_diff"] = float(np.abs(np.array(ours) - np.array(theirs)).max())
        s = load_splits(task, DATA, num_train=0, num_dev=0, num_test=args.num_test, seed=0)
        row["old_zolm_protocol_acc"] = round(evaluate_items(model, tok, encode_all(tok, s.test), s.task.kind,
                                                            args.batch_size)["accuracy"], 4)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out[task] = row
        print(task, json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps({"model": "smollm2-135m", "num_test": args.num_test, "tasks": out}))


if __name__ == "__main__":
    main()
