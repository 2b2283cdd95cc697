"""Device choice without a GPU: --device checks, torchrun ranks -> cuda:LOCAL_RANK, module devices, the reducer.

torch.cuda and torch.distributed are monkeypatched, so these run on any CPU machine.
"""

import pytest
import torch
from torch import nn

from zolm.errors import ZolmError
from zolm.train.config import FinetuneConfig
from zolm.train.loop import placement
from zolm.utils import devices, dist


@pytest.fixture
def fake_gpus(monkeypatch):
    """Pretend this machine has 4 CUDA devices; records torch.cuda.set_device calls."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: calls[-1].index if calls else 0)
    return calls


@pytest.fixture
def torchrun(monkeypatch):
    def launch(local_rank: int, world: int = 2) -> None:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        monkeypatch.setenv("RANK", str(local_rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    return launch


def test_cpu_and_bad_names(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert devices.resolve_device(None) == torch.device("cpu") == devices.resolve_device("cpu")
    with pytest.raises(ZolmError, match="unknown device 'gpu'"):
        devices.resolve_device("gpu")


def test_cuda_without_cuda_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ZolmError, match=r"device 'cuda': CUDA is not available .*use --device cpu") as e:
        devices.resolve_device("cuda")
    assert "\n" not in str(e.value)


def test_each_torchrun_worker_gets_its_own_gpu(fake_gpus, torchrun):
    torchrun(local_rank=3, world=4)
    assert devices.resolve_device("cuda") == torch.device("cuda", 3)
    assert devices.resolve_device("cuda:1") == torch.device("cuda", 1), "an explicit index is kept"
    assert devices.resolve_device("cuda", distributed=False) == torch.device("cuda")


def test_single_process_keeps_plain_cuda(fake_gpus, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert devices.resolve_device("cuda") == torch.device("cuda")


def test_index_past_the_last_gpu(fake_gpus, torchrun):
    with pytest.raises(ZolmError, match="cuda:7: only 4 CUDA device"):
        devices.resolve_device("cuda:7")
    torchrun(local_rank=5, world=6)
    with pytest.raises(ZolmError, match="LOCAL_RANK 5 -> cuda:5: only 4"):
        devices.resolve_device("cuda")


def test_training_loop_places_each_worker(fake_gpus, torchrun):
    torchrun(local_rank=1)
    assert placement(FinetuneConfig.of(device="cuda")) == torch.device("cuda", 1)
    assert fake_gpus == [torch.device("cuda", 1)], "the worker's GPU becomes the current device"
    with pytest.raises(ZolmError, match="device_map .* cannot be combined with torchrun"):
        placement(FinetuneConfig.of(device_map="auto"))


def test_cpu_workers_never_touch_cuda(fake_gpus, torchrun):
    torchrun(local_rank=1)
    assert placement(FinetuneConfig.of(device="cpu")) == torch.device("cpu")
    assert fake_gpus == []


def test_init_binds_the_group_to_the_workers_gpu(fake_gpus, torchrun, monkeypatch):
    import torch.distributed as tdist

    torchrun(local_rank=1)
    seen = {}
    monkeypatch.setattr(tdist, "is_initialized", lambda: False)
    monkeypatch.setattr(tdist, "init_process_group", lambda **kw: seen.update(kw))
    assert dist.init(torch.device("cuda", 1))
    assert seen == {"backend": "cpu:gloo,cuda:nccl", "device_id": torch.device("cuda", 1)}
    assert fake_gpus == [torch.device("cuda", 1)]
    seen.clear()
    dist.init("cpu")
    assert seen == {"backend": "gloo"}


@pytest.mark.parametrize("backend,where", [("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu"), ("nccl", "cuda:2")])
def test_reducer_tensor_goes_where_the_group_reduces(fake_gpus, monkeypatch, backend, where):
    import torch.distributed as tdist

    fake_gpus.append(torch.device("cuda", 2))
    monkeypatch.setattr(tdist, "get_backend", lambda group=None: backend)
    assert dist.reduce_device() == torch.device(where)


def test_reducer_sums_on_the_chosen_device(torchrun, monkeypatch):
    import torch.distributed as tdist

    torchrun(local_rank=0)
    seen = []
    monkeypatch.setattr(dist, "reduce_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(tdist, "all_reduce", lambda t, op=None: (seen.append((t.device, t.dtype)), t.mul_(2)))
    r = dist.Reducer()
    assert r.sum([1.5, 2.0]) == [3.0, 4.0]
    assert seen == [(torch.device("cpu"), torch.float64)] and r.bytes_sent == 16


def test_module_device_prefers_the_accelerate_execution_device():
    lin = nn.Linear(2, 2)
    assert devices.module_device(lin) == torch.device("cpu")
    lin._hf_hook = type("Hook", (), {"execution_device": 1})()
    assert devices.module_device(lin) == torch.device("cuda", 1)
    assert devices.module_device(nn.ReLU()) == torch.device("cpu")


def test_map_device_longest_prefix():
    m = {"": "cpu", "model.layers": 0, "model.layers.1": 1}
    assert devices.map_device(m, "model.layers.1.mlp") == 1
    assert devices.map_device(m, "model.layers.10") == 0
    assert devices.map_device(m, "lm_head") == "cpu"
    assert devices.map_device({"model": 0}, "lm_head") is None


def test_to_device_walks_nested_arguments():
    x = torch.ones(1)
    out = devices.to_device({"a": (x, [x]), "n": 3}, torch.device("meta"))
    assert out["a"][0].device.type == "meta" and out["a"][1][0].device.type == "meta" and out["n"] == 3


def test_disk_offload_is_refused():
    with pytest.raises(ZolmError, match="offloads part of the model to disk"):
        devices.place_(nn.Linear(2, 2), device_map={"": "disk"})
