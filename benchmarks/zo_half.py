"""ZO on half-precision weights: how exactly each ``half_mode`` applies the updates, what it costs in memory and time.

For one half dtype (default bfloat16) and the modes exact / lean / inplace (plus float32 as the yardstick), each in
its own subprocess on SmolLM2-135M:
  * err: 100 MeZO steps (+eps, -2eps, restore+update) on the tensors of decoder block 0 with projected gradients
    g_t = +-U(0.5, 1.5) at lr 1e-5 (lr g ~ 1e-5, MeZO's regime), without forwards (the loss values are set so
    that g comes out as chosen). error = final - (start + sum_t -lr g_t z_t), the sum in float64; reported as
    RMS(error) / RMS(intended sum). For exact mode on the float32 masters (the trained state) and on the half
    weights the forward sees (their rounding to half, which does not accumulate).
  * peak: peak resident memory (VmHWM) of 3 ZO steps of the whole model at batch 8 x 64, against inference.
  * time: median ZO step / (2 x median forward) at batch 8 x 64.

Reproduce:  .venv/bin/python benchmarks/zo_half.py [--dtype bfloat16] [--steps 100]
            (benchmarks/zo_step.py prints the same line after its shapes)
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from _common import environment, peak_mib, reset_peak, run_worker  # noqa: E402
from zo_step import interleaved, make_batch  # noqa: E402

MODES = ("exact", "lean", "inplace")
BLOCK = r"^model\.layers\.0\."


def _err(model_name: str, dtype: str, mode: str, steps: int) -> dict:
    from zolm import models
    from zolm.zo.optimizer import ZOConfig, ZOOptimizer
    from zolm.zo.rng import draw, tensor_key
    from zolm.zo.spsa import ParamSet

    model, _ = models.load(model_name, dtype)
    params = ParamSet(model, include=[BLOCK])
    start = [p.detach().double().clone() for p in params.params]
    intended = [torch.zeros_like(s) for s in start]
    eps, lr = 1e-3, 1e-5
    opt = ZOOptimizer(params, ZOConfig(eps=eps, seed=3, half_mode=mode))
    g = torch.Generator().manual_seed(0)
    for step in range(1, steps + 1):
        gt = float((torch.rand(1, generator=g) + 0.5) * (1 if torch.rand(1, generator=g) < 0.5 else -1))
        values = iter([1.0 + gt * eps, 1.0 - gt * eps])
        rec = opt.step(lambda v=values: next(v), step, lr)
        for i, p in enumerate(params.params):
            z = draw(p.numel(), tensor_key(rec.seeds[0], i)).double().view(p.shape)
            intended[i] -= rec.lr * rec.grads[0] * z

    def ratio(final: list[torch.Tensor]) -> float:
        err = sum(float(((f.double() - s) - d).pow(2).sum()) for f, s, d in zip(final, start, intended))
        ref = sum(float(d.pow(2).sum()) for d in intended)
        return (err / ref) ** 0.5

    out = {"mode": mode, "dtype": dtype, "err_ratio": ratio([p.detach() for p in params.params]),
           "update_rms": (sum(float(d.pow(2).sum()) for d in intended) / params.numel()) ** 0.5}
    if opt.store.masters:
        out["err_ratio_master"] = ratio([opt.store.masters[i] for i in range(len(params))])
    return out


def _run(model_name: str, dtype: str, mode: str, what: str, reps: int) -> dict:
    from zolm import models
    from zolm.eval.scoring import task_loss
    from zolm.zo.optimizer import ZOConfig, ZOOptimizer
    from zolm.zo.spsa import ParamSet

    model, _ = models.load(model_name, dtype)
    b = make_batch(model, 8, 64)

    def loss() -> float:
        with torch.inference_mode():
            return float(task_loss(model, b, "multiple_choice"))

    loss()
    opt = None if mode == "infer" else ZOOptimizer(ParamSet(model), ZOConfig(eps=1e-3, half_mode=mode))
    if what == "peak":
        reset_peak()
        for step in range(1, 4):
            loss() if opt is None else opt.step(loss, step, 1e-6)
        return {"mode": mode, "peak_mib": peak_mib(),
                "master_mib": 0.0 if opt is None else opt.store.master_bytes() / 2**20}
    opt.step(loss, 1, 1e-6)
    f, s = interleaved(loss, lambda step: opt.step(loss, step, 1e-6), reps)
    return {"mode": mode, "step_over_2fwd": s / (2 * f)}


def curves(steps: int = 60, lr: float = 2e-3) -> dict:
    """MeZO on a tiny random Llama (from a config) in float32 and in bf16 under each half_mode, same seed:
    10-step means of the training loss (what tests/train/test_half_precision_runs.py asserts on)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from zolm.eval.scoring import task_loss
    from zolm.zo.optimizer import ZOConfig, ZOOptimizer
    from zolm.zo.spsa import ParamSet

    cfg = LlamaConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, pad_token_id=0)
    out: dict = {"benchmark": "zo_half_curves", "steps": steps, "lr": lr, "eps": 1e-2, "queries": 4}
    for dtype, mode in (("float32", "exact"), ("bfloat16", "exact"), ("bfloat16", "lean"), ("bfloat16", "inplace")):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).eval()
        b = make_batch(model, 16, 12)

        def loss(model=model, b=b) -> float:
            with torch.inference_mode():
                return float(task_loss(model, b, "multiple_choice"))

        opt = ZOOptimizer(ParamSet(model), ZOConfig(eps=1e-2, seed=1, half_mode=mode, queries=4))
        ls = [opt.step(loss, s, lr).loss for s in range(1, steps + 1)]
        out[f"{dtype}_{mode}" if dtype != "float32" else "float32"] = [round(sum(ls[i:i + 10]) / 10, 4)
                                                                      for i in range(0, steps, 10)]
    return out


def worker(kind: str, model: str, dtype: str, mode: str, n: int) -> dict:
    if kind == "err":
        return _err(model, dtype, mode, n)
    return _run(model, dtype, mode, kind, n)


def half_line(model: str = "smollm2-135m", dtype: str = "bfloat16", steps: int = 100, reps: int = 3,
              script: str = __file__) -> dict:
    """The benchmark's JSON record (each measurement in a fresh subprocess of ``script``)."""
    def w(kind: str, dt: str, mode: str, n: int) -> dict:
        return run_worker(script, kind, model, dt, mode, str(n))

    rec: dict = {"benchmark": "zo_half", "model": model, "dtype": dtype, "steps": steps, "lr": 1e-5}
    rec["err_ratio_float32"] = round(w("err", "float32", "inplace", steps)["err_ratio"], 5)
    for mode in MODES:
        e = w("err", dtype, mode, steps)
        rec[f"err_ratio_{mode}"] = round(e.get("err_ratio_master", e["err_ratio"]), 5)
        if "err_ratio_master" in e:
            rec["err_ratio_exact_half_weights"] = round(e["err_ratio"], 4)  # rounding of the master to half
        rec["update_rms"] = e["update_rms"]
    infer = w("peak", dtype, "infer", 0)["peak_mib"]
    rec["infer_peak_mib"] = round(infer)
    for mode in MODES:
        p = w("peak", dtype, mode, 0)
        rec[f"{mode}_peak_mib"] = round(p["peak_mib"])
        rec[f"{mode}_peak_over_infer"] = round(p["peak_mib"] / infer, 3)
        rec[f"{mode}_master_mib"] = round(p["master_mib"], 1)
        rec[f"{mode}_step_over_2fwd"] = round(w("time", dtype, mode, reps)["step_over_2fwd"], 3)
    return {**rec, **environment()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=5, metavar=("KIND", "MODEL", "DTYPE", "MODE", "N"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--curves", action="store_true", help="only the tiny-Llama loss curves (seconds)")
    args = ap.parse_args()
    if args.curves:
        for lr in (2e-3, 2e-4):
            print(json.dumps(curves(lr=lr)), flush=True)
        return
    if args.worker:
        kind, model, dtype, mode, n = args.worker
        print(json.dumps(worker(kind, model, dtype, mode, int(n))))
        return
    print(json.dumps(half_line(args.model, args.dtype, args.steps, args.reps)), flush=True)


if __name__ == "__main__":
    main()
