"""The expanded multi-branch backbone (X-Learner Sec. 3.2 and Algorithm 1; INTERN Up-G Sec. 7.1.1).

X-Learner's Eq. 2 fuses detached features of the other tasks' sub-backbones into each task's stage
outputs::

    F_i^t = E_i^t + sum_{k != t} sum_{j <= i} gamma_{j->i}^{k->t}( stopgrad(E_j^k) )

:func:`reconciliation_links` spells out the links of a connection pattern; :class:`ExpandedBackbone`
wires T sub-backbones with one :class:`~moe_kernels.nn.ReconciliationLayer` per fused stage output
(:mod:`moe_kernels.nn.reconcile`), with Algorithm 1's two phases.

Papers: "X-Learner: Learning Cross Sources and Tasks for Universal Visual Representation", He et al.,
arXiv:2203.08764; "INTERN: A New Learning Paradigm Towards General Vision", Shao et al.,
arXiv:2111.08687.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from torch import Tensor, nn

from .._validation import check, check_choice, check_int, fail
from .reconcile import LAYOUTS, UPSAMPLE_MODES, GammaChain, ReconciliationLayer, _check_map

PATTERNS = ("same_level", "low_level", "high_level", "cross_level", "deep_to_shallow")
PHASES = ("independent", "joint")
FUSIONS = ("inline", "output")

__all__ = ["ExpandedBackbone", "Link", "reconciliation_links"]


# ---------------------------------------------------------------------------------------------
# connection patterns


class Link(NamedTuple):
    """One link ``gamma_{src_stage -> dst_stage}^{src_task -> dst_task}`` (0-based indices)."""

    src_task: int
    src_stage: int
    dst_task: int
    dst_stage: int


def _default_levels(pattern: str, num_stages: int) -> list[int]:
    split = (num_stages + 1) // 2
    if pattern == "low_level":
        return list(range(split))
    if pattern == "high_level":
        return list(range(split, num_stages))
    return list(range(num_stages))


def reconciliation_links(pattern: str | Iterable[Sequence[int]], num_tasks: int,
                         num_stages: int, *, levels: Iterable[int] | None = None) -> list[Link]:
    """The links of a connection pattern, sorted by ``(dst_task, dst_stage, src_task, src_stage)``.

    Patterns (``k != t`` always; X-Learner Sec. 3.2/3.4, INTERN Sec. 7.2.3 Tab. 22a):

    * ``"cross_level"``: ``j <= i`` -- Eq. 2, X-Learner's default and INTERN's default;
      ``T(T-1) * D(D+1)/2`` links.
    * ``"same_level"``: ``j == i`` only; ``T(T-1) * D``.
    * ``"low_level"`` / ``"high_level"``: cross-level links with source *and* target among the
      shallow stages ``0..ceil(D/2)-1`` / the deep stages ``ceil(D/2)..D-1`` (INTERN: "only
      interconnect at shallow stages" / "applied only at deep stages"); ``T(T-1) * L(L+1)/2`` for
      ``L`` levels.
    * ``"deep_to_shallow"``: ``j >= i`` -- X-Learner_t: same-level links kept, the cross-layer ones
      reversed (deeper sources, ``gamma_c`` instead of ``gamma_a``); ``T(T-1) * D(D+1)/2``.
    * a list of ``(src_task, src_stage, dst_task, dst_stage)`` tuples (custom).

    ``levels`` overrides the stage subset of a named pattern (both ends of a link must be in it).

    Example::

        len(reconciliation_links("cross_level", 2, 4))   # 2 * 1 * 10 = 20
    """
    op = "nn.reconciliation_links"
    check_int(num_tasks, op, "num_tasks", lo=1)
    check_int(num_stages, op, "num_stages", lo=1)
    if isinstance(pattern, str):
        check_choice(pattern, op, "pattern", PATTERNS)
        lv = set(_default_levels(pattern, num_stages) if levels is None else levels)
        for s in lv:
            check_int(s, op, "levels", lo=0, hi=num_stages - 1)
        keep = {
            "same_level": lambda j, i: j == i,
            "low_level": lambda j, i: j <= i,
            "high_level": lambda j, i: j <= i,
            "cross_level": lambda j, i: j <= i,
            "deep_to_shallow": lambda j, i: j >= i,
        }[pattern]
        links = [Link(k, j, t, i) for t in range(num_tasks) for i in range(num_stages)
                 for k in range(num_tasks) for j in range(num_stages)
                 if k != t and i in lv and j in lv and keep(j, i)]
        return links
    check(levels is None, op, "levels", "applies to the named patterns only, not to a link list")
    try:
        raw = [tuple(l) for l in pattern]
    except TypeError:
        fail(op, "pattern", f"must be one of {PATTERNS} or a list of (src_task, src_stage, "
                            f"dst_task, dst_stage) tuples, got {type(pattern).__name__}")
    links, seen = [], set()
    for n, l in enumerate(raw):
        arg = f"pattern[{n}]"
        check(len(l) == 4, op, arg, f"must be (src_task, src_stage, dst_task, dst_stage), got {l}")
        k, j, t, i = l
        for v, hi in ((k, num_tasks), (j, num_stages), (t, num_tasks), (i, num_stages)):
            check_int(v, op, arg, lo=0, hi=hi - 1)
        check(k != t, op, arg, f"links task {k} to itself; a link joins two different branches")
        check(l not in seen, op, arg, f"repeats the link {l}")
        seen.add(l)
        links.append(Link(k, j, t, i))
    return sorted(links, key=lambda l: (l.dst_task, l.dst_stage, l.src_task, l.src_stage))


# ---------------------------------------------------------------------------------------------
# the expanded backbone


class ExpandedBackbone(nn.Module):
    """T sub-backbones joined by reconciliation links (X-Learner's expanded backbone, INTERN's Up-G).

    ``forward(x)`` returns, per task t, the list of fused stage outputs ``[F_1^t, ..., F_D^t]`` of
    Eq. 2. Links into ``(t, i)`` live in one :class:`ReconciliationLayer` (``self.fusers``, keyed
    ``"t{t}_s{i}"``); a link ``j < i`` has a :class:`GammaChain` of ``i - j`` ``gamma_a`` following
    the source branch's channels, ``j > i`` one of ``j - i`` ``gamma_c``.

    Where the fused feature goes (``fusion``):

    * ``"inline"`` (default whenever every link has ``j <= i``): ``F_i^t`` *replaces* ``E_i^t`` as
      the input of stage ``i+1`` of branch t -- the branches advance stage by stage in lockstep.
      This is what the papers describe: X-Learner Sec. 3.2 calls ``F_i^t`` "the final fused output
      at layer i of the sub-backbone for task t" and fuses "into the features of another task at the
      same or a deeper layer"; INTERN Sec. 7.1 conducts "feature exchange at each stage of the
      experts" and its Fig. 7 passes "auxiliary features from shallow layers to deep stages of the
      main branch". Sources are the pre-fusion ``E_j^k`` (Eq. 2 is written with ``E``), i.e. stage j
      of branch k applied to branch k's own fused ``F_{j-1}^k``. Needs branches exposing
      ``stages`` (D modules, each taking the previous one's output) and optionally ``stem``.
    * ``"output"``: every branch runs bare and Eq. 2 is applied to the D outputs only. Required for
      links with ``j > i`` (``"deep_to_shallow"``): inline, ``F_i^t`` would need ``E_j^k`` (j > i),
      which needs ``F_i^k``, which needs ``E_j^t`` -- a cycle with no forward order. Works with any
      branch module returning its D stage features.

    Phases (Algorithm 1): ``set_phase("independent")`` (or ``joint = False``) runs every branch
    alone, no link runs and the link parameters get no gradient -- steps ``k <= tau``;
    ``set_phase("joint")`` (default) runs the expanded backbone -- steps ``k > tau``::

        backbone.set_phase("independent" if step <= tau else "joint")

    Inputs: one tensor (every branch sees it; Algorithm 1's joint step feeds the union batch of
    all tasks to the expanded backbone, and task t's loss reads ``F^t`` on its own samples), or a
    list of T tensors, one per branch (the independent phase's per-task batches). In the joint
    phase links pair samples row by row, so per-branch inputs must then hold the same images.

    Gradients: every link detaches its source, so task t's outputs give no gradient to any other
    branch nor to the links into other branches (their ``.grad`` stays ``None``, so optimizers with
    weight decay or momentum skip them too). In training mode the forward still updates the BN
    running statistics of every branch it runs (buffers, not parameters).

    Args:
        branches: T >= 2 sub-backbones, each returning a list/tuple of D stage features.
        stage_channels: D channel counts shared by all branches, or one such list per branch;
            default: each branch's ``stage_channels`` attribute.
        pattern: a name of :func:`reconciliation_links` or a custom list of links.
        levels: stage subset for the named patterns (see :func:`reconciliation_links`).
        fusion: ``"inline"`` or ``"output"``; default inline unless a link has ``j > i``.
        norm, activation: of every ``gamma_b`` (default BN + ReLU: INTERN's "Non-Linear").
        layout: ``"nchw"`` or ``"nhwc"``: the layout of the branches' features.
        upsample: ``"nearest"`` or ``"bilinear"`` in ``gamma_c``.
        backend: forwarded to :func:`moe_kernels.reconcile`.

    Example::

        nets = [MyResNet() for _ in range(2)]   # .stem, .stages (4 of them) and .stage_channels
        ebb = ExpandedBackbone(nets, pattern="cross_level")
        feats = ebb(torch.randn(2, 3, 32, 32))       # feats[t][i]: F_i^t
    """

    def __init__(self, branches: Sequence[nn.Module],
                 stage_channels: Sequence[int | Sequence[int]] | None = None,
                 pattern: str | Iterable[Sequence[int]] = "cross_level", *,
                 levels: Iterable[int] | None = None, fusion: str | None = None,
                 norm: str = "bn", activation: str | None = "relu", layout: str = "nchw",
                 upsample: str = "nearest", backend: str | None = None) -> None:
        super().__init__()
        op = "nn.ExpandedBackbone"
        if isinstance(branches, nn.Module) and not isinstance(branches, nn.ModuleList):
            fail(op, "branches", "must be a list of T sub-backbones, got a single module")
        branches = list(branches)
        check(len(branches) >= 2, op, "branches",
              f"must hold at least 2 sub-backbones (T >= 2: links join different tasks), "
              f"got {len(branches)}")
        for t, b in enumerate(branches):
            if not isinstance(b, nn.Module):
                fail(op, f"branches[{t}]", f"must be an nn.Module, got {type(b).__name__}")
        check_choice(layout, op, "layout", LAYOUTS)
        check_choice(upsample, op, "upsample", UPSAMPLE_MODES)
        T = len(branches)
        chans = self._resolve_channels(op, branches, stage_channels)
        D = len(chans[0])
        for t, b in enumerate(branches):
            bl = getattr(b, "layout", layout)
            check(bl == layout, op, f"branches[{t}]",
                  f"has layout '{bl}' but the backbone's is '{layout}' (layout mismatch)")
        links = reconciliation_links(pattern, T, D, levels=levels)
        has_up = any(l.src_stage > l.dst_stage for l in links)
        if fusion is None:
            fusion = "output" if has_up else "inline"
        check_choice(fusion, op, "fusion", FUSIONS)
        if fusion == "inline":
            if has_up:
                fail(op, "fusion", "'inline' is impossible with deep-to-shallow links (src_stage > "
                                   "dst_stage): F_i^t would need E_j^k (j > i), which needs F_i^k, "
                                   "which needs E_j^t -- a cycle; use fusion='output'")
            for t, b in enumerate(branches):
                st = getattr(b, "stages", None)
                if st is None or not hasattr(st, "__len__"):
                    fail(op, f"branches[{t}]", "must expose `stages` (D modules run in sequence, "
                                               "optionally after `stem`) for fusion='inline'; "
                                               "or use fusion='output'")
                check(len(st) == D, op, f"branches[{t}]",
                      f"has {len(st)} stages but stage_channels gives D={D}")

        self.branches = nn.ModuleList(branches)
        self.stage_channels = chans
        self.num_tasks, self.num_stages = T, D
        self.layout, self.fusion = layout, fusion
        self.links = links
        self.joint = True
        self._sources: dict[str, list[Link]] = {}
        fusers = {}
        for t in range(T):
            for i in range(D):
                src = [l for l in links if l.dst_task == t and l.dst_stage == i]
                if not src:
                    continue
                adapters: list[nn.Module | None] = []
                for l in src:
                    k, j = l.src_task, l.src_stage
                    if j < i:
                        adapters.append(GammaChain(chans[k][j:i + 1], direction="down", layout=layout))
                    elif j > i:
                        adapters.append(GammaChain(chans[k][i:j + 1][::-1], direction="up",
                                                   layout=layout, upsample=upsample))
                    else:
                        adapters.append(None)
                key = f"t{t}_s{i}"
                fusers[key] = ReconciliationLayer(
                    chans[t][i], [chans[l.src_task][l.src_stage] for l in src], adapters=adapters,
                    norm=norm, activation=activation, layout=layout, backend=backend,
                    link_names=[f"branch {l.src_task} stage {l.src_stage} -> branch {t} stage {i}"
                                for l in src])
                self._sources[key] = src
        self.fusers = nn.ModuleDict(fusers)

    @staticmethod
    def _resolve_channels(op, branches, stage_channels) -> list[list[int]]:
        T = len(branches)
        if stage_channels is None:
            chans = []
            for t, b in enumerate(branches):
                sc = getattr(b, "stage_channels", None)
                if sc is None:
                    fail(op, "stage_channels", f"is required: branches[{t}] has no `stage_channels`")
                chans.append(list(sc))
        else:
            sc = list(stage_channels)
            check(len(sc) > 0, op, "stage_channels", "must not be empty")
            if all(isinstance(c, int) and not isinstance(c, bool) for c in sc):
                chans = [list(sc) for _ in range(T)]
            else:
                check(len(sc) == T, op, "stage_channels",
                      f"must be D ints or one list of D ints per branch ({T}), got {len(sc)} entries")
                chans = [list(c) for c in sc]
        D = len(chans[0])
        check(D >= 1, op, "stage_channels", "must give at least one stage")
        for t, c in enumerate(chans):
            check(len(c) == D, op, "stage_channels",
                  f"gives {len(c)} stages for branch {t} but {D} for branch 0; all branches need "
                  "the same D")
            for i, v in enumerate(c):
                check_int(v, op, f"stage_channels[{t}][{i}]", lo=1)
        return chans

    # -- phases ------------------------------------------------------------------------------

    @property
    def phase(self) -> str:
        return "joint" if self.joint else "independent"

    def set_phase(self, phase: str) -> ExpandedBackbone:
        """``"independent"`` (Algorithm 1, k <= tau: branches alone) or ``"joint"`` (k > tau)."""
        check_choice(phase, "nn.ExpandedBackbone", "phase", PHASES)
        self.joint = phase == "joint"
        return self

    @property
    def num_links(self) -> int:
        return len(self.links)

    def link_parameters(self):
        """Parameters of the reconciliation layers (all gamma_a / gamma_b / gamma_c)."""
        return self.fusers.parameters()

    def branch_parameters(self, task: int):
        """Parameters of sub-backbone ``task`` (not the links into it)."""
        return self.branches[task].parameters()

    # -- forward -----------------------------------------------------------------------------

    def _inputs(self, x) -> list[Tensor]:
        op = "nn.ExpandedBackbone"
        if isinstance(x, Tensor):
            return [x] * self.num_tasks
        xs = list(x)
        check(len(xs) == self.num_tasks, op, "x",
              f"must be one tensor or a list of one per branch ({self.num_tasks}), got {len(xs)}")
        for t, v in enumerate(xs):
            if not isinstance(v, Tensor):
                fail(op, f"x[{t}]", f"must be a torch.Tensor, got {type(v).__name__}")
        return xs

    def _check_stage(self, t: int, i: int, f) -> None:
        _check_map(f, "nn.ExpandedBackbone", f"branches[{t}] stage {i} output", self.layout,
                   self.stage_channels[t][i])

    def _bare(self, t: int, x: Tensor) -> list[Tensor]:
        out = self.branches[t](x)
        check(isinstance(out, (list, tuple)) and len(out) == self.num_stages, "nn.ExpandedBackbone",
              f"branches[{t}]", f"must return a list/tuple of D={self.num_stages} stage features, "
                                f"got {type(out).__name__}"
                                f"{' of length ' + str(len(out)) if isinstance(out, (list, tuple)) else ''}")
        for i, f in enumerate(out):
            self._check_stage(t, i, f)
        return list(out)

    def _fuse(self, t: int, i: int, main: Tensor, E: list[list[Tensor | None]]) -> Tensor:
        key = f"t{t}_s{i}"
        if key not in self.fusers:
            return main
        return self.fusers[key](main, [E[l.src_task][l.src_stage] for l in self._sources[key]])

    def forward(self, x: Tensor | Sequence[Tensor]) -> list[list[Tensor]]:
        xs = self._inputs(x)
        T, D = self.num_tasks, self.num_stages
        if not self.joint:
            return [self._bare(t, xs[t]) for t in range(T)]
        if self.fusion == "output":
            E = [self._bare(t, xs[t]) for t in range(T)]
            return [[self._fuse(t, i, E[t][i], E) for i in range(D)] for t in range(T)]
        # inline: advance all branches one stage at a time; F_i^t feeds stage i+1 of branch t
        h = []
        for t in range(T):
            stem = getattr(self.branches[t], "stem", None)
            h.append(xs[t] if stem is None else stem(xs[t]))
        E: list[list[Tensor | None]] = [[None] * D for _ in range(T)]
        out: list[list[Tensor]] = [[] for _ in range(T)]
        for i in range(D):
            for t in range(T):
                E[t][i] = self.branches[t].stages[i](h[t])
                self._check_stage(t, i, E[t][i])
            for t in range(T):
                h[t] = self._fuse(t, i, E[t][i], E)
                out[t].append(h[t])
        return out

    def extra_repr(self) -> str:
        return (f"num_tasks={self.num_tasks}, num_stages={self.num_stages}, "
                f"num_links={self.num_links}, fusion={self.fusion!r}, layout={self.layout!r}")
