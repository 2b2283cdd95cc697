"""Adding TT adapters to tiny Llama / OPT models: placement, freezing, init effect, save/load/merge round trips."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from zolm.adapters import (
    TTAdapter,
    TTAdapterConfig,
    TTAdapterLinear,
    adapter_parameters,
    add_tt_adapters,
    is_adapter_dir,
    load_adapters,
    load_model_with_adapters,
    merge_adapters,
    remove_adapters,
    save_adapters,
)
from zolm.errors import ZolmError

IDS = torch.tensor([[1, 5, 9, 23, 7, 40, 3, 11], [1, 8, 2, 30, 30, 12, 6, 4]])
MODELS = ["tiny_llama_dir", "tiny_opt_dir"]
EXPECTED = {"tiny_llama_dir": {"gate_proj": "input", "up_proj": "input", "down_proj": "output"},
            "tiny_opt_dir": {"fc1": "input", "fc2": "output"}}


def fresh(request, fixture):
    return AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture)).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("fixture", MODELS)
def test_default_placement_and_only_adapters_train(request, fixture):
    model = fresh(request, fixture)
    names = add_tt_adapters(model, TTAdapterConfig(rank=2, bottleneck=8))
    leaf = {n.rsplit(".", 1)[-1] for n in names}
    assert leaf == set(EXPECTED[fixture]) and len(names) == 2 * len(leaf)  # two decoder blocks
    for n in names:
        w = model.get_submodule(n)
        assert isinstance(w, TTAdapterLinear) and w.side == EXPECTED[fixture][n.rsplit(".", 1)[-1]]
        hidden = model.config.hidden_size  # the adapter sits on the hidden-size side of every target
        assert w.tt_adapter.down.in_features == hidden and w.tt_adapter.down.out_features == 8
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model)) and trainable
    assert all(p.dtype == torch.float32 for p in adapter_parameters(model).values())


def test_smollm2_sized_llama_has_179k_adapter_parameters():
    """papers.md 6.2 / 9.2: 90 adapters x 1,990 = 179,100 (vs 460,800 for LoRA r=8 on q, v)."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    add_tt_adapters(model)
    assert sum(p.numel() for p in adapter_parameters(model).values()) == 179_100


def test_adapters_are_float32_on_a_bf16_model_and_keep_its_dtype(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    add_tt_adapters(model, TTAdapterConfig(rank=2, bottleneck=8))
    assert all(p.dtype == torch.float32 for p in adapter_parameters(model).values())
    assert logits(model).dtype == torch.bfloat16


@pytest.mark.parametrize("fixture", MODELS)
def test_initial_adapters_change_the_output_by_a_bounded_amount(request, fixture):
    """The reference init is not zero (papers.md 6.7): the adapted model differs from the base model, by an amount that
    is linear in the scaling s (small s) and exactly zero at s = 0; each adapter's change obeys the operator
    bound ||s U relu(D x + b_d) + s b_u|| <= s (||U|| (||D|| ||x|| + ||b_d||) + ||b_u||)."""
    base = logits(fresh(request, fixture))
    diffs = {}
    for s in (0.0, 0.001, 0.01):
        model = fresh(request, fixture)
        add_tt_adapters(model, TTAdapterConfig(rank=2, bottleneck=8, scaling=s, init="reference"))
        diffs[s] = float((logits(model) - base).norm() / base.norm())
    assert diffs[0.0] == 0.0 and diffs[0.001] > 0
    assert diffs[0.001] == pytest.approx(diffs[0.01] / 10, rel=0.1)
    seen = []
    for w in (m for m in model.modules() if isinstance(m, TTAdapterLinear)):
        w.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0])))
    logits(model)
    for w, inp in seen:
        x = inp if w.side == "input" else w.base_layer(inp)
        a, op = w.tt_adapter, lambda t: torch.linalg.matrix_norm(t, ord=2)
        bound = a.scaling * (op(a.up.dense_weight()) * (op(a.down.dense_weight()) * x.norm(dim=-1)
                                                          + a.down.bias.norm()) + a.up.bias.norm())
        assert bool((a.delta(x).norm(dim=-1) <= bound * (1 + 1e-5)).all())


def test_initial_adapter_change_has_the_expected_size(hidden=(2, 3), bottleneck=(2, 2)):
    """E_init ||Adapter(x) - x||^2 = s^2 [H/(H+b) * (b/(H+b) ||x||^2 + 1/3) / 2 + 1/3] (papers.md 6.1 init:
    W entries of variance 1/(N+M), biases U(-1/sqrt(M), 1/sqrt(M)); ReLU keeps half of a symmetric h)."""
    h, b = math.prod(hidden), math.prod(bottleneck)
    x = torch.randn(256, h, generator=torch.Generator().manual_seed(0))
    sq = float((x ** 2).sum(-1).mean())
    with torch.no_grad():
        got = [float((TTAdapter(hidden, bottleneck, 3, scaling=0.5, generator=torch.Generator().manual_seed(s),
                                init="reference")
                      .delta(x) ** 2).sum(-1).mean()) for s in range(2000)]
    expected = 0.25 * (h / (h + b) * (b / (h + b) * sq + 1 / 3) / 2 + 1 / 3)
    assert sum(got) / len(got) == pytest.approx(expected, rel=0.15)


def test_explicit_placement_filter_and_errors(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    one = TTAdapterConfig(rank=2, bottleneck=8, placement=[r"layers\.1\.mlp\.up_proj:output"])
    names = add_tt_adapters(model, one)
    assert names == ["model.layers.1.mlp.up_proj"] and model.get_submodule(names[0]).tt_adapter.down.in_features == 64
    with pytest.raises(ZolmError, match="already has a TT adapter"):
        add_tt_adapters(model, TTAdapterConfig(placement=["up_proj:input"]))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    only_first = add_tt_adapters(model, TTAdapterConfig(rank=2, bottleneck=8),
                                 filter_fn=lambda module, name: ".layers.0." in name)
    assert len(only_first) == 3
    with pytest.raises(ZolmError, match="matches no module of LlamaForCausalLM"):
        add_tt_adapters(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), TTAdapterConfig(placement=["fc9:input"]))
    with pytest.raises(ZolmError, match="selects model.embed_tokens, a Embedding; TT adapters wrap nn.Linear"):
        add_tt_adapters(model, TTAdapterConfig(placement=["embed_tokens:input"]))
    with pytest.raises(ZolmError, match="must look like 'module_pattern:input'"):
        TTAdapterConfig(placement=["gate_proj:inside"])
    with pytest.raises(ZolmError, match="no default TT adapter placement for Sequential"):
        add_tt_adapters(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_bad_shapes_get_a_clear_error_and_leave_the_model_alone(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(ZolmError, match="size 9 does not factorise into 3 TT modes"):
        add_tt_adapters(model, TTAdapterConfig(bottleneck=9))
    with pytest.raises(ZolmError, match=r"hidden modes \[4, 4, 4\] multiply to 64, but the adapted layer side has 32"):
        add_tt_adapters(model, TTAdapterConfig(hidden_modes=[4, 4, 4]))
    assert not any(isinstance(m, TTAdapterLinear) for m in model.modules())
    assert all(torch.equal(p, before[n]) and p.requires_grad for n, p in model.named_parameters())
    odd = torch.nn.Sequential()
    odd.add_module("fc1", torch.nn.Linear(31, 8))
    odd.add_module("fc2", torch.nn.Linear(8, 31))
    with pytest.raises(ZolmError, match="size 31 does not factorise"):
        add_tt_adapters(odd)


def _train_a_little(model):
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(0.05 * torch.randn_like(p))


@pytest.mark.parametrize("fixture", MODELS)
def test_save_load_round_trip(request, fixture, tmp_path):
    model = fresh(request, fixture)
    add_tt_adapters(model, TTAdapterConfig(rank=3, bottleneck=8, seed=3))
    _train_a_little(model)
    expected = logits(model)
    save_adapters(model, tmp_path / "ad", base_model=request.getfixturevalue(fixture))
    assert is_adapter_dir(tmp_path / "ad") and not is_adapter_dir(tmp_path)
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert meta["adapter_type"] == "zolm-tt" and meta["rank"] == 3 and meta["activation"] == "relu"
    assert set(meta["targets"]) == {n for n, m in model.named_modules() if isinstance(m, TTAdapterLinear)}
    loaded = load_adapters(fresh(request, fixture), tmp_path / "ad")
    assert torch.equal(logits(loaded), expected)
    again, _ = load_model_with_adapters(tmp_path / "ad")
    assert torch.equal(logits(again), expected)
    assert torch.equal(logits(remove_adapters(loaded)), logits(fresh(request, fixture)))


def test_loading_onto_the_wrong_base_fails_clearly(tiny_llama_dir, tiny_opt_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    add_tt_adapters(model, TTAdapterConfig(rank=2, bottleneck=8))
    save_adapters(model, tmp_path / "ad")
    with pytest.raises(ZolmError, match=r"adapts model.layers.0.mlp.\w+_proj, which the model lacks"):
        load_adapters(AutoModelForCausalLM.from_pretrained(tiny_opt_dir), tmp_path / "ad")
    with pytest.raises(ZolmError, match="is not a zolm TT adapter directory"):
        load_adapters(model, tmp_path)


@pytest.mark.parametrize("fixture", MODELS)
@pytest.mark.parametrize("bias", [True, False])
def test_identity_adapters_merge_exactly_and_reload_as_plain_models(request, fixture, bias, tmp_path):
    model = fresh(request, fixture)
    add_tt_adapters(model, TTAdapterConfig(rank=3, bottleneck=8, activation="identity", bias=bias, scaling=0.7))
    _train_a_little(model)
    expected = logits(model)
    merged = merge_adapters(model)
    assert not any(isinstance(m, TTAdapterLinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(logits(reloaded), expected, rtol=1e-5, atol=1e-5)
    if fixture == "tiny_llama_dir":  # Llama's MLP has no bias: a biased adapter turns mlp_bias on
        assert reloaded.config.mlp_bias is bias


def test_relu_adapters_refuse_to_merge(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    add_tt_adapters(model, TTAdapterConfig(rank=2, bottleneck=8))
    with pytest.raises(ZolmError, match="a relu adapter is not linear, so it cannot be merged"):
        merge_adapters(model)
    assert any(isinstance(m, TTAdapterLinear) for m in model.modules())  # nothing changed


@pytest.mark.slow
def test_smollm2_adapters_counts_and_initial_effect(smollm2):
    """papers.md 9.2 on the real model: 90 adapters, 179,100 parameters (vs LoRA r=8 on q,v: 460,800), shapes
    from its config (576 = 8 x 8 x 9). The paper's initialisation (s = 1) is *not* a small change at 135M: the
    output adapters scale with down_proj's output (RMS ~90 in the last block), so the next-token distribution
    moves by > 1 nat (docs/adazeta.md); at s = 0.1 it moves by < 0.1 nat and the top token stays."""
    import copy

    from peft import LoraConfig, get_peft_model

    base, tok = smollm2
    ids = tok(["The movie was great. It was", "Paris is the capital of", "Question: is the sky blue? Answer:"],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        ref = torch.log_softmax(base(**ids).logits[:, -1], -1)
    kl = {}
    for s in (1.0, 0.1):
        model = copy.deepcopy(base)
        names = add_tt_adapters(model, TTAdapterConfig(scaling=s))
        with torch.no_grad():
            got = torch.log_softmax(model(**ids).logits[:, -1], -1)
        kl[s] = float((ref.exp() * (ref - got)).sum(-1).max())
        same_top = bool((got.argmax(-1) == ref.argmax(-1)).all())
    assert len(names) == 3 * model.config.num_hidden_layers == 90
    w = model.get_submodule(names[0])
    assert (w.tt_adapter.down.in_modes, w.tt_adapter.down.out_modes) == ([8, 8, 9], [4, 4, 4])
    assert sum(p.numel() for p in adapter_parameters(model).values()) == 179_100
    assert kl[1.0] > 1.0 and 0 < kl[0.1] < 0.1 and same_top, kl
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == 460_800


@pytest.mark.parametrize("fixture", MODELS)
def test_default_adapters_leave_the_model_unchanged_at_start(request, fixture):
    """zero-up (the default): the adapted model's logits equal the base model's exactly, at any hidden size."""
    base = logits(fresh(request, fixture))
    model = fresh(request, fixture)
    add_tt_adapters(model, TTAdapterConfig(rank=2, bottleneck=8))
    assert torch.equal(logits(model), base)
