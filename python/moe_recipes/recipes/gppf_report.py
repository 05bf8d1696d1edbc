"""GPPF's ``report.md``: Tab. 1's rows {single, static, DyNet N=2} (and the divergence checks) beside the
paper's numbers, the fine-tuning rows, the selected-path heatmap per task and layer (Fig. 3), the
selection-probability curves over training (Fig. 11), and the claims of RECIPES.md 6.4 with verdicts."""

from __future__ import annotations

import itertools
import json
import os
from typing import Dict, List, Optional

from ..report import DENSE_NOISE, _plt, accuracy_noise, plot_heatmaps, plot_losses, read_jsonl, table, verdict
from ..tasks import HIGHER_IS_BETTER, PRIMARY

# the paper's Tab. 1 (arXiv:2208.02148, GPPF-R50), per RECIPES.md 3.4: (Single, static, DyNet N=2, DyNet N=3)
PAPER_TAB1 = {
    "IN21K": (35.8, 40.2, 40.6, 40.6), "COCO": (46.8, 48.8, 49.7, 49.1), "COCO mask": (42.0, 43.8, 44.5, 44.0),
    "LVIS": (28.2, 32.2, 34.0, 33.3), "LVIS mask": (26.6, 31.2, 32.1, 31.4), "Objects365": (24.0, 25.5, 26.6, 25.7),
    "Open Images": (52.4, 57.6, 57.7, 57.1), "ADE20K": (42.1, 47.2, 45.3, 46.0), "VOC": (76.4, 81.9, 82.2, 80.8),
    "COCO-Stuff": (40.4, 44.5, 44.0, 43.8),
}
PAPER_FINETUNE = [
    "Tab. 4 (KITTI depth, RMSE, lower is better): path IN21K 2.438, path ADE20K 2.388, **path COCO 2.252**, "
    "Dyfinetune 2.382; ImageNet R50 2.797, scratch 3.151.",
    "Tab. 5 (UODB, 10 det datasets, mean AP50): path IN21K 73.0, path Objects365 75.5, **Dyfinetune 76.5**; "
    "baseline 60.6.",
    "Tab. 6 (IN-1K, top-1): scratch 78.12, **path IN21K 79.18**, Dyfinetune 79.04.",
]
ROW_LABELS = {"single": "Single task", "static": "static (N=1, SIMT + SyncBN)", "dynet": "**DyNet N=2** (SIMT + SyncBN)",
              "global": "per-batch task sampling (check)", "no_syncbn": "SIMT w/o SyncBN (check)"}
FT_LABELS = {"static": "static backbone (N=1), standard fine-tune", "path_near": "fixed path of the near task",
             "path_cls": "fixed path of the cls task (\"path IN21K\")", "dyfinetune": "Dyfinetune (new controller)"}

DECISIONS = [
    "Controllers: one logit vector per (task, layer), p = softmax, uniform init; soft Gumbel logits (every unit runs); "
    "one Gumbel draw per (task, layer) per slot-step (RECIPES.md 3.6 item 2); controllers get the backbone's SGD and "
    "schedule without weight decay (item 3).",
    "Temperature 5.0 → 0.01 linearly over `gumbel.decay_fraction` (90%) of the steps, then fixed (App. D.1); "
    "Dyfinetune decays over the first half of its steps (item 6).",
    "SIMT on few processes (item 5): `world size × train.virtual_devices` slots, each drawing its task per step "
    "(`mk.distributed.TaskSampler`, a function of (seed, step, slot)); the V micro-steps of a rank accumulate. BN "
    "batch statistics are per micro-step and synchronised over the real ranks (`SyncBatchNorm`), a documented "
    "deviation: with 1 process there is no cross-task BN at all, so the 'w/o SyncBN' check needs ≥ 2 ranks.",
    "Task average over slots: the trainer averages each parameter over the device *slots* (virtual devices "
    "included) whose backward reached it, `(1/N_p) Σ g_i` (`mk.distributed.task_average_gradients` with per-rank "
    "use counts); a task no slot drew gets no update of its head or controller (item 4).",
    "Single-task baselines: a plain ResNet on one task, `steps × V × share` steps of one slot per rank, so the single "
    "budgets sum to the joint run's slot-steps (Sec. 4.1); detection and segmentation from scratch alike (no IN-1k "
    "initialisation in the world).",
    "Heads: the recipes' cls / FCOS-style det / FPN seg heads (no Mask R-CNN or UperNet): det sources with instance "
    "masks are scored on box AP only.",
    "Input sizes per task via the source's `image_size` (world images resized), so BN statistics differ across tasks.",
    "Fixed-path rows reuse the path of the downstream source's 'near' pre-training task (VOC det uses COCO's) and the "
    "classification task's; all rows share one fine-tuning budget and LR grid (App. D.2's protocols scaled down). "
    "'Retrain' (item 7) is not run.",
]


def _load(path) -> Optional[dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _noise(task: str, value, n: int) -> float:
    return accuracy_noise(value, n) if task == "cls" and value is not None else DENSE_NOISE


def _signed(task: str, a, b):
    """``a - b`` in the direction of "better" for the task's primary metric."""
    if a is None or b is None:
        return None
    return (a - b) if HIGHER_IS_BETTER[task] else (b - a)


def _agreement(p: List[int], q: List[int]) -> float:
    return sum(int(a == b) for a, b in zip(p, q)) / max(len(p), 1)


def plot_selection_curves(sel: List[dict], names: List[str], layers: List[str], path: str) -> Optional[str]:
    """Fig. 11: per task, p(unit 0) of every lego layer over training, and the temperature."""
    if not sel:
        return None
    plt = _plt()
    n = len(names)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    steps = [r["step"] for r in sel]
    for ax, name in zip(itertools.chain(*axes), names):
        for li, lname in enumerate(layers):
            ax.plot(steps, [r["probs"][name][li][0] for r in sel], lw=1, label=lname or "stem")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("step", fontsize=7)
        ax.set_ylabel("p(unit 0)", fontsize=7)
        tw = ax.twinx()
        tw.plot(steps, [r["tau"] for r in sel], color="black", ls=":", lw=0.8)
        tw.set_ylabel("τ (dotted)", fontsize=7)
    for ax in list(itertools.chain(*axes))[n:]:
        ax.axis("off")
    axes[0][0].legend(fontsize=5, ncol=2)
    fig.suptitle("GPPF selection probability of unit 0 per lego layer over training (Fig. 11)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _selection(out: str) -> List[dict]:
    by_step: Dict[int, dict] = {}
    for r in read_jsonl(os.path.join(out, "dynet", "selection.jsonl")):
        by_step[r["step"]] = r  # a resumed run re-records some steps: the last one wins
    return [by_step[k] for k in sorted(by_step)]


def write_report(cfg, data, out: str) -> str:
    res = _load(os.path.join(out, "results.json")) or {}
    pre = res.get("pretrain", {})
    runs = res.get("runs", {})
    paths = res.get("paths") or _load(os.path.join(out, "paths.json")) or {}
    names = data.pretraining
    analog = dict(cfg.studies.paper_analogues)
    n_eval = cfg.train.eval_samples
    world = res.get("world_size", 1)
    V = cfg.train.virtual_devices
    dyn_run = runs.get("dynet", {})

    lines = [f"# GPPF in miniature — preset `{cfg.preset}`", "",
             "Reproduces the tables of Sun et al., *GPPF: A General Perception Pre-training Framework via Sparsely "
             "Activated Multi-Task Learning* (arXiv:2208.02148) at CPU scale on the built-in world (RECIPES.md "
             "section 3). The paper's numbers stand beside ours for direction only: model, data and budget differ by "
             "orders of magnitude, so only the *directions* of RECIPES.md 6.4 are judged.", ""]
    lines += ["## Run", "",
              f"- Command: `moe-kernels pretrain gppf --preset {cfg.preset} --out {out}` "
              f"(`procs = {cfg.procs}`; under `torchrun` every rank runs the same command)",
              f"- SIMT: {world} process(es) × {V} virtual device(s) = {world * V} slots per step; SyncBN over the ranks: "
              f"{'yes' if dyn_run.get('sync_bn') else 'no'}; reduction `{cfg.simt.reduction}` (over slots)",
              f"- Backbone: ResNet `{cfg.model.backbone}` (widths {cfg.model.widths or 'preset'}, depths "
              f"{cfg.model.depths or 'preset'}); lego layers: {len(paths.get('layers', []))} (the stem and every block), "
              f"N = {cfg.model.lego_units}, `{cfg.model.lego_mode}` Gumbel logits; lego backbone "
              f"{paths.get('lego_params', 0) / 1e6:.3f}M parameters, an extracted path "
              + (f"{next(iter(paths['per_task'].values()))['params'] / 1e6:.3f}M" if paths.get("per_task") else "–"),
              f"- Gumbel τ {cfg.gumbel.start:g} → {cfg.gumbel.end:g} over {cfg.gumbel.decay_fraction:.0%} of "
              f"{cfg.train.steps} steps; SGD lr {cfg.optim.lr:g} momentum {cfg.optim.momentum:g}, wd "
              f"{cfg.optim.weight_decay:g} on weights only; `{cfg.schedule.kind}` schedule, warm-up "
              f"{cfg.schedule.warmup:.0%}; w_t = 1 for every task",
              f"- Pre-training (DyNet) took {dyn_run.get('seconds', float('nan')):.0f} s", ""]
    rows = []
    for s in cfg.sources:
        rows.append([f"`{s.name}`", data.task(s.name), analog.get(s.name, "–"), s.weight,
                     s.weight / sum(x.weight for x in cfg.sources), s.batch_size,
                     s.image_size or cfg.world.image_size, len(data.items[s.name][3])])
    lines += ["Tasks (Tab. D.1 analogue):", "",
              table(["source", "task", "paper analogue", "sampling weight", "probability", "batch / slot",
                     "input px", "train images"], rows, 3), ""]

    # ---- Tab. 1
    def val(key, n):
        d = pre.get(key)
        if not d or n not in d:
            return None
        return d[n].get(PRIMARY[data.task(n)])

    cols = [f"`{n}` {PRIMARY[data.task(n)]}" for n in names]
    rows = []
    for key in ("single", "static", "dynet", "global", "no_syncbn"):
        if key not in pre and key != "dynet" and key not in runs:
            continue
        r = runs.get(key, {})
        status = "–"
        if key in ("global", "no_syncbn"):
            if r.get("skipped"):
                status = "not run (1 process)"
            elif r.get("error"):
                status = f"diverged ({r['error'][:60]})"
            elif r.get("finite") is False:
                status = "diverged (non-finite loss)"
            elif r:
                status = f"converged? loss {r.get('first_loss', 0):.3f} → {r.get('last_loss', 0):.3f}"
        elif r:
            status = f"loss {r.get('first_loss') or 0:.3f} → {r.get('last_loss') or 0:.3f}"
        rows.append([ROW_LABELS[key]] + [val(key, n) for n in names] + [status])
    lines += ["## Tab. 1 — pre-training tasks (held-out images of each source)", "",
              f"Primary metric per source on its {n_eval} held-out images (det: COCO mAP by pycocotools, box only; "
              "seg: mIoU; cls: top-1).", "",
              table(["row"] + cols + ["training"], rows, 2), ""]
    prow = []
    for i, label in enumerate(("Single", "static", "DyNet N=2", "DyNet N=3")):
        prow.append([f"paper: {label}"] + [PAPER_TAB1.get(analog.get(n, ""), (None,) * 4)[i] for n in names])
    lines += ["The paper's Tab. 1 (GPPF-R50, 56 V100, 500k iterations) in the same columns, by analogue (per-batch "
              "sampling and SIMT w/o SyncBN: *not converge*):", "",
              table(["row"] + [f"{analog.get(n, '–')} (for `{n}`)" for n in names], prow, 1), ""]

    # ---- paths (Fig. 3)
    per = paths.get("per_task", {})
    layers = paths.get("layers", [])
    figs = []
    if per:
        L = len(layers)
        rows = [[f"`{n}`", data.task(n)] + per[n]["path"]
                + [sum(max(p) for p in per[n]["probs"]) / L, per[n]["max_abs_diff"], per[n]["plain"]] for n in names]
        short = [(lname.replace("stages.", "s").replace(".", "b") or "stem") for lname in layers]
        lines += ["## Selected paths (Fig. 3)", "",
                  "Unit selected (argmax of the controller) per task and lego layer; *mean max p* = how sparse the "
                  "choice has become (1/N = undecided). *extract diff* = the largest |lego eval − extracted plain "
                  "ResNet| over the four feature maps of 4 held-out images (the extracted model is the test-time "
                  "model).", "",
                  table(["task", "type"] + short + ["mean max p", "extract diff", "plain ResNet"], rows, 3), ""]
        agree = [[f"`{a}`"] + [_agreement(per[a]["path"], per[b]["path"]) for b in names] for a in names]
        lines += ["Path agreement (share of layers with the same unit):", "",
                  table(["task"] + [f"`{b}`" for b in names], agree, 2), ""]
        maps = {n: per[n]["probs"] for n in names}
        p = plot_heatmaps(maps, os.path.join(out, "paths.png"), "unit", "lego layer (stem first)",
                          "GPPF selection probability per task, layer and unit at the end of pre-training (Fig. 3)",
                          vmax=1.0)
        figs.append(("Selection per task and layer (Fig. 3): rows = lego layers, columns = units", os.path.basename(p)))
    sel = _selection(out)
    p = plot_selection_curves(sel, names, layers, os.path.join(out, "selection_curves.png")) if sel and layers else None
    if p:
        figs.append((f"Selection probability curves, every {cfg.simt.probs_every} steps (Fig. 11)", os.path.basename(p)))

    # ---- fine-tuning
    ft = res.get("finetune", {})
    dn = data.downstream
    if dn:
        rows = []
        for row in cfg.downstream.rows:
            r = ft.get(row)
            if r is None:
                rows.append([FT_LABELS.get(row, row)] + [None] * (len(dn) + 1) + ["not run"])
                continue
            ps = r["per_source"]
            rows.append([FT_LABELS.get(row, row)] + [ps.get(n, {}).get("metric") for n in dn] + [r["mean"]]
                        + ["; ".join(f"{n.split('/')[-1]}: {ps[n]['path_of'] or ''} {ps[n]['path']}" for n in dn
                                     if n in ps and ps[n].get("path") is not None) or "–"])
        lines += ["## Fine-tuning on held-out sources (Tab. 4–6 in miniature)", "",
                  f"{cfg.downstream.steps} steps per source, best of the LR grid, one budget for every row; metric per "
                  "source: " + ", ".join(f"`{n}` {PRIMARY[data.task(n)]}" for n in dn) + ". Mean = plain mean.", "",
                  table(["row"] + [f"`{n}`" for n in dn] + ["mean", "path (task: unit per layer)"], rows, 2), "",
                  "The paper's fine-tuning results for comparison:", ""] + [f"- {t}" for t in PAPER_FINETUNE] + [""]

    # ---- claims
    claims = []
    tasks = {n: data.task(n) for n in names}

    def per_task(a, b):
        out_ = {}
        for n in names:
            va, vb = val(a, n), val(b, n)
            m = _signed(tasks[n], va, vb)
            out_[n] = (m, _noise(tasks[n], va, n_eval), verdict(m, _noise(tasks[n], va, n_eval)))
        return out_

    for joint in ("dynet", "static"):
        if joint not in pre or "single" not in pre:
            claims.append((f"SIMT + SyncBN joint ({joint}) > single task on every task (Tab. 1)", None, None, "not run"))
            continue
        pt = per_task(joint, "single")
        vs = [v for _, _, v in pt.values()]
        overall = "yes" if all(v == "yes" for v in vs) else ("no" if "no" in vs else "inconclusive")
        ms = [m for m, _, _ in pt.values() if m is not None]
        claims.append((f"SIMT + SyncBN joint ({joint}) > single task on every task (Tab. 1): per task "
                       + ", ".join(f"{n.split('/')[-1]} {v}" for n, (_, _, v) in pt.items()),
                       min(ms) if ms else None, None, overall))
    if "static" in pre and "dynet" in pre:
        pt = per_task("dynet", "static")
        vs = [v for _, _, v in pt.values()]
        yes, no = vs.count("yes"), vs.count("no")
        overall = "yes" if yes > len(vs) / 2 else ("no" if no > len(vs) / 2 else "inconclusive")
        ms = [m for m, _, _ in pt.values() if m is not None]
        claims.append((f"DyNet N=2 ≥ static on most tasks (Tab. 1): better on {yes}, worse on {no}, within noise on "
                       f"{len(vs) - yes - no} of {len(vs)}; margin = mean over tasks",
                       sum(ms) / len(ms) if ms else None, DENSE_NOISE, overall))
    else:
        claims.append(("DyNet N=2 ≥ static on most tasks (Tab. 1)", None, None, "not run"))
    if per:
        L = max(len(layers), 1)
        det = [n for n in names if tasks[n] == "det"]
        cls = [n for n in names if tasks[n] == "cls"]
        seg = [n for n in names if tasks[n] == "seg"]

        def mean_agree(pairs):
            pairs = list(pairs)
            return None if not pairs else sum(_agreement(per[a]["path"], per[b]["path"]) for a, b in pairs) / len(pairs)

        dd = mean_agree(itertools.combinations(det, 2))
        cd = mean_agree((c, d) for c in cls for d in det)
        undecided = sum(sum(max(p) for p in per[n]["probs"]) / L for n in names) / len(names)
        decided = undecided > 0.6  # argmax of near-uniform controllers is noise: no verdict on it
        note = "" if decided else (f"; controllers still near uniform (mean max p {undecided:.2f} ≤ 0.6), so the paths "
                                   "are not choices yet")
        m = None if dd is None or cd is None else dd - cd
        claims.append((f"Detection tasks share paths, cls and det diverge (Fig. 3): det–det agreement "
                       f"{'–' if dd is None else f'{dd:.2f}'} vs cls–det {'–' if cd is None else f'{cd:.2f}'}{note}",
                       m, 1.0 / L, verdict(m, 1.0 / L) if decided else "inconclusive"))
        if seg and det and cls:
            sd = mean_agree((s, d) for s in seg for d in det)
            sc = mean_agree((s, c) for s in seg for c in cls)
            mixes = 0 < sd < 1 and 0 < sc < 1
            claims.append((f"Segmentation mixes (Fig. 3): seg–det agreement {sd:.2f}, seg–cls {sc:.2f} (yes = both "
                           f"strictly between 0 and 1){note}", None, None,
                           ("yes" if mixes else "no") if decided else "inconclusive"))
    for key, label in (("global", "Per-batch task sampling diverges or degrades (Tab. 1: not converge)"),
                       ("no_syncbn", "SIMT without SyncBN diverges or degrades (Tab. 1: not converge)")):
        r = runs.get(key)
        if not r or r.get("skipped"):
            claims.append((label + (" — needs ≥ 2 processes" if r and r.get("skipped") else ""), None, None, "not run"))
            continue
        if r.get("error") or r.get("finite") is False:
            claims.append((label + ": diverged", None, None, "yes"))
            continue
        pt = per_task("dynet", key)
        ms = [m for m, _, _ in pt.values() if m is not None]
        m = sum(ms) / len(ms) if ms else None
        claims.append((label + ": converged; margin = mean over tasks of DyNet − this row", m, DENSE_NOISE,
                       verdict(m, DENSE_NOISE)))
    lines += ["## Directional claims (RECIPES.md 6.4)", "",
              "Verdict rule: *yes* when the margin has the claimed sign and exceeds the noise, *no* when it has the "
              "opposite sign beyond it, *inconclusive* otherwise. Noise: for a top-1 accuracy over n held-out images "
              f"the standard error of a difference, 100·sqrt(2p(1−p)/n) (n = {n_eval}); for AP, IoU and means a fixed "
              f"{DENSE_NOISE:g} point; for path agreement one layer (1/L). A per-task claim is *yes* only when every "
              "task is, *no* when any task is; its margin is the smallest per-task margin. A claim that did not "
              "reproduce is reported as such.", "",
              table(["claim", "margin", "noise", "reproduced"], claims, 2), ""]

    # ---- figures
    loss_runs = {k: os.path.join(out, k, "metrics.jsonl") for k in ("dynet", "static", "global", "no_syncbn")
                 if os.path.exists(os.path.join(out, k, "metrics.jsonl"))}
    p = plot_losses(loss_runs, os.path.join(out, "loss_curves.png"), "GPPF pre-training loss per task")
    if p:
        figs.append(("Pre-training loss per task (DyNet, static, checks)", os.path.basename(p)))
    lines += ["## Figures", ""] + [f"**{t}**\n\n![{t}]({f})\n" for t, f in figs]
    lines += ["## Decisions where the paper is silent", ""] + [f"- {d}" for d in DECISIONS] + [""]
    path = os.path.join(out, "report.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines))
    print(f"[gppf] report: {path}", flush=True)
    return path


__all__ = ["write_report", "plot_selection_curves", "PAPER_TAB1"]
