"""Pruning a model sharded with a device_map: every block's calibration runs where the block is.

On the CPU the map sends every block to "cpu" with accelerate's hooks forced on, which runs the sharded code path
(hooks, execution devices, buffers moved per block); the result must equal pruning the plain model.
"""

import pytest
import torch

from tests.prune.conftest import calib_ids, tiny_model
from zolm.blocks import BlockInputs
from zolm.errors import ZolmError
from zolm.prune import calibrate
from zolm.prune.api import PruneConfig, prune_
from zolm.utils.devices import place_

PER_BLOCK = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu", "model.norm": "cpu",
             "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("method,extra", [("wanda", {}), ("sparsegpt", {}), ("wanda++", {"ro_rounds": 1})])
def test_sharded_model_prunes_like_the_plain_one(method, extra, monkeypatch):
    plain, sharded = tiny_model("llama"), place_(tiny_model("llama"), device_map=PER_BLOCK, force_hooks=True)
    assert hasattr(sharded.model.layers[0], "_hf_hook")
    cfg = PruneConfig(method=method, nm="2:4", ro_samples=2, **extra)
    a = prune_(plain, cfg, calib_ids())
    seen = []
    real = calibrate.block_device
    monkeypatch.setattr(calibrate, "block_device", lambda b, n="block": (seen.append(n), real(b, n))[1])
    b = prune_(sharded, cfg, calib_ids())
    assert seen == ["model.layers.0", "model.layers.1"], "each block's device is looked up before it runs"
    assert a.sparsity == b.sparsity == 0.5
    for (name, p), q in zip(plain.state_dict().items(), sharded.state_dict().values()):
        assert torch.equal(p, q), name


def test_offloaded_block_is_refused():
    model = tiny_model("llama")
    model.model.layers[1].to("meta")
    with pytest.raises(ZolmError, match="model.layers.1 is offloaded"):
        prune_(model, PruneConfig(method="wanda"), calib_ids())


def test_block_inputs_move_with_their_arguments():
    x = torch.ones(2, 3, 4)
    inputs = BlockInputs(x, (torch.zeros(1),), {"position_embeddings": (torch.ones(1), torch.ones(1)), "k": 1})
    assert inputs.to(torch.device("cpu")) is inputs
    moved = inputs.to(torch.device("meta"))
    assert moved.hidden.is_meta and moved.args[0].is_meta and moved.kwargs["position_embeddings"][1].is_meta
    assert moved.kwargs["k"] == 1
