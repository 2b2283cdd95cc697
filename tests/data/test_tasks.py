"""MeZO's sampling protocol and the clear errors bad data gets."""

import json

import pytest

from tests.conftest import SHARED_DATA, write_jsonl
from zolm.data.tasks import TASKS, get_task, load_rows, load_splits
from zolm.errors import ZolmError


def test_sampling_is_seeded_disjoint_and_sized(data_dir):
    s = load_splits("sst2", data_dir, num_train=10, num_dev=6, num_test=5, seed=0)
    assert (len(s.train), len(s.dev), len(s.test)) == (10, 6, 5)
    again = load_splits("sst2", data_dir, num_train=10, num_dev=6, num_test=5, seed=0)
    assert s.train == again.train and s.dev == again.dev and s.test == again.test
    other = load_splits("sst2", data_dir, num_train=10, num_dev=6, num_test=5, seed=1)
    assert other.train != s.train


def test_dev_is_the_tail_of_the_train_sample(data_dir):
    """MeZO: one permutation gives num_train + num_dev rows; dev is the last num_dev of them."""
    both = load_splits("sst2", data_dir, num_train=20, num_dev=10, num_test=1, seed=3)
    no_dev = load_splits("sst2", data_dir, num_train=30, num_dev=0, num_test=1, seed=3)
    assert both.train + both.dev == no_dev.train


def test_small_train_split_gives_fewer_examples(data_dir):
    s = load_splits("copa", data_dir, num_train=1000, num_dev=4, num_test=1000)
    assert (len(s.train), len(s.dev), len(s.test)) == (6, 4, 4)


def test_task_without_train_split_is_carved_from_validation(data_dir):
    s = load_splits("squad", data_dir, num_train=100, num_dev=2, num_test=100)
    assert len(s.test) == 6 and len(s.train) + len(s.dev) == 6
    assert s.task.kind == "generation" and s.test[0].answers == ("the Nile", "Nile")


def test_multirc_is_flattened(data_dir):
    rows = load_rows(get_task("multirc"), "train", data_dir)
    assert len(rows) == 4 * 2 * 2
    assert rows[0]["answer"] == "blue" and rows[0]["label"] == 1 and "Passage 0" in rows[0]["paragraph"]


def test_unknown_task_lists_the_valid_ones():
    with pytest.raises(ZolmError, match=r"unknown task 'sst3'; valid: arc_challenge, arc_easy, boolq, cb, copa, "
                                        r"multirc, openbookqa, piqa, rte, squad, sst2, wic, winogrande, wsc$"):
        get_task("sst3")


def test_malformed_line_names_file_and_line(tmp_path):
    write_jsonl(tmp_path / "sst2" / "train.jsonl", [{"sentence": "ok", "label": 1}])
    with open(tmp_path / "sst2" / "train.jsonl", "a") as f:
        f.write('{"sentence": "broken", "label": \n')
    write_jsonl(tmp_path / "sst2" / "validation.jsonl", [{"sentence": "ok", "label": 1}])
    with pytest.raises(ZolmError, match=r"sst2/train\.jsonl:2: malformed JSON line"):
        load_splits("sst2", tmp_path)


def test_missing_field_lists_the_task_fields(tmp_path):
    write_jsonl(tmp_path / "rte" / "validation.jsonl", [{"premise": "p", "label": 0}])
    expected = r"line 1 lacks field\(s\) hypothesis; this task needs: premise, hypothesis, label"
    with pytest.raises(ZolmError, match=expected):
        load_splits("rte", tmp_path)


def test_missing_files_and_folders_are_named(tmp_path):
    with pytest.raises(ZolmError, match="data directory not found"):
        load_splits("sst2", tmp_path / "nope")
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "test.jsonl").write_text(json.dumps({"sentence": "x", "label": 0}) + "\n")
    with pytest.raises(ZolmError, match=r"missing data file .*validation\.jsonl; .* has: test"):
        load_splits("sst2", tmp_path)


def test_label_out_of_range_is_reported(tmp_path):
    write_jsonl(tmp_path / "sst2" / "validation.jsonl", [{"sentence": "x", "label": 7}])
    with pytest.raises(ZolmError, match="label 7, valid: 0..1"):
        load_splits("sst2", tmp_path, num_train=0)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data beside the checkout")
@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_loads_from_the_shared_data(task):
    s = load_splits(task, SHARED_DATA, num_train=20, num_dev=10, num_test=20)
    assert len(s.test) >= 20 and len(s.train) == 20 and len(s.dev) == 10
    assert all(0 <= ex.gold < len(ex.candidates) for ex in s.test)


def test_hub_loading_without_data_dir(monkeypatch):
    """Without --data-dir rows come from datasets.load_dataset(path, name, split)."""
    import datasets

    calls = []

    def fake_load(path, name, split):
        calls.append((path, name, split))
        return [{"premise": f"p{i}", "hypothesis": "h", "label": i % 2, "idx": i} for i in range(8)]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    s = load_splits("rte", None, num_train=4, num_dev=2, num_test=3)
    assert ("super_glue", "rte", "validation") in calls and ("super_glue", "rte", "train") in calls
    assert (len(s.train), len(s.dev), len(s.test)) == (4, 2, 3)


def test_unreachable_hub_is_one_line(monkeypatch):
    import datasets

    def fail(*a, **k):
        raise ConnectionError("no network\nmore details")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(ZolmError, match=r"could not load glue/sst2 \[validation\] from the hub \(no network\); "
                                        r"pass --data-dir"):
        load_splits("sst2", None)


def test_zero_shot_evaluation_keeps_the_whole_test_split(data_dir):
    s = load_splits("squad", data_dir, num_train=0, num_dev=0, num_test=100)
    assert (len(s.train), len(s.dev), len(s.test)) == (0, 0, 12)
