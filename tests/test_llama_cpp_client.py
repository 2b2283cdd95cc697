"""SmolLM2's GGUF exports in a real llama.cpp (node-llama-cpp's prebuilt CPU build): the same greedy text and
perplexity as transformers on the same weights (slow; skipped without node and node-llama-cpp, see
benchmarks/llama_cpp_client.py for the set-up and the full figures in docs/results.md)."""

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "llama_cpp_client.py"
SEQ, WINDOWS, GEN = 128, 2, 16


def _bench():
    spec = importlib.util.spec_from_file_location("llama_cpp_client", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    why = mod.client_missing()
    if why:
        pytest.skip(f"llama.cpp client unavailable: {why}")
    return mod


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type,ppl_rtol", [("f32", 1e-3), ("q4_0", 5e-2)])
def test_llama_cpp_runs_zolms_gguf_like_transformers(smollm2, tmp_path, gguf_type, ppl_rtol):
    """f32: llama.cpp and transformers agree to float rounding (same greedy tokens, perplexity to 1e-3).
    q4_0 (INT4 g32 codes copied): llama.cpp rounds each matmul's input to Q8_0 blocks, which moves the
    perplexity by about 1% here; the weights themselves are zolm's (tests/test_export_gguf_exact.py)."""
    bench = _bench()
    from zolm.eval.perplexity import read_wikitext
    from zolm.export import export_gguf
    from zolm.quant import QuantConfig, QuantFormat, quantize_

    from .conftest import SHARED_DATA

    text = SHARED_DATA / "wikitext2" / "wiki.test.raw"
    if not text.is_file():
        pytest.skip(f"no WikiText-2 test file at {text}")
    model, tok = smollm2
    if gguf_type == "q4_0":
        model = quantize_(copy.deepcopy(model), QuantConfig(weight=QuantFormat("int", 4, group_size=32),
                                                           embed_bits=8))
    export_gguf(model, tok, tmp_path / "m.gguf", gguf_type)
    ids = torch.tensor(tok(read_wikitext(text)[:20000])["input_ids"])
    windows = ids[: SEQ * WINDOWS].view(WINDOWS, SEQ)
    prompt = tok("The history of the Roman Empire")["input_ids"]
    ref = bench.reference(model, prompt, GEN, windows)
    got = bench.run_client(tmp_path / "m.gguf", prompt, GEN, windows.tolist(), timeout=600)
    tokens = WINDOWS * (SEQ - 1)
    ppl_ref, ppl_cpp = (math.exp(sum(r["window_nll"]) / tokens) for r in (ref, got))
    assert ppl_cpp == pytest.approx(ppl_ref, rel=ppl_rtol)
    i = bench.first_difference(ref["greedy_ids"], got["greedy_ids"])
    if i is not None:  # q4_0 here: at the second token, where transformers' logits of the two choices differ
        assert gguf_type != "f32" and i >= 1, (tok.decode(got["greedy_ids"]), tok.decode(ref["greedy_ids"]))
        s = ref["scores"][i]  # by 0.15 (a wrong weight would give a wrong token with a large gap)
        assert float(s[ref["greedy_ids"][i]] - s[got["greedy_ids"][i]]) < 0.5
