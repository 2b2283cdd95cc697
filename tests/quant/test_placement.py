"""A quantized model honours dtype and device_map: float parts cast, codes and scales kept, dispatch works."""

import pytest
import torch

from zolm import models
from zolm.quant import QuantConfig, QuantEmbedding, QuantFormat, QuantLinear, quantize_
from zolm.quant.placement import _tied_head_follows_embedding, cast_float_parts_, place_quantized_

X = torch.tensor([[1, 5, 9, 13, 17, 21]])


@pytest.fixture(scope="module", params=[8, None], ids=["int8-embedding", "float-embedding"])
def quant_dir(request, tiny_llama_dir, tmp_path_factory):
    model, tok = models.load(tiny_llama_dir)
    if request.param is None:  # a float embedding and an untied float LM head (a tied float pair cannot save)
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    quantize_(model, QuantConfig(weight=QuantFormat("int", 4, group_size=16), embed_bits=request.param))
    return str(models.save(model, tok, tmp_path_factory.mktemp("q") / "model"))


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(X).logits


def test_dtype_casts_the_float_parts_only(quant_dir):
    ref, _ = models.load(quant_dir)
    model, _ = models.load(quant_dir, dtype="bfloat16")
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, name
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantEmbedding)):
            assert m.scale.dtype == torch.float32, name
            assert m.qweight.dtype == dict(ref.named_modules())[name].qweight.dtype, name
    out = _logits(model)
    assert out.dtype == torch.bfloat16, "the model computes in bf16 from the embedding on"
    assert torch.allclose(out.float(), _logits(ref), atol=0.1)


def test_device_map_dispatches_a_quantized_model(quant_dir):
    ref, _ = models.load(quant_dir)
    model, _ = models.load(quant_dir, device_map={"": "cpu"})
    assert torch.equal(_logits(model), _logits(ref))
    auto, _ = models.load(quant_dir, device_map="auto")
    assert torch.equal(_logits(auto), _logits(ref))


def test_per_block_map_with_hooks(quant_dir):
    ref, _ = models.load(quant_dir)
    model, _ = models.load(quant_dir)
    per_block = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
                 "model.rotary_emb": "cpu", "lm_head": "cpu"}
    place_quantized_(model, device_map=per_block, force_hooks=True)
    assert hasattr(model.model.layers[1], "_hf_hook")
    assert torch.equal(_logits(model), _logits(ref))


def test_tied_quantized_head_follows_the_embedding(tiny_llama_dir):
    model, _ = models.load(tiny_llama_dir)
    quantize_(model, QuantConfig(embed_bits=8))
    m = {"model.embed_tokens": 0, "model.layers": 1, "model.norm": 1, "lm_head": 1}
    assert _tied_head_follows_embedding(model, m)["lm_head"] == 0
    assert _tied_head_follows_embedding(model, {"": 0}) == {"": 0}


def test_cast_is_idempotent_and_keeps_one_hook(tiny_llama_dir):
    model, _ = models.load(tiny_llama_dir)
    quantize_(model, QuantConfig(embed_bits=8))
    cast_float_parts_(model, torch.bfloat16)
    cast_float_parts_(model, torch.float16)
    assert len(model.get_input_embeddings()._forward_hooks) == 1
    assert _logits(model).dtype == torch.float16
