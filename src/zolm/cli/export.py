"""``zolm export``: write a model as dense Hugging Face safetensors, compressed-tensors or a GGUF file."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a model as dense safetensors (hf) or GGUF",
                       description="hf: save_pretrained with float weights (low-bit layers dequantized), loadable "
                                   "by plain transformers. gguf: a llama.cpp-compatible GGUF file (Llama family).")
    p.add_argument("--model", required=True, help="built-in name, local directory (also zolm's low-bit form, and a "
                                                  "TT adapter directory with identity adapters: merged), hub id")
    p.add_argument("--format", choices=("hf", "gguf", "compressed-tensors"), required=True,
                   help="hf: float safetensors; gguf: llama.cpp; compressed-tensors: pack-quantized INT4/INT8 "
                        "(transformers and vLLM load it; needs pip install compressed-tensors)")
    p.add_argument("--gguf-type", default="f16",
                   help="f32, f16, q8_0 or q4_0 (zolm's INT4/INT8 codes with fp16 scales are copied exactly)")
    p.add_argument("--requantize", action="store_true",
                   help="round low-bit layers that q8_0/q4_0 cannot hold exactly again instead of refusing them")
    p.add_argument("--tokenizer-pre", default=None,
                   help="tokenizer.ggml.pre to write (default: recognised as llama.cpp's converter does)")
    p.add_argument("--tokenizer-gguf", default=None,
                   help="copy tokenizer metadata from this GGUF (default: the built-in SmolLM2 file if it matches)")
    p.add_argument("--out", required=True, help="output directory (hf) or .gguf file")
    p.add_argument("--overwrite", action="store_true", help="replace what is at --out (default: refuse)")


def run(args: argparse.Namespace) -> int:
    from zolm import models
    from zolm.adapters import load_model_or_adapters
    from zolm.errors import ZolmError
    from zolm.export import GGUF_TYPES, export_gguf, to_dense
    from zolm.utils.outputs import check_output

    if args.format == "gguf" and args.gguf_type not in GGUF_TYPES:
        raise ZolmError(f"unknown GGUF tensor type {args.gguf_type!r}; valid: {', '.join(GGUF_TYPES)}")
    check_output(args.out, overwrite=args.overwrite, kind="file" if args.format == "gguf" else "directory",
                 inputs=[args.model, args.tokenizer_gguf])
    model, tok = load_model_or_adapters(args.model, merge=True)
    if args.format == "hf":
        models.save(to_dense(model), tok, args.out)
        print(json.dumps({"format": "hf", "out": args.out}))
    elif args.format == "compressed-tensors":
        from zolm.quant.ct import save_ct

        save_ct(model, tok, args.out)
        print(json.dumps({"format": "compressed-tensors", "out": args.out}))
    else:
        print(json.dumps(export_gguf(model, tok, args.out, args.gguf_type, args.tokenizer_gguf,
                                     requantize=args.requantize, pre=args.tokenizer_pre)))
    return 0
