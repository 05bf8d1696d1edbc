#!/usr/bin/env python
"""Compile every triton program of the triton backend for sm_90 (``cuda:90``), without a GPU.

The CPU tests run the kernels under ``TRITON_INTERPRET=1``, which never compiles them, so
compile-only bugs slip through (e.g. an int argument equal to 1 is a compile-time constant once
compiled: ``T.to(tl.int64)`` on it fails to compile, and the interpreter cannot see it). This check
lowers each kernel to cubin with the installed triton and its bundled ptxas; no CUDA device needed.

How the launch set is obtained (phase 1, one subprocess with ``TRITON_INTERPRET=1``):

* every ``InterpretedFunction.run`` is recorded: per argument, a tensor's dtype and whether its
  pointer is 16-byte aligned, an int's specialisation class (``1``, or int32/int64/uint64 and
  divisible by 16 or not) with its value, constexprs and bools exactly, and launch options
  (``num_warps``);
* the launchers' module-level ``interpreting`` is forced to ``False`` so they choose their GPU tile
  configurations (block sizes, ``UPCAST``, the fp64 ``"sum"`` path) while the interpreter still
  executes the kernels (so host-side values computed from kernel outputs stay right);
* launches come from a small, fast selection of the interpreter tests (``TESTS`` below) plus a sweep
  of every contract kernel over fp32/bf16/fp16/fp64 at a few tiny geometries, one of them all ones
  (T = E = k = D = H = 1), so the "int equal to 1" specialisations are recorded.

Deduplication (a representative subset, to stay well under 8 minutes on 2 cores): a launch's
*base* is (kernel, tensor dtypes, bools, dtype constexprs, flag constexprs, launch options; block
size constexprs are not part of it). Cases are
picked greedily so that every base is compiled once AND every recorded per-argument class appears
in at least one compiled case of that kernel: each int class (incl. ``== 1``), each tensor
alignment class, each exact constexpr value. It is not the full cross product of those classes.

Phase 2 compiles the cases in 2 worker processes through triton's own launch path minus the launch:
``create_function_from_signature`` (the binder a launch uses: it computes the specialisation) ->
``JITFunction._pack_args`` -> ``ASTSource`` -> ``triton.compile(target=GPUTarget("cuda", 90, 32))``.
These are triton-internal APIs (pinned: triton==3.9.0 in scripts/setup.sh). ``TRITON_CACHE_DIR``
is a fresh temporary directory, so nothing is cached across runs.

The recorder also sets the launchers' ``grouped.TMA = True``, so weights whose layout allows it are
recorded on the tensor-descriptor path (as on an H100/H200) and the others on pointer loads; a sweep
pass with ``FP32_PRECISION = "tf32"`` records the TF32 GEMMs.

Measured (triton 3.9.0, 2 cores): 1412 distinct launches recorded, 440 cases compiled (about 50
with a tensor descriptor), in 5.8 minutes (recording 2.7, compiling 3.1).

Exit status 0 when every case compiles; otherwise 1, listing per failure the kernel, the
specialisation and the error (its first line, and its last line: the cause).

Also measured with triton 3.6.0 (the GPU machine's version; its wheel installed with ``--no-deps
--target``, put first on ``PYTHONPATH``): the same 440 cases, 0 failures. CI compiles with both:
3.9 records and compiles (``--keep DIR``), then 3.6 compiles the same launches (``--launches
DIR/launches.pkl``), 167-180 s more.

Usage: .venv/bin/python scripts/triton_compile_check.py [--jobs 2] [--keep DIR] [--launches PKL]
"""

from __future__ import annotations

import argparse
import collections
import importlib
import inspect
import multiprocessing as mp
import os
import pickle
import subprocess
import sys
import tempfile
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_MODULES = ("grouped", "losses", "permute", "reconcile", "routing")
#: Interpreter tests whose launches are recorded: small and fast (test_plan_across_blocks and
#: test_losses_match_reference are left out for time; the sweep reaches every kernel, T = 1 included).
TESTS = [
    "tests/test_triton_backend.py::test_nonfinite_tokens_under_sync_free_policy",
    "tests/test_triton_backend.py::test_permutes_read_nothing_past_their_inputs",
    "tests/test_triton_backend.py::test_task_route_reads_nothing_past_its_inputs",
    "tests/test_triton_backend.py::test_route_backward_matches_reference_in_every_dtype",
    "tests/test_triton_backend.py::test_reconcile_single_row_and_main_none",
    "tests/test_triton_backend.py::test_moe_mlp_kernels_hf_weights",
    "tests/test_triton_backend.py::test_grouped_kernels_empty_inputs",
]
#: Sweep geometries (T, E, K, D, H) for tests/kernel_cases.py: the conformance one, all ones, one token,
#: and one whose weight rows are 16-byte aligned in every dtype (the tensor-descriptor path).
#: (T <= 9: kernel_cases' task ids are 9 long. Its plans hold a few rows per expert, so the GEMMs'
#: largest row tiles, BM = 128 from 256 rows per expert, come from _big_tiles.)
SWEEP_GEOMS = [(9, 5, 2, 6, 4), (1, 1, 1, 1, 1), (1, 5, 2, 6, 4), (9, 5, 2, 16, 16)]
#: Int constexprs that select a code path (kept exactly in the base); other int constexprs are sizes.
FLAG_NAMES = {"ACT", "MODE", "PHASE", "POLICY", "TASK", "NS", "ACC"}
DTYPES = ("float32", "float16", "bfloat16", "float64", "int32", "int64", "int16", "int8", "bool", "uint8")


# ---------------------------------------------------------------- phase 1: recording (interpreter)

def _int_class(v: int):
    """The int's specialisation class as triton sees it (1 is a constexpr when specialised)."""
    if v == 1:
        return "1"
    rng = "i32" if -2**31 <= v < 2**31 else ("u64" if v >= 2**63 else "i64")
    return rng + ("/d16" if v % 16 == 0 else "")


def _enc(x, cexpr: bool):
    import torch
    import triton.language as tl
    if isinstance(x, torch.Tensor):
        return ("T", str(x.dtype).replace("torch.", ""), x.data_ptr() % 16 == 0)
    if isinstance(x, bool):
        return ("b", x)
    if isinstance(x, int):
        return ("c", x) if cexpr else ("i", _int_class(x), x)
    if isinstance(x, float):
        return ("f", x)
    if x is None:
        return ("n",)
    if isinstance(x, (tuple, list)):
        return ("t", tuple(_enc(e, cexpr) for e in x))
    if isinstance(x, tl.dtype):
        return ("d", x.name)
    if isinstance(x, str):
        return ("s", x)
    if type(x).__name__ == "TensorDescriptor":
        return ("D", str(x.base.dtype).replace("torch.", ""), tuple(x.shape), tuple(x.strides), tuple(x.block_shape))
    return ("o", repr(x))


def _spec_key(e):
    """The part of an encoded argument that decides the compiled program (not an int's value)."""
    if e is None:
        return None
    if e[0] == "i":
        return ("i", e[1])
    if e[0] == "f":
        return ("f",)
    if e[0] == "t":
        return ("t", tuple(_spec_key(c) for c in e[1]))
    if e[0] == "D":  # a descriptor compiles by its dtype and block; shape and strides are runtime values
        return ("D", e[1], e[4])
    return e


class Recorder:
    """Records every interpreted launch: (module, kernel, ((param, encoding), ...), options)."""

    def __init__(self):
        self.recs = {}
        import triton
        from triton.runtime import interpreter
        orig = interpreter.InterpretedFunction.run
        recs = self.recs

        def run(self, *args, grid, warmup, **kwargs):
            fn = self.fn
            sig = inspect.signature(fn)
            bound = sig.bind(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
            params = []
            for name, p in sig.parameters.items():
                cexpr = p.annotation is triton.language.constexpr or "constexpr" in str(p.annotation)
                params.append((name, _enc(bound.arguments[name], cexpr) if name in bound.arguments else None))
            opts = tuple(sorted((k, v) for k, v in kwargs.items() if k not in sig.parameters))
            key = (fn.__module__, fn.__name__, tuple((n, _spec_key(e)) for n, e in params), opts)
            recs.setdefault(key, (fn.__module__, fn.__name__, tuple(params), opts))
            return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

        interpreter.InterpretedFunction.run = run
        for m in LAUNCHER_MODULES:  # the launchers pick their GPU tile configurations
            importlib.import_module(f"moe_kernels.backends.triton.{m}").interpreting = lambda: False
        # and the descriptor path wherever the weight's layout allows it, as on an H100/H200
        importlib.import_module("moe_kernels.backends.triton.grouped").TMA = True


def _sweep():
    """Every contract kernel in fp32/bf16/fp16/fp64 at SWEEP_GEOMS, plus activation/BN/policy variants."""
    import torch
    from moe_kernels.backends import contract
    from tests import kernel_cases as kc

    def conv(a, dt):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.to(dt)
        if isinstance(a, (list, tuple)):
            return type(a)(conv(x, dt) for x in a)
        return a

    n_err = 0
    for geom in SWEEP_GEOMS:
        kc.T, kc.E, kc.K, kc.D, kc.H = geom
        for spec in contract.KERNELS.values():
            fn = getattr(importlib.import_module(f"moe_kernels.backends.triton.{spec.module}"), spec.name, None)
            if not callable(fn):
                continue
            for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
                try:
                    args = conv(kc.kernel_args(spec.name), dt)
                except Exception:
                    continue
                variants = [args]
                if spec.name in ("grouped_mlp", "grouped_mlp_backward", "moe_mlp", "moe_mlp_backward"):
                    variants += [tuple(act if a == "gelu" else a for a in args) for act in ("none", "relu", "silu")]
                if spec.name in ("reconcile", "reconcile_backward"):
                    for act in ("none", "gelu", "silu"):
                        v = list(args); v[4] = act; variants.append(tuple(v))
                    v = list(args); v[5] = False; variants.append(tuple(v))
                if spec.name == "route":
                    v = list(args); v[2] = "sigmoid"; v[4] = 2; v[5] = "score"; variants.append(tuple(v))
                    v = list(args); v[4] = -1; variants.append(tuple(v))
                for v in variants:
                    try:
                        fn(*v)
                    except Exception:  # a launch before the error is recorded all the same
                        n_err += 1
    n_err += _big_tiles()
    # fp32 GEMMs with TF32 asked for (input_precision="tf32"), at the conformance geometry
    from moe_kernels.backends.triton import _common
    kc.T, kc.E, kc.K, kc.D, kc.H = SWEEP_GEOMS[0]
    _common.FP32_PRECISION = "tf32"
    try:
        for spec in contract.KERNELS.values():
            if spec.module not in ("grouped", "reconcile"):
                continue
            fn = getattr(importlib.import_module(f"moe_kernels.backends.triton.{spec.module}"), spec.name, None)
            try:
                fn(*kc.kernel_args(spec.name))
            except Exception:
                n_err += 1
    finally:
        _common.FP32_PRECISION = None
    return n_err


def _big_tiles():
    """The grouped GEMMs with 300 rows of one expert (the GPU tile table's BM = 128, 8 warps), every dtype."""
    import torch
    from moe_kernels.backends.triton import grouped as tg

    n_err = 0
    off = torch.tensor([0, 300], dtype=torch.int32)
    for dt in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        x, gy = torch.randn(300, 16).to(dt), torch.randn(300, 16).to(dt)
        w1, w2 = torch.randn(1, 16, 160).to(dt), torch.randn(1, 80, 16).to(dt)
        try:
            tg.grouped_gemm(x, off, w1)  # 160 columns: BN = 128, 8 warps
            tg.grouped_gemm_backward(gy, x, off, w1[:, :, :16].contiguous(), True, True)
            y, z = tg.grouped_mlp(x, off, w1, w2, None, None, "swiglu")
            tg.grouped_mlp_backward(gy, x, z, off, w1, w2, None, None, "swiglu")
        except Exception:
            n_err += 1
    return n_err


def record(out: str) -> None:
    """Phase 1 (run with TRITON_INTERPRET=1): record the launches and pickle them to ``out``."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    sys.path.insert(0, ROOT)
    import pytest
    rec = Recorder()
    t0 = time.time()
    rc = pytest.main(["-q", "--tb=no", "-rN", "-p", "no:cacheprovider", "--no-header", "-W", "ignore", *TESTS])
    t1 = time.time()
    n_err = _sweep()
    print(f"[record] tests exit {int(rc)} ({t1 - t0:.0f}s); sweep: {n_err} calls raised ({time.time() - t1:.0f}s) "
          f"(test outcomes do not matter here: the launchers use GPU tiles under the interpreter); "
          f"{len(rec.recs)} distinct launches", flush=True)
    with open(out, "wb") as f:
        pickle.dump(list(rec.recs.values()), f)


# ---------------------------------------------------------------- deduplication

def _base(rec):
    _, name, params, opts = rec
    parts = []
    for pname, e in params:
        if e is None:
            continue
        if e[0] == "T":
            parts.append(e[1])
        elif e[0] == "t":
            parts.append(("t", tuple(c[1] if c[0] == "T" else c[0] for c in e[1])))
        elif e[0] in ("b", "d"):
            parts.append((pname, e[1]))
        elif e[0] == "c":
            if pname in FLAG_NAMES:
                parts.append((pname, e[1]))
        elif e[0] in ("o", "s"):
            parts.append((pname, e[1]))
        elif e[0] == "D":
            parts.append((pname, _spec_key(e)))
    return (name, tuple(parts), opts)


def _features(rec):
    """Per-argument classes that must each be compiled at least once per kernel."""
    _, name, params, _ = rec
    out = set()
    for pname, e in params:
        if e is None:
            continue
        if e[0] == "T":
            out.add((name, pname, "a16" if e[2] else "unaligned"))
        elif e[0] == "i":
            out.add((name, pname, e[1]))
        elif e[0] in ("c", "s"):
            out.add((name, pname, e[1]))
        elif e[0] == "D":
            out.add((name, pname, _spec_key(e)))
        elif e[0] == "t":
            for j, c in enumerate(e[1]):
                out.add((name, f"{pname}[{j}]", _spec_key(c)))
    return out


def select(recs):
    """Greedy: one case per base, then extra cases until every feature of every kernel is covered."""
    by_base = collections.defaultdict(list)
    for r in recs:
        by_base[_base(r)].append(r)
    chosen, covered = [], set()
    for base in sorted(by_base, key=repr):  # deterministic
        best = max(by_base[base], key=lambda r: len(_features(r) - covered))
        chosen.append(best)
        covered |= _features(best)
    rest = [r for r in recs if not any(r is c for c in chosen)]
    while True:
        gain, best = max(((len(_features(r) - covered), r) for r in rest), default=(0, None), key=lambda x: x[0])
        if not gain:
            break
        chosen.append(best)
        covered |= _features(best)
        rest = [r for r in rest if r is not best]
    return chosen


# ---------------------------------------------------------------- phase 2: compiling (no interpreter)

def describe(rec) -> str:
    _, name, params, opts = rec

    def one(e):
        if e[0] == "T":
            return e[1].replace("float", "f").replace("bfloat", "bf") + ("*" if e[2] else "*unaligned")
        if e[0] == "i":
            return e[1]
        if e[0] == "t":
            return "(" + ",".join(one(c) for c in e[1]) + ")"
        if e[0] == "n":
            return "None"
        if e[0] == "D":
            return f"desc<{e[1]}{list(e[4])}>"
        return str(e[1]) if len(e) > 1 else e[0]

    args = ", ".join(f"{n}={one(e)}" for n, e in params if e is not None)
    return f"{name}({args}){''.join(f' {k}={v}' for k, v in opts)}"


_STATE = {}


def _dec(e):
    import torch
    import triton.language as tl
    k = e[0]
    if k == "T":
        t = torch.empty(64, dtype=getattr(torch, e[1]))
        return t if e[2] else t[1:]  # t[1:] of a 16-byte aligned allocation is not 16-byte aligned
    if k == "i":
        return e[2]
    if k in ("b", "f", "c", "s"):
        return e[1]
    if k == "D":
        from triton.tools.tensor_descriptor import TensorDescriptor
        _, dt, shape, strides, block = e
        base = torch.empty_strided(shape, strides, dtype=getattr(torch, dt))
        return TensorDescriptor(base, list(shape), list(strides), list(block))
    if k == "n":
        return None
    if k == "t":
        return tuple(_dec(c) for c in e[1])
    if k == "d":
        return tl.dtype(e[1])
    raise ValueError(f"cannot rebuild argument {e!r}")


def compile_case(rec):
    """Compile one recorded launch for cuda:90; returns (ok, seconds, error text)."""
    assert os.environ.get("TRITON_INTERPRET") != "1"
    t0 = time.time()
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend, compile as tcompile
        from triton.runtime.jit import create_function_from_signature
        if "backend" not in _STATE:
            sys.path.insert(0, ROOT)
            _STATE["target"] = GPUTarget("cuda", 90, 32)
            _STATE["backend"] = make_backend(_STATE["target"])
        target, backend = _STATE["target"], _STATE["backend"]
        modname, name, params, opts = rec
        fn = getattr(importlib.import_module(modname), name)
        kwargs = {n: _dec(e) for n, e in params if e is not None}
        kwargs.update(dict(opts))
        kwargs["debug"] = False
        kwargs["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
        binder = _STATE.setdefault(("binder", modname, name),
                                   create_function_from_signature(fn.signature, fn.params, backend))
        bound_args, specialization, options = binder(**kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
        tcompile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        return True, time.time() - t0, ""
    except Exception as ex:  # noqa: BLE001: every failure is reported
        err = "".join(traceback.format_exception_only(type(ex), ex))
        inner = ex  # a CompilationError's message is a source excerpt: the cause is at the chain's end
        while inner.__cause__ is not None:
            inner = inner.__cause__
        if inner is not ex:
            err += "".join(traceback.format_exception_only(type(inner), inner))
        return False, time.time() - t0, err.strip()


def _known(rec, err: str) -> str:
    """A note for failures already diagnosed (so a report of only those reads as such)."""
    _, name, params, _ = rec
    dtypes = {e[1] for _, e in params if e and e[0] == "T"}
    if (name in ("_threshold_kernel", "_hist_kernel", "_slots_kernel") and "bitcast" in err
            and dtypes & {"bfloat16", "float16"}):
        return ("  [known F5: _routing_jit._key cannot take a 16-bit (bf16/fp16) priority; "
                "the fix upcasts it to fp32 inside _key]")
    return ""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="compile worker processes (default 2)")
    ap.add_argument("--keep", help="keep the records and triton cache in this directory")
    ap.add_argument("--launches", metavar="PKL",
                    help="compile the launches recorded by an earlier run (its --keep DIR/launches.pkl) instead of "
                         "recording: e.g. the same programs with another triton on PYTHONPATH")
    ap.add_argument("--record-only", metavar="PKL", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.record_only:
        record(a.record_only)
        return 0
    try:
        import triton
    except ImportError:
        print("triton is not importable: nothing to check")
        return 0
    t0 = time.time()
    work = a.keep or tempfile.mkdtemp(prefix="triton_compile_check.")
    os.makedirs(work, exist_ok=True)
    pkl = a.launches or os.path.join(work, "launches.pkl")
    if a.launches:
        print(f"== launches recorded earlier: {pkl}", flush=True)
    else:
        env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        print(f"== recording launches (TRITON_INTERPRET=1, GPU tile configs): {len(TESTS)} tests + kernel sweep",
              flush=True)
        subprocess.run([sys.executable, os.path.abspath(__file__), "--record-only", pkl], cwd=ROOT, env=env,
                       check=True)
    with open(pkl, "rb") as f:
        recs = pickle.load(f)
    cases = select(recs)
    t_rec = time.time() - t0
    per_kernel = collections.Counter(r[1] for r in cases)
    print(f"== compiling {len(cases)} cases (of {len(recs)} distinct launches; {len(per_kernel)} kernels) "
          f"for cuda:90 with triton {triton.__version__}, {a.jobs} workers", flush=True)

    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_CACHE_DIR"] = os.path.join(work, "cache")  # fresh: nothing cached across runs
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    failures = []
    with mp.get_context("spawn").Pool(a.jobs) as pool:
        for i, (rec, (ok, secs, err)) in enumerate(zip(cases, pool.imap(compile_case, cases))):
            if not ok:
                failures.append((rec, err))
                print(f"  FAIL {describe(rec)}", flush=True)
            elif (i + 1) % 50 == 0:
                print(f"  {i + 1}/{len(cases)} compiled", flush=True)
    wall = time.time() - t0
    print(f"== {len(cases)} cases, {len(failures)} failures; {wall:.0f}s "
          f"(recording {t_rec:.0f}s, compiling {wall - t_rec:.0f}s)")
    if not a.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    if failures:
        print(f"\n{len(failures)} triton programs do not compile for sm_90:")
        for rec, err in failures:
            lines = [ln for ln in err.splitlines() if ln.strip()]
            first, last = (lines[0], lines[-1]) if lines else ("?", "?")
            print(f"- {describe(rec)}\n    {first}" + (f"\n    ... {last.strip()}" if last != first else "")
                  + _known(rec, err))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
