"""GGUF tokenizer metadata (``tokenizer.ggml.*``, gguf-py ``Keys.Tokenizer``) as llama.cpp's converter writes it.

Either copied verbatim from a reference GGUF whose token list is identical (the built-in SmolLM2 file by default),
or built from a Hugging Face BPE tokenizer: tokens, token types, merges, special token ids, ``add_bos_token`` and the
chat template. ``tokenizer.ggml.pre`` names the pre-tokenizer (split regex) that llama.cpp applies before BPE; like
``convert_hf_to_gguf.py``'s ``get_vocab_base_pre`` it is recognised by the sha256 of the token ids of a fixed
check text (the hashes below are those llama.cpp lists for the named models). A tokenizer whose only
pre-tokenizer is GPT-2's byte-level regex gets ``gpt-2``; anything else falls back to ``default`` with a warning
(pass ``pre=`` to name it).
"""

from __future__ import annotations

import json
import logging
from hashlib import sha256
from pathlib import Path

from zolm.errors import ZolmError

log = logging.getLogger(__name__)

# the check text of llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre), byte for byte
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) "
              "✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
              "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
              "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
PRE_BY_HASH = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # HuggingFaceTB/SmolLM-135M
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # meta-llama/Meta-Llama-3-8B
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",  # openai-community/gpt2
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen/Qwen1.5-7B
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",  # bigcode/starcoder2-3b
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",  # tiiuae/falcon-7b
    "b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166": "mpt",  # mosaicml/mpt-7b (also OLMo)
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # mistralai/Mistral-Nemo
    "32d85c31273f8019248f2559fed492d929ea28b17e51d81d3bb36fff23ca72b3": "stablelm2",
    "6221ad2852e85ce96f791f476e0b390cf9b474c9e3d1362f53a24a06dc8220ff": "refact",
    "9c2227e4dd922002fb81bde4fc02b0483ca4f12911410dee2255e4987644e3f8": "command-r",
    "a8594e3edff7c29c003940395316294b2c623e09894deebbc65f33f1515df79e": "dbrx",
}


def check_hash(tokenizer) -> str:
    """sha256 of ``str(tokenizer.encode(CHECK_TEXT))``: llama.cpp's ``chkhsh``."""
    return sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def _is_gpt2_byte_level(spec: dict) -> bool:
    pre = spec.get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not spec.get("normalizer")


def detect_pre(tokenizer) -> str:
    """The ``tokenizer.ggml.pre`` name of a Hugging Face tokenizer (see the module docstring)."""
    h = check_hash(tokenizer)
    if h in PRE_BY_HASH:
        return PRE_BY_HASH[h]
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if _is_gpt2_byte_level(spec):
        return "gpt-2"
    log.warning("unrecognised BPE pre-tokenizer (chkhsh %s): writing tokenizer.ggml.pre = 'default'", h)
    return "default"


def tokenizer_fields(tokenizer, reference: Path | None, pre: str | None = None) -> tuple[dict, str]:
    """GGUF tokenizer key -> (value, gguf value types): from ``reference`` if its vocabulary matches, else built."""
    from gguf import GGUFReader
    from gguf import GGUFValueType as T

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    if reference is not None and reference.is_file() and pre is None:
        r = GGUFReader(str(reference))
        if "tokenizer.ggml.tokens" in r.fields and r.fields["tokenizer.ggml.tokens"].contents() == tokens:
            return {k: (f.contents(), f.types) for k, f in r.fields.items() if k.startswith("tokenizer.")}, "copied"
    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    if spec.get("model", {}).get("type") != "BPE":
        raise ZolmError("GGUF export needs a BPE tokenizer (or a reference GGUF with the same vocabulary)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    added = set(tokenizer.get_added_vocab())
    special = set(tokenizer.all_special_ids)
    # llama.cpp token types: 1 normal, 3 control (special added tokens), 4 user defined (other added tokens)
    types = [3 if i in special else 4 if t in added else 1 for i, t in enumerate(tokens)]
    fields = {"tokenizer.ggml.model": ("gpt2", [T.STRING]),
              "tokenizer.ggml.pre": (pre or detect_pre(tokenizer), [T.STRING]),
              "tokenizer.ggml.tokens": (tokens, [T.ARRAY, T.STRING]),
              "tokenizer.ggml.token_type": (types, [T.ARRAY, T.INT32]),
              "tokenizer.ggml.merges": (merges, [T.ARRAY, T.STRING])}
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("padding", tokenizer.pad_token_id), ("unknown", tokenizer.unk_token_id)):
        if tid is not None:
            fields[f"tokenizer.ggml.{key}_token_id"] = (int(tid), [T.UINT32])
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer("a")["input_ids"][:1] == [bos]
    fields["tokenizer.ggml.add_bos_token"] = (bool(adds_bos), [T.BOOL])
    fields["tokenizer.ggml.add_space_prefix"] = (False, [T.BOOL])
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        fields["tokenizer.chat_template"] = (template, [T.STRING])
    return fields, "built"
