"""benchmarks/adazeta_seeds.py: mean +- standard error over seeds and the forward-pass ratio to MeZO-LoRA's final."""

import importlib.util
import math
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "adazeta_seeds.py"


@pytest.fixture(scope="module")
def seeds_mod():
    spec = importlib.util.spec_from_file_location("adazeta_seeds", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_mean_se_is_sample_sd_over_sqrt_n(seeds_mod):
    r = seeds_mod.mean_se([1.0, 2.0, 4.0])
    assert r["mean"] == pytest.approx(7 / 3, abs=1e-4) and r["n"] == 3
    sd = math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    assert r["se"] == pytest.approx(sd / math.sqrt(3), abs=1e-4)
    assert seeds_mod.mean_se([0.5])["se"] is None
    assert seeds_mod.mean_se([None, float("nan")]) == {"mean": None, "se": None, "n": 0}


def _seed(lora: list[float], ada: list[float], to_final: int | None) -> dict:
    def run(curve, hit):
        return {"curve": [{"val_loss": v} for v in curve], "forward_passes": 4096, "acc_before": 0.5,
                "acc_after": 0.6, "to_final": None if hit is None else {"forward_passes": hit}}
    return {"results": {"sst2": {"mezo-lora": run(lora, 4096), "adazeta-fixed": run(ada, to_final)}}}


def test_aggregate_counts_seeds_that_reach_the_target_in_half_the_forwards(seeds_mod):
    out = seeds_mod.aggregate([_seed([1.2, 0.9, 0.6], [1.2, 0.7, 0.5], 1365),
                               _seed([1.1, 0.8, 0.7], [1.1, 0.9, 0.8], None)])["sst2"]
    ada = out["adazeta-fixed"]
    assert ada["to_final_ratio"] == [pytest.approx(1365 / 4096), None] and ada["reached_half"] == 1
    assert ada["final_val_loss"]["mean"] == pytest.approx(0.65) and ada["best_val_loss"]["mean"] == pytest.approx(0.65)
    assert out["mezo-lora"]["final_val_loss"]["mean"] == pytest.approx(0.65)
    assert out["mezo-lora"]["to_final_ratio"] == [1.0, 1.0] and out["mezo-lora"]["reached_half"] == 0
    assert ada["curves"] == [[1.2, 0.7, 0.5], [1.1, 0.9, 0.8]]
