"""zolm's GGUF exports in a real llama.cpp client: greedy text and WikiText-2 perplexity against transformers.

SmolLM2-135M is exported as f16 (float model), q8_0 (INT8 groups of 32: codes copied) and q4_0 (INT4 groups of
32: codes copied), and each file runs in llama.cpp through node-llama-cpp's prebuilt CPU binaries
(benchmarks/llama_cpp/client.mjs). Both sides get the same token ids (transformers' tokenizer), so the figures
compare weights and arithmetic; llama.cpp's own tokenization of the WikiText-2 text is compared separately.
The transformers reference computes in float32 with the weights the file holds: zolm's dequantized INT weights
for q8_0 / q4_0 (bit for bit what the file dequantizes to), the float weights rounded to fp16 for f16.
Prints one JSON line.

Set-up (once; ~20 s, 725 MB of prebuilt binaries, no compiler):
    npm install --prefix benchmarks/llama_cpp --no-audit --no-fund        # node-llama-cpp 3.22.1 (package.json)
Reproduce (~15 minutes on 2 idle CPU cores):
    .venv/bin/python benchmarks/llama_cpp_client.py --max-windows 8 --seq-len 512 --gen 32
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

CLIENT_DIR = Path(__file__).resolve().parent / "llama_cpp"
PROMPT = "The history of the Roman Empire"


def client_missing() -> str | None:
    """Why the llama.cpp client cannot run here (None when it can)."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    if not (CLIENT_DIR / "node_modules" / "node-llama-cpp" / "package.json").is_file():
        return f"node-llama-cpp is not installed: npm install --prefix {CLIENT_DIR} --no-audit --no-fund"
    return None


def run_client(gguf: Path, prompt_ids: list[int], n_gen: int, windows: list[list[int]], text: str | None = None,
               threads: int = 2, timeout: int = 3600) -> dict:
    """Run ``gguf`` in llama.cpp on these token ids: greedy continuation, summed NLL per window, tokens of text."""
    context = max([len(prompt_ids) + n_gen] + [len(w) for w in windows])
    request = {"model": str(gguf), "threads": threads, "context": context, "prompt_ids": prompt_ids,
               "n_gen": n_gen, "windows": windows, "text": text}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    try:
        proc = subprocess.run(["node", str(CLIENT_DIR / "client.mjs"), f.name], capture_output=True, text=True,
                              timeout=timeout, cwd=CLIENT_DIR)
    finally:
        os.unlink(f.name)
    if proc.returncode != 0:
        raise RuntimeError(f"llama.cpp client failed on {gguf}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@torch.no_grad()
def reference(model, prompt_ids: list[int], n_gen: int, windows: torch.Tensor) -> dict:
    """transformers on the same ids: greedy continuation (the argmax of the raw logits at every step, EOS
    included, as the client does; with the raw logits) and the summed NLL per window."""
    model.eval()
    x, past, ids, scores = torch.tensor([prompt_ids]), None, [], []
    for _ in range(n_gen):
        out = model(input_ids=x, past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1].float()
        ids.append(int(logits.argmax()))
        scores.append(logits)
        x = torch.tensor([[ids[-1]]])
    return {"greedy_ids": ids, "scores": scores, "window_nll": window_nll(model, windows)}


@torch.no_grad()
def window_nll(model, windows: torch.Tensor) -> list[float]:
    """Summed next-token NLL of each window (one forward per window, as zolm.eval.perplexity does)."""
    nll = []
    for w in windows:
        logits = model(input_ids=w[None], use_cache=False).logits[0, :-1].float()
        nll.append(float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum")))
    return nll


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def compare(tok, ref: dict, got: dict, tokens: int) -> dict:
    """Greedy agreement (where it diverges, and transformers' logit gap there) and both perplexities."""
    i = first_difference(ref["greedy_ids"], got["greedy_ids"])
    row = {"greedy_equal_tokens": len(ref["greedy_ids"]) if i is None else i,
           "greedy_tokens": len(ref["greedy_ids"]),
           "text_transformers": tok.decode(ref["greedy_ids"]), "text_llama_cpp": tok.decode(got["greedy_ids"])}
    if i is not None:  # how close transformers' own choice was to llama.cpp's at the first divergence
        s = ref["scores"][i]
        row["gap_at_divergence"] = round(float(s[ref["greedy_ids"][i]] - s[got["greedy_ids"][i]]), 4)
    worst = max(abs(a - b) for a, b in zip(ref["window_nll"], got["window_nll"]))
    ppl_ref = math.exp(sum(ref["window_nll"]) / tokens)
    ppl_cpp = math.exp(sum(got["window_nll"]) / tokens)
    row.update({"ppl_transformers": round(ppl_ref, 4), "ppl_llama_cpp": round(ppl_cpp, 4),
                "ppl_rel_diff": float(f"{ppl_cpp / ppl_ref - 1:.3g}"),
                "max_window_nll_diff_per_token": float(f"{worst / (tokens / len(ref['window_nll'])):.3g}"),
                "llama_cpp_seconds": round(got["load_seconds"] + got["greedy_seconds"] + got["ppl_seconds"], 1)})
    return row


def q8_0_activations(x: torch.Tensor) -> torch.Tensor:
    """What llama.cpp's CPU matmul does to the input of a Q4_0 / Q8_0 weight: Q8_0 blocks of 32 along the
    last axis, scale max|x| / 127 stored as fp16, codes round(x * 127 / max|x|) (ggml's quantize_row_q8_0)."""
    shape = x.shape
    b = x.float().reshape(-1, 32)
    amax = b.abs().amax(dim=1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(b * inv).clamp(-127, 127)
    return (q * (amax / 127.0).half().float()).reshape(shape).to(x.dtype)


def with_q8_0_activations(model):
    """Hooks that round the input of every quantized linear layer and of the tied head as llama.cpp does."""
    handles = []
    for mod in model.modules():
        if type(mod).__name__ in ("QuantLinear", "QuantTiedHead"):
            handles.append(mod.register_forward_pre_hook(lambda _m, args: (q8_0_activations(args[0]), *args[1:])))
    if not handles:
        raise RuntimeError("no quantized layers to hook")
    return handles


def fp16_weights(model):
    """The float model with the weights an f16 GGUF holds: 2-D tensors rounded to fp16, norms kept float32."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-dir", default=None, help="folder holding wikitext2/wiki.test.raw (default ../shared/data)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-windows", type=int, default=8)
    ap.add_argument("--gen", type=int, default=32, help="greedy tokens generated from the prompt")
    ap.add_argument("--types", default="f16,q8_0,q4_0,int4-f32",
                    help="of f32, f16, q8_0, q4_0, int4-f32 (the INT4 model dequantized into an f32 file)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    why = client_missing()
    if why:
        print(json.dumps({"error": f"llama.cpp client unavailable: {why}"}))
        sys.exit(2)
    from _common import DATA, environment
    from zolm import models
    from zolm.eval.perplexity import read_wikitext
    from zolm.export import export_gguf
    from zolm.quant import QuantConfig, QuantFormat, quantize_

    torch.set_num_threads(args.threads)
    data = Path(args.data_dir) if args.data_dir else DATA
    model, tok = models.load(args.model)
    text = read_wikitext(data / "wikitext2" / "wiki.test.raw")
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    n = min(args.max_windows, ids.numel() // args.seq_len)
    windows = ids[: n * args.seq_len].view(n, args.seq_len)
    tokens = n * (args.seq_len - 1)
    prompt_ids = tok(PROMPT)["input_ids"]
    cases = {"f32": (None, None), "f16": (None, fp16_weights), "q8_0": (QuantFormat("int", 8, group_size=32), None),
             "q4_0": (QuantFormat("int", 4, group_size=32), None),
             "int4-f32": (QuantFormat("int", 4, group_size=32), None)}
    rows, tokenization = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for gtype in args.types.split(","):
            fmt, ref_of = cases[gtype]
            m = model if fmt is None else quantize_(copy.deepcopy(model), QuantConfig(weight=fmt, embed_bits=8))
            path = Path(tmp) / f"{gtype}.gguf"
            info = export_gguf(m, tok, path, "f32" if gtype == "int4-f32" else gtype)
            print(f"{gtype}: exported, {info['bytes'] / 2**20:.1f} MiB", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            ref = reference(ref_of(m) if ref_of else m, prompt_ids, args.gen, windows)
            ref_seconds = time.perf_counter() - t0
            got = run_client(path, prompt_ids, args.gen, windows.tolist(), text if tokenization is None else None,
                             threads=args.threads)
            cpp_seconds = got["ppl_seconds"] + got["greedy_seconds"]
            print(f"{gtype}: transformers {ref_seconds:.0f} s, llama.cpp {cpp_seconds:.0f} s", file=sys.stderr,
                  flush=True)
            if tokenization is None:
                diff = first_difference(ids.tolist(), got["text_ids"])
                tokenization = {"tokens_transformers": ids.numel(), "tokens_llama_cpp": len(got["text_ids"]),
                                "first_difference": diff}
                if diff is not None:
                    tokenization["at_first_difference"] = [tok.convert_ids_to_tokens(ids[diff:diff + 4].tolist()),
                                                           tok.convert_ids_to_tokens(got["text_ids"][diff:diff + 4])]
            label = {"f32": "float -> f32", "f16": "float -> f16", "q8_0": "int8-g32 -> q8_0 (exact copy)",
                     "q4_0": "int4-g32 -> q4_0 (exact copy)", "int4-f32": "int4-g32 -> f32 (dequantized)"}[gtype]
            rows[label] = {"MiB": round(info["bytes"] / 2**20, 1), **compare(tok, ref, got, tokens),
                           "transformers_seconds": round(ref_seconds, 1)}
            if gtype in ("q8_0", "q4_0"):  # transformers, activations rounded as llama.cpp does
                handles = with_q8_0_activations(m)
                emu = reference(m, prompt_ids, args.gen, windows)
                for h in handles:
                    h.remove()
                rows[label]["q8_0_activations"] = {k: v for k, v in compare(tok, emu, got, tokens).items()
                                                   if k.startswith(("greedy_equal", "ppl_", "max_", "gap"))}
            if gtype == "f16":  # the float32 model itself, for scale
                rows[label]["ppl_transformers_float32"] = round(math.exp(sum(window_nll(model, windows)) / tokens), 4)
            llama = got["llama_cpp"]
            del m
    print(json.dumps({"model": args.model, "prompt": PROMPT, "seq_len": args.seq_len, "windows": n,
                      "tokens_scored": tokens, "wikitext_tokenization": tokenization, "llama_cpp": llama,
                      "node_llama_cpp": json.loads((CLIENT_DIR / "node_modules" / "node-llama-cpp" /
                                                    "package.json").read_text())["version"],
                      **environment(), "results": rows}))


if __name__ == "__main__":
    main()
