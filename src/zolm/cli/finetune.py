"""``zolm finetune``: fine-tune a model on a task with a ZO or first-order method."""

from __future__ import annotations

import argparse
import json
import typing
from dataclasses import fields

from zolm.train.config import DEFAULT_LR, METHODS, SCHEDULES, FinetuneConfig

HELP = {
    "out": "run directory (results, checkpoints, logs); an existing run with the same config resumes",
    "model": "built-in name (smollm2-135m), local directory or Hugging Face id",
    "task": "task name (sst2, rte, cb, boolq, wsc, wic, multirc, copa, squad), or a comma-separated mixture",
    "task_weights": "mixture proportions, one per task (default: uniform)",
    "method": f"training method: {', '.join(METHODS)}",
    "data_dir": "folder of <task>/<split>.jsonl files (default: the Hugging Face hub)",
    "lr": "learning rate (default per method: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")",
    "lr_schedule": f"{' or '.join(SCHEDULES)}",
    "eps": "ZO perturbation scale (default 1e-3; mezo-lora 1e-2)",
    "queries": "ZO queries (SPSA estimates) per step",
    "sampler": "ZO perturbation distribution: ih4 (Irwin-Hall ~ Gaussian) or rademacher",
    "half_mode": "ZO on bfloat16/float16 weights: exact (float32 master copies of the trained tensors, +4 bytes "
                 "per trained weight), lean (no copy: virtual perturbation, stochastically rounded updates) or "
                 "inplace (round to nearest; small updates are lost) -- docs/methods.md",
    "train_params": "regular expressions of parameter names to train (default: all)",
    "freeze_params": "regular expressions of parameter names to keep frozen",
    "num_dev": "dev examples (default: 500; CB and COPA 100)",
    "eval_every": "evaluate on dev every N steps (0: only at the end); best-on-dev weights are kept",
    "checkpoint_every": "write a resumable checkpoint every N steps (default: eval_every)",
    "eval_before": "evaluate on test before training (zero-shot)",
    # masked ZO (docs/mazo.md)
    "mask_ratio": "masked methods: share rho of each row's weights that ZO perturbs and updates, in (0, 1]",
    "mask_params": "masked methods: regular expressions of maskable [out, in] weights (default: the linear "
                   "layers of the decoder blocks: q/k/v/o/gate/up/down_proj, OPT out_proj/fc1/fc2)",
    "mazo_alpha": "MaZO: weight of the greedy importance term g^2",
    "mazo_beta": "MaZO: weight of the magnitude importance term |W|",
    "mazo_curvature": "MaZO: h in the global term g^2/(2(h+lambda)): fisher (mean squared mini-batch "
                      "gradient) or activation (row-wise: mean x_j^2 of the layer input)",
    "mazo_damping": "MaZO: lambda = damping * mean(h)",
    "mazo_row_eps": "MaZO: per-task row normalisation S / (max_j S + eps)",
    "mazo_term_norm": "MaZO: row-normalise each importance term before weighting (zolm option, off in 5.3)",
    "mazo_calib_examples": "MaZO: calibration examples per task (its first training examples)",
    "mazo_calib_batch_size": "MaZO: calibration mini-batch size (one backward pass each)",
}
HELP.update({  # adapter methods: adazeta, mezo-lora, fo-tt (docs/adazeta.md)
    "tt_rank": "TT rank of the AdaZeta adapters",
    "tt_bottleneck": "TT adapter bottleneck size",
    "tt_modes": "TT modes each side of a TT layer is factorised into",
    "tt_hidden_modes": "explicit factorisation of the adapted side (default: balanced factors of its size)",
    "tt_activation": "adapter activation: relu (paper) or identity (linear, mergeable into the weights)",
    "tt_scaling": "adapter scaling s in x + s * TT_up(act(TT_down(x)))",
    "tt_bias": "TT layers with a bias",
    "tt_placement": "where adapters go, as module_pattern:input|output (default by architecture: Llama "
                    "gate_proj:input up_proj:input down_proj:output; OPT fc1:input fc2:output)",
    "q_schedule": "adazeta queries per step: adaptive, Q_e = min(max(floor(q_alpha e^q_beta), 1), q_max) at "
                  "epoch e, or fixed (--queries)",
    "q_alpha": "multiplier of the adaptive query schedule",
    "q_beta": "exponent of the adaptive query schedule (default: fitted so Q reaches q_target at the last epoch)",
    "q_max": "cap of the adaptive query schedule (paper 20; AdaZeta's script 15)",
    "q_target": "Q at the last epoch when q_beta is fitted",
})


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a model (MeZO or first-order baselines)",
                       description="Fine-tune a causal LM on a prompt-based task. Every option may also come "
                                   "from --config FILE (YAML or JSON); flags given here override the file.")
    p.add_argument("--config", help="YAML or JSON file with FinetuneConfig keys")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    hints = typing.get_type_hints(FinetuneConfig)
    for f in fields(FinetuneConfig):
        flags = ["--" + f.name.replace("_", "-")] + (["--tasks"] if f.name == "task" else [])
        kind = hints[f.name]
        text = HELP.get(f.name, "")
        if kind is bool:
            p.add_argument(*flags, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            p.add_argument(*flags, nargs="+", type=item, default=None, metavar="X", help=text)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            p.add_argument(*flags, type=base, default=None, help=text)


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    given = {f.name: getattr(args, f.name) for f in fields(FinetuneConfig) if getattr(args, f.name) is not None}
    if args.config:
        return FinetuneConfig.from_file(args.config, **given)
    return FinetuneConfig.from_dict(given)


def run(args: argparse.Namespace) -> int:
    from zolm.train.loop import finetune

    config = config_from_args(args)
    results = finetune(config, overwrite=args.overwrite)
    metric = "accuracy" if "accuracy" in (results["after"] or {}) else "f1"
    before = (results.get("before") or {}).get(metric)
    after = (results.get("after") or {}).get(metric)
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    print(f"{config.task} {metric}: before {fmt(before)}  after {fmt(after)}  "
          f"(method {config.method}, {results['steps']} steps, selected step {results['selected_step']}, "
          f"{results['train_time_s']:.0f} s training)")
    print(f"results: {config.out}/results.json  model: {config.out}/model")
    print(json.dumps({"task": config.task, "method": config.method, f"{metric}_before": before,
                      f"{metric}_after": after}))
    return 0
