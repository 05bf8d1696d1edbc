"""The README's DeepSpeed job runs as written: ``examples/deepspeed/run.sh`` (the deepspeed launcher, 2 CPU
processes, ZeRO-2, expert parallelism over both) with ``--convert`` (the converter's worked example)."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (bash scripts/setup.sh test)")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.distributed
def test_example_deepspeed_job_runs_and_converter_keeps_the_loss():
    from moe_kernels.distributed import free_port

    env = dict(os.environ, MASTER_PORT=str(free_port()),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(["bash", str(ROOT / "examples/deepspeed/run.sh"), "--steps", "3", "--convert"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    pairs = re.findall(r"\[rank (\d)\] converter: loss with deepspeed.moe.layer.MoE ([\d.]+), "
                       r"after convert_deepspeed_moe ([\d.]+)", out)
    assert sorted(r for r, _, _ in pairs) == ["0", "1"], out[-4000:]
    assert all(a == b for _, a, b in pairs), pairs
    assert re.search(r"step\s+2\s+loss [\d.]+", out), out[-4000:]
