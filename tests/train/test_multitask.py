"""Task mixtures: the sampler follows the configured proportions; training reports every task and the average."""

import json

import pytest

from zolm.errors import ZolmError
from zolm.train.batches import Mixture, allocation
from zolm.train.config import FinetuneConfig
from zolm.train.loop import finetune


@pytest.mark.parametrize("weights", [[1, 1, 1], [1, 2, 5], [0.2, 0.8]])
def test_mixture_follows_the_proportions_exactly(weights):
    sizes = [7, 30, 100][:len(weights)]
    m = Mixture(sizes, batch_size=16, seed=0, weights=weights)
    totals = [0] * len(sizes)
    for step in range(1, 201):
        per_task, _ = m.step(step)
        assert sum(len(i) for i in per_task) == 16
        for t, (idx, n) in enumerate(zip(per_task, sizes)):
            assert all(0 <= i < n for i in idx)
            totals[t] += len(idx)
    share = [w / sum(weights) for w in weights]
    assert all(abs(tot - 16 * 200 * s) <= 1 for tot, s in zip(totals, share))


def test_each_task_cycles_through_all_its_examples():
    m = Mixture([6, 50], batch_size=4, seed=1)
    seen = [i for step in range(1, 4) for i in m.step(step)[0][0]]
    assert sorted(seen) == list(range(6))  # 3 steps x 2 examples = one epoch of task 0


def test_allocation_sums_to_the_batch():
    assert [sum(allocation(16, [1, 1, 1], s)) for s in range(1, 50)] == [16] * 49
    assert allocation(16, [1, 1], 1) == [8, 8]


def test_bad_weights_are_clear_errors():
    with pytest.raises(ZolmError, match="task_weights has 1 values for 2 tasks"):
        FinetuneConfig.of(out="o", task="sst2,rte", task_weights=[1.0])
    with pytest.raises(ZolmError, match="distinct tasks"):
        FinetuneConfig.of(out="o", task="sst2,sst2")
    with pytest.raises(ZolmError, match="non-negative"):
        Mixture([3, 3], 4, 0, weights=[1.0, -1.0])


@pytest.mark.parametrize("method", ["mezo", "fo-adamw"])
def test_multitask_run_reports_each_task_and_the_average(tiny_llama_dir, data_dir, tmp_path, method):
    cfg = FinetuneConfig.of(out=str(tmp_path / "mt"), model=tiny_llama_dir, task="sst2,rte,copa", data_dir=data_dir,
                         method=method, lr=1e-3, steps=4, batch_size=6, num_train=12, num_dev=3, num_test=4,
                         eval_every=2, eval_batch_size=4)
    results = finetune(cfg)
    for key in ("before", "after", "best_dev"):
        assert set(results[key]) == {"sst2", "rte", "copa", "average"}
        mean = sum(results[key][t]["accuracy"] for t in ("sst2", "rte", "copa")) / 3
        assert results[key]["average"] == pytest.approx(mean)
    lines = [json.loads(x) for x in (tmp_path / "mt" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert all(set(r["task_loss"]) == {"sst2", "rte", "copa"} for r in steps)
    for r in steps:  # the step loss is the batch-share-weighted mean of the task losses (2 examples each)
        assert r["loss"] == pytest.approx(sum(r["task_loss"].values()) / 3, rel=1e-6)
    assert any("dev_average" in r and "dev_rte_accuracy" in r for r in lines)
