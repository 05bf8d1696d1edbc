"""Nothing may get slower: one benchmark run alternately in two checkouts, compared cell by cell.

    git worktree add --detach ../moe_kernels-base f15fb29
    python benchmarks/compare_revisions.py --base ../moe_kernels-base --rounds 3 -- bench_overhead.py --reps 5
    python benchmarks/compare_revisions.py --base ../moe_kernels-base -- bench_moe_layer.py --quick \\
        --candidates moe_kernels,dense,grouped

SCRIPT (a file of ``benchmarks/``) runs with ARGS in the base checkout (``--base``, another revision)
and in this one, alternately: base, new, base, new, ... (``--rounds`` runs of each), each run a fresh
process in its checkout's root with ``PYTHONPATH=<checkout>``, so it imports that checkout's
moe_kernels (the variable wins over an editable install), and each writing its results as JSON
into a scratch folder. When the base checkout does not have SCRIPT (it is newer than the base, as
bench_overhead.py is), the script is copied into the base's ``benchmarks/`` first: only that file,
and only scripts that use nothing but the library's public API (``COPYABLE``); a copy made by an
earlier comparison (a file the base's git does not track) is refreshed. Nothing else in the base
checkout is written (no bytecode either).

Per cell (shape, dtype, mode, candidate): each run gives one median (the script's own median over
its repetitions); the table shows the median of those per-round medians for base and new, their
spread [min, max], and new / base. Because this machine drifts between runs, each row also gives
the cell's ratio to a reference measured in the same run (bench_moe_layer.py: the better of its two
pure-torch lower bounds, `dense` / `grouped`, i.e. the table's `x LB`; bench_overhead.py: the
pure-torch `bare_torch`), median over the rounds, and new / base of that: drift cancels in it. The
pure-torch references themselves get their own rows ("gauge": the same code in both trees; their
new / base shows how much the machine moved between the runs).

Verdict of a library cell, with tolerance t (``--tolerance``, default 0.05):
  slower   new / base > 1 + t, every new round slower than every base round (at least 3 rounds:
           with n rounds each, that order comes by chance with p = n!^2 / (2n)!, 1/6 for 2 rounds,
           1/20 for 3), and (where there is a reference) new / base against the reference > 1 + t;
  faster   the same the other way;
  slower?  new / base, or new / base against the reference, > 1 + t without the rest: maybe noise,
           rerun with more rounds;
  same     otherwise.
A backend that differs between the two trees (e.g. the C++ backend unavailable in one) is shown in
the backend column; the cell is judged all the same. The exit status is 1 when a cell is slower.

Writes ``--out`` (default ``benchmarks/results/compare_<script>[-quick]``) ``.json`` (every round's
numbers) and ``.md`` (the tables), and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness

TREE = harness.BENCH_DIR.parent
MODE_ORDER = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}
MIN_ROUNDS = 3  # the fewest rounds whose order can confirm a change (p = 1/20, see verdict)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- what each script writes

class MoeLayer:
    """bench_moe_layer.py: ``--out STEM`` writes STEM.json; one table per (config, dtype)."""

    unit, scale, ref_name = "ms", 1e3, "x LB"

    def before(self) -> list:  # options put before the command line's (which win)
        return []

    def after(self, stem: Path) -> list:  # options put after them: how the run writes its JSON
        return ["--out", str(stem)]

    def read(self, stem: Path, stdout: str) -> dict:
        return json.loads(Path(f"{stem}.json").read_text())["results"]

    def cells(self, tables: list) -> dict:
        out = {}
        for tab in tables:
            shape = " ".join(f"{k}={v}" for k, v in tab["shape"].items())
            where = f"{tab['config']} {shape} {tab['dtype']}"
            for row in tab["rows"]:
                name = row["candidate"]
                role = "library" if name.startswith("moe_kernels") else "gauge" if name in ("dense", "grouped") else None
                if role is None or "skipped" in row:
                    continue
                for mode, title in harness.MODE_TITLES.items():
                    out[(where, title, name)] = {
                        "value": row["timings"][mode]["median_s"], "backend": row["backend"], "role": role,
                        "ref": tab["best_bound_s"][mode] if role == "library" else None}
        return out


class Overhead:
    """bench_overhead.py: ``--json`` prints one JSON object; one cell per T. The shapes are passed
    explicitly (this tree's shapes.json), so a copy in an older checkout runs the same ones."""

    unit, scale, ref_name = "us", 1.0, "x bare_torch"

    def before(self) -> list:
        return harness.shape_options("overhead")

    def after(self, stem: Path) -> list:
        return ["--json"]

    def read(self, stem: Path, stdout: str) -> dict:
        return json.loads(stdout.strip().splitlines()[-1])

    def cells(self, data: dict) -> dict:
        out = {}
        for r in data["results"]:
            where = f"T={r['T']} d={r['d']} h={r['h']} E={r['E']} k={r['k']}"
            med, ref = r["median_us"], r["median_us"]["bare_torch"]
            out[(where, "fwd+bwd", "bare_torch")] = {"value": ref, "backend": "torch", "role": "gauge", "ref": None}
            for name, mode, value in (("mk_route", "fwd", med["mk_route"]),
                                      ("mk_route_moe_mlp", "fwd+bwd", med["mk_route_moe_mlp"]),
                                      ("overhead", "fwd+bwd", r["overhead_us"])):
                out[(where, mode, name)] = {"value": value, "backend": data["backend"], "role": "library",
                                            "ref": ref}
        return out


ADAPTERS = {"bench_moe_layer.py": MoeLayer(), "bench_overhead.py": Overhead()}
COPYABLE = ("bench_overhead.py",)  # public API only: may be copied into a checkout that lacks it


# --------------------------------------------------------------------------- running

def git(tree: Path, *args) -> str:
    r = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def revision(tree: Path) -> str:
    head = git(tree, "rev-parse", "--short", "HEAD") or "?"
    return head + (" (modified)" if git(tree, "status", "--porcelain", "--untracked-files=no") else "")


def ensure_script(base: Path, script: str) -> str:
    """Make sure the base checkout has SCRIPT; returns what was done, in words. A script the base's
    git tracks (or any, when the base is no git checkout) is never overwritten."""
    rel = f"benchmarks/{script}"
    ours, theirs = TREE / rel, base / rel
    if theirs.exists() and (git(base, "ls-files", rel) or not git(base, "rev-parse", "--git-dir")):
        return "the base's own"
    if script not in COPYABLE:
        raise SystemExit(f"the base has no {rel}, and only scripts that use nothing but the public API "
                         f"may be copied into it ({', '.join(COPYABLE)})")
    if theirs.exists() and theirs.read_bytes() == ours.read_bytes():
        return "this tree's, copied into the base earlier"
    shutil.copy2(ours, theirs)
    log(f"copied {ours} to {theirs}")
    return "this tree's, copied into the base"


def run_once(tree: Path, script: str, args: list, adapter, stem: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [sys.executable, str(tree / "benchmarks" / script), *adapter.before(), *args, *adapter.after(stem)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} (in {tree}) failed with status {r.returncode}:\n{r.stderr[-4000:]}")
    log(f"{tree}: {script} done in {time.perf_counter() - t0:.0f} s")
    return adapter.cells(adapter.read(stem, r.stdout))


# --------------------------------------------------------------------------- comparing

def side_summary(got: list) -> dict:
    vals = [g["value"] for g in got]
    refs = [g["value"] / g["ref"] for g in got if g["ref"]]
    return {"rounds": vals, "median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "x_ref_rounds": refs, "x_ref": statistics.median(refs) if refs else None,
            "backend": ",".join(sorted({g["backend"] for g in got}))}


def ratio(new, base):
    return new / base if new is not None and base and base > 0 and new > 0 else None


def verdict(row: dict, tol: float) -> str:
    b, n, r, rr = row["base"], row["new"], row["ratio"], row["ratio_vs_ref"]
    if b is None or n is None:
        return "only in " + ("new" if b is None else "base")
    if row["role"] == "gauge":
        return "gauge"
    if r is None:
        return "-"
    # all n new rounds above all n base rounds happens by chance with p = n!^2 / (2n)!: 1/6 for
    # 2 rounds, 1/20 for 3; fewer than MIN_ROUNDS rounds cannot confirm a change
    enough = min(len(b["rounds"]), len(n["rounds"])) >= MIN_ROUNDS
    if enough and r > 1 + tol and n["min"] > b["max"] and (rr is None or rr > 1 + tol):
        return "slower"
    if enough and r < 1 / (1 + tol) and n["max"] < b["min"] and (rr is None or rr < 1 / (1 + tol)):
        return "faster"
    return "slower?" if r > 1 + tol or (rr is not None and rr > 1 + tol) else "same"


def compare(runs: dict, tol: float) -> list:
    keys = {k for side in runs.values() for cells in side for k in cells}
    rows = []
    for key in sorted(keys, key=lambda k: (k[0], k[2], MODE_ORDER.get(k[1], 9))):
        row = {"cell": key[0], "mode": key[1], "candidate": key[2]}
        for side, cells in runs.items():
            got = [c[key] for c in cells if key in c]
            row[side] = side_summary(got) if got else None
            row["role"] = got[0]["role"] if got else row.get("role")
        b, n = row["base"] or {}, row["new"] or {}
        row["ratio"] = ratio(n.get("median"), b.get("median"))
        row["ratio_vs_ref"] = ratio(n.get("x_ref"), b.get("x_ref"))
        row["verdict"] = verdict(row, tol)
        rows.append(row)
    return rows


def markdown(rows: list, adapter, tol: float) -> str:
    unit, sc = adapter.unit, adapter.scale

    def num(x):
        x *= sc
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"

    def value(s):
        return "-" if s is None else f"{num(s['median'])} [{num(s['min'])}, {num(s['max'])}]"

    def x_ref(s):
        return "-" if s is None or s["x_ref"] is None else f"{s['x_ref']:.3f}"

    def backend(r):
        names = [(r[s] or {}).get("backend", "-") for s in ("base", "new")]
        return names[0] if names[0] == names[1] else f"**{names[0]} -> {names[1]}**"

    out = []
    for role, title in (("library", "Library cells"), ("gauge", "Gauges: pure torch, the same code in both trees")):
        sel = [r for r in rows if r["role"] == role]
        if not sel:
            continue
        headers = ["cell", "mode", "candidate", "backend base -> new", f"base {unit} [min, max]",
                   f"new {unit} [min, max]", "new / base"]
        if role == "library":
            headers += [f"base {adapter.ref_name}", f"new {adapter.ref_name}", f"new / base ({adapter.ref_name})",
                        "verdict"]
        table = []
        for r in sel:
            line = [r["cell"], r["mode"], r["candidate"], backend(r), value(r["base"]), value(r["new"]),
                    harness.fmt_ratio(r["ratio"])]
            if role == "library":
                line += [x_ref(r["base"]), x_ref(r["new"]), harness.fmt_ratio(r["ratio_vs_ref"]), r["verdict"]]
            table.append(line)
        out.append(f"## {title}\n\n" + harness.markdown_table(headers, table))
    counts = {}
    for r in rows:
        if r["role"] == "library":
            counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
    summary = (f"Verdicts (tolerance {tol:.0%}): " + ", ".join(f"{v} {n}" for v, n in sorted(counts.items()))
               + ". Values: median over the rounds of each run's median [min, max over the rounds]; "
               f"`{adapter.ref_name}`: the cell / its reference measured in the same run (median over "
               "the rounds); `new / base` of that cancels the machine's drift between runs.")
    if any(r["base"] and r["new"] and r["base"]["backend"] != r["new"]["backend"] for r in rows):
        summary += " **The backends differ between the trees in some cells (bold): those compare two backends.**"
    return summary + "\n\n" + "\n\n".join(out) + "\n"


# --------------------------------------------------------------------------- main

def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 usage="%(prog)s --base PATH [options] -- SCRIPT [ARGS...]")
    ap.add_argument("--base", required=True, type=Path, help="checkout of the revision to compare against")
    ap.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternating (default 3)")
    ap.add_argument("--tolerance", type=float, default=0.05, help="relative slow-down ignored (default 0.05)")
    ap.add_argument("--out", default=None, help="output stem (default benchmarks/results/compare_<script>[-quick])")
    ap.add_argument("--keep-runs", default=None, metavar="DIR",
                    help="keep every run's output in DIR (default: a scratch folder, removed afterwards)")
    args = ap.parse_args(argv[:cut])
    if cut >= len(argv) - 1:
        ap.error("give the script and its arguments after `--`")
    script, sargs = Path(argv[cut + 1]).name, argv[cut + 2:]
    if script not in ADAPTERS:
        ap.error(f"no reader for {script}'s results; supported: {', '.join(ADAPTERS)}")
    if "--out" in sargs:
        ap.error("compare_revisions chooses where each run writes its results: leave --out out")
    base = args.base.resolve()
    if base == TREE.resolve() or not (base / "moe_kernels").is_dir():
        ap.error(f"--base {base}: must be another checkout of this repository")
    adapter = ADAPTERS[script]
    source = ensure_script(base, script)
    meta = harness.environment(extra={
        "base": {"path": str(base), "revision": revision(base), "script": source},
        "new": {"path": str(TREE), "revision": revision(TREE)},
        "script": [script, *sargs], "rounds": args.rounds, "tolerance": args.tolerance,
        "timing": (f"{args.rounds} rounds of base, new alternating, each run a fresh process; per cell "
                   "the median of the per-run medians"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()]})
    runs_dir = Path(args.keep_runs or tempfile.mkdtemp(prefix="compare_revisions-"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    runs = {"base": [], "new": []}
    try:
        for r in range(args.rounds):
            for side, tree in (("base", base), ("new", TREE)):
                log(f"round {r + 1}/{args.rounds}: {side} ({tree})")
                runs[side].append(run_once(tree, script, sargs, adapter, runs_dir / f"{side}-{r + 1}"))
    finally:
        if not args.keep_runs:
            shutil.rmtree(runs_dir, ignore_errors=True)
    meta["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    rows = compare(runs, args.tolerance)
    body = (f"- base: `{base}` at {meta['base']['revision']} (script: {source}); new: `{TREE}` at "
            f"{meta['new']['revision']}\n- compared: `{' '.join([script, *sargs])}`\n\n"
            + markdown(rows, adapter, args.tolerance))
    print(body)
    quick = "-quick" if "--quick" in sargs else ""
    stem = args.out or str(harness.RESULTS_DIR / f"compare_{Path(script).stem}{quick}")
    j, m = harness.write_results(stem, meta, rows, body, title=f"compare_revisions: {script}, base vs new")
    log(f"wrote {j} and {m}")
    return 1 if any(r["verdict"] == "slower" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
