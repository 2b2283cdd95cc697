"""GGUF export of SmolLM2-135M: file sizes, and whether Q4_0 / Q8_0 hold zolm's INT weights bit for bit.

For f16 of the float model, and for INT4 (groups of 32, fp16 scales, INT8 embedding) -> q4_0 and
INT8 (groups of 32, fp16 scales) -> q8_0, it writes the GGUF file, reads every tensor back with gguf's own
reader and dequantizer (gguf.quants.dequantize) and compares it with zolm's dequantized weight (after
llama.cpp's Q/K row permutation). It also writes the INT4 model as a compressed-tensors pack-quantized folder
and checks that plain transformers gives zolm's logits on it. Prints one JSON line.

Reproduce:  .venv/bin/python benchmarks/gguf_export.py            (~2 minutes on 2 CPU cores)
Same as:    zolm quantize --bits 4 --group-size 32 --out int4 && zolm export --model int4 --format gguf \
                --gguf-type q4_0 --out smollm2-int4.q4_0.gguf
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def compare(path: Path, expected: dict[str, np.ndarray]) -> dict:
    """Read ``path`` with gguf and count tensors equal (bit for bit) to ``expected``; the largest difference."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    r = GGUFReader(str(path))
    equal, worst, types = 0, 0.0, {}
    for t in r.tensors:
        got = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(expected[t.name].shape)
        equal += int(np.array_equal(got, expected[t.name]))
        worst = max(worst, float(np.abs(got - expected[t.name]).max()))
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return {"tensors": len(r.tensors), "bit_exact": equal, "max_abs_diff": worst, "types": types,
            "pre": r.fields["tokenizer.ggml.pre"].contents()}


def compressed_tensors_row(model, tok, out: Path) -> dict:
    """Size of the pack-quantized folder, and plain transformers' logits on it against zolm's."""
    from transformers import AutoModelForCausalLM

    from zolm.quant.ct import save_ct

    save_ct(model, tok, out)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    ids = tok("Zeroth-order fine-tuning costs two forward passes.", return_tensors="pt")["input_ids"]
    plain = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        same = torch.equal(plain(ids).logits, model(ids).logits)
    return {"bytes": size, "MB": round(size / 1e6, 1), "MiB": round(size / 2**20, 1),
            "plain_transformers_logits_equal_zolm": same}


def main() -> None:
    from zolm import models
    from zolm.export import export_gguf, gguf_weights
    from zolm.quant import QuantConfig, QuantFormat, quantize_

    model, tok = models.load("smollm2-135m")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        cases = [("float", "f16", None), ("int4-g32", "q4_0", QuantFormat("int", 4, group_size=32)),
                 ("int8-g32", "q8_0", QuantFormat("int", 8, group_size=32))]
        for label, gtype, fmt in cases:
            m = model if fmt is None else quantize_(copy.deepcopy(model), QuantConfig(weight=fmt, embed_bits=8))
            t0 = time.perf_counter()
            info = export_gguf(m, tok, Path(tmp) / f"{label}.{gtype}.gguf", gtype)
            seconds = time.perf_counter() - t0
            check = compare(Path(info["path"]), gguf_weights(m))
            rows[f"{label}->{gtype}"] = {"bytes": info["bytes"], "MB": round(info["bytes"] / 1e6, 1),
                                         "MiB": round(info["bytes"] / 2**20, 1), "seconds": round(seconds, 1),
                                         "encodings": info["encodings"], **check}
            if label == "int4-g32":
                rows["int4-g32->compressed-tensors"] = compressed_tensors_row(m, tok, Path(tmp) / "ct")
            del m
    print(json.dumps({"model": "smollm2-135m", "torch": torch.__version__, "results": rows}))


if __name__ == "__main__":
    main()
