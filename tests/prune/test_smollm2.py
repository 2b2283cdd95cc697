"""The real SmolLM2-135M (slow): Wanda++ 2:4 end to end, exact pattern, compressed copy smaller on disk."""

import copy

import pytest
import torch

from tests.conftest import SHARED_DATA
from zolm import models
from zolm.compressed import load_compressed, save_compressed
from zolm.data.calibration import calibration_ids
from zolm.eval.perplexity import perplexity, read_wikitext
from zolm.prune import PruneConfig, prune_

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data beside the checkout")]


def dir_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def test_wanda_pp_24_on_smollm2(smollm2, tmp_path):
    dense, tok = smollm2
    model = copy.deepcopy(dense)
    calib = calibration_ids(tok, "c4", SHARED_DATA, nsamples=8, seqlen=128)
    # lr 1e-4 for M = 4: the default 2e-4 is tuned for M = 8 and overshoots in blocks 1, 2 with 4 steps of 8 x 128
    config = PruneConfig(method="wanda++", nm="2:4", ro_rounds=1, ro_samples=4, ro_lr=1e-4, ro_log_errors=True)
    report = prune_(model, config, calib)
    assert len(report.layers()) == 30 * 7 and all(lay.nm_violations == 0 for lay in report.layers())
    assert all(r["rel_error_after"] < r["rel_error_before"] for b in report.blocks for r in b.details["ro"])
    assert torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    ids = torch.tensor(tok(read_wikitext(SHARED_DATA / "wikitext2" / "wiki.test.raw"))["input_ids"])
    ppl_dense = perplexity(dense, ids, 256, max_windows=4)["perplexity"]
    ppl = perplexity(model, ids, 256, max_windows=4)["perplexity"]
    assert ppl_dense < ppl < 50 * ppl_dense

    models.save(model, tok, tmp_path / "p")
    save_compressed(model, tok, tmp_path / "c")
    assert dir_bytes(tmp_path / "c") < 0.75 * dir_bytes(tmp_path / "p")
    again, _ = load_compressed(tmp_path / "c")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
