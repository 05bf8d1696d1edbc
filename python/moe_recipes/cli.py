"""``moe-kernels pretrain <recipe> --preset <name> [--out DIR] [key=value ...]``: run a recipe.

Also under a launcher: ``torchrun --nproc_per_node 2 -m moe_recipes.cli pretrain gppf --preset cpu-tiny``
or ``deepspeed --num_gpus 2 --module moe_recipes.cli pretrain mthl --preset paper deepspeed=ds.json`` (each
rank runs this; the trainer joins the process group the launcher describes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from typing import List, Optional

RECIPES = ("mthl", "gppf")


def _recipe(name: str):
    if name == "mthl":
        from .recipes import mthl

        return mthl, mthl.MTHLConfig
    if name == "gppf":
        from .recipes import gppf

        return gppf, gppf.GPPFConfig
    raise SystemExit(f"moe-kernels pretrain: unknown recipe {name!r}; the recipes are {list(RECIPES)}")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="the paper's recipe")
    p.add_argument("--preset", default="cpu-tiny", help="a preset name (moe_recipes/presets/<recipe>/) or a "
                   "path to a .toml / config.json")
    p.add_argument("--out", default=None, help="the run folder (default: runs/<recipe>-<preset>)")
    p.add_argument("--stages", default=None, help="comma-separated stages to run (default: all of the recipe's)")
    p.add_argument("--rows", default=None, help="mthl: comma-separated Tab. 3 rows for the adapt stage")
    p.add_argument("--fresh", action="store_true", help="delete the run folder's previous results first (default: "
                   "resume, and reuse every finished stage and row)")
    p.add_argument("--list-presets", action="store_true", help="print the recipe's presets and exit")
    p.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. train.steps=50)")
    # the deepspeed launcher passes --local_rank to each process (the trainer reads LOCAL_RANK instead)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run(args) -> int:
    from . import config

    module, cls = _recipe(args.recipe)
    if args.list_presets:
        print("\n".join(config.preset_names(args.recipe)))
        return 0
    try:
        cfg = config.load(cls, args.recipe, args.preset, args.overrides)
    except config.ConfigError as exc:
        print(f"moe-kernels pretrain: {exc}", file=sys.stderr)
        return 2
    out = args.out or f"runs/{args.recipe}-{cfg.preset}"
    if args.fresh and os.path.isdir(out) and os.listdir(out):
        if not os.path.exists(os.path.join(out, "config.json")):
            print(f"moe-kernels pretrain: --fresh: {out} is not a run folder (no config.json); not deleting it",
                  file=sys.stderr)
            return 2
        shutil.rmtree(out)
    stages = tuple(args.stages.split(",")) if args.stages else module.STAGES
    kwargs = {}
    if args.rows:
        kwargs["rows"] = args.rows.split(",")
    module.run(cfg, out, resume=not args.fresh, stages=stages, **kwargs)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="moe_recipes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # the deepspeed launcher puts --local_rank=N before the module's own arguments
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="cmd", required=True)
    add_arguments(sub.add_parser("pretrain", help="run a recipe"))
    args, rest = parser.parse_known_args(argv)
    if any("=" not in r or r.startswith("-") for r in rest):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.overrides = list(args.overrides) + rest
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
