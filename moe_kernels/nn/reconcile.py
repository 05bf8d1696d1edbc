"""Reconciliation layers (X-Learner Sec. 3.2, INTERN Sec. 7.1.1): the links that fuse detached features
of other branches into one branch. The wiring of whole sub-backbones with them is
:mod:`moe_kernels.nn.backbone`.

Papers: "X-Learner: Learning Cross Sources and Tasks for Universal Visual Representation", He et al.,
arXiv:2203.08764; "INTERN: A New Learning Paradigm Towards General Vision", Shao et al.,
arXiv:2111.08687.

X-Learner's Eq. 2 fuses detached features of the other tasks' sub-backbones into each task's stage
outputs::

    F_i^t = E_i^t + sum_{k != t} sum_{j <= i} gamma_{j->i}^{k->t}( stopgrad(E_j^k) )

with each link ``gamma_{j->i}`` composed of one ``gamma_b`` and ``i - j`` ``gamma_a``. INTERN's Up-G
"knowledge transfer modules" are the same construction (a module at stage d collects stages 1..d of
every auxiliary branch, detached, and merges them into the main branch), with the "Non-Linear" module
as the default ``gamma_b``.

Pieces (all layouts ``"nchw"`` ``[B, C, H, W]`` or ``"nhwc"`` ``[B, H, W, C]``):

* :class:`GammaB` -- 1x1 conv + norm (+ activation: INTERN's "Non-Linear" module), the part that
  fuses into the main branch.
* :class:`GammaA` -- 3x3 stride-2 conv + BN + ReLU, one stage down (cross-layer links ``j < i``).
* :class:`GammaC` -- upsample + 1x1 conv, one stage up (X-Learner_t's deep-to-shallow links).
* :class:`GammaChain` -- ``|i - j|`` of :class:`GammaA` or :class:`GammaC`.
* :class:`ReconciliationLayer` -- every link into one target ``(t, i)``: detach, chain, ``gamma_b``,
  sum into the main feature; pure 1x1 links go through ONE :func:`moe_kernels.reconcile` call.

Composition order of a link (a choice: the paper's Fig. 2(a) that fixes it is not in the text).
``gamma_{j->i} = gamma_b o gamma_a^(i-j)``: the ``gamma_a`` chain runs first and follows the *source*
branch's own channel progression (``C^k_j -> C^k_{j+1} -> ... -> C^k_i``), then ``gamma_b``
(``C^k_i -> C^t_i``) fuses at the target's resolution. Reasons: X-Learner Sec. 3.2 says a
reconciliation layer "obtains features from one task, transforms them with a few operations, and
then fuses them into the features of another task", and INTERN Sec. 7.1.1 places the module *at*
stage d, collecting stages 1..d -- the fusing op lives at the target stage; the same-level link
(``i = j``) is then exactly ``gamma_b``, every link into ``(t, i)`` ends in a ``gamma_b`` of the
same shape, so all of them are summed by one layer (and one fused op), and the 3x3 convs of the
chain run at the narrow source widths instead of at ``C_i`` on high-resolution maps.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validation import check, check_choice, check_int, fail
from ..ops.reconcile import reconcile as _fused_reconcile
from ..backends.reference.reconcile import RECONCILE_ACTIVATIONS

LAYOUTS = ("nchw", "nhwc")
NORMS = ("bn", "none")
UPSAMPLE_MODES = ("nearest", "bilinear")

__all__ = ["GammaA", "GammaB", "GammaC", "GammaChain", "ReconciliationLayer"]


# ---------------------------------------------------------------------------------------------
# layout helpers


def _to_nchw(x: Tensor, layout: str) -> Tensor:
    """An NCHW *view* of ``x`` (for NHWC it has channels_last strides: no copy)."""
    return x.permute(0, 3, 1, 2) if layout == "nhwc" else x


def _from_nchw(y: Tensor, layout: str) -> Tensor:
    """Back to ``layout``; an NCHW result in channels_last memory format gives a contiguous NHWC."""
    return y.permute(0, 2, 3, 1) if layout == "nhwc" else y


def _channels(x: Tensor, layout: str) -> int:
    return x.shape[-1] if layout == "nhwc" else x.shape[1]


def _spatial(x: Tensor, layout: str) -> tuple[int, int]:
    return tuple(x.shape[1:3]) if layout == "nhwc" else tuple(x.shape[2:4])


def _act(z: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return F.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "silu":
        return F.silu(z)
    return z


def _check_map(x, op: str, arg: str, layout: str, channels: int) -> None:
    """4-D feature map in ``layout`` with ``channels`` channels; says so when the layout is swapped."""
    if not isinstance(x, Tensor):
        fail(op, arg, f"must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        fail(op, arg, f"must be a 4-D {layout.upper()} feature map, got shape {tuple(x.shape)}")
    got = _channels(x, layout)
    if got != channels:
        other = "nhwc" if layout == "nchw" else "nchw"
        hint = ""
        if _channels(x, other) == channels:
            hint = (f"; it looks like a {other.upper()} tensor but the layout is '{layout}' "
                    f"(layout mismatch)")
        fail(op, arg, f"must have {channels} channels in {layout.upper()} layout, got shape "
                      f"{tuple(x.shape)}{hint}")


def _xavier(conv: nn.Conv2d) -> None:
    # X-Learner Sec. 4.1 (implementation details): reconciliation layers use Glorot init [20].
    nn.init.xavier_uniform_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _norm_act(activation: str | None) -> str:
    return "none" if activation is None else activation


# ---------------------------------------------------------------------------------------------
# the pieces of gamma


class GammaB(nn.Module):
    """``gamma_b``: 1x1 conv -> norm -> activation, the part of a link that fuses into the target.

    With ``norm="bn", activation="relu"`` this is INTERN's default "Non-Linear" knowledge transfer
    module (Sec. 7.2.3, Tab. 22b); ``activation=None`` gives the linear conv + norm form. The conv has
    a bias only without norm (BN's shift makes it redundant). Works on NCHW maps; the layers that use
    it handle the layout.

    Example::

        g = GammaB(64, 128)                 # conv1x1(64->128) + BN + ReLU
        y = g(torch.randn(2, 64, 8, 8))     # [2, 128, 8, 8]
    """

    def __init__(self, in_channels: int, out_channels: int, *, norm: str = "bn",
                 activation: str | None = "relu") -> None:
        super().__init__()
        op = "nn.GammaB"
        check_int(in_channels, op, "in_channels", lo=1)
        check_int(out_channels, op, "out_channels", lo=1)
        check_choice(norm, op, "norm", NORMS)
        check_choice(_norm_act(activation), op, "activation", RECONCILE_ACTIVATIONS)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.activation = _norm_act(activation)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=(norm == "none"))
        self.norm = nn.BatchNorm2d(out_channels) if norm == "bn" else None
        _xavier(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        z = self.conv(x)
        if self.norm is not None:
            z = self.norm(z)
        return _act(z, self.activation)

    @property
    def foldable(self) -> bool:
        """True when the link is one affine map: no norm, or BN in eval mode with running stats."""
        n = self.norm
        return n is None or (not n.training and n.running_mean is not None)

    def fused_params(self) -> tuple[Tensor, Tensor]:
        """``(W [C_in, C_out], b [C_out])`` with ``act(x @ W + b) == forward(x)`` per pixel.

        Eval-mode BN is folded into the 1x1 weights: ``s = gamma / sqrt(var + eps)``,
        ``W' = W * s``, ``b' = (b - mean) * s + beta``. Differentiable in the conv and BN params.
        Only valid when :attr:`foldable`.
        """
        w = self.conv.weight.reshape(self.out_channels, self.in_channels)
        b = self.conv.bias
        n = self.norm
        if n is not None:
            s = torch.rsqrt(n.running_var + n.eps)
            if n.weight is not None:
                s = s * n.weight
            w = w * s[:, None]
            b = -n.running_mean * s if b is None else (b - n.running_mean) * s
            if n.bias is not None:
                b = b + n.bias
        if b is None:
            b = torch.zeros(self.out_channels, dtype=w.dtype, device=w.device)
        return w.t().contiguous(), b.contiguous()

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


class GammaA(nn.Module):
    """``gamma_a``: 3x3 stride-2 conv -> BN -> ReLU; brings a map one stage deeper (H, W halved).

    Padding 1 gives ``ceil(H / 2)``, the size a ResNet stage's stride-2 conv gives.

    Example::

        a = GammaA(32, 64, layout="nhwc")
        y = a(torch.randn(2, 16, 16, 32))   # [2, 8, 8, 64]
    """

    def __init__(self, in_channels: int, out_channels: int, *, layout: str = "nchw") -> None:
        super().__init__()
        op = "nn.GammaA"
        check_int(in_channels, op, "in_channels", lo=1)
        check_int(out_channels, op, "out_channels", lo=1)
        check_choice(layout, op, "layout", LAYOUTS)
        self.in_channels, self.out_channels, self.layout = in_channels, out_channels, layout
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)
        _xavier(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.norm(self.conv(_to_nchw(x, self.layout))))
        return _from_nchw(y, self.layout)


class GammaC(nn.Module):
    """``gamma_c`` (X-Learner_t, Sec. 3.4): upsample x2 + 1x1 conv; brings a map one stage shallower.

    The 1x1 conv runs *before* the upsampling, at the low resolution (4x fewer FLOPs). This is the
    same function as upsample-then-conv: a 1x1 conv acts per pixel and both ``nearest`` and
    ``bilinear`` (``align_corners=False``: weights sum to 1, so the bias passes through) upsampling
    act per channel, so the two commute. ``mode="nearest"`` is the default (exact x2 inverse of a
    stride-2 grid, no blur); ``"bilinear"`` is the smoother option.

    Example::

        c = GammaC(128, 64)
        y = c(torch.randn(2, 128, 4, 4))            # [2, 64, 8, 8]
        y = c(torch.randn(2, 128, 4, 4), (7, 7))    # explicit output size
    """

    def __init__(self, in_channels: int, out_channels: int, *, layout: str = "nchw",
                 mode: str = "nearest") -> None:
        super().__init__()
        op = "nn.GammaC"
        check_int(in_channels, op, "in_channels", lo=1)
        check_int(out_channels, op, "out_channels", lo=1)
        check_choice(layout, op, "layout", LAYOUTS)
        check_choice(mode, op, "mode", UPSAMPLE_MODES)
        self.in_channels, self.out_channels, self.layout, self.mode = (
            in_channels, out_channels, layout, mode)
        self.conv = nn.Conv2d(in_channels, out_channels, 1, bias=True)
        _xavier(self.conv)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        y = self.conv(_to_nchw(x, self.layout))
        kw = {} if self.mode == "nearest" else {"align_corners": False}
        if size is None:
            y = F.interpolate(y, scale_factor=2.0, mode=self.mode, **kw)
        else:
            y = F.interpolate(y, size=tuple(size), mode=self.mode, **kw)
        return _from_nchw(y, self.layout)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class GammaChain(nn.Module):
    """``|i - j|`` resolution steps of a link: :class:`GammaA` going deeper, :class:`GammaC` going up.

    ``channels`` lists the channels after each step, starting with the input's:
    ``GammaChain([16, 32, 64])`` is two ``gamma_a`` (16->32->64, H/4). With ``direction="up"`` the
    steps are ``gamma_c``; ``forward(x, size)`` sends the last step to ``size`` (the target map's
    spatial size), the others upsample x2.

    Example::

        down = GammaChain([16, 32, 64])                   # stage 0 -> stage 2 of a (16, 32, 64) net
        up = GammaChain([64, 32, 16], direction="up")     # stage 2 -> stage 0
    """

    def __init__(self, channels: Sequence[int], *, direction: str = "down", layout: str = "nchw",
                 upsample: str = "nearest") -> None:
        super().__init__()
        op = "nn.GammaChain"
        channels = list(channels)
        check(len(channels) >= 2, op, "channels",
              f"must list at least the input and one step's channels, got {channels}")
        for n, c in enumerate(channels):
            check_int(c, op, f"channels[{n}]", lo=1)
        check_choice(direction, op, "direction", ("down", "up"))
        check_choice(layout, op, "layout", LAYOUTS)
        self.direction, self.layout = direction, layout
        self.in_channels, self.out_channels = channels[0], channels[-1]
        if direction == "down":
            steps = [GammaA(a, b, layout=layout) for a, b in itertools.pairwise(channels)]
        else:
            steps = [GammaC(a, b, layout=layout, mode=upsample) for a, b in itertools.pairwise(channels)]
        self.steps = nn.ModuleList(steps)

    def __len__(self) -> int:
        return len(self.steps)

    def forward(self, x: Tensor, size: Sequence[int] | None = None) -> Tensor:
        last = len(self.steps) - 1
        for n, step in enumerate(self.steps):
            x = step(x, size if n == last else None) if self.direction == "up" else step(x)
        return x


# ---------------------------------------------------------------------------------------------
# the reconciliation layer


class ReconciliationLayer(nn.Module):
    """All links into one main feature: ``main + sum_n gamma_b_n(adapter_n(stopgrad(aux_n)))``.

    Every aux input is detached on entry (X-Learner Sec. 3.2: "we detach inputs to all
    reconciliation layers"; INTERN Sec. 7.1.1), so neither the aux tensors nor anything upstream of
    them gets a gradient from this layer; ``main``, the adapters and the ``gamma_b`` weights do.

    Execution paths, chosen per call and per link:

    * fused: links whose ``gamma_b`` is one affine map (no norm, or eval-mode BN folded into the
      1x1 weights, see :meth:`GammaB.fused_params`) and whose input needs no gradient (no adapter,
      or under ``torch.no_grad``) -> ONE :func:`moe_kernels.reconcile` call for all of them. The op
      works channels-last: an NHWC map is used as is; an NCHW map in ``channels_last`` memory format
      is viewed with ``permute(0, 2, 3, 1)`` (no copy), a contiguous NCHW map is copied by that
      permute + ``.contiguous()`` (use ``.to(memory_format=torch.channels_last)`` to avoid it). The
      NCHW result then comes back in channels_last memory format.
    * :meth:`_links_with_norm`: detached links with BN in training mode (batch statistics) -> one
      :func:`moe_kernels.reconcile` call with ``batch_norm=True`` per group of links with the same
      activation (BN inside the op; the backward recomputes the GEMM and keeps only per-channel
      statistics; the running statistics are updated in place).
    * :meth:`_links_autograd`: links whose adapted input carries a gradient to a ``gamma_a`` /
      ``gamma_c`` chain. They stay plain autograd: the fused op gives its aux inputs no gradient by
      contract, but the stop-gradient of Eq. 2 sits *before* the chain, whose weights must learn.

    Args:
        main_channels: channels of the main feature (and of the output).
        aux_channels: channels of each raw aux input.
        adapters: per aux input ``None`` (same resolution) or a module with ``in_channels`` /
            ``out_channels`` (e.g. :class:`GammaChain`) run on the detached input before ``gamma_b``;
            a :class:`GammaChain` is given the main map's spatial size.
        norm: ``"bn"`` or ``"none"`` in each ``gamma_b``.
        activation: ``None``, ``"relu"`` (default: INTERN's "Non-Linear" module), ``"gelu"``,
            ``"silu"``.
        layout: ``"nchw"`` or ``"nhwc"`` for main, aux and output.
        link_names: names of the links for error messages (default ``aux[n]``).
        backend: forwarded to :func:`moe_kernels.reconcile`.

    Example::

        layer = ReconciliationLayer(64, [64, 32], adapters=[None, GammaChain([32, 64])])
        out = layer(main, [aux_same_res, aux_one_stage_up])    # main: [B, 64, H, W]
    """

    def __init__(self, main_channels: int, aux_channels: Sequence[int], *,
                 adapters: Sequence[nn.Module | None] | None = None, norm: str = "bn",
                 activation: str | None = "relu", layout: str = "nchw",
                 link_names: Sequence[str] | None = None, backend: str | None = None) -> None:
        super().__init__()
        op = "nn.ReconciliationLayer"
        check_int(main_channels, op, "main_channels", lo=1)
        aux_channels = list(aux_channels)
        for n, c in enumerate(aux_channels):
            check_int(c, op, f"aux_channels[{n}]", lo=1)
        check_choice(layout, op, "layout", LAYOUTS)
        check_choice(norm, op, "norm", NORMS)
        check_choice(_norm_act(activation), op, "activation", RECONCILE_ACTIVATIONS)
        adapters = [None] * len(aux_channels) if adapters is None else list(adapters)
        check(len(adapters) == len(aux_channels), op, "adapters",
              f"must have one entry per aux input ({len(aux_channels)}), got {len(adapters)}")
        names = [f"aux[{n}]" for n in range(len(aux_channels))] if link_names is None else list(link_names)
        check(len(names) == len(aux_channels), op, "link_names",
              f"must have one entry per aux input ({len(aux_channels)}), got {len(names)}")
        proj_in = []
        for n, (c, a) in enumerate(zip(aux_channels, adapters)):
            if a is None:
                proj_in.append(c)
                continue
            if not isinstance(a, nn.Module):
                fail(op, f"adapters[{n}]", f"must be an nn.Module or None, got {type(a).__name__}")
            ci, co = getattr(a, "in_channels", None), getattr(a, "out_channels", None)
            if not isinstance(ci, int) or not isinstance(co, int):
                fail(op, f"adapters[{n}]", "must have int attributes in_channels and out_channels")
            if ci != c:
                fail(op, f"adapters[{n}]", f"takes {ci} channels but aux_channels[{n}] is {c}")
            if getattr(a, "layout", layout) != layout:
                fail(op, f"adapters[{n}]", f"has layout '{a.layout}' but the layer's is '{layout}' "
                                           "(layout mismatch)")
            proj_in.append(co)
        self.main_channels, self.aux_channels = main_channels, aux_channels
        self.layout, self.activation, self.backend = layout, _norm_act(activation), backend
        self.link_names = names
        self.adapters = nn.ModuleList([nn.Identity() if a is None else a for a in adapters])
        self._has_adapter = [a is not None for a in adapters]
        self.links = nn.ModuleList(
            [GammaB(c, main_channels, norm=norm, activation=activation) for c in proj_in])

    @property
    def num_links(self) -> int:
        return len(self.links)

    # -- forward -----------------------------------------------------------------------------

    def forward(self, main: Tensor, aux: Sequence[Tensor]) -> Tensor:
        op = "nn.ReconciliationLayer"
        _check_map(main, op, "main", self.layout, self.main_channels)
        if isinstance(aux, Tensor):
            aux = [aux]
        aux = list(aux)
        check(len(aux) == self.num_links, op, "aux",
              f"must hold {self.num_links} tensors (one per link), got {len(aux)}")
        size = _spatial(main, self.layout)
        inputs = []
        for n, a in enumerate(aux):
            name = self.link_names[n]
            _check_map(a, op, name, self.layout, self.aux_channels[n])
            x = a.detach()  # Eq. 2's stopgrad(E_j^k): nothing upstream of a link learns from it
            if self._has_adapter[n]:
                ad = self.adapters[n]
                x = ad(x, size) if isinstance(ad, GammaChain) else ad(x)
            if x.shape[0] != main.shape[0] or _spatial(x, self.layout) != size:
                fail(op, name, f"gives a map of batch {x.shape[0]} and size {_spatial(x, self.layout)}"
                               f" after its adapter but main has batch {main.shape[0]} and size "
                               f"{size} (mismatched resolutions)")
            inputs.append(x)

        fused, with_norm, autograd = [], [], []
        for n, x in enumerate(inputs):
            if x.requires_grad:
                autograd.append(n)
            elif self.links[n].foldable:
                fused.append(n)
            else:
                with_norm.append(n)

        out = main
        if fused:
            out = self._links_fused(main, fused, inputs)
        for extra in (self._links_with_norm(with_norm, inputs),
                      self._links_autograd(autograd, inputs)):
            if extra is not None:
                out = out + extra
        if not (fused or with_norm or autograd):
            out = main.clone()  # same contract as mk.reconcile with no aux: a new tensor
        return out

    def _links_fused(self, main: Tensor, idx: list[int], inputs: list[Tensor]) -> Tensor:
        """ONE mk.reconcile call for the affine (foldable) links in ``idx``, channels-last."""
        def cl(t: Tensor) -> Tensor:
            v = t.permute(0, 2, 3, 1) if self.layout == "nchw" else t
            return v if v.is_contiguous() else v.contiguous()

        params = [self.links[n].fused_params() for n in idx]
        out = _fused_reconcile(cl(main), [cl(inputs[n]) for n in idx], [w for w, _ in params],
                               [b for _, b in params], self.activation, backend=self.backend)
        return out.permute(0, 3, 1, 2) if self.layout == "nchw" else out

    def _gamma_b(self, n: int, x: Tensor) -> Tensor:
        return _from_nchw(self.links[n](_to_nchw(x, self.layout)), self.layout)

    def _links_with_norm(self, idx: list[int], inputs: list[Tensor]) -> Tensor | None:
        """Sum of the detached links whose BN is not folded (batch statistics: training mode).

        ONE fused :func:`moe_kernels.reconcile` call with ``batch_norm=True`` for all of them (per
        group of links with equal BN settings; the layer builds them equal): 1x1 conv, BN from the
        batch statistics of the conv output, activation and the sum, channels-last, with the
        running buffers updated in place and ``num_batches_tracked`` counted exactly as
        ``nn.BatchNorm2d.forward`` does. The op keeps only the per-channel mean and inv-std for the
        backward. Called directly in eval mode (running statistics), the same call folds them.
        """
        if not idx:
            return None
        groups: dict[tuple, list[int]] = {}
        for n in idx:
            groups.setdefault(self._bn_call(n), []).append(n)
        total = None
        for (batch_stats, track, eps, momentum, affine), members in groups.items():
            bns = [self.links[n].norm for n in members]
            kw = dict(batch_norm=True, training=batch_stats, eps=eps, momentum=momentum)
            if affine:
                kw.update(bn_weight=[b.weight for b in bns], bn_bias=[b.bias for b in bns])
            if track:
                kw.update(running_mean=[b.running_mean for b in bns],
                          running_var=[b.running_var for b in bns])
            ws, bs = [], []
            for n in members:
                conv = self.links[n].conv
                # [C_in, C_out] as a view of the conv weight: no copy, and its gradient comes back in
                # the conv weight's layout
                ws.append(conv.weight.view(conv.out_channels, conv.in_channels).t())
                bs.append(conv.bias)
            out = _fused_reconcile(None, [self._channels_last(inputs[n]) for n in members], ws,
                                   None if any(b is None for b in bs) else bs, self.activation,
                                   backend=self.backend, **kw)
            out = out.permute(0, 3, 1, 2) if self.layout == "nchw" else out
            total = out if total is None else total + out
        return total

    def _bn_call(self, n: int) -> tuple:
        """``(batch_stats, track, eps, momentum, affine)``: how link n's BN is called, with the side
        effect of ``nn.BatchNorm2d.forward`` (``num_batches_tracked += 1`` in training)."""
        bn = self.links[n].norm
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            momentum = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
        batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
        # running buffers: updated with batch statistics, folded without; absent when not tracked
        track = bn.running_mean is not None and (not bn.training or bn.track_running_stats)
        return batch_stats, track, bn.eps, float(momentum), bn.weight is not None

    def _channels_last(self, t: Tensor) -> Tensor:
        v = t.permute(0, 2, 3, 1) if self.layout == "nchw" else t
        return v if v.is_contiguous() else v.contiguous()

    def _links_autograd(self, idx: list[int], inputs: list[Tensor]) -> Tensor | None:
        """Sum of the links whose adapted input needs a gradient (trainable gamma_a/gamma_c chain).

        Stays plain autograd on purpose: the fused op gives its aux inputs no gradient, while the
        chain's weights (after the stop-gradient) must receive one through gamma_b.
        """
        if not idx:
            return None
        acc = None
        for n in idx:
            z = self._gamma_b(n, inputs[n])
            acc = z if acc is None else acc + z
        return acc

    def extra_repr(self) -> str:
        return (f"main_channels={self.main_channels}, aux_channels={self.aux_channels}, "
                f"layout={self.layout!r}")
