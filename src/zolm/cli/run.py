"""``zolm run RECIPE``: run a recipe's stages (prune, quantize, finetune, eval), restarting where it stopped."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run a recipe: prune -> quantize -> finetune -> eval, restartable",
                       description="Runs the stages of a YAML recipe in order (see recipes/). Complete stages are "
                                   "skipped when run again; an interrupted fine-tuning stage resumes.")
    p.add_argument("recipe", help="a YAML recipe file")
    p.add_argument("--out", default=None, help="override the recipe's output directory")
    p.add_argument("--data-dir", default=None, help="override the recipe's data directory")
    p.add_argument("--model", default=None, help="override the recipe's input model")
    p.add_argument("--overwrite", action="store_true", help="delete the output directory first")


def run(args: argparse.Namespace) -> int:
    from zolm.pipeline import Recipe, run_recipe, summary_table

    recipe = Recipe.from_file(args.recipe, out=args.out, data_dir=args.data_dir, model=args.model)
    summaries = run_recipe(recipe, overwrite=args.overwrite)
    print("\n".join(summary_table(summaries)))
    print(f"pipeline summary: {recipe.out}/pipeline.json")
    return 0
