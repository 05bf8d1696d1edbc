"""The ``moe-kernels`` command line.

    moe-kernels info     what is installed: versions, devices, each backend and why (not) available
    moe-kernels demo     a short MoE training run on built-in synthetic multi-source data
"""

from __future__ import annotations

import argparse
import contextlib
import io
import importlib
import os
import platform
import sys
import warnings


def _version_of(module: str) -> str:
    try:
        # peers print banners and warnings on import; the report shows only their versions
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            mod = importlib.import_module(module)
    except Exception as exc:  # report, never crash the report
        return f"not installed ({type(exc).__name__})" if isinstance(exc, ImportError) else f"broken: {exc}"
    return getattr(mod, "__version__", "installed")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def info(out=sys.stdout) -> int:
    import torch

    import moe_kernels as mk
    from moe_kernels._validation import CHECK_VALUES_ENV
    from moe_kernels.backends import BACKENDS, ENV_VAR, PREFERENCE

    def row(k, v):
        print(f"  {k:<22} {v}", file=out)

    print("moe_kernels report", file=out)
    print("-" * 72, file=out)
    row("moe_kernels", f"{mk.__version__}  ({os.path.dirname(mk.__file__)})")
    row("python", f"{platform.python_version()}  ({sys.executable})")
    row("torch", f"{torch.__version__}  (cuda {torch.version.cuda or 'none'})")
    row("platform", f"{platform.platform()}")
    row("cpu", f"{_cpu_model()}; {os.cpu_count()} cores; torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            row(f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        row("cuda", "no CUDA device visible")
    print("\nbackends", file=out)
    print("-" * 72, file=out)
    for name, b in BACKENDS.items():
        state = "available" if b.available else "NOT available"
        row(name, f"{state}: {b.reason}")
        if not b.available:
            row("", f"to get it: {b.how_to_get}")
        elif name != "reference":
            native = sorted(n for n, k in b.kernels.items() if not k.delegated_to)
            row("", f"{len(native)} kernels: {', '.join(native)}")
            by = {}
            for op, to in b.delegated.items():
                by.setdefault(to, []).append(op)
            for to, ops in sorted(by.items()):
                row("", f"delegated to {to} by design: {', '.join(sorted(ops))}")
    env = os.environ.get(ENV_VAR)
    row(ENV_VAR, env if env else "(unset: choose by device)")
    chk = os.environ.get(CHECK_VALUES_ENV)
    row(CHECK_VALUES_ENV, chk if chk else "(unset: synchronous value checks on CPU tensors, sync-free elsewhere)")
    for dev, prefs in PREFERENCE.items():
        chosen = next((p for p in prefs if BACKENDS[p].available), "reference")
        row(f"auto on {dev}", f"{chosen}  (preference {' > '.join(prefs)})")
    print("\nintegrations", file=out)
    print("-" * 72, file=out)
    from moe_kernels.integrations import transformers as hf  # imports transformers only if present

    ok, why = hf.available()
    row("transformers", f"{'available' if ok else 'NOT available'}: {why}")
    print("\noptional peers and tools", file=out)
    print("-" * 72, file=out)
    for mod in ("triton", "deepspeed", "transformers", "megatron.core", "ninja", "pytest_benchmark"):
        row(mod, _version_of(mod))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moe-kernels", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, devices and backends (like ds_report)")
    demo = sub.add_parser("demo", help="short MoE training run on synthetic multi-source data")
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--backend", default=None)
    demo.add_argument("--no-bench", action="store_true", help="skip the closing benchmark table")
    try:  # the recipes install with the library (python/moe_recipes); absent only in a stripped install
        from moe_recipes import cli as recipes_cli
    except ImportError:
        recipes_cli = None
    if recipes_cli is not None:
        recipes_cli.add_arguments(sub.add_parser("pretrain", help="run a paper's recipe (moe_recipes): "
                                                 "pre-training, its studies and report.md"))
    # overrides (key=value) may come before or after the options
    args, rest = parser.parse_known_args(argv)
    if rest and (args.cmd != "pretrain" or any("=" not in r or r.startswith("-") for r in rest)):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "info":
        return info()
    if args.cmd == "pretrain":
        args.overrides = list(args.overrides) + rest
        return recipes_cli.run(args)
    from moe_kernels.demo import run

    return run(steps=args.steps, seed=args.seed, backend=args.backend, bench=not args.no_bench)


if __name__ == "__main__":
    sys.exit(main())
