"""``zolm quantize``: store a model's weights in INT8 / INT4 / FP8 (codes + scales) and save it."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model's weights to INT8 / INT4 / FP8 and save it",
                       description="Round-to-nearest absmax quantization of every linear layer (and the token "
                                   "embedding / tied LM head); the result stores low-bit codes and loads with "
                                   "zolm (zolm eval --model DIR, zolm finetune --model DIR --method quzo).")
    p.add_argument("--model", default="smollm2-135m", help="built-in name, local directory or hub id")
    p.add_argument("--bits", type=int, default=4, help="weight bits for int (4 or 8)")
    p.add_argument("--format", default="int", help="int or fp8")
    p.add_argument("--fp8-variant", default="e4m3", help="e4m3 or e5m2")
    p.add_argument("--group-size", type=int, default=None,
                   help="input columns per scale (default: 32 for int4, one scale per output channel otherwise)")
    p.add_argument("--embed-bits", type=int, default=8, help="embedding bits (4 or 8); 0 keeps it float")
    p.add_argument("--fp16-scales", choices=("auto", "on", "off"), default="auto",
                   help="round scales to float16 so GGUF Q4_0/Q8_0 exports are exact (auto: on for int groups of 32)")
    p.add_argument("--clip", choices=("auto", "mse", "act", "none"), default="auto",
                   help="scale search: mse clips each group's range to minimise its error, act to minimise the "
                        "error weighted by each input's mean square on calibration text (llama.cpp's imatrix), "
                        "none is absmax (auto: mse for int4)")
    p.add_argument("--calib-data", default=None,
                   help="clip act: calibration text (c4, wikitext2, or a .jsonl / .txt path; default c4)")
    p.add_argument("--data-dir", default=None,
                   help="clip act: folder holding c4/ and wikitext2/ (e.g. ../shared/data)")
    p.add_argument("--nsamples", type=int, default=None, help="clip act: calibration sequences (default 32)")
    p.add_argument("--seqlen", type=int, default=None, help="clip act: tokens per calibration sequence (default 256)")
    p.add_argument("--act-bits", type=int, default=None, help="also fake-quantize layer inputs (4 or 8)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--overwrite", action="store_true", help="replace what is at --out (default: refuse)")


def _bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def run(args: argparse.Namespace) -> int:
    from zolm.train.parts import BaseWeights

    base = BaseWeights(kind="low-bit", bits=args.bits, format=args.format,  # validates before loading
                       fp8_variant=args.fp8_variant, group_size=args.group_size, embed_bits=args.embed_bits or None,
                       act_bits=args.act_bits, fp16_scales={"auto": None, "on": True, "off": False}[args.fp16_scales],
                       clip=None if args.clip == "auto" else args.clip)
    qc = base.quant_config()
    calib = {"--calib-data": args.calib_data, "--data-dir": args.data_dir, "--nsamples": args.nsamples,
             "--seqlen": args.seqlen}
    if qc.weight.clip != "act" and any(v is not None for v in calib.values()):
        from zolm.errors import ZolmError

        raise ZolmError(f"{', '.join(k for k, v in calib.items() if v is not None)}: calibration options apply "
                        "only with --clip act")
    from zolm.utils.outputs import check_output

    if qc.weight.clip == "act":  # a missing calibration file fails before the model loads
        from zolm.data.calibration import calibration_source

        calibration_source(args.calib_data or "c4", args.data_dir)
    check_output(args.out, overwrite=args.overwrite, inputs=[args.model, args.data_dir])
    from zolm import models
    from zolm.quant.linear import quantize_

    model, tok = models.load(args.model)
    before = _bytes(model)
    importance = None
    if qc.weight.clip == "act":
        from zolm.quant.calibrate import calibrated_importance

        given = {"source": args.calib_data, "nsamples": args.nsamples, "seqlen": args.seqlen}
        importance = calibrated_importance(model, tok, data_dir=args.data_dir,
                                           **{k: v for k, v in given.items() if v is not None})
    quantize_(model, qc, importance=importance)
    after = _bytes(model)
    models.save(model, tok, args.out)
    print(json.dumps({"model": args.model, "format": qc.weight.name, "embed_bits": qc.embed_bits,
                      "weight_bytes_before": before, "weight_bytes_after": after,
                      "ratio": round(after / before, 4), "out": args.out}))
    return 0
