"""The ``zolm`` command: one module per subcommand, registered here explicitly."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys

from zolm import __version__
from zolm.cli import eval as eval_cmd
from zolm.cli import export, finetune, prune, quantize, replay, run
from zolm.errors import ZolmError

COMMANDS = {
    "finetune": finetune, "prune": prune, "quantize": quantize, "run": run, "eval": eval_cmd, "replay": replay,
    "export": export,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zolm", description="Zeroth-order fine-tuning, low-bit training and "
                                     "pruning of language models.")
    parser.add_argument("--version", action="version", version=f"zolm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()  # zolm shows its own bars
        return int(COMMANDS[args.command].run(args) or 0)
    except ZolmError as e:
        print(f"zolm: error: {e}", file=sys.stderr)
        return 2
    except re.error as e:  # a user's regular expression compiled outside zolm.utils.patterns
        print(f"zolm: error: invalid regular expression {e.pattern!r} ({e})", file=sys.stderr)
        return 2
    except OSError as e:  # a read or write the commands did not anticipate: still one line
        where = f"{e.filename}: " if e.filename else ""
        print(f"zolm: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zolm: interrupted (run the same command again to resume)", file=sys.stderr)
        return 130
