"""Issue 15's table: bad inputs and faults tried on tiny models, and what came of them. Prints one JSON line.

Runs the bad-input, fault, replay-tampering and architecture tests (slow ones included: the walk of every numeric
option out of range, kill -9 at 20 random moments, every method on 8 architectures) through pytest, reads its
JUnit report and counts cases per category. Every case asserts its own outcome: a one-line error and exit status 2
(never a traceback), a resumed run bit-identical to an uninterrupted one (no run lost), a tampered log refused.

    .venv/bin/python benchmarks/safety.py            # ~8 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = ["tests/cli/test_safety_cli.py", "tests/cli/test_cli.py", "tests/cli/test_device_cli.py",
         "tests/train/test_run_faults.py", "tests/train/test_replay_verify.py", "tests/train/test_kill_resume.py",
         "tests/test_architectures.py", "tests/data/test_tasks.py"]
# test name (prefix) -> category
CATEGORIES = {
    "test_every_option_with_a_wrong_type": "inputs", "test_every_numeric_option_out_of_range": "inputs",
    "test_bad_input_gets_one_line": "inputs", "test_bad_data_and_patterns": "inputs",
    "test_prune_seqlen": "inputs", "test_nothing_a_user_has_is_deleted": "outputs",
    "test_replay_never_replaces": "outputs", "test_gguf_export_refuses": "outputs",
    "test_unwritable_output": "outputs",
    "test_finetune_and_prune_refuse_cuda": "inputs", "test_malformed_line": "inputs", "test_missing_field": "inputs",
    "test_label_out_of_range": "inputs",
    "test_interrupted_before": "faults", "test_relative_and_absolute": "faults", "test_kill_between": "faults",
    "test_a_full_disk": "faults", "test_a_non_finite_update": "faults", "test_a_second_writer": "faults",
    "test_a_directory_with_a_users_files": "faults", "test_a_float16_divergence": "faults",
    "test_random_kills": "kills", "test_a_recipe_never_writes": "outputs",
    "test_a_tampered_log": "tampered", "test_a_wrong_base": "tampered",
    "test_quantize_with_no_extra_flags": "architectures", "test_prune_with_no_extra_flags": "architectures",
    "test_masks_and_tt_adapters": "architectures", "test_methods_run_with_todays_flags": "architectures",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fast", action="store_true", help="skip the slow tests")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "report.xml"
        marks = "not slow and not cuda" if args.fast else "not cuda"
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marks,
                               f"--junitxml={xml}", *FILES], cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        cases = ET.parse(xml).getroot().iter("testcase")
        counts: dict[str, dict[str, int]] = {}
        for case in cases:
            name = case.get("name", "")
            cat = next((c for p, c in CATEGORIES.items() if name.startswith(p)), None)
            if cat is None:
                continue
            state = ("failed" if case.find("failure") is not None or case.find("error") is not None
                     else "skipped" if case.find("skipped") is not None else "passed")
            counts.setdefault(cat, {"passed": 0, "failed": 0, "skipped": 0})[state] += 1
    failed = sum(c["failed"] for c in counts.values())
    print(json.dumps({"cases": counts, "failed": failed, "pytest_exit": proc.returncode,
                      "seconds": round(seconds, 1), "tail": proc.stdout.strip().splitlines()[-1:]}))


if __name__ == "__main__":
    main()
