"""``zolm prune``: prune a model's decoder blocks (magnitude, Wanda, SparseGPT, Wanda++) and save it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from zolm.errors import ZolmError
from zolm.prune.api import METHODS, RO_STATS, PruneConfig
from zolm.utils.outputs import check_output

DEFAULTS = PruneConfig()  # one source of defaults for the flags below


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="prune a model (magnitude, wanda, sparsegpt, wanda++)",
                       description="Prune the linear layers of every decoder block, block by block on calibration "
                                   "text, print the achieved sparsity per layer and save the model with "
                                   "save_pretrained (plus prune_report.json). Embeddings and the LM head are kept.")
    p.add_argument("--model", default="smollm2-135m", help="built-in name, local directory or hub id")
    p.add_argument("--method", default="wanda", help=f"one of: {', '.join(METHODS)}")
    pattern = p.add_mutually_exclusive_group()
    pattern.add_argument("--sparsity", type=float, help="unstructured sparsity in [0, 1) (default 0.5)")
    pattern.add_argument("--nm", metavar="N:M", help="semi-structured: keep N of every M input weights (2:4, 4:8)")
    p.add_argument("--out", required=True, help="directory for the pruned model")
    p.add_argument("--overwrite", action="store_true", help="replace what is at --out (default: refuse)")
    p.add_argument("--compressed", action="store_true",
                   help="also write the compact form (bitmap + non-zero values) to OUT/compressed")
    p.add_argument("--calib-data", default="c4",
                   help="c4 (DATA_DIR/c4/validation.jsonl), wikitext2 (DATA_DIR/wikitext2/wiki.train.raw) or a "
                        ".jsonl/.txt path")
    p.add_argument("--data-dir", help="folder holding c4/ and wikitext2/ (e.g. ../shared/data)")
    p.add_argument("--nsamples", type=int, default=64, help="calibration sequences (paper: 128)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration sequence (paper: 2048)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling and RO draws")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help="sequences per block forward")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (calibration runs in it)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1... (model and calibration run there)")
    p.add_argument("--device-map", default=None,
                   help="shard the model over devices (accelerate): auto, balanced, sequential; each block's "
                        "calibration inputs follow it to its device (overrides --device)")
    wpp = p.add_argument_group("Wanda++")
    wpp.add_argument("--alpha", type=float, default=DEFAULTS.alpha, help="weight of the regional gradient term")
    wpp.add_argument("--ro-rounds", type=int, default=DEFAULTS.ro_rounds, help="regional optimisation rounds")
    wpp.add_argument("--ro-samples", type=int, default=DEFAULTS.ro_samples,
                     help="calibration inputs drawn per round, one RMSprop step each (paper: 32; CPU: 8-16)")
    wpp.add_argument("--ro-lr", type=float, default=DEFAULTS.ro_lr,
                     help="RMSprop learning rate of RO (tuned at 135M; the paper's 3e-7 is for LLaMA-7B)")
    wpp.add_argument("--no-ro", action="store_true", help="RGS only: skip regional optimisation")
    wpp.add_argument("--ro-stats", choices=tuple(RO_STATS), default=DEFAULTS.ro_stats,
                     help="where a round's re-prune takes input norms from: the previous round's RO steps (free) "
                          "or a forward of the round's inputs (the community reproduction)")
    wpp.add_argument("--ro-log-errors", action="store_true",
                     help="also log each RO round's block error before and after its steps (two more forwards)")
    sgpt = p.add_argument_group("SparseGPT")
    sgpt.add_argument("--blocksize", type=int, default=DEFAULTS.blocksize, help="columns per lazy-update block")
    sgpt.add_argument("--damp", type=float, default=DEFAULTS.damp, help="dampening, as a fraction of mean(diag H)")


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    return PruneConfig(method=args.method, sparsity=args.sparsity, nm=args.nm, alpha=args.alpha,
                       ro_rounds=0 if args.no_ro else args.ro_rounds, ro_samples=args.ro_samples, ro_lr=args.ro_lr,
                       ro_stats=args.ro_stats, ro_log_errors=args.ro_log_errors, blocksize=args.blocksize,
                       damp=args.damp, batch_size=args.batch_size, seed=args.seed)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def format_report(report) -> list[str]:
    """One line per block: every layer's achieved sparsity, the block's relative output error and time."""
    lines = []
    for b in report.blocks:
        parts = " ".join(f"{_short(lay.name)} {lay.sparsity:.3f}" for lay in b.layers)
        err = "" if b.rel_error is None else f" | rel.err {b.rel_error:.4f}"
        ro = b.details.get("ro") if b.details else None
        if ro and "rel_error_before" in ro[0]:
            err += f" (RO round 1 {ro[0]['rel_error_before']:.4f} -> {ro[0]['rel_error_after']:.4f})"
        elif ro:
            err += f" (RO round 1 loss {ro[0]['rel_loss']:.4f} -> round {len(ro)} {ro[-1]['rel_loss']:.4f})"
        lines.append(f"block {b.index:>3}: {parts}{err} | {b.seconds:.1f} s")
    return lines


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # every option is checked before the model loads
    from zolm.data.calibration import calibration_ids, calibration_source, check_fits_positions
    from zolm.models import resolve_dtype
    from zolm.utils.devices import resolve_device

    resolve_dtype(args.dtype)
    device = resolve_device(args.device, distributed=False)  # `--device cuda` without CUDA: one line, exit 2
    if args.nsamples < 1 or args.seqlen < 2:
        raise ZolmError(f"need --nsamples >= 1 and --seqlen >= 2, got {args.nsamples} and {args.seqlen}")
    source = calibration_source(args.calib_data, args.data_dir) if config.needs_calibration else None
    out = Path(args.out)
    check_output(out, overwrite=args.overwrite, inputs=[args.model, args.data_dir, source])

    from zolm import models
    from zolm.compressed import save_compressed
    from zolm.prune.api import prune_
    from zolm.utils.io import atomic_write_json

    model, tok = models.load(args.model, args.dtype, device=device, device_map=args.device_map)
    calib = None
    if source is not None:
        check_fits_positions(model.config, args.seqlen, "--seqlen")
        calib = calibration_ids(tok, source, None, args.nsamples, args.seqlen, args.seed)
    report = prune_(model, config, calib)
    for line in format_report(report):
        print(line)
    models.save(model, tok, out)
    summary = {"model": args.model, "method": config.method, "pattern": config.nm or f"{config.target:g}",
               "sparsity": report.sparsity, "params_pruned": report.params_pruned, "seconds": report.seconds,
               "calibration": None if source is None else {"data": str(source), "nsamples": args.nsamples,
                                                           "seqlen": args.seqlen, "seed": args.seed},
               "device": str(device) if args.device_map is None else f"device_map={args.device_map}",
               "out": str(out)}
    atomic_write_json(out / "prune_report.json", {**summary, "report": report.to_dict()})
    if args.compressed:
        comp = save_compressed(model, tok, out / "compressed")
        summary["compressed"] = {"dir": str(comp), "bytes": _dir_size(comp),
                                 "save_pretrained_bytes": _dir_size(out) - _dir_size(comp)}
    print(f"{config.describe()}: {report.sparsity:.4f} of {report.params_pruned:,} block weights are zero "
          f"({report.seconds:.1f} s); saved {out}")
    print(json.dumps(summary))
    return 0
