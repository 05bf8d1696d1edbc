"""The README's DeepSpeed job runs as written: ``examples/deepspeed/run.sh`` (the deepspeed launcher, 2 CPU
processes, ZeRO-2, expert parallelism over both) with ``--convert`` (the converter's worked example)."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (bash scripts/setup.sh test)")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # all gone already
        pass


@pytest.mark.slow
@pytest.mark.distributed
def test_example_deepspeed_job_runs_and_converter_keeps_the_loss(deepspeed_ops):
    from moe_kernels.distributed import free_port

    env = dict(os.environ, MASTER_PORT=str(free_port()), PYTHONFAULTHANDLER="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    # its own session: on a timeout the launcher and both ranks are killed, not only the launcher (ranks
    # left running would hold their locks and ports for the tests after this one)
    proc = subprocess.Popen(["bash", str(ROOT / "examples/deepspeed/run.sh"), "--steps", "3", "--convert"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGABRT)  # PYTHONFAULTHANDLER: each Python process prints its stack
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            out = "(no output: the processes did not exit after SIGABRT)"
        _signal_group(proc, signal.SIGKILL)
        pytest.fail(f"the DeepSpeed example ran past {TIMEOUT_S} s; its output, with each process's stack "
                    f"at the kill:\n{(out or '')[-8000:]}")
    assert proc.returncode == 0, out[-4000:]
    pairs = re.findall(r"\[rank (\d)\] converter: loss with deepspeed.moe.layer.MoE ([\d.]+), "
                       r"after convert_deepspeed_moe ([\d.]+)", out)
    assert sorted(r for r, _, _ in pairs) == ["0", "1"], out[-4000:]
    assert all(a == b for _, a, b in pairs), pairs
    assert re.search(r"step\s+2\s+loss [\d.]+", out), out[-4000:]
