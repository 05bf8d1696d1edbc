"""Unit tests of the benchmark harness itself (fast; no timing claims).

    pytest benchmarks/test_harness.py
"""

from __future__ import annotations

import json

import pytest
import torch

import harness


def test_percentile_and_timing():
    t = harness.Timing([5.0, 1.0, 3.0, 2.0, 4.0])
    assert t.median == 3.0
    assert t.p20 == pytest.approx(1.8)
    assert t.p80 == pytest.approx(4.2)
    assert harness.percentile([], 50) != harness.percentile([], 50)  # nan


def test_round_robin_order_and_modes():
    calls = []

    def cand(name):
        def fwd():
            calls.append((name, "f"))
            return name

        def bwd(out):
            calls.append((out, "b"))
        return harness.Candidate(name, fwd, bwd, reset=lambda: calls.append((name, "r")))

    fwd_only = harness.Candidate("C", lambda: calls.append(("C", "f")))
    res = harness.time_candidates([cand("A"), cand("B"), fwd_only], reps=2, warmup=1)
    # split mode (CPU): per repetition A then B then C; each of A, B: reset, forward, backward
    assert calls[:8] == [("A", "r"), ("A", "f"), ("A", "b"), ("B", "r"), ("B", "f"), ("B", "b"),
                         ("C", "f"), ("A", "r")]
    assert set(res["A"]) == {"forward", "backward", "full"} and set(res["C"]) == {"forward"}
    assert all(len(t.samples) == 2 for t in res["A"].values())
    r = res["A"]
    for a, b, full in zip(r["forward"].samples, r["backward"].samples, r["full"].samples):
        assert full == pytest.approx(a + b)

    calls.clear()
    res = harness.time_candidates([cand("A"), cand("B")], modes=("backward",), reps=1, warmup=0, split=False)
    # backward mode: an untimed forward, then the timed backward, candidate by candidate
    assert calls == [("A", "r"), ("A", "f"), ("A", "b"), ("B", "r"), ("B", "f"), ("B", "b")]
    assert list(res["A"]) == ["backward"]


def test_memory_probe_selftest():
    out = harness.memory_probe_selftest()
    assert out["ok"] and out["pattern_peak_bytes"] == 12 * 10 ** 6


def test_peak_memory_excludes_what_exists_before():
    big = torch.empty(4 * 2 ** 20)  # 16 MiB allocated before: not counted

    def fn():
        t = torch.empty(2 ** 20)  # 4 MiB
        del t
        return big.sum()

    got = harness.peak_memory(fn, torch.device("cpu"))
    assert 4 * 2 ** 20 <= got["peak_bytes"] < 4 * 2 ** 20 + 4096


def test_peak_memory_dense_mlp_matches_hand_count():
    # gelu(X W1^T) W2^T forward + backward; fp32, N rows, d -> h -> d
    N, d, h = 2048, 64, 256
    x = torch.randn(N, d, requires_grad=True)
    w1, w2 = torch.randn(h, d, requires_grad=True), torch.randn(d, h, requires_grad=True)
    g = torch.randn(N, d)

    def fn():
        y = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1)), w2)
        y.backward(g)

    got = harness.peak_memory(fn, torch.device("cpu"))
    nh, nd = N * h * 4, N * d * 4
    # forward keeps z = X W1^T (for gelu) and a = gelu(z) (for the 2nd matmul) and makes y.
    # backward: da = g W2 [N, h]; the 2nd matmul's node then frees a; gelu's backward makes
    # dz [N, h] while z and da are alive -> worst moment: z, da, dz and y = 3*N*h + N*d floats.
    assert got["net_bytes"] == nd + (h * d + d * h) * 4  # what stays: the gradients of x, w1, w2
    assert 3 * nh + nd <= got["peak_bytes"] <= 3 * nh + 2 * nd + (h * d + d * h) * 4, got


def test_check_close():
    e = torch.randn(100, 8)
    assert harness.check_close(e.clone(), e, "same") == 0.0
    bad = e.clone()
    bad[3] += 1.0
    with pytest.raises(AssertionError, match="1/100 rows"):
        harness.check_close(bad, e, "one bad row")
    rel, nbad, n = harness.check_close(bad, e, "allowed", max_bad_fraction=0.02, rows=True)
    assert (nbad, n) == (1, 100) and rel == 0.0
    with pytest.raises(AssertionError, match="NaN"):
        harness.check_close(torch.full_like(e, float("nan")), e, "nan")


def test_distinct_logits_have_no_ties_in_bf16():
    lg = harness.distinct_logits(64, 64, torch.bfloat16, "cpu")
    assert lg.dtype == torch.bfloat16
    assert all(len(set(row.tolist())) == 64 for row in lg)


def test_write_results(tmp_path):
    meta = harness.environment()
    for key in ("date_utc", "command", "machine", "versions"):
        assert key in meta
    assert meta["machine"]["cpu_count"] >= 1 and meta["versions"]["torch"] == torch.__version__
    rows = [{"t": harness.Timing([1.0, 2.0])}]
    j, m = harness.write_results(tmp_path / "x.y", meta, rows, "| a |", "title")
    assert j.name == "x.y.json" and m.name == "x.y.md"
    data = json.loads(j.read_text())
    assert data["results"][0]["t"]["median_s"] == 1.5 and data["meta"]["command"] == meta["command"]
    assert "title" in m.read_text() and meta["machine"]["cpu_model"] in m.read_text()


def test_shapes_file():
    """shapes.json: every section documented, with full shapes; the --quick configs keep E and k,
    are named <name>-quick and stay tiny (CI runs them)."""
    table = json.loads(harness.SHAPES_FILE.read_text())
    sections = [name for name in table if not name.startswith("_")]
    assert all("_doc" in table[s] and "full" in table[s] for s in sections)
    full, quick = harness.configs(False), harness.configs(True)
    assert [q.name for q in quick] == [f"{f.name}-quick" for f in full]
    assert all((q.E, q.k) == (f.E, f.k) and q.T * q.d <= 2 ** 15 for f, q in zip(full, quick))
    assert harness.configs(True, "C,A") == [quick[2], quick[0]]
    opts = harness.shape_options("overhead")
    assert opts[::2] == [f"--{key}" for key in harness.shapes("overhead")]
    with pytest.raises(KeyError, match="no section"):
        harness.shapes("_doc")
