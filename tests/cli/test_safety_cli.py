"""Nothing a user types ends in a traceback or deletes what they have: every subcommand's outputs are guarded,
bad data and bad options get one line, and a walk over every option of every subcommand with values of the wrong
type (or out of range) never leaks an exception."""

import argparse
import json
import os
from pathlib import Path

import pytest

from tests.conftest import write_jsonl
from zolm.cli import build_parser, main


def run(capsys, *argv) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code, err, message=""):
    """Exit status 2 and one error line: zolm's own, or argparse's (after its usage text)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    if err.startswith("usage: "):
        assert ": error: " in err.strip().splitlines()[-1], err
    else:
        assert err.startswith("zolm: error: ") and len(err.strip().splitlines()) == 1, err
    assert message in err, err


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-safety") / "run"
    assert main(["finetune", "--model", tiny_llama_dir, "--data-dir", data_dir, "--steps", "2", "--batch-size", "2",
                 "--num-train", "4", "--num-dev", "2", "--num-test", "2", "--eval-every", "2", "--lr", "1e-3",
                 "--out", str(out)]) == 0
    return out


def precious(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "precious.txt").write_text("mine")
    return path


WRITERS = {
    "quantize": ["quantize", "--model", "{tiny}", "--bits", "8", "--embed-bits", "0"],
    "prune": ["prune", "--model", "{tiny}", "--method", "magnitude", "--sparsity", "0.5"],
    "export": ["export", "--model", "{tiny}", "--format", "hf"],
    "replay": ["replay", "{tiny}", "{log}"],
}


@pytest.mark.parametrize("cmd", sorted(WRITERS))
def test_nothing_a_user_has_is_deleted_without_overwrite(capsys, tiny_llama_dir, run_dir, tmp_path, cmd):
    argv = [a.format(tiny=tiny_llama_dir, log=run_dir / "replay.jsonl") for a in WRITERS[cmd]]
    mine = precious(tmp_path / "mine")
    one_line(*run(capsys, *argv, "--out", mine)[::2], "exists (a non-empty directory); use --overwrite")
    assert (mine / "precious.txt").read_text() == "mine"
    (tmp_path / "file.bin").write_text("mine")
    one_line(*run(capsys, *argv, "--out", tmp_path / "file.bin")[::2], "exists (a file)")
    assert (tmp_path / "file.bin").read_text() == "mine"
    one_line(*run(capsys, *argv, "--out", Path(tiny_llama_dir) / "sub")[::2], "is inside its input")
    one_line(*run(capsys, *argv, "--out", Path(tiny_llama_dir).parent, "--overwrite")[::2], "around its input")
    code, out, err = run(capsys, *argv, "--out", mine, "--overwrite")
    assert code == 0, err
    assert not (mine / "precious.txt").exists() and (mine / "config.json").is_file()


def test_replay_never_replaces_a_run_directory(capsys, tiny_llama_dir, run_dir, tmp_path):
    before = sorted(p.name for p in run_dir.iterdir())
    for extra in ([], ["--overwrite"]):
        one_line(*run(capsys, "replay", tiny_llama_dir, run_dir / "replay.jsonl", "--out", run_dir, *extra)[::2])
    other = tmp_path / "other-run"
    (other).mkdir()
    (other / "run_config.json").write_text("{}")
    one_line(*run(capsys, "replay", tiny_llama_dir, run_dir / "replay.jsonl", "--out", other, "--overwrite")[::2],
             "is a zolm run directory; it is never replaced")
    assert sorted(p.name for p in run_dir.iterdir()) == before
    code, out, err = run(capsys, "replay", tiny_llama_dir, run_dir / "replay.jsonl", "--out", tmp_path / "rebuilt")
    assert code == 0 and "verified: the weights match the hash recorded at step" in out, err
    one_line(*run(capsys, "replay", tiny_llama_dir, run_dir / "replay.jsonl", "--out", tmp_path / "r2",
                  "--step", "-1")[::2], "cannot replay to step -1")


def test_gguf_export_refuses_an_existing_file(capsys, tiny_llama_dir, tmp_path):
    (tmp_path / "m.gguf").write_text("mine")
    one_line(*run(capsys, "export", "--model", tiny_llama_dir, "--format", "gguf", "--out", tmp_path / "m.gguf")[::2],
             "exists (a file)")
    assert (tmp_path / "m.gguf").read_text() == "mine"


def test_unwritable_output_is_one_line(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    import errno
    import tempfile

    from zolm.utils import io

    def readonly(*a, dir=None, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(io.tempfile, "mkdtemp", readonly)
    one_line(*run(capsys, "quantize", "--model", tiny_llama_dir, "--bits", "8", "--out", tmp_path / "q")[::2],
             "could not write")
    monkeypatch.setattr(io.tempfile, "mkdtemp", tempfile.mkdtemp)
    (tmp_path / "f").write_text("x")
    one_line(*run(capsys, "prune", "--model", tiny_llama_dir, "--method", "magnitude", "--out",
                  tmp_path / "f" / "sub")[::2], "is not a directory")


def test_bad_data_and_patterns_are_one_line(capsys, tiny_llama_dir, tmp_path):
    base = ["finetune", "--model", tiny_llama_dir, "--steps", "1", "--batch-size", "2", "--num-dev", "0",
            "--num-test", "2", "--eval-every", "0"]
    rows = [{"sentence": f"s{i}", "label": i % 2} for i in range(6)]
    cases = {"float": (0.7, "line 4 has label 0.7; labels are integers"),
             "bool": (True, "line 4 has label true; labels are integers"),
             "range": (5, "line 4 has label 5, valid: 0..1")}
    for name, (label, message) in cases.items():
        d = tmp_path / name
        write_jsonl(d / "sst2" / "train.jsonl", rows[:3] + [{"sentence": "x", "label": label}] + rows[3:])
        write_jsonl(d / "sst2" / "validation.jsonl", rows)
        one_line(*run(capsys, *base, "--data-dir", d, "--out", tmp_path / f"o-{name}")[::2], message)
    d = tmp_path / "bytes"
    write_jsonl(d / "sst2" / "validation.jsonl", rows)
    write_jsonl(d / "sst2" / "train.jsonl", rows)
    with open(d / "sst2" / "train.jsonl", "ab") as f:
        f.write(b'{"sentence": "caf\xe9", "label": 1}\n')
    one_line(*run(capsys, *base, "--data-dir", d, "--out", tmp_path / "o-bytes")[::2],
             "train.jsonl:7: not valid UTF-8 (byte 0xe9")
    for flag in ("--train-params", "--freeze-params"):
        one_line(*run(capsys, *base, "--data-dir", tmp_path / "range", flag, "(", "--out", tmp_path / "o-re")[::2])


def test_prune_seqlen_beyond_the_model_positions(capsys, tiny_llama_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog . " * 400)
    one_line(*run(capsys, "prune", "--model", tiny_llama_dir, "--method", "wanda", "--calib-data", text,
                  "--seqlen", "100000", "--nsamples", "1", "--out", tmp_path / "p")[::2],
             "--seqlen 100000 is longer than the model's 256 positions (max_position_embeddings)")


# --------------------------------------------------------------------------- every option, wrong values
BASE = {
    "finetune": ["--model", "{tiny}", "--data-dir", "{data}", "--steps", "1", "--batch-size", "2", "--num-train", "4",
                 "--num-dev", "0", "--num-test", "2", "--eval-every", "0", "--no-eval-before", "--out", "{out}"],
    "prune": ["--model", "{tiny}", "--method", "magnitude", "--out", "{out}"],
    "quantize": ["--model", "{tiny}", "--bits", "8", "--out", "{out}"],
    "export": ["--model", "{tiny}", "--format", "hf", "--out", "{out}"],
    "eval": ["--model", "{tiny}", "--task", "sst2", "--data-dir", "{data}", "--num-test", "2"],
    "replay": ["{tiny}", "{log}", "--out", "{out}"],
    "run": ["{recipe}", "--out", "{out}"],
}
FREE_TEXT = {"--out", "--tokenizer-pre"}  # any string is a valid value
# Values that the base command does not use (checked only by the method / format / stage that needs them): they
# may be accepted (exit 0), never a traceback. finetune's are FinetuneConfig's (validated per method today).
UNUSED = {("finetune", f) for f in ("--freeze-params", "--lora-targets", "--format", "--fp8-variant", "--fp16-scales",
                                    "--update-rounding", "--mask-params")}
UNUSED |= {("prune", "--calib-data"), ("prune", "--data-dir"), ("run", "--data-dir"), ("export", "--gguf-type"),
           ("export", "--tokenizer-gguf")}


def options():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for cmd, parser in sub.choices.items():
        for action in parser._actions:
            if action.option_strings and action.nargs != 0 and action.dest != "help":
                yield cmd, action


WRONG = [(cmd, a.option_strings[-1], a.type or (str if a.choices is None else "choice"))
         for cmd, a in options()]


def argv_for(cmd, flag, values, paths):
    base = [x.format(**paths) for x in BASE[cmd]]
    if flag in base:  # the option under test replaces the base value
        i = base.index(flag)
        del base[i:i + 2]
    return [cmd, *base, flag, *values]


@pytest.fixture(scope="module")
def paths(tiny_llama_dir, data_dir, run_dir, tmp_path_factory):
    recipe = tmp_path_factory.mktemp("recipe") / "r.yaml"
    recipe.write_text(json.dumps({"model": tiny_llama_dir, "out": "x", "stages": [{"eval": {}}]}))
    return {"tiny": tiny_llama_dir, "data": data_dir, "log": str(run_dir / "replay.jsonl"), "recipe": str(recipe)}


@pytest.mark.parametrize("cmd", sorted(BASE))
def test_the_base_commands_run(capsys, paths, tmp_path, cmd):
    """Each walk below changes one option of a command that succeeds as is (else the walk would prove nothing)."""
    code, _, err = run(capsys, cmd, *[x.format(**paths, out=str(tmp_path / "out")) for x in BASE[cmd]])
    assert code == 0, err


@pytest.mark.parametrize("cmd,flag,kind", WRONG, ids=[f"{c}{f}" for c, f, _ in WRONG])
def test_every_option_with_a_wrong_type_is_refused_in_one_line(capsys, paths, tmp_path, cmd, flag, kind):
    if flag in FREE_TEXT:
        pytest.skip("any text is a valid value")
    p = {**paths, "out": str(tmp_path / "out")}
    code, _, err = run(capsys, *argv_for(cmd, flag, ["%%not-a-value%%"], p))
    if (cmd, flag) in UNUSED and code == 0:
        return
    one_line(code, err)


NUMERIC = [(c, f, k) for c, f, k in WRONG if k in (int, float)]


@pytest.mark.slow
@pytest.mark.parametrize("cmd,flag,kind", NUMERIC, ids=[f"{c}{f}" for c, f, _ in NUMERIC])
def test_every_numeric_option_out_of_range_never_leaks(capsys, paths, tmp_path, cmd, flag, kind):
    """Values of the right type but out of range: refused in one line, or accepted and run (exit 0)."""
    huge = [] if flag in ("--steps", "--queries") else [["100000"]]  # (a run of 100000 steps would just run)
    for value in [["-7"], ["0"]] + ([["nan"], ["1e30"]] if kind is float else huge):
        p = {**paths, "out": str(tmp_path / f"out{value[0]}")}
        code, _, err = run(capsys, *argv_for(cmd, flag, value, p))
        assert code in (0, 2) and "Traceback" not in err, err
        if code == 2:
            one_line(code, err)
    assert os.path.isdir(paths["tiny"])


def test_a_recipe_never_writes_into_a_users_folder(capsys, paths, tmp_path):
    mine = precious(tmp_path / "mine")
    one_line(*run(capsys, "run", paths["recipe"], "--out", mine)[::2], "exists (a non-empty directory)")
    assert (mine / "precious.txt").read_text() == "mine"
    one_line(*run(capsys, "run", paths["recipe"], "--out", Path(paths["tiny"]).parent, "--overwrite")[::2],
             "around its input")
    assert Path(paths["tiny"], "config.json").is_file()
