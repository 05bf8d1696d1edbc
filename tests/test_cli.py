"""The moe-kernels command line."""

import io
import subprocess
import sys

from moe_kernels import cli


def test_info_reports_every_backend():
    out = io.StringIO()
    assert cli.info(out) == 0
    text = out.getvalue()
    for name in ("reference", "cpu", "triton", "cuda"):
        assert f"\n  {name} " in text
    assert "torch" in text and "MOE_KERNELS_BACKEND" in text and "auto on cpu" in text


def test_module_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "moe_kernels", "info"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "backends" in res.stdout


def test_demo_trains_and_prints_usage(capsys):
    assert cli.main(["demo", "--steps", "30", "--no-bench"]) == 0
    out = capsys.readouterr().out
    assert "expert usage per dataset" in out and "dropped" in out
    # the loss went down on every dataset: the final eval loss is below the first batch's loss
    rows = [l for l in out.splitlines() if "(" in l and l.strip()[:1].isdigit() and ")" in l]
    assert len(rows) == 3
    for row in rows:
        final, first = row.rsplit(" ", 2)[-2:]
        assert float(final) < float(first.strip("()"))


def test_demo_first_run_is_quiet():
    """A newcomer's first run: no NumPy warning, no fallback warning (the mutual-information losses
    run on the reference by design, not as a fallback)."""
    res = subprocess.run([sys.executable, "-W", "default", "-m", "moe_kernels", "demo", "--steps", "3",
                          "--no-bench"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    noisy = [ln for ln in res.stderr.splitlines() if "Warning" in ln or "NumPy" in ln or "fall" in ln]
    assert not noisy, res.stderr
