"""The one benchmark harness every script in ``benchmarks/`` uses.

What it gives a script:

* :func:`shapes` -- the one reader of ``shapes.json``, where every benchmark shape lives (full and
  ``--quick``, with a ``_doc`` per section saying what each shape is and where it comes from);
  :func:`configs` / :func:`cases` build the MoE layer shapes A, B, C from it.
* :class:`Candidate` -- one implementation of a computation: a ``forward`` that returns what
  ``backward`` consumes, plus an untimed ``reset`` run before every forward (drop ``.grad`` buffers,
  refill inputs). Inputs, output gradients and ``out=`` buffers are made once, outside the timed
  region, by the script that builds the candidate.
* :func:`time_candidates` -- warm-up, then round-robin timing (A, B, C, A, B, C, ...) so that noise
  from other processes on the machine hits every candidate alike; modes ``forward``, ``backward``
  (backward alone, after an untimed forward) and ``full`` (forward+backward). Median and
  20th/80th percentiles per candidate and mode (:class:`Timing`).
* :func:`peak_memory` -- peak live torch-allocated bytes above the level at the start of one call
  ("activation memory": parameters and inputs that exist before the call are not counted). CUDA:
  ``torch.cuda.max_memory_allocated``. CPU (torch keeps no allocator statistics there): the
  allocation and free events recorded by ``torch.profiler`` with ``profile_memory=True``, summed
  in time order; :func:`memory_probe_selftest` checks the method on a known allocation pattern.
* :func:`environment` and :func:`write_results` -- every result file (JSON with the raw samples,
  markdown with a table) is stamped with the machine, versions, date and the exact command line.
* :func:`check_close` -- the correctness gate run before timing (raises, never prints).

Compare numbers only within one run: two runs on the shared 2-core machine differed by a median of
8% per cell (up to 35%).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MODES = ("forward", "backward", "full")
MODE_TITLES = {"forward": "fwd", "backward": "bwd", "full": "fwd+bwd"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# Correctness tolerances, relative to the largest magnitude of the expected tensor.
# fp32: the same math in a different order (per-expert GEMM blocking, fp32 vs in-place sums).
# bf16: 8-bit mantissa (ulp 2^-8 = 0.4%); GEMM inputs and outputs rounded to bf16, k partial
# results summed in different precisions by different implementations -> a few ulps.
TOLERANCES = {torch.float32: (1e-4, 1e-5), torch.float64: (1e-9, 1e-10),
              torch.bfloat16: (3e-2, 1.5e-2), torch.float16: (5e-3, 2e-3)}


# --------------------------------------------------------------------------- shapes and inputs

@dataclass(frozen=True)
class Config:
    """One MoE layer shape: T tokens, model dim d, expert hidden h, E experts, top-k."""

    name: str
    T: int
    d: int
    h: int
    E: int
    k: int

    def describe(self) -> str:
        return f"{self.name}: T={self.T} d={self.d} h={self.h} E={self.E} k={self.k}"


SHAPES_FILE = BENCH_DIR / "shapes.json"


def shapes(section: str, quick: bool = False) -> Any:
    """The shapes of one section of ``shapes.json``: its ``quick`` entry with ``quick`` (when the
    section has one), else its ``full`` entry. Every benchmark script reads its shapes here."""
    table = json.loads(SHAPES_FILE.read_text())
    if section not in table or section.startswith("_"):
        raise KeyError(f"{SHAPES_FILE} has no section {section!r}; it has "
                       f"{sorted(k for k in table if not k.startswith('_'))}")
    entry = table[section]
    return entry["quick"] if quick and "quick" in entry else entry["full"]


def shape_options(section: str, quick: bool = False) -> list:
    """``shapes(section, quick)`` as command-line options ``--key value`` (lists comma-joined), for a
    script whose options are named after the section's keys (bench_overhead.py)."""
    return [arg for key, value in shapes(section, quick).items()
            for arg in (f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else str(value))]


def configs(quick: bool, names: Optional[str] = None) -> list:
    """The MoE layer shapes of ``shapes.json`` (section ``configs``) named in ``names`` ("A,C";
    default all, in the file's order); the ``--quick`` ones are named ``A-quick``, ..."""
    table = {n: Config(f"{n}-quick" if quick else n, **dims) for n, dims in shapes("configs", quick).items()}
    out = []
    for n in (names.split(",") if names else table):
        n = n.strip()
        if n not in table:
            raise SystemExit(f"unknown config {n!r}; choose from {sorted(table)}")
        out.append(table[n])
    return out


@dataclass(frozen=True)
class Case:
    """One parametrisation of a per-op benchmark: a shape, a dtype and an optional variant."""

    cfg: Config
    dtype: torch.dtype
    variant: str = ""

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    @property
    def id(self) -> str:
        return f"{self.cfg.name}-{self.dtype_name}" + (f"-{self.variant}" if self.variant else "")


def cases(quick: bool, dtypes=("fp32", "bf16"), variants=("",), names: Optional[str] = None) -> list:
    return [Case(cfg, DTYPES[dt], v) for cfg in configs(quick, names) for dt in dtypes for v in variants]


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def distinct_logits(T: int, E: int, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    """Router logits with no ties in any row, exactly representable in bf16/fp16.

    Each row is a random permutation of 0..E-1 times a power of two (so bf16 keeps every value);
    softmax top-k then has one right answer, and implementations that break ties differently
    (``torch.topk`` vs a stable sort) still agree bit-for-bit on the chosen experts.
    """
    g = torch.Generator().manual_seed(seed)
    perm = torch.rand(T, E, generator=g).argsort(dim=1).to(torch.float32)
    scale = 2.0 ** -max(0, math.floor(math.log2(max(E, 1))) - 1)
    return ((perm - (E - 1) / 2) * scale).to(dtype).to(device).contiguous()


def randn(*shape, dtype=torch.float32, device="cpu", seed: int = 0, scale: float = 1.0,
          requires_grad: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = (torch.randn(*shape, generator=g) * scale).to(dtype).to(device)
    return t.requires_grad_(requires_grad)


# --------------------------------------------------------------------------- devices and backends

def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the CUDA device when torch sees one, else the CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: torch sees no CUDA device (torch {torch.__version__})")
    return dev


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def backend_arg(name: Optional[str]) -> Optional[str]:
    """``--backend auto`` (or nothing) means: let moe_kernels choose (``backend=None``)."""
    return None if name in (None, "", "auto") else name


def resolved_backend(op: str, device: torch.device, backend: Optional[str]) -> str:
    """The backend moe_kernels will run ``op`` on for tensors on ``device`` (what gets recorded).

    Asked with ``warn=False``: the resolved name is what the results record.
    """
    import moe_kernels as mk

    return mk.backends.resolve(op, device, backend_arg(backend), warn=False)


def backend_report(device: torch.device) -> dict:
    """Availability of every registered moe_kernels backend, with the reason in words."""
    import moe_kernels as mk

    return {name: {"available": b.available, "reason": b.reason, "devices": list(b.devices)}
            for name, b in mk.backends.BACKENDS.items()}


# --------------------------------------------------------------------------- timing

def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]) of an already sorted sequence."""
    if not sorted_xs:
        return float("nan")
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


@dataclass
class Timing:
    """Seconds per call: every sample, and median with 20th/80th percentiles."""

    samples: list

    @property
    def median(self) -> float:
        return percentile(sorted(self.samples), 50)

    @property
    def p20(self) -> float:
        return percentile(sorted(self.samples), 20)

    @property
    def p80(self) -> float:
        return percentile(sorted(self.samples), 80)

    def to_dict(self) -> dict:
        return {"median_s": self.median, "p20_s": self.p20, "p80_s": self.p80, "n": len(self.samples),
                "samples_s": list(self.samples)}


@dataclass
class Candidate:
    """One implementation under test.

    forward: runs the computation and returns what ``backward`` needs (usually the output).
    backward: consumes the forward's return value (e.g. ``torch.autograd.backward(out, grad)``);
        ``None`` for forward-only candidates.
    reset: untimed, before every forward: drop ``.grad`` buffers, re-zero accumulators, ...
    meta: recorded next to the timings (backend, implementation notes, ...).
    """

    name: str
    forward: Callable[[], Any]
    backward: Optional[Callable[[Any], None]] = None
    reset: Optional[Callable[[], None]] = None
    meta: dict = field(default_factory=dict)

    def _reset(self):
        if self.reset is not None:
            self.reset()


def autograd_backward(grad_outputs):
    """A ``Candidate.backward`` for forwards returning a tensor (or a tuple of tensors)."""
    def backward(out):
        outs = out if isinstance(out, (tuple, list)) else (out,)
        grads = grad_outputs if isinstance(grad_outputs, (tuple, list)) else (grad_outputs,)
        torch.autograd.backward(list(outs), list(grads))
    return backward


def drop_grads(*tensors_or_modules) -> Callable[[], None]:
    """A ``Candidate.reset`` that sets ``.grad = None`` on the given leaves / module parameters.

    This is what ``optimizer.zero_grad(set_to_none=True)`` does in training, so every candidate's
    backward allocates its gradient buffers the same way.
    """
    leaves = []
    for t in tensors_or_modules:
        if isinstance(t, torch.nn.Module):
            leaves.extend(t.parameters())
        elif isinstance(t, torch.Tensor):
            leaves.append(t)
        elif t is not None:
            leaves.extend(t)

    def reset():
        for p in leaves:
            p.grad = None
    return reset


def _run_split(c: Candidate, device, want_bwd: bool):
    """One forward and (optionally) one backward with timestamps between: (t_fwd, t_bwd)."""
    c._reset()
    sync(device)
    t0 = time.perf_counter()
    out = c.forward()
    sync(device)
    t1 = time.perf_counter()
    if not want_bwd:
        del out
        return t1 - t0, None
    c.backward(out)
    sync(device)
    t2 = time.perf_counter()
    del out
    return t1 - t0, t2 - t1


def _run_mode(c: Candidate, device, mode: str) -> float:
    c._reset()
    if mode == "backward":
        out = c.forward()  # untimed
        sync(device)
        t0 = time.perf_counter()
        c.backward(out)
        sync(device)
        t = time.perf_counter() - t0
    else:
        sync(device)
        t0 = time.perf_counter()
        out = c.forward()
        if mode == "full":
            c.backward(out)
        sync(device)
        t = time.perf_counter() - t0
    del out
    return t


def time_candidates(candidates: Sequence[Candidate], modes: Iterable[str] = MODES, *, reps: int = 10,
                    warmup: int = 2, device: Optional[torch.device] = None,
                    split: Optional[bool] = None, progress: Optional[Callable[[str], None]] = None
                    ) -> dict:
    """Time every candidate in every mode, round-robin, and return ``{name: {mode: Timing}}``.

    Round-robin: repetition r runs candidate A, then B, then C, ... so a burst of load from another
    process lands on all of them. ``warmup`` untimed round-robin passes come first.

    split: time forward, backward and forward+backward from one forward+backward call with a
        timestamp (and device sync) between them. Default: on CPU (where a sync is free and the
        forward/backward boundary costs nothing); on CUDA each mode gets its own round-robin pass
        instead, so the full mode keeps CPU launch / GPU work overlap across the boundary.
    """
    modes = tuple(modes)
    for m in modes:
        if m not in MODES:
            raise ValueError(f"unknown mode {m!r}; choose from {MODES}")
    device = device or torch.device("cpu")
    if split is None:
        split = device.type == "cpu"
    needs_bwd = any(m in ("backward", "full") for m in modes)
    # forward-only candidates (bandwidth baselines, ...) get forward samples only
    res = {c.name: {m: Timing([]) for m in modes if c.backward is not None or m == "forward"}
           for c in candidates}

    if split:
        for r in range(warmup + reps):
            for c in candidates:
                has_bwd = needs_bwd and c.backward is not None
                tf, tb = _run_split(c, device, has_bwd)
                if r < warmup:
                    continue
                if "forward" in modes:
                    res[c.name]["forward"].samples.append(tf)
                if has_bwd and "backward" in modes:
                    res[c.name]["backward"].samples.append(tb)
                if has_bwd and "full" in modes:
                    res[c.name]["full"].samples.append(tf + tb)
            if progress:
                progress(f"rep {r + 1 - warmup}/{reps}" if r >= warmup else f"warm-up {r + 1}/{warmup}")
        return res

    for m in modes:
        for r in range(warmup + reps):
            for c in candidates:
                if m != "forward" and c.backward is None:
                    continue
                t = _run_mode(c, device, m)
                if r >= warmup:
                    res[c.name][m].samples.append(t)
            if progress:
                progress(f"{m}: rep {r + 1 - warmup}/{reps}" if r >= warmup else f"{m}: warm-up")
    return res


# --------------------------------------------------------------------------- memory

@contextlib.contextmanager
def _quiet_stderr_fd():
    """Silence file descriptor 2 (kineto prints a 'profiler_start/stop' line there on each use)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # pytest capture: nothing to silence
        yield
        return
    sys.stderr.flush()
    saved, devnull = os.dup(fd), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)
        os.close(devnull)


def _profiler_memory_walk(fn: Callable[[], Any]) -> tuple[int, int]:
    """(peak, net) live bytes above the start of ``fn``, from torch.profiler allocation events."""
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False)
    with _quiet_stderr_fd():  # only around start and stop: fn's own errors stay visible
        prof.__enter__()
    try:
        fn()
    finally:
        with _quiet_stderr_fd():
            prof.__exit__(None, None, None)
    events = []
    for i, e in enumerate(prof.profiler.kineto_results.events()):
        if e.name() == "[memory]":
            events.append((e.start_ns(), i, int(e.nbytes())))
    events.sort()
    cur = peak = 0
    for _, _, nbytes in events:  # +size for an allocation, -size for a free
        cur += nbytes
        peak = max(peak, cur)
    return peak, cur


def empty_moe_kernels_pool() -> None:
    """Free the idle buffers of moe_kernels' cpu buffer pool (after collecting garbage that may hold some).

    The cpu kernels keep large buffers in a pool and reuse them across calls; a reuse is no
    allocation, so the memory walk would not see it. Emptying the pool first makes the measured call
    allocate every pooled buffer it uses; the pool keeps them to the end of the call, so they count
    as live from first use on (the steady-state footprint, or a little more). Scripts also call it
    between cells, so one cell's buffers are not carried into the next.
    """
    gc.collect()
    try:
        from moe_kernels import cpu_backend
    except ImportError:
        return
    cpu_backend.empty_cache()


def peak_memory(fn: Callable[[], Any], device: torch.device) -> dict:
    """Peak live torch-allocated bytes above the level at the start of ``fn()`` (and the net change).

    Everything allocated before the call (parameters, inputs, output-gradient buffers) is excluded;
    everything allocated inside (activations saved for backward, temporaries, and the gradients the
    backward produces) counts while it is alive. ``fn`` should leave nothing behind it does not
    mean to (the net value shows what it kept).
    """
    gc.collect()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        net = torch.cuda.memory_allocated(device) - base
        return {"peak_bytes": int(peak), "net_bytes": int(net), "method": "torch.cuda.max_memory_allocated"}
    empty_moe_kernels_pool()
    peak, net = _profiler_memory_walk(fn)
    return {"peak_bytes": int(peak), "net_bytes": int(net),
            "method": "torch.profiler(profile_memory=True) allocation/free events, running sum"}


def memory_probe_selftest(device: Optional[torch.device] = None) -> dict:
    """Check :func:`peak_memory` on a known pattern; raises AssertionError if it is off.

    Pattern (fp32): a = 4 MB, b = 8 MB, free a, c = 2 MB, free c  -> peak 12 MB, net +8 MB; then an
    autograd case: y = (x @ w) * 2 with x [512, 256], w [256, 1024] needing grad, y.sum().backward()
    -> the 2 MB product and the 2 MB y are alive together, net = the two gradients (0.5 + 1 MB).
    """
    device = device or torch.device("cpu")
    MB = 10 ** 6

    def pattern():
        a = torch.empty(MB, device=device)          # 4 MB
        b = torch.empty(2 * MB, device=device)      # 8 MB
        del a
        c = torch.empty(MB // 2, device=device)     # 2 MB
        del c, b

    got = peak_memory(pattern, device)
    assert got["peak_bytes"] == 12 * MB and got["net_bytes"] == 0, f"memory probe: pattern gave {got}"

    x = torch.randn(512, 256, device=device, requires_grad=True)
    w = torch.randn(256, 1024, device=device, requires_grad=True)

    def autograd_case():
        y = (x @ w) * 2
        y.sum().backward()

    got2 = peak_memory(autograd_case, device)
    prod = 512 * 1024 * 4
    grads = x.numel() * 4 + w.numel() * 4
    assert got2["net_bytes"] == grads, f"memory probe: autograd net {got2} != grads {grads}"
    assert 2 * prod <= got2["peak_bytes"] <= 2 * prod + grads + prod, f"memory probe: autograd {got2}"
    return {"pattern_peak_bytes": got["peak_bytes"], "autograd_peak_bytes": got2["peak_bytes"],
            "autograd_net_bytes": got2["net_bytes"], "method": got["method"], "ok": True}


# --------------------------------------------------------------------------- correctness

def check_close(actual: torch.Tensor, expected: torch.Tensor, name: str, *, dtype=None,
                rtol: Optional[float] = None, atol: Optional[float] = None,
                max_bad_fraction: float = 0.0, rows: bool = False):
    """Assert ``|actual - expected| <= atol * max|expected| + rtol * |expected|`` elementwise.

    Tolerances default to :data:`TOLERANCES` for ``dtype`` (default: ``expected.dtype``).
    ``max_bad_fraction`` lets a small fraction of *rows* fail (only for comparisons where routing
    near-ties can legitimately pick another expert; 0 by default). Returns the max abs error of
    the rows within tolerance relative to max|expected| (with ``rows=True``: that, the number of
    rows outside tolerance and the number of rows). Raises AssertionError with the numbers otherwise.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    dt = dtype or expected.dtype
    r0, a0 = TOLERANCES.get(dt, TOLERANCES[torch.float32])
    rtol = r0 if rtol is None else rtol
    atol = a0 if atol is None else atol
    rel, rel_all, bad_rows, n_rows = compare_rows(actual, expected, rtol, atol, name)
    if bad_rows and bad_rows / max(n_rows, 1) > max_bad_fraction:
        raise AssertionError(
            f"{name}: {bad_rows}/{n_rows} rows outside rtol={rtol}, atol={atol}*max|expected| "
            f"(max rel err {rel_all:.3g}, allowed bad-row fraction {max_bad_fraction})")
    return (rel, bad_rows, n_rows) if rows else rel


def compare_rows(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, name: str = ""):
    """Row-wise comparison (row = first dim): (max error of the rows within tolerance, max error of
    all rows, number of rows outside tolerance, number of rows); errors relative to max|expected|."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        raise AssertionError(f"{name}: result has NaN/inf")
    if e.dim() == 0:
        a, e = a.reshape(1), e.reshape(1)
    if e.numel() == 0:
        return 0.0, 0.0, 0, e.shape[0]
    scale = max(float(e.abs().max()), 1e-30)
    err = (a - e).abs()
    bad = (err > atol * scale + rtol * e.abs()).reshape(e.shape[0], -1).any(1)
    row_err = err.reshape(e.shape[0], -1).amax(1)
    good = row_err[~bad]
    return ((float(good.max()) / scale if good.numel() else 0.0), float(row_err.max()) / scale,
            int(bad.sum()), e.shape[0])


# --------------------------------------------------------------------------- environment

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> Optional[str]:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    """HEAD of the repository the benchmarks live in, and whether the work tree differs (read-only)."""
    try:
        root = BENCH_DIR.parent
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return f"{head}{' (modified)' if dirty else ''}" if head else None
    except Exception:
        return None


def command_line() -> str:
    """The exact command that produced a result (interpreter, script or ``-m`` module, arguments)."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(("pytest", "pytest/__main__.py", "py.test")):
        argv[0] = "pytest"
    elif argv and argv[0].endswith(".py"):
        try:
            argv[0] = os.path.relpath(argv[0])
        except ValueError:
            pass
        argv = ["python"] + argv
    return shlex.join(argv)


def environment(device: Optional[torch.device] = None, extra: Optional[dict] = None) -> dict:
    """Machine, versions, date and command line, for stamping every result file."""
    device = device or torch.device("cpu")
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    machine = {"hostname": socket.gethostname(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
               "cpus_usable": usable, "torch_num_threads": torch.get_num_threads(),
               "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
        machine["cuda"] = torch.version.cuda
    try:
        import moe_kernels

        mk_version = moe_kernels.__version__
    except Exception as exc:  # a broken install is still worth recording
        mk_version = f"import failed: {exc}"
    versions = {"python": platform.python_version(), "torch": torch.__version__, "moe_kernels": mk_version}
    for dist in ("deepspeed", "transformers", "megatron-core", "triton", "pytest-benchmark", "numpy"):
        versions[dist] = _version(dist)
    env = {k: os.environ[k] for k in ("MOE_KERNELS_BACKEND", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                      "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES") if k in os.environ}
    out = {"date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": command_line(), "cwd": os.getcwd(), "git_commit": _git_commit(),
           "machine": machine, "versions": versions, "env": env}
    if extra:
        out.update(extra)
    return out


# --------------------------------------------------------------------------- results

def fmt_ms(seconds: Optional[float]) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_timing(t: Optional[Timing]) -> str:
    """``median [p20-p80]`` in ms."""
    if t is None or not t.samples:
        return "-"
    return f"{fmt_ms(t.median)} [{fmt_ms(t.p20)}-{fmt_ms(t.p80)}]"


def fmt_ratio(x: Optional[float]) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def fmt_mib(nbytes: Optional[int]) -> str:
    return "-" if nbytes is None else f"{nbytes / 2 ** 20:.1f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    def cell(v):
        return str(v).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, Timing):
        return obj.to_dict()
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "__dataclass_fields__"):
        return _jsonable(asdict(obj))
    return obj


def meta_markdown(meta: dict) -> str:
    m, v = meta["machine"], meta["versions"]
    lines = [f"- command: `{meta['command']}`",
             f"- date (UTC): {meta['date_utc']}; git: {meta.get('git_commit') or '-'}",
             f"- machine: {m['cpu_model']}, {m['cpu_count']} cores ({m['cpus_usable']} usable), "
             f"torch threads {m['torch_num_threads']}, device {m['device']}"
             + (f" ({m['gpu']}, CUDA {m.get('cuda')})" if "gpu" in m else ""),
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val)]
    if meta.get("env"):
        lines.append("- env: " + ", ".join(f"{k}={val}" for k, val in meta["env"].items()))
    for key in ("backend", "timing", "memory", "peers"):
        if key in meta:
            lines.append(f"- {key}: {meta[key]}")
    return "\n".join(lines)


def write_results(stem, meta: dict, results: Any, markdown_body: str, title: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (meta + raw results) and ``<stem>.md`` (meta + tables).

    ``stem`` is a path without suffix; a bare name goes to ``benchmarks/results/``.
    """
    stem = Path(stem)
    if stem.parent == Path("."):
        stem = RESULTS_DIR / stem
    stem.parent.mkdir(parents=True, exist_ok=True)
    jpath, mpath = Path(f"{stem}.json"), Path(f"{stem}.md")
    jpath.write_text(json.dumps(_jsonable({"meta": meta, "results": results}), indent=1) + "\n")
    mpath.write_text(f"# {title}\n\n{meta_markdown(meta)}\n\n{markdown_body.rstrip()}\n")
    return jpath, mpath
