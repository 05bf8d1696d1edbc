"""pytest glue for the per-op benchmark scripts (``bench_*.py``); the timing itself is in harness.py.

Run one script:  ``pytest benchmarks/bench_route.py --benchmark-only [--quick] [--backend NAME]``.

Each script defines ``make_cases(quick)`` (its shapes from ``benchmarks/shapes.json``, through
``harness.shapes`` / ``harness.cases``), ``CANDIDATES`` (names) and ``build(case, ctx)`` (returns
``{name: harness.Candidate}`` after asserting correctness), and two kinds of tests:

* ``test_<op>[case-candidate-mode]``: pytest-benchmark times one candidate in one mode
  (``benchmark.pedantic``; the untimed forward of the backward mode runs in its ``setup``).
  Sequential, so these numbers carry the machine's noise; use them with pytest-benchmark's own
  tooling (``--benchmark-json``, ``--benchmark-compare``).
* ``test_<op>_compare[case]``: the harness times all candidates round-robin, with peak memory, and
  the rows go to ``benchmarks/results/<script>[-quick].{json,md}`` at the end of the session. Its
  pytest-benchmark entry is the wall time of the whole comparison; read the results file.

This conftest is only loaded for paths under ``benchmarks/``: ``pytest tests`` is unaffected.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("moe_kernels benchmarks")
    g.addoption("--quick", action="store_true", help="tiny shapes and few repetitions (CI smoke run)")
    g.addoption("--backend", default="auto",
                help="moe_kernels backend: auto (default: $MOE_KERNELS_BACKEND or the fastest "
                     "available), reference, cpu, triton, cuda")
    g.addoption("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    g.addoption("--threads", type=int, default=0, help="torch.set_num_threads(N) first (0: leave as is)")
    g.addoption("--reps", type=int, default=0,
                help="timed round-robin repetitions in the *_compare tests (default 10; 3 with --quick)")
    g.addoption("--bench-dtypes", default="fp32,bf16", help="comma-separated dtypes (fp32,bf16,fp16)")
    g.addoption("--results-dir", default=str(harness.RESULTS_DIR),
                help="where the *_compare tests write <script>[-quick].json/.md")


def pytest_configure(config):
    # collect bench_*.py when a directory is given (`pytest benchmarks --benchmark-only`)
    config.addinivalue_line("python_files", "bench_*.py")
    if config.getoption("threads", 0):
        torch.set_num_threads(config.getoption("threads"))


@dataclass
class BenchContext:
    device: torch.device
    backend: Optional[str]  # None: let moe_kernels choose
    quick: bool
    reps: int
    warmup: int
    rounds: int  # pytest-benchmark rounds per single-candidate test
    dtypes: tuple
    results_dir: Path
    records: dict = field(default_factory=dict)  # script -> list of rows
    _checked: dict = field(default_factory=dict)

    def backend_of(self, op: str) -> str:
        return harness.resolved_backend(op, self.device, self.backend)

    def cached(self, key, fn: Callable):
        """Run ``fn`` once per key (correctness checks shared by the tests of one case)."""
        if key not in self._checked:
            self._checked[key] = fn()
        return self._checked[key]

    # ---- single candidate through pytest-benchmark
    def pytest_benchmark(self, benchmark, c: harness.Candidate, mode: str):
        dev = self.device
        benchmark.extra_info.update({"candidate": c.name, "mode": mode, "device": str(dev), **c.meta})
        if mode != "forward" and c.backward is None:
            pytest.skip(f"{c.name} is forward-only (a bandwidth baseline)")
        warm = 1 if self.quick else 2

        def reset():
            c._reset()
            harness.sync(dev)

        if mode == "forward":
            def target():
                out = c.forward()
                harness.sync(dev)
                return out
            benchmark.pedantic(target, setup=reset, rounds=self.rounds, warmup_rounds=warm)
        elif mode == "full":
            def target():
                c.backward(c.forward())
                harness.sync(dev)
            benchmark.pedantic(target, setup=reset, rounds=self.rounds, warmup_rounds=warm)
        else:
            def setup():
                reset()
                out = c.forward()  # untimed
                harness.sync(dev)
                return (out,), {}

            def target(out):
                c.backward(out)
                harness.sync(dev)
            benchmark.pedantic(target, setup=setup, rounds=self.rounds, warmup_rounds=warm)

    # ---- all candidates of a case, round-robin, with memory
    def compare(self, benchmark, script: str, case_id: str, candidates: dict, *,
                baselines: dict, op_of: Callable[[str], str] = lambda name: "", memory: bool = True,
                extra: Optional[Callable[[str, dict], dict]] = None):
        """Time ``candidates`` round-robin; rows are written to the results file at session end.

        baselines: {op: candidate name} -- each candidate's ratio is to its op's baseline.
        op_of: the op a candidate belongs to (one comparison may hold several ops that share a
            bandwidth baseline, as in bench_permute).
        extra: (name, {mode: Timing}) -> extra columns (GB/s, GFLOP/s, ...).
        """
        cands = list(candidates.values())
        out = {}

        def run():
            out["t"] = harness.time_candidates(cands, reps=self.reps, warmup=1 if self.quick else 2,
                                               device=self.device)
        benchmark.pedantic(run, rounds=1, iterations=1)
        timings = out["t"]
        rows = self.records.setdefault(script, [])
        for c in cands:
            op = op_of(c.name)
            base = timings.get(baselines.get(op, ""), {})
            ratios = {m: t.median / base[m].median for m, t in timings[c.name].items()
                      if m in base and base[m].samples and t.samples}
            mem = None
            if memory and c.backward is not None:
                def once(c=c):
                    c._reset()
                    c.backward(c.forward())
                c._reset()
                mem = harness.peak_memory(once, self.device)
                c._reset()
            row = {"case": case_id, "op": op, "candidate": c.name, **c.meta,
                   "timings": timings[c.name], "ratio_to_baseline": ratios,
                   "baseline": baselines.get(op), "memory": mem,
                   "extra": extra(c.name, timings[c.name]) if extra else {}}
            rows.append(row)
            benchmark.extra_info[c.name] = {m: t.median for m, t in timings[c.name].items()}
        return timings


@pytest.fixture(scope="session")
def bctx(request) -> BenchContext:
    cfg = request.config
    quick = cfg.getoption("quick")
    reps = cfg.getoption("reps") or (3 if quick else 10)
    dtypes = tuple(harness.DTYPES[d.strip()] for d in cfg.getoption("bench_dtypes").split(",") if d.strip())
    ctx = BenchContext(device=harness.pick_device(cfg.getoption("device")),
                       backend=harness.backend_arg(cfg.getoption("backend")), quick=quick, reps=reps,
                       warmup=1 if quick else 2,
                       rounds=max(1, int(cfg.getoption("benchmark_min_rounds", 5) or 5)),
                       dtypes=dtypes, results_dir=Path(cfg.getoption("results_dir")))
    cfg._moe_bench_ctx = ctx
    return ctx


def pytest_generate_tests(metafunc):
    mod = metafunc.module
    quick = metafunc.config.getoption("quick")
    dtypes = [d.strip() for d in metafunc.config.getoption("bench_dtypes").split(",") if d.strip()]
    if "case" in metafunc.fixturenames and hasattr(mod, "make_cases"):
        cases = [c for c in mod.make_cases(quick) if c.dtype_name in dtypes]
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])
    if "candidate_name" in metafunc.fixturenames and hasattr(mod, "CANDIDATES"):
        metafunc.parametrize("candidate_name", list(mod.CANDIDATES))
    if "mode" in metafunc.fixturenames:
        metafunc.parametrize("mode", list(harness.MODES))


def _markdown(rows: list) -> str:
    extra_cols = []
    for r in rows:
        for k in r["extra"]:
            if k not in extra_cols:
                extra_cols.append(k)
    headers = (["case", "op", "candidate", "backend", "fwd ms [p20-p80]", "bwd ms [p20-p80]",
                "fwd+bwd ms [p20-p80]", "fwd x", "bwd x", "fwd+bwd x", "peak MiB"] + extra_cols)
    out = []
    for r in rows:
        t, x = r["timings"], r["ratio_to_baseline"]
        mem = r["memory"]["peak_bytes"] if r["memory"] else None
        out.append([r["case"], r["op"], r["candidate"], r.get("backend", "-"),
                    harness.fmt_timing(t.get("forward")), harness.fmt_timing(t.get("backward")),
                    harness.fmt_timing(t.get("full")), harness.fmt_ratio(x.get("forward")),
                    harness.fmt_ratio(x.get("backward")), harness.fmt_ratio(x.get("full")),
                    harness.fmt_mib(mem)] + [r["extra"].get(k, "-") for k in extra_cols])
    legend = ("Times: median [20th-80th percentile] of round-robin repetitions, in ms. `x`: median "
              "divided by the median of the op's baseline candidate (column `baseline` in the JSON) "
              "in the same run. `peak MiB`: peak live torch-allocated memory of one forward+backward "
              "above the level at its start (activations, temporaries and the gradients it "
              "produces; parameters and inputs excluded).")
    return legend + "\n\n" + harness.markdown_table(headers, out)


def pytest_sessionfinish(session, exitstatus):
    ctx: Optional[BenchContext] = getattr(session.config, "_moe_bench_ctx", None)
    if ctx is None or not ctx.records:
        return
    meta = harness.environment(ctx.device, extra={
        "backend": {"requested": ctx.backend or "auto",
                    "available": {k: v["available"] for k, v in harness.backend_report(ctx.device).items()}},
        "timing": f"round-robin, {ctx.reps} reps after {ctx.warmup} warm-up; forward, backward and "
                  + ("forward+backward from one timestamped call (CPU)" if ctx.device.type == "cpu"
                     else "forward+backward each in its own round-robin pass"),
        "memory": ("peak live torch-allocated bytes of one forward+backward above the level at its start ("
                   + ("torch.cuda.max_memory_allocated" if ctx.device.type == "cuda"
                      else "torch.profiler profile_memory allocation/free events, running sum") + ")")})
    for script, rows in ctx.records.items():
        stem = ctx.results_dir / (script + ("-quick" if ctx.quick else ""))
        j, m = harness.write_results(stem, meta, rows, _markdown(rows),
                                     title=f"{script}: interleaved comparison")
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        if tr is not None:
            tr.write_line(f"moe_kernels benchmarks: wrote {j} and {m}")
