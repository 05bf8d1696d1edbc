"""MTHL's ``report.md``: its tables in miniature beside the paper's numbers, the claims of RECIPES.md
6.4 with verdicts, the expert-usage heatmap per dataset per layer and the loss curves."""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch

import moe_kernels as mk

from ..report import DENSE_NOISE, accuracy_noise, plot_heatmaps, plot_losses, table, verdict, within
from ..tasks import PRIMARY

# the paper's numbers (arXiv:2306.17165), quoted per RECIPES.md 5.4
PAPER_TAB1_SWIN_T = {"Scratch": (80.6, 34.9, 32.0), "Pre.&FT.": (None, 42.0, 44.3), "MTHL.D": (79.7, 43.8, 44.4),
                     "MTHL": (80.3, 45.0, 44.6)}  # IN-1K top-1, COCO mAP, ADE20K mIoU
PAPER_TAB2_SWIN_B_MEAN = {"IN-1K Pre.": 78.7, "Mod-Squad": 78.1, "MTHL.D": 79.9, "MTHL": 80.4}
PAPER_TAB3 = {  # DaViT-S: train M, model M, GFLOPs, mean
    "ft_full": ("FT-Full", 88.9, 88.9, 9.2, 79.9), "router_only": ("Ro. Only", 0.4, None, None, 70.3),
    "router_1ex": ("Ro. w/ 1 Ex.", 5.4, None, None, 77.8), "router_2ex": ("Ro. w/ 2 Ex.", 10.4, None, None, 79.4),
    "prune_theta_1": ("Prune θ=1%", None, 60.2, None, 79.9), "prune_theta_5": ("Prune θ=5%", None, 54.4, None, 79.7),
    "prune_half": ("Prune 1/2 Ex.", None, 59.9, None, 79.8), "prune_two_thirds": ("Prune 2/3 Ex.", None, 49.9, None, 79.7),
    "topk_3": ("Top-K=3", None, None, 7.7, 79.0), "topk_2": ("Top-K=2", None, None, 6.2, 76.8),
    "topk_1": ("Top-K=1", None, None, 4.7, 65.4), "hybrid_a": ("Hybrid-A", 5.4, 49.9, 6.2, 77.4),
    "hybrid_b": ("Hybrid-B", 10.4, 49.9, 7.7, 78.8),
}
PAPER_TAB4 = {1: 79.0, 2: 80.6, "ft_full": 80.8, "router_only": 70.7}

DECISIONS = [
    "MI-loss weight 0.005 per MoE layer, summed over the layers (RECIPES.md 5.6 item 1; the paper gives none).",
    "P(E|D) from the dense router softmax (5.6 item 2), top-K gates not renormalised (Eq. 2 literal, item 4), "
    "linear routers without bias, no load-balancing or z-loss (MTHL's only auxiliary loss is the MI loss).",
    "Per-device dataset sampling (5.6 item 5): each step's slots draw their dataset; `train.sampling=global` "
    "gives the other reading. The MI buffer is averaged over the ranks after every step (item 6).",
    "Triangular schedule: linear warm-up over 5% of the steps to the peak, linear decay to 0 (item 7); LAMB "
    "without weight decay on norms, biases and routers.",
    "Downstream: one budget per source for every method (item 9): AdamW, cosine, `downstream.steps`, the LR grid "
    "of the preset; FT-Full also gets a new router per MoE layer. Prune rows learn the new router for "
    "`downstream.router_steps` first (frozen backbone), prune by its usage on the downstream training images, then "
    "fine-tune the whole model; Top-K rows fine-tune everything with the smaller K (item 10 and 5.5). Every row "
    "has the same total step budget: the router phase of the prune and hybrid rows is taken out of their "
    "fine-tuning steps.",
    "Scratch = the dense backbone trained on one source alone, on as many of its images as the joint run saw "
    "(steps x its sampling share); 'IN-1K Pre.' = that run on the classification source; 'Pre.&FT.' = the same "
    "budget on a detection or segmentation source, starting from the classification-only backbone.",
    "No Adapter row and no Mod-Squad row (the world has no multi-label source yet): those claims are 'not run'.",
]


def _band(m, z, lo, hi) -> str:
    """Verdict for "the margin lies in [lo, hi]" with noise z."""
    if m is None:
        return "not run"
    if m < lo - z or m > hi + z:
        return "no"
    if lo <= m <= hi and z <= 0.5:
        return "yes"
    return "inconclusive"


def _load(path) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _usage_maps(model, data) -> Dict[str, list]:
    """Per pre-training dataset: [layer][expert] share of that dataset's top-K assignments on its eval images."""
    layers = model.backbone.moe_layers()
    if not layers:
        return {}
    model.eval()
    with torch.no_grad(), mk.nn.ExpertUsage(model.backbone) as usage:
        for n in data.pretraining:
            ds, _, _, _, te = data.items[n]
            idx = list(te)
            head = model.heads[n]
            for j in range(0, len(idx), 16):
                model.features(n, head.collate([ds[i] for i in idx[j:j + 16]])["images"])
    model.train()
    freqs = usage.frequencies()
    out = {}
    for n in data.pretraining:
        t = model.task_ids[n]
        out[n] = [freqs[name][t].tolist() for name in freqs]
    return out


def write_report(cfg, data, model, out: str) -> str:
    res = _load(os.path.join(out, "results.json")) or {}
    pre = res.get("pretrain", {})
    lines = [f"# MTHL in miniature — preset `{cfg.preset}`", "",
             "Reproduces the tables of Chen et al., *An Efficient General-Purpose Modular Vision Model via Multi-Task "
             "Heterogeneous Training* (arXiv:2306.17165) at CPU scale on the built-in world (RECIPES.md section 5). "
             "The paper's numbers are beside ours for direction only: sizes, data and budgets differ by orders of "
             "magnitude, so only the *directions* (RECIPES.md 6.4) are judged.", ""]
    run = _load(os.path.join(out, "mthl", "run.json")) or {}
    bb_params = run.get("params")
    lines += ["## Run", "",
              f"- Command: `moe-kernels pretrain mthl --preset {cfg.preset} --out {out}`",
              "- Pre-training sources (sampling weight / loss weight / batch): " + ", ".join(
                  f"`{s.name}` ({s.weight:g} / {s.loss_weight:g} / {s.batch_size})" for s in cfg.sources),
              "- Downstream sources: " + ", ".join(f"`{s.name}`" for s in cfg.downstream.sources),
              f"- Backbone `{cfg.model.backbone}`: {cfg.model.num_experts} experts, top-{cfg.model.k}, MoE "
              f"`{cfg.model.moe}`; {bb_params / 1e6:.2f}M parameters" if bb_params else "- Backbone: –",
              f"- {cfg.train.steps} steps x {cfg.train.virtual_devices} virtual device(s); optimiser "
              f"`{run.get('optimizer', '?')}` (lr {cfg.optim.lr:g}, wd {cfg.optim.weight_decay:g}, clip "
              f"{cfg.optim.clip_grad:g}), `{cfg.schedule.kind}` schedule; pre-training took "
              f"{run.get('seconds', float('nan')):.0f} s", ""]

    # ---- Tab. 1
    def metric(d, n, key):
        return None if d is None or n not in d else d[n].get(key)

    names = data.pretraining
    cols = []
    for n in names:
        t = data.task(n)
        cols += [(n, k) for k in {"cls": ("top1", "top5"), "det": ("mAP", "mAP50", "mAP75"),
                                  "seg": ("mIoU", "mAcc", "aAcc"), "depth": ("RMSE", "AbsRel")}[t]]
    rows = []
    for label, key in (("Scratch", "scratch"), ("Pre.&FT.", "pre_ft"), ("MTHL.D", "mthl_d"), ("MTHL", "mthl")):
        d = pre.get(key)
        paper = PAPER_TAB1_SWIN_T[label]
        rows.append([label] + [metric(d, n, k) for n, k in cols] + [" / ".join("–" if v is None else f"{v}" for v in paper)])
    lines += ["## Tab. 1 — pre-training tasks (held-out images of each source)", "",
              table(["row"] + [f"{n} {k}" for n, k in cols] + ["paper Swin-T (IN-1K / COCO / ADE)"], rows), ""]

    # ---- Tab. 2
    down = res.get("downstream", {})
    dn = data.downstream
    rows = []
    for label, key, paper in (("IN-1K Pre. (cls only)", "cls_only", "IN-1K Pre."), ("MTHL.D", "mthl_d", "MTHL.D"),
                              ("MTHL", "mthl", "MTHL")):
        r = down.get(key)
        rows.append([label] + [None if r is None else r["per_source"][n]["metric"] for n in dn]
                    + [None if r is None else r["mean"], PAPER_TAB2_SWIN_B_MEAN[paper]])
    lines += ["## Tab. 2 — downstream fine-tuning (FT-Full)", "",
              "Metric per source: " + ", ".join(f"`{n}` {PRIMARY[data.task(n)]}" for n in dn)
              + ". Mean = the mean over task types of each type's mean (Tab. 2's definition, RECIPES.md 5.4).", "",
              table(["pre-training"] + dn + ["Mean", "paper Mean (Swin-B)"], rows), ""]

    # ---- Tab. 3
    adapt = res.get("adapt", {})
    full = adapt.get("ft_full")
    rows = []
    for key, (label, p_tr, p_model, p_fl, p_mean) in PAPER_TAB3.items():
        r = adapt.get(key)
        if r is None:
            rows.append([label] + [None] * (4 + len(dn)) + [p_tr, p_model, p_fl, p_mean])
            continue
        ps = r["per_source"]
        tr = sum(v["trainable_M"] for v in ps.values()) / len(ps)
        mp = sum(v["params_M"] for v in ps.values()) / len(ps)
        fl = 1e3 * sum(v["GFLOPs"] for v in ps.values()) / len(ps)
        rows.append([label, tr, mp, fl] + [ps[n]["metric"] for n in dn] + [r["mean"], p_tr, p_model, p_fl, p_mean])
    lines += ["## Tab. 3 — efficient adaptation of the MTHL model", "",
              "Train. M = trainable parameters (backbone + the new head), Model M = backbone parameters, MFLOPs = "
              "backbone FLOPs of one image (multiply-add = 2; the paper's column is GFLOPs at 224²), each the mean "
              "over the downstream sources.", "",
              table(["method", "train M", "model M", "MFLOPs"] + dn + ["Mean", "paper train M", "paper model M",
                                                                      "paper GFLOPs", "paper Mean"], rows, 2), ""]

    # ---- Tab. 4
    cont = res.get("continual", {})
    rows = []
    for C in cfg.studies.continual_experts:
        r = cont.get(str(C)) or cont.get(C)
        if r is None:
            continue
        ps = r["per_source"]
        rows.append([f"Rou. w/ {C}Ex.", sum(v["new_params_M"] for v in ps.values()) / len(ps)]
                    + [ps[n]["metric"] for n in dn] + [r["average"], r["old_outputs_bit_identical"], PAPER_TAB4.get(C)])
    if full:
        fps = full["per_source"]
        rows.append(["FT-Full (not continual)", None] + [fps[n]["metric"] for n in dn]
                    + [sum(fps[n]["metric"] for n in dn if data.task(n) != "depth") / len(dn), None,
                       PAPER_TAB4["ft_full"]])
    lines += ["## Tab. 4 — continual learning", "",
              "Datasets added in the order listed; each gets C new experts per MoE layer and a new router, everything "
              "old frozen. Average = the plain mean (Tab. 4's definition). *Old outputs bit-identical*: the backbone "
              "features of every earlier dataset, pre-training ones included, compared with `torch.equal` after each "
              "addition.", "",
              table(["method", "new params M / task"] + dn + ["Average", "old outputs bit-identical", "paper Average"],
                    rows, 2), ""]

    # ---- claims
    n_eval = cfg.train.eval_samples
    n_down = cfg.downstream.eval_samples

    def noise_for(task, value, n):
        return accuracy_noise(value, n) if task == "cls" and value is not None else DENSE_NOISE

    claims = []

    def pre_margin(a, b, n):
        va, vb = metric(pre.get(a), n, PRIMARY[data.task(n)]), metric(pre.get(b), n, PRIMARY[data.task(n)])
        return (None, None) if va is None or vb is None else (va - vb, noise_for(data.task(n), va, n_eval))

    for n in names:
        t = data.task(n)
        if t in ("det", "seg"):
            m, z = pre_margin("mthl", "scratch", n)
            claims.append((f"Heterogeneous training ≫ Scratch on {t} (`{n}`, Tab. 1)", m, z, verdict(m, z or 0)))
            m, z = pre_margin("mthl", "pre_ft", n)
            v = "not run" if m is None else ("yes" if m >= -z else "no")
            claims.append((f"Heterogeneous training ≈ or above Pre.&FT. on {t} (`{n}`, Tab. 1; yes unless below "
                           f"by more than the noise)", m, z, v))
        if t == "cls":
            m, z = pre_margin("mthl", "scratch", n)
            claims.append((f"MTHL slightly below Scratch on cls (`{n}`, Tab. 1: −0.3 to −0.8; yes when the margin "
                           f"is in [−1.8, +0.7] and the noise below 0.5, no when outside it by more than the noise)",
                           m, z, _band(m, z, -1.8, 0.7)))

    def mean_of(tag):
        r = down.get(tag)
        return None if r is None else r["mean"]

    def mean_noise(tag):
        """The noise of a difference of two Tab. 2 means: each source's noise (binomial for an accuracy,
        the fixed floor otherwise), propagated through the mean of task-type means."""
        r = down.get(tag)
        if r is None:
            return DENSE_NOISE
        by: Dict[str, list] = {}
        for v in r["per_source"].values():
            se = accuracy_noise(v["metric"], n_down) / 2 ** 0.5 if v["task"] == "cls" else DENSE_NOISE / 2 ** 0.5
            by.setdefault(v["task"], []).append(se ** 2)
        var = sum(sum(x) / len(x) ** 2 for x in by.values()) / len(by) ** 2
        return (2 * var) ** 0.5

    mthl, mthld, clso = mean_of("mthl"), mean_of("mthl_d"), mean_of("cls_only")
    z = mean_noise("mthl")
    if mthl is not None and mthld is not None:
        claims.append(("MTHL > MTHL.D on the downstream mean (Tab. 2)", mthl - mthld, z, verdict(mthl - mthld, z)))
    if mthld is not None and clso is not None:
        claims.append(("MTHL.D > IN-1K-only on the downstream mean (Tab. 2)", mthld - clso, z, verdict(mthld - clso, z)))

    def amean(k):
        r = adapt.get(k)
        return None if r is None else r["mean"]

    f = amean("ft_full")
    if f is not None:
        for k, label, tol in (("router_2ex", "Ro. w/ 2 Ex. within ~0.5 of FT-Full", 0.5),
                              ("prune_two_thirds", "Prune 2/3 ≈ FT-Full (within 0.5)", 0.5)):
            a = amean(k)
            d = None if a is None else a - f
            claims.append((f"{label} (Tab. 3)", d, z, within(d, tol, z)))
        t1, t3 = amean("topk_1"), amean("topk_3")
        if t1 is not None and t3 is not None:
            claims.append(("Top-K 1 collapses: well below Top-K 3 (Tab. 3: 65.4 vs 79.0)", t3 - t1, z, verdict(t3 - t1, z)))
    claims.append(("Router-only > Adapter (Tab. 3)", None, None, "not run"))
    ident = [(C, (cont.get(str(C)) or cont.get(C) or {}).get("old_outputs_bit_identical")) for C in cfg.studies.continual_experts]
    for C, ok in ident:
        claims.append((f"Continual learning without forgetting, C={C}: old outputs bit-identical (Tab. 4)", None, None,
                       "not run" if ok is None else ("yes" if ok else "no")))
    lines += ["## Directional claims (RECIPES.md 6.4)", "",
              f"Verdict rule: *yes* when the margin has the claimed sign and exceeds the noise, *no* when it has the "
              f"opposite sign beyond it, *inconclusive* otherwise. Noise: for an accuracy over n held-out images the "
              f"standard error of a difference, 100·sqrt(2p(1−p)/n) (n = {n_eval} per pre-training source, {n_down} "
              f"per downstream source); for AP and IoU a fixed floor of {DENSE_NOISE:g} point (not an estimate: at "
              f"cpu-tiny sizes read margins of a few points as indicative only); for a Tab. 2/3 mean the sources' "
              f"noises propagated through the mean of task-type means. A claim that did not reproduce is reported "
              f"as such.", "",
              table(["claim", "margin", "noise", "reproduced"], claims, 2), ""]

    # ---- figures
    figs = []
    maps = _usage_maps(model, data)
    if maps:
        p = plot_heatmaps(maps, os.path.join(out, "expert_usage.png"), "expert", "MoE layer",
                          "MTHL expert usage per dataset (share of top-K assignments, held-out images)")
        figs.append(("Expert usage per dataset per layer", os.path.basename(p)))
        with open(os.path.join(out, "expert_usage.json"), "w") as fh:
            json.dump(maps, fh)
    runs = {k: os.path.join(out, k, "metrics.jsonl") for k in ("mthl", "mthl_d")}
    p = plot_losses(runs, os.path.join(out, "loss_curves.png"), "pre-training loss per source")
    if p:
        figs.append(("Pre-training loss per source (MTHL and MTHL.D)", os.path.basename(p)))
    lines += ["## Figures", ""] + [f"**{t}**\n\n![{t}]({f})\n" for t, f in figs]
    lines += ["## Decisions where the paper is silent", ""] + [f"- {d}" for d in DECISIONS] + [""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    print(f"[mthl] report: {path}", flush=True)
    return path


__all__ = ["write_report"]
