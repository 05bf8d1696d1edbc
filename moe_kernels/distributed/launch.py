"""Run a function in N local processes (a small ``torchrun`` for tests, examples and notebooks).

Every failure comes back to the caller: a child's exception is re-raised in the parent with the child's
traceback, a child that dies without reporting (segfault, ``os._exit``) is reported with its exit code,
and a job that runs past ``timeout`` is killed and reported, so nothing hangs.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable, Optional, Sequence

from .._validation import check, check_int


class ChildProcessFailed(RuntimeError):
    """A process started by :func:`run_processes` raised, died, or ran past the timeout."""


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(fn, rank, world_size, port, backend, args, env, threads, timeout, results):
    try:
        os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                           "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                           "LOCAL_WORLD_SIZE": str(world_size)})
        os.environ.update(env or {})
        # a hang shows where it is: shortly before the parent gives up, every thread's stack goes to
        # this process's stderr (the parent's, inherited)
        faulthandler.dump_traceback_later(max(timeout - 10.0, 0.9 * timeout), exit=False)
        import torch
        import torch.distributed as dist
        if threads:
            torch.set_num_threads(threads)
        if backend is not None:
            dist.init_process_group(backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout))
        try:
            out = fn(rank, world_size, *args)
        finally:
            if dist.is_initialized():
                try:
                    dist.destroy_process_group()
                except Exception:  # best effort: the result is what matters
                    pass
        # pickled here by value: a tensor put on the queue as-is travels as a shared-memory handle that
        # dies with this process
        faulthandler.cancel_dump_traceback_later()
        results.put((rank, "ok", pickle.dumps(out)))
    except BaseException:  # report everything, including SystemExit and KeyboardInterrupt
        faulthandler.cancel_dump_traceback_later()
        results.put((rank, "error", traceback.format_exc()))


def run_processes(fn: Callable[..., Any], nprocs: int = 2, *, args: Sequence = (),
                  backend: Optional[str] = "gloo", timeout: float = 120.0,
                  env: Optional[dict] = None, threads: Optional[int] = 1, prebuild: bool = True) -> list:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` fresh processes and return their results.

    Each process gets ``MASTER_ADDR``/``MASTER_PORT`` (a free port)/``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
    and, unless ``backend`` is None, an initialised default process group (``fn`` may instead call
    ``deepspeed.init_distributed()`` itself, which picks up the same variables).

    Args:
        fn: a module-level (picklable) function; its return value must be picklable.
        nprocs: number of processes.
        args: extra positional arguments for ``fn``.
        backend: ``"gloo"`` (CPU), ``"nccl"`` (CUDA) or None (do not initialise).
        timeout: seconds for the whole job (and the process group's collective timeout).
        env: extra environment variables for the children.
        threads: ``torch.set_num_threads`` in each child (None leaves torch's default).
        prebuild: build (or load) the library's C++ CPU kernels in this process first, so the children
            load them from the cache instead of each compiling them (about a minute on a cold cache).

    Returns:
        ``[result of rank 0, result of rank 1, ...]``.

    Raises:
        ChildProcessFailed: with the failing rank's traceback, or after ``timeout``.

    Example:
        >>> def hello(rank, world):  # must live in an importable module
        ...     return rank * 10
        >>> run_processes(hello, 2)  # doctest: +SKIP
        [0, 10]
    """
    op = "distributed.run_processes"
    check(callable(fn), op, "fn", "must be callable")
    check_int(nprocs, op, "nprocs", lo=1)
    check(isinstance(timeout, (int, float)) and timeout > 0, op, "timeout", f"must be > 0, got {timeout!r}")
    import torch.multiprocessing as mp

    if prebuild:
        from ..backends import BACKENDS
        BACKENDS["cpu"].available  # builds (or loads) the C++ kernels once here; never raises
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, daemon=True,
                         args=(fn, r, nprocs, port, backend, tuple(args), env, threads, timeout, results))
             for r in range(nprocs)]
    for p in procs:
        p.start()
    out: dict = {}
    deadline = time.monotonic() + timeout
    failure = None
    try:
        while len(out) < nprocs and failure is None:
            left = deadline - time.monotonic()
            if left <= 0:
                failure = (f"timed out after {timeout:.0f} s; ranks that finished: {sorted(out)} (each "
                           "unfinished rank printed its stack to stderr shortly before)")
                break
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
            except queue_mod.Empty:
                dead = [(r, p.exitcode) for r, p in enumerate(procs)
                        if r not in out and p.exitcode is not None]
                if dead:
                    time.sleep(0.5)  # a report may still be in the pipe
                    try:
                        rank, status, value = results.get_nowait()
                    except queue_mod.Empty:
                        failure = "; ".join(f"rank {r} exited with code {c} without reporting"
                                            for r, c in dead)
                        break
                else:
                    continue
            if status == "ok":
                out[rank] = pickle.loads(value)
            else:
                # the first report is often a peer's "connection reset": collect the others' for a
                # moment so the root cause is in the message too
                errors = {rank: value}
                grace = time.monotonic() + 5.0
                while len(errors) + len(out) < nprocs and time.monotonic() < grace:
                    try:
                        r2, s2, v2 = results.get(timeout=0.25)
                    except queue_mod.Empty:
                        continue
                    if s2 != "ok":
                        errors[r2] = v2
                failure = "\n".join(f"rank {r} raised:\n{errors[r]}" for r in sorted(errors))
                died = [(r, p.exitcode) for r, p in enumerate(procs)
                        if r not in out and r not in errors and p.exitcode not in (None, 0)]
                if died:  # e.g. a C++ abort inside a collective: its message is on the child's stderr
                    failure += "".join(f"\nrank {r} died with exit code {c} without reporting (its stderr "
                                       "has the reason)" for r, c in died)
    finally:
        if failure is not None:
            for p in procs:
                if p.is_alive():
                    p.kill()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if failure is not None:
        raise ChildProcessFailed(failure)
    return [out[r] for r in range(nprocs)]


__all__ = ["ChildProcessFailed", "free_port", "run_processes"]
