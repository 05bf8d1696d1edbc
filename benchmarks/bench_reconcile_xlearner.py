"""The X-Learner reconciliation sweep: fused conv1x1 + BatchNorm + ReLU links vs plain PyTorch.

    python benchmarks/bench_reconcile_xlearner.py                      # the full sweep (long)
    python benchmarks/bench_reconcile_xlearner.py --quick              # CI smoke run, tiny stages
    python benchmarks/bench_reconcile_xlearner.py [--batches 32,8] [--tasks 2,3] [--stages 1,2,3,4]
        [--dtypes fp32,bf16] [--candidates ...] [--reps 7] [--reps-stage1 5] [--backend NAME]
    python benchmarks/bench_reconcile_xlearner.py --render RESULTS.json [--notes NOTES.md]

One case is one reconciliation layer of X-Learner ("X-Learner: Learning Cross Sources and Tasks for
Universal Visual Representation", arXiv:2203.08764): the T - 1 links gamma_b = conv1x1 + BatchNorm
(training) + ReLU into one task's stage output of a ResNet-50, at the stage shapes of section
``reconcile_xlearner`` of benchmarks/shapes.json (``--quick``: its tiny stages at batch 2). The
candidates with a backward are checked against an fp64 truth before anything is timed; all
candidates of a case are timed round-robin, with peak memory. What the candidates are:
``XLEARNER_DOC`` below, which also heads the results page
``benchmarks/results/reconcile_xlearner[-quick].{json,md}`` (or ``--out``). ``pytest benchmarks
--quick`` smoke-runs it (``test_reconcile_xlearner_quick``). The per-op benchmark of mk.reconcile
on token and map cases is ``benchmarks/bench_reconcile.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import moe_kernels as mk  # noqa: E402

XLEARNER_DOC = """\
X-Learner (Sec. 3.2, Eq. 2) fuses detached features of the other tasks into each task's stage
output: F_i^t = E_i^t + sum_{k != t} gamma_b(stopgrad(E_i^k)) for the same-level links, with
gamma_b = conv1x1 + BatchNorm (training: batch statistics) + ReLU (INTERN's "Non-Linear" module).
One case is one reconciliation layer: the T - 1 links into one task's stage output of a ResNet-50
at 224x224 input (stage outputs 256x56x56, 512x28x28, 1024x14x14, 2048x7x7; all T targets of a
stage cost T times one case). The aux inputs are leaves that require grad (standing in for the
other branches' features): every candidate must leave their .grad None.

Candidates (same initial weights, BN parameters and running statistics):
  fused      mk.reconcile(main, aux, W, activation="relu", batch_norm=True, bn_weight, bn_bias,
             running_mean, running_var) on channels-last maps (NHWC views of channels_last
             tensors), W = the 1x1 conv weights' [C_in, C_out] views: one op for all links;
             backward keeps only per-channel mean/inv-std and recomputes aux @ W.
  plain      the plain PyTorch composition: main + sum_k relu(bn_k(conv_k(aux_k.detach()))) with
             nn.Conv2d(1x1, bias=False) / nn.BatchNorm2d in training mode, NCHW (contiguous).
  plain_cl   the same modules on channels_last tensors.
  module     mk.nn.ReconciliationLayer(norm="bn", activation="relu", layout="nhwc") in training
             mode (its batch-statistics links run through the fused op, the residual add outside).
  conv1x1_fwd, conv1x1_wgrad   forward-only references: the T - 1 link GEMMs alone (oneDNN 1x1
             convolutions on channels-last maps; the weight gradient via aten.convolution_backward).
             The plain composition needs one of each per link, the fused op one more forward (the
             recompute in its backward).
"""

XL_CANDIDATES = ("fused", "plain", "plain_cl", "module", "conv1x1_fwd", "conv1x1_wgrad")


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _load():
    return [round(x, 2) for x in os.getloadavg()]


class XLProblem:
    """Inputs and per-candidate parameter copies of one reconciliation layer."""

    def __init__(self, C, H, batch, links, dtype, seed=0):
        self.C, self.H, self.B, self.L, self.dtype = C, H, batch, links, dtype
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g) * scale).to(dtype)

        self.main = rnd(batch, C, H, H)
        self.aux = [rnd(batch, C, H, H) for _ in range(links)]
        self.grad = rnd(batch, C, H, H)
        bound = (6.0 / (2 * C)) ** 0.5  # Glorot (X-Learner Sec. 4.1: reconciliation layers use [20])
        self.conv_w = [((torch.rand(C, C, 1, 1, generator=g) * 2 - 1) * bound).to(dtype)
                       for _ in range(links)]
        self.gamma = [(torch.rand(C, generator=g) + 0.5).to(dtype) for _ in range(links)]
        self.beta = [(torch.randn(C, generator=g) * 0.1).to(dtype) for _ in range(links)]

    def leaves(self, channels_last):
        mf = torch.channels_last if channels_last else torch.contiguous_format
        main = self.main.clone(memory_format=mf).requires_grad_()
        aux = [a.clone(memory_format=mf).requires_grad_() for a in self.aux]
        return main, aux, self.grad.clone(memory_format=mf)

    def modules(self):
        convs, bns = [], []
        for i in range(self.L):
            c = torch.nn.Conv2d(self.C, self.C, 1, bias=False).to(self.dtype)
            b = torch.nn.BatchNorm2d(self.C).to(self.dtype)
            with torch.no_grad():
                c.weight.copy_(self.conv_w[i])
                b.weight.copy_(self.gamma[i])
                b.bias.copy_(self.beta[i])
            convs.append(c)
            bns.append(b)
        return torch.nn.ModuleList(convs), torch.nn.ModuleList(bns)


class XLBuilt:
    def __init__(self, name, fwd, leaves, grad, aux, notes="", backward=True, bns=None, weight_grads=None):
        self.name, self.fwd, self.leaves, self.grad, self.aux = name, fwd, leaves, grad, aux
        self.notes, self.backward, self.bns, self.weight_grads = notes, backward, bns, weight_grads


def xl_build(name, p: XLProblem, backend):
    if name in ("plain", "plain_cl"):
        main, aux, grad = p.leaves(channels_last=name == "plain_cl")
        convs, bns = p.modules()
        if name == "plain_cl":
            convs = convs.to(memory_format=torch.channels_last)

        def fwd():
            out = main
            for a, c, b in zip(aux, convs, bns):
                out = out + F.relu(b(c(a.detach())))
            return out
        wg = lambda: [c.weight.grad.reshape(p.C, p.C).t() for c in convs]
        return XLBuilt(name, fwd, [main, *convs.parameters(), *bns.parameters()], grad, aux,
                       "NCHW" if name == "plain" else "channels_last", bns=list(bns), weight_grads=wg)
    if name == "fused":
        main, aux, grad = p.leaves(channels_last=True)
        mv, av, gv = main.permute(0, 2, 3, 1), [a.permute(0, 2, 3, 1) for a in aux], grad.permute(0, 2, 3, 1)
        # the link weights as the model holds them: 1x1 conv weights [C, C, 1, 1], passed as their
        # [C_in, C_out] transposed views (no copy; the gradient comes back in the conv layout)
        conv_w = [w.clone().requires_grad_() for w in p.conv_w]
        ws = [w.view(p.C, p.C).t() for w in conv_w]
        gam = [t.clone().requires_grad_() for t in p.gamma]
        bet = [t.clone().requires_grad_() for t in p.beta]
        bns = [torch.nn.BatchNorm2d(p.C).to(p.dtype) for _ in range(p.L)]  # holders of the running stats
        rms, rvs = [b.running_mean for b in bns], [b.running_var for b in bns]

        def fwd():
            return mk.reconcile(mv, av, ws, None, "relu", batch_norm=True, bn_weight=gam, bn_bias=bet,
                                running_mean=rms, running_var=rvs, momentum=0.1, eps=1e-5, backend=backend)
        for b, gm, bt in zip(bns, gam, bet):  # for the correctness check only
            b.weight, b.bias = torch.nn.Parameter(gm.detach()), torch.nn.Parameter(bt.detach())
        built = XLBuilt(name, fwd, [main, *conv_w, *gam, *bet], gv, aux,
                        f"backend {harness.resolved_backend('reconcile', torch.device('cpu'), backend)}",
                        bns=bns, weight_grads=lambda: [w.grad.view(p.C, p.C).t() for w in conv_w])
        built.bn_grads = lambda: ([t.grad for t in gam], [t.grad for t in bet])
        return built
    if name == "module":
        main, aux, grad = p.leaves(channels_last=True)
        mv, av, gv = main.permute(0, 2, 3, 1), [a.permute(0, 2, 3, 1) for a in aux], grad.permute(0, 2, 3, 1)
        layer = mk.nn.ReconciliationLayer(p.C, [p.C] * p.L, norm="bn", activation="relu", layout="nhwc",
                                          backend=backend).to(p.dtype)
        with torch.no_grad():
            for i, gb in enumerate(layer.links):
                gb.conv.weight.copy_(p.conv_w[i])
                gb.norm.weight.copy_(p.gamma[i])
                gb.norm.bias.copy_(p.beta[i])
        return XLBuilt(name, lambda: layer(mv, av), [main, *layer.parameters()], gv, aux,
                       "nn.ReconciliationLayer, nhwc", bns=[gb.norm for gb in layer.links],
                       weight_grads=lambda: [gb.conv.weight.grad.reshape(p.C, p.C).t() for gb in layer.links])
    if name in ("conv1x1_fwd", "conv1x1_wgrad"):
        _, aux, grad = p.leaves(channels_last=True)
        ws = [w.contiguous() for w in p.conv_w]
        if name == "conv1x1_fwd":
            fwd = lambda: [F.conv2d(a.detach(), w) for a, w in zip(aux, ws)]
        else:
            fwd = lambda: [torch.ops.aten.convolution_backward(
                grad, a.detach(), w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False])[1]
                for a, w in zip(aux, ws)]
        return XLBuilt(name, fwd, [], None, aux, "forward-only reference", backward=False)
    raise ValueError(name)


def xl_truth(p: XLProblem):
    """Output, d main and d W of one step in fp64 (the reference backend on fp64 copies of the same
    inputs and parameters), and the running statistics it leaves."""
    main = p.main.double().permute(0, 2, 3, 1).contiguous().requires_grad_()
    ws = [w.reshape(p.C, p.C).t().double().contiguous().requires_grad_() for w in p.conv_w]
    rm = [torch.zeros(p.C, dtype=torch.float64) for _ in range(p.L)]
    rv = [torch.ones(p.C, dtype=torch.float64) for _ in range(p.L)]
    out = mk.reconcile(main, [a.double().permute(0, 2, 3, 1).contiguous() for a in p.aux], ws, None, "relu",
                       batch_norm=True, bn_weight=[t.double() for t in p.gamma],
                       bn_bias=[t.double() for t in p.beta],
                       running_mean=rm, running_var=rv, backend="reference")
    out.backward(p.grad.double().permute(0, 2, 3, 1))
    return dict(out=out.detach().permute(0, 3, 1, 2), main=main.grad.permute(0, 3, 1, 2),
                w=[w.grad for w in ws], rm=rm, rv=rv)


def xl_check(built: dict, p: XLProblem):
    """Every candidate with a backward against the fp64 truth (xl_truth): output, d main, d W and
    the running statistics after one step; the aux inputs must get no gradient.

    Errors are max |actual - truth| / max |truth| per quantity. The library's candidates (fused,
    module) must be within the harness tolerances of the dtype, or no further from the truth than
    twice the plain composition's error on the same quantity, or nothing is timed. d W may have up
    to max(2, C/100) output channels outside the tolerances: where u = BN(z) is within rounding of 0
    for some pixel, the computed and the exact relu masks differ there, which moves that channel's
    column of d W by |a * g| (seen in fp32: 0.7% of max|d W| for one channel of the plain
    composition at stage 3, batch 8, and 1.4% for one of the fused op's at stage 4, batch 32, each
    time with the other one exact; in bf16, where z is rounded to 8 bits before the BN, such pixels
    are common in every implementation).
    """
    want = xl_truth(p)
    errs = {}
    for name, b in built.items():
        if not b.backward:
            continue
        for leaf in b.leaves:
            leaf.grad = None
        out = b.fwd()
        out_nchw = out.permute(0, 3, 1, 2) if name in ("fused", "module") else out
        torch.autograd.backward([out], [b.grad])
        assert all(a.grad is None for a in b.aux), f"{name}: an aux input received a gradient"
        got = {"output": out_nchw, "d main": b.leaves[0].grad}
        for i, wg in enumerate(b.weight_grads()):
            got[f"d W[{i}]"] = wg
            got[f"running_mean[{i}]"] = b.bns[i].running_mean
            got[f"running_var[{i}]"] = b.bns[i].running_var
        exp = {"output": want["out"], "d main": want["main"]}
        for i in range(p.L):
            exp[f"d W[{i}]"], exp[f"running_mean[{i}]"], exp[f"running_var[{i}]"] = (
                want["w"][i], want["rm"][i], want["rv"][i])
        rtol, atol = harness.TOLERANCES[p.dtype]
        errs[name] = {}
        for k, v in got.items():
            if k.startswith("d W"):  # rows = output channels: a relu-mask flip moves one of them
                _, rel, bad, _ = harness.compare_rows(v.t(), exp[k].t(), rtol, atol, f"{name}: {k}")
                errs[name][k] = (rel, bad <= max(2, p.C // 100))
            else:
                _, rel, bad, _ = harness.compare_rows(v, exp[k], rtol, atol, f"{name}: {k}")
                errs[name][k] = (rel, bad == 0)
    msgs = {}
    for name, e in errs.items():
        worst = max(rel for rel, _ in e.values())
        plain = errs.get("plain", {})
        if name in ("fused", "module"):
            for k, (rel, ok) in e.items():
                if not ok and not (k in plain and rel <= 2 * plain[k][0]):
                    raise AssertionError(f"{name}: {k}: max error {rel:.3g} of max|fp64 truth| is outside "
                                         f"the "
                                         f"{p.dtype} tolerances and over twice the plain composition's "
                                         f"({plain.get(k, (float('nan'),))[0]:.3g}); refusing to time it")
        msgs[name] = f"max rel err {worst:.2g} vs fp64"
    for b in built.values():  # undo the check's step: fresh running statistics for the timing
        for x in (b.bns or []):
            x.reset_running_stats()
    return msgs


def xl_case(stage, T, batch, dtype, args):
    C, H = (args.shapes["stages"][str(stage)][k] for k in ("C", "H"))
    L = T - 1
    dname = harness.dtype_name(dtype)
    cid = f"stage{stage} {C}x{H}x{H} B={batch} T={T} ({L} link{'s' if L > 1 else ''}) {dname}"
    p = XLProblem(C, H, batch, L, dtype, seed=stage * 100 + T)
    built = {n: xl_build(n, p, args.backend) for n in args.candidates}
    checks = xl_check(built, p)
    reps = args.reps if not (stage == 1 and batch >= 32 and args.reps_stage1) else args.reps_stage1
    cands = [harness.Candidate(b.name, b.fwd, harness.autograd_backward(b.grad) if b.backward else None,
                               harness.drop_grads(b.leaves) if b.backward else None, {"notes": b.notes})
             for b in built.values()]
    load0 = _load()
    t0 = time.perf_counter()
    timings = harness.time_candidates(cands, reps=reps, warmup=args.warmup, device=torch.device("cpu"))
    load1 = _load()
    log(f"{cid}: timed in {time.perf_counter() - t0:.1f} s (load {load0} -> {load1})")
    rows = []
    for c in cands:
        b = built[c.name]
        mem = None
        if b.backward and not args.no_memory:
            c._reset()
            mem = harness.peak_memory(lambda c=c: c.backward(c.forward()), torch.device("cpu"))
            grads = sum(t.numel() * t.element_size() for t in b.leaves[1:] if t.requires_grad)
            mem["param_grad_bytes"] = grads
            mem["activation_bytes"] = mem["peak_bytes"] - grads
            mem["aux_grad_bytes"] = sum(a.grad.numel() * a.element_size() for a in b.aux
                                        if a.grad is not None)
            c._reset()
        rows.append({"candidate": c.name, "notes": b.notes, "check": checks.get(c.name, "-"),
                     "timings": timings[c.name], "memory": mem, "reps": reps})
    for b in built.values():
        for x in b.leaves:
            x.grad = None
    return {"case": cid, "stage": stage, "C": C, "H": H, "batch": batch, "T": T, "links": L, "dtype": dname,
            "reps": reps, "load_before": load0, "load_after": load1, "rows": rows}


def _med(row, mode):
    t = row["timings"].get(mode)
    return t.median if t is not None and t.samples else None


def xl_case_markdown(case):
    rows = {r["candidate"]: r for r in case["rows"]}
    base = rows.get("plain")
    headers = ["candidate", "fwd ms [p20-p80]", "bwd ms [p20-p80]", "fwd+bwd ms [p20-p80]",
               "plain / this (fwd+bwd)",
               "peak MiB", "act MiB", "act vs plain", "aux grad B", "check", "notes"]
    out = []
    for name, r in rows.items():
        t = r["timings"]
        speed = (_med(base, "full") / _med(r, "full")) if base and _med(r, "full") else None
        mem = r["memory"]
        act = mem["activation_bytes"] if mem else None
        bact = base["memory"]["activation_bytes"] if base and base["memory"] else None
        out.append([name, harness.fmt_timing(t.get("forward")), harness.fmt_timing(t.get("backward")),
                    harness.fmt_timing(t.get("full")), harness.fmt_ratio(speed),
                    harness.fmt_mib(mem["peak_bytes"] if mem else None), harness.fmt_mib(act),
                    (f"{100 * (act / bact - 1):+.0f}%" if act is not None and bact else "-"),
                    (str(mem["aux_grad_bytes"]) if mem else "-"), r["check"], r["notes"]])
    return (f"### {case['case']}\n\n{case['reps']} reps; load average {case['load_before']} -> "
            f"{case['load_after']}\n\n" + harness.markdown_table(headers, out) + "\n")


def _rows(case):
    return {r["candidate"]: r for r in case["rows"]}


def _act(row):
    return row["memory"]["activation_bytes"] if row and row.get("memory") else None


def xl_summary(cases):
    headers = ["batch", "dtype", "stage", "T", "plain fwd+bwd ms", "fused fwd+bwd ms", "speed-up",
               "plain act MiB", "fused act MiB", "act saved", "recompute GEMM ms",
               "speed-up w/o recompute (est.)",
               "fused - its GEMMs ms", "aux grad B"]
    out = []
    for c in cases:
        rows = _rows(c)
        pl, fu = rows.get("plain"), rows.get("fused")
        if not (pl and fu):
            continue
        tp, tf = _med(pl, "full"), _med(fu, "full")
        ap_, af = _act(pl), _act(fu)
        rec = _med(rows["conv1x1_fwd"], "forward") if "conv1x1_fwd" in rows else None
        gemm = (2 * rec + _med(rows["conv1x1_wgrad"], "forward")) if rec and "conv1x1_wgrad" in rows else None
        out.append([c["batch"], c["dtype"], c["stage"], c["T"], harness.fmt_ms(tp), harness.fmt_ms(tf),
                    harness.fmt_ratio(tp / tf), harness.fmt_mib(ap_), harness.fmt_mib(af),
                    (f"{100 * (1 - af / ap_):.0f}%" if ap_ and af is not None else "-"),
                    harness.fmt_ms(rec), (harness.fmt_ratio(tp / (tf - rec)) if rec else "-"),
                    (harness.fmt_ms(tf - gemm) if gemm else "-"),
                    (fu["memory"]["aux_grad_bytes"] if fu["memory"] else "-")])
    return harness.markdown_table(headers, out)


def xl_targets(cases, T=3, speed=1.25, saved=0.30):
    """The fused layer's targets at T = 3 (at least ``speed`` x faster forward+backward than the plain
    composition, ``saved`` less activation memory, no gradient memory for the aux inputs), per case and
    summed over the four stages of a (batch, dtype)."""
    lines, totals = [], {}
    for c in cases:
        if c["T"] != T:
            continue
        rows = _rows(c)
        pl, fu = rows.get("plain"), rows.get("fused")
        if not (pl and fu):
            continue
        tp, tf, ap_, af = _med(pl, "full"), _med(fu, "full"), _act(pl), _act(fu)
        key = (c["batch"], c["dtype"])
        tot = totals.setdefault(key, [0.0, 0.0, 0, 0, 0])
        tot[0] += tp
        tot[1] += tf
        tot[2] += ap_ or 0
        tot[3] += af or 0
        tot[4] += 1
        sp = tp / tf
        sv = (1 - af / ap_) if ap_ and af is not None else None
        aux0 = fu["memory"]["aux_grad_bytes"] == 0 if fu["memory"] else None
        lines.append([c["batch"], c["dtype"], c["stage"], harness.fmt_ratio(sp),
                      "met" if sp >= speed else f"NOT met: {100 * (1 - sp / speed):.0f}% short of {speed}x",
                      (f"{100 * sv:.0f}%" if sv is not None else "-"),
                      ("met" if sv is not None and sv >= saved else
                       (f"NOT met ({100 * sv:.0f}% < {100 * saved:.0f}%)" if sv is not None else "-")),
                      {True: "met (0 B)", False: "NOT met", None: "-"}[aux0]])
    for (batch, dname), (tp, tf, ap_, af, n) in totals.items():
        if n < 2:
            continue
        sp = tp / tf
        lines.append([batch, dname, f"all {n} (sum)", harness.fmt_ratio(sp),
                      "met" if sp >= speed else f"NOT met: {100 * (1 - sp / speed):.0f}% short of {speed}x",
                      f"{100 * (1 - af / ap_):.0f}%" if ap_ else "-",
                      ("met" if ap_ and 1 - af / ap_ >= saved else "NOT met"), "-"])
    headers = ["batch", "dtype", "stage", "speed-up (plain / fused, fwd+bwd)", f">= {speed}x",
               "activation memory saved", f">= {100 * saved:.0f}%", "aux gradient memory = 0"]
    return harness.markdown_table(headers, lines)


XL_LEGEND = """\
Times: median [20th-80th percentile] of round-robin repetitions (all candidates of a case
interleaved), in ms; `plain / this` = the plain composition's median divided by the candidate's
(> 1: faster than plain). `peak MiB`: peak live torch-allocated bytes of one forward+backward above
the level at its start (the output, saved activations, temporaries, main's gradient and the
parameter gradients); `act MiB` = peak less the parameter gradients (activation memory);
`aux grad B`: bytes of gradient the aux inputs hold after the backward (must be 0).
Summary: `recompute GEMM` = conv1x1_fwd's median (the T - 1 link GEMMs alone, in the same
round-robin): what recomputing z = aux @ W in the backward costs, instead of keeping z (one
[N, C] tensor per link). `speed-up w/o recompute (est.)` = plain / (fused - recompute GEMM): the
speed-up the op would have if it kept z. `fused - its GEMMs` = the fused median less its three GEMMs
per link measured alone (2 x conv1x1_fwd + conv1x1_wgrad): everything else the op does (batch
statistics, the fused BN/ReLU/residual pass, the two backward passes, allocations).
"""


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="X-Learner reconciliation sweep: fused conv1x1+BN+ReLU links "
                                             "vs the plain PyTorch composition")
    ap.add_argument("--batches", default=None,
                    help="comma-separated batch sizes (default from shapes.json: 32,8; --quick 2)")
    ap.add_argument("--tasks", default=None,
                    help="comma-separated T, links per target = T - 1 (default from shapes.json: 2,3)")
    ap.add_argument("--stages", default=None,
                    help="comma-separated ResNet-50 stages (default: all in shapes.json, 1,2,3,4)")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--candidates", default=",".join(XL_CANDIDATES))
    ap.add_argument("--reps", type=int, default=None, help="timed round-robin reps (default 7; --quick 2)")
    ap.add_argument("--reps-stage1", type=int, default=None,
                    help="reps for stage 1 at batch >= 32 (the largest case; default: --reps)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny stage shapes, batch 2 (CI smoke run)")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--out", default=None,
                    help="output stem (default benchmarks/results/reconcile_xlearner[-quick])")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="only rewrite the markdown of a finished run from its JSON (with --notes FILE)")
    ap.add_argument("--notes", default=None, help="markdown file inserted after the legend by --render")
    args = ap.parse_args(argv)
    args.shapes = harness.shapes("reconcile_xlearner", args.quick)

    def ints(text, default):
        return [int(x) for x in (text.split(",") if text else default)]
    args.batches = ints(args.batches, args.shapes["batches"])
    args.tasks = ints(args.tasks, args.shapes["tasks"])
    args.stages = ints(args.stages, args.shapes["stages"])
    bad = [st for st in args.stages if str(st) not in args.shapes["stages"]]
    if bad:
        ap.error(f"unknown stages {bad}; shapes.json has {sorted(args.shapes['stages'])}")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    bad = [c for c in args.candidates if c not in XL_CANDIDATES]
    if bad:
        ap.error(f"unknown candidates {bad}; choose from {XL_CANDIDATES}")
    if any(t < 2 for t in args.tasks):
        ap.error("--tasks: T >= 2 (T - 1 links per target)")
    args.reps = args.reps or (2 if args.quick else 7)
    args.backend = harness.backend_arg(args.backend)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.render:
        j, m = render(args.render, args.notes)
        log(f"rewrote {j} and {m}")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    probe = harness.memory_probe_selftest(torch.device("cpu"))
    meta = harness.environment(torch.device("cpu"), extra={
        "backend": {"requested": args.backend or "auto",
                    "reconcile_runs_on": harness.resolved_backend("reconcile", torch.device("cpu"),
                                                                  args.backend),
                    "moe_kernels_backends": harness.backend_report(torch.device("cpu"))},
        "timing": (f"round-robin over the candidates of a case, {args.reps} reps "
                   + (f"({args.reps_stage1} for stage 1 at batch >= 32) " if args.reps_stage1 else "")
                   + f"after {args.warmup} warm-up; forward, backward and forward+backward from one "
                     "timestamped call"),
        "memory": f"{probe['method']}; self-test on a known allocation pattern passed",
        "load_average_start": _load(), "quick": args.quick,
    })
    cases = []
    for batch in args.batches:
        for dname in args.dtypes:
            for stage in args.stages:
                for T in args.tasks:
                    case = xl_case(stage, T, batch, harness.DTYPES[dname], args)
                    cases.append(case)
                    print(xl_case_markdown(case), flush=True)
    meta["load_average_end"] = _load()
    meta["wall_time_s"] = round(time.perf_counter() - t_start, 1)
    name = "reconcile_xlearner-quick" if args.quick else "reconcile_xlearner"
    stem = args.out or str(harness.RESULTS_DIR / name)
    j, m = xl_write(stem, meta, cases)
    log(f"wrote {j} and {m} ({meta['wall_time_s']} s)")
    return 0


def xl_write(stem, meta, cases, notes=""):
    body = (XLEARNER_DOC + "\n" + XL_LEGEND + (("\n" + notes.rstrip() + "\n") if notes else "")
            + "\n## Targets (T = 3)\n\n" + xl_targets(cases)
            + "\n\n## Summary (one reconciliation layer: T - 1 links into one target)\n\n" + xl_summary(cases)
            + "\n\n## Cases\n\n" + "\n".join(xl_case_markdown(c) for c in cases))
    title = "reconcile: X-Learner reconciliation layers (conv1x1 + BN + ReLU), fused vs plain PyTorch"
    return harness.write_results(stem, meta, cases, body, title=title)


def render(json_path, notes_path=None):
    """Rewrite the markdown (and JSON) of a finished run from its JSON, e.g. after adding notes."""
    data = json.loads(Path(json_path).read_text())
    cases = data["results"]
    for c in cases:
        for r in c["rows"]:
            r["timings"] = {m: harness.Timing(t["samples_s"]) for m, t in r["timings"].items()}
    meta = data["meta"]
    if notes_path:  # kept in the JSON, so a later --render keeps them
        meta["notes"] = Path(notes_path).read_text()
        meta["notes_added_by"] = harness.command_line()
    stem = str(Path(json_path).with_suffix(""))
    return xl_write(stem, meta, cases, meta.get("notes", ""))


def test_reconcile_xlearner_quick(benchmark, bctx):
    """``pytest benchmarks --quick`` smoke-runs the X-Learner sweep on tiny stage shapes."""
    import pytest

    if not bctx.quick:
        pytest.skip("the full sweep is run as a script: python benchmarks/bench_reconcile_xlearner.py")
    argv = ["--quick", "--stages", "1,4", "--dtypes", ",".join(harness.dtype_name(d) for d in bctx.dtypes),
            "--backend", bctx.backend or "auto", "--out", str(bctx.results_dir / "reconcile_xlearner-quick")]
    assert benchmark.pedantic(main, args=(argv,), rounds=1, iterations=1) == 0


if __name__ == "__main__":
    sys.exit(main())
