"""Parity of ``mk.route`` with DeepSpeed's MoE gating (``deepspeed/moe/sharded_moe.py``, 0.19.8).

DeepSpeed's ``top1gating``, ``top2gating`` and ``topkgating`` are called on the same logits as
``mk.route``. Where the two agree on semantics the results are compared exactly (integers and
booleans) or to a few fp32 ulps (gate weights, l_aux). Where they differ, either one side is
transformed so that the comparison is exact again, or the difference itself is asserted.
``docs/deepspeed_parity.md`` summarises the findings.

DeepSpeed's gating needs no ``torch.distributed`` process group here: with ``ep_group=None`` and
no model-parallel unit registered, it never issues a collective, so there is no fixture for one.

Comparison conventions. DeepSpeed is called with ``sparse_routes=True``, which returns one row per
route (choice j of token t): the expert (-1 when dropped by the capacity), the position in the
expert's capacity buffer and the gate weight. The mk side is mapped onto the same form: expert =
``topk_ids`` where ``slots >= 0`` else -1, position = ``slots - offsets[expert]`` (``pad_to=1``).
The dense outputs (``combine_weights`` / ``dispatch_mask``, ``sparse_routes=False``) are checked
against the same mk-derived data. DeepSpeed's random parts are switched off unless a test is about
them: ``use_rts=False``, ``noisy_gate_policy=None``, ``top2_2nd_expert_sampling=False``. Every
DeepSpeed call gets a clone of the logits (``top2gating`` with sampling adds noise in place).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F

import moe_kernels as mk

pytestmark = pytest.mark.peers

deepspeed = pytest.importorskip(
    "deepspeed", reason="DeepSpeed is not installed; the parity tests against its MoE gating "
                        "(deepspeed.moe.sharded_moe) need it")
from deepspeed.moe import sharded_moe as ds  # noqa: E402

# Gate weights: both sides start from the same fp32 softmax values (torch.softmax over the same
# fp32 logits) and divide by the sum of the kept ones, but DeepSpeed reduces over a masked [T, E]
# row in expert-id order and mk over the k chosen values in score order, so the renormalising sum
# may round differently by an ulp or two. 1e-6 relative is ~8 fp32 ulps; 1e-7 absolute covers
# weights near 0.
W_TOL = dict(rtol=1e-6, atol=1e-7)
# l_aux: the same formula (E * sum_e mean-prob_e * load-fraction_e) with differently ordered fp32
# reductions (DeepSpeed: mean of the E products times E*E; mk: sum times E).
LAUX_TOL = dict(rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- helpers

def make_logits(T: int, E: int, seed: int, kind: str = "randn") -> torch.Tensor:
    """fp32 [T, E] logits. Kinds: ``randn`` (distinct scores), ``one_expert`` (every token's first
    choice is expert ``seed % E``), ``empty`` (all first two choices among experts {1, E-2}),
    ``tied`` (small integers: many exact ties between experts)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "tied":
        return torch.randint(0, 3, (T, E), generator=g).float()
    x = torch.randn(T, E, generator=g) * 2.0
    if kind == "one_expert":
        x[:, seed % E] += 12.0
    elif kind == "empty":
        x[:, [1, E - 2]] += 12.0
    else:
        assert kind == "randn", kind
    return x


class Routes(NamedTuple):
    """Per-route view [T, k]: expert (-1 dropped), buffer position (0 when dropped), weight."""
    ids: torch.Tensor
    loc: torch.Tensor
    w: torch.Tensor
    capacity: int
    exp_counts: torch.Tensor  # DeepSpeed only: per-expert load before the capacity
    l_aux: torch.Tensor  # DeepSpeed only

    @property
    def keep(self) -> torch.Tensor:
        return self.ids >= 0


def _from_ds(out) -> Routes:
    l_aux, capacity, _num_experts, idx, loc, gates, exp_counts = out
    return Routes(idx.t().long(), loc.t().long(), gates.t(), int(capacity), exp_counts.long(), l_aux)


def ds_top1(logits, cf, min_cap=0, *, sparse=True, **kw):
    kw.setdefault("use_rts", False)
    out = ds.top1gating(logits.clone(), cf, min_cap, sparse_routes=sparse, **kw)
    return _from_ds(out) if sparse else out


def ds_top2(logits, cf, min_cap=0, *, sparse=True, **kw):
    kw.setdefault("top2_2nd_expert_sampling", False)
    out = ds.top2gating(logits.clone(), cf, min_cap, sparse_routes=sparse, **kw)
    return _from_ds(out) if sparse else out


def ds_topk(logits, k, cf, min_cap=0, *, sparse=True, **kw):
    out = ds.topkgating(logits.clone(), k, cf, min_cap, sparse_routes=sparse, **kw)
    return _from_ds(out) if sparse else out


def mk_routes(r: mk.Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert or -1 when dropped, position inside the expert's segment or 0) for each route."""
    assert torch.equal(r.offsets.long(), F.pad(torch.cumsum(r.counts.long(), 0), (1, 0)))  # pad_to=1
    keep = r.slots >= 0
    ids = r.topk_ids.long()
    loc = r.slots.long() - r.offsets.long()[ids]
    return torch.where(keep, ids, -1), torch.where(keep, loc, 0)


def renorm_over_kept(raw: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """DeepSpeed's top-2/top-k weights: the kept raw scores of a token divided by their sum
    (a token whose routes were all dropped gets zeros)."""
    kept = torch.where(keep, raw, torch.zeros_like(raw))
    s = kept.sum(-1, keepdim=True)
    return torch.where(keep, kept / s.clamp_min(torch.finfo(s.dtype).tiny), torch.zeros_like(raw))


def kept_per_expert(ids: torch.Tensor, E: int) -> torch.Tensor:
    return torch.bincount(ids[ids >= 0], minlength=E)


def assert_dense(dense_out, ids, loc, w, E, C):
    """DeepSpeed's dense (combine_weights [T, E, C], dispatch_mask) against per-route data."""
    _l_aux, combine, dispatch, _counts = dense_out
    T = ids.shape[0]
    expected = torch.zeros(T, E, C)
    t, j = (ids >= 0).nonzero(as_tuple=True)
    expected[t, ids[t, j], loc[t, j]] = w[t, j]
    assert combine.shape == (T, E, C)
    assert torch.equal(dispatch, expected != 0)
    torch.testing.assert_close(combine, expected, **W_TOL)


def one_hot_rows(choices: torch.Tensor, E: int) -> torch.Tensor:
    """Logits whose top-1 (with any score policy) is ``choices[i]`` for row i."""
    x = torch.zeros(choices.numel(), E)
    x[torch.arange(choices.numel()), choices] = 10.0
    return x


# ----------------------------------------------------------------------------- capacity

CAP_T = (1, 5, 25, 37)
CAP_E = (1, 2, 7)
DYADIC = (0.25, 0.5, 1.0, 1.25, 1.5)  # exact in binary: fp32 and fp64 agree
DECIMAL = (0.3, 1.1, 1.2)  # not exact in binary


def test_capacity_value():
    """DeepSpeed's ``_capacity`` with factor ``capacity_factor * k`` (what top2gating/topkgating
    pass) against ``mk.route(...).capacity``: equal for binary-exact factors and whenever the
    decimal value T*k*cf/E is not an integer. mk always gives the exact decimal ceiling; at exact
    integers DeepSpeed's fp32 rounding may land one above it."""
    checked = disagreements = 0
    for T in CAP_T:
        for E in CAP_E:
            x = torch.zeros(T, E)
            for k in (1, 2, 3):
                if k > E:
                    continue
                for cf in DYADIC + DECIMAL:
                    for mc in (0, 6):
                        d = int(ds._capacity(x, torch.tensor(cf * k), torch.tensor(mc)))
                        m = mk.route(x, k, capacity_factor=cf, min_capacity=mc).capacity
                        exact = Fraction(str(cf)) * T * k / E
                        checked += 1
                        assert m == max(mc, math.ceil(exact)), (T, E, k, cf, mc, m)
                        if cf in DYADIC or exact.denominator != 1:
                            assert d == m, (T, E, k, cf, mc)
                        elif d != m:
                            disagreements += 1
                            assert d == m + 1, (T, E, k, cf, mc, d, m)
    assert checked > 300 and disagreements > 0


@pytest.mark.parametrize("T,E,k,cf,ds_cap,mk_cap", [
    (25, 1, 1, 1.2, 31, 30),  # exact 30: fp32(1.2) > 1.2 -> DeepSpeed rounds up to 31
    (25, 5, 2, 1.1, 11, 11),  # exact 11: fp32 lands on 11; a plain fp64 product would give 12
])
def test_capacity_rounding_at_exact_integers(T, E, k, cf, ds_cap, mk_cap):
    x = torch.zeros(T, E)
    gate = ds.top1gating if k == 1 else ds.top2gating
    assert int(ds._capacity(x, torch.tensor(cf * k), torch.tensor(0))) == ds_cap
    kw = dict(use_rts=False) if k == 1 else dict(top2_2nd_expert_sampling=False)
    assert int(gate(x.clone(), cf, 0, sparse_routes=True, **kw)[1]) == ds_cap
    assert mk.route(x, k, capacity_factor=cf).capacity == mk_cap
    assert math.ceil(Fraction(str(cf)) * T * k / E) == mk_cap  # mk: the exact decimal ceiling


# ----------------------------------------------------------------------------- top-1

TOP1_CASES = [  # T, E, kind
    (1, 1, "randn"), (1, 7, "randn"), (37, 7, "randn"), (64, 8, "randn"), (37, 1, "randn"),
    (37, 7, "one_expert"), (37, 7, "empty"), (37, 7, "tied"), (5, 7, "randn"),
]


@pytest.mark.parametrize("T,E,kind", TOP1_CASES)
def test_top1_dropless(T, E, kind):
    """drop_tokens=False: DeepSpeed sizes the capacity to the largest expert load and keeps every
    token. Expert choice (argmax, ties to the lower id: the same rule as mk), positions, raw
    (un-renormalised) weights, loads and l_aux coincide with mk's dropless routing."""
    x = make_logits(T, E, seed=T * 31 + E, kind=kind)
    d = ds_top1(x, 1.0, drop_tokens=False)
    r = mk.route(x, 1, renormalize=False)
    ids, loc = mk_routes(r)
    assert r.capacity == -1 and int(r.num_dropped) == 0
    assert torch.equal(d.ids, ids) and torch.equal(d.loc, loc)
    assert torch.equal(d.exp_counts, r.counts.long())
    assert d.capacity == int(r.counts.max())
    torch.testing.assert_close(d.w, r.topk_weights, **W_TOL)
    torch.testing.assert_close(d.l_aux, mk.load_balancing_loss(x, r), **LAUX_TOL)
    assert_dense(ds_top1(x, 1.0, drop_tokens=False, sparse=False), ids, loc, r.topk_weights, E,
                 d.capacity)
    # mk's renormalised top-1 weight is 1; DeepSpeed's top-1 gate is the raw softmax probability.
    assert torch.equal(mk.route(x, 1).topk_weights, torch.ones(T, 1))


@pytest.mark.parametrize("T,E,kind", TOP1_CASES)
@pytest.mark.parametrize("cf,min_cap", [(0.5, 0), (1.0, 0), (0.25, 1)])
def test_top1_capacity_without_rts(T, E, kind, cf, min_cap):
    """use_rts=False. The capacity and the number kept per expert (min(load, C)) coincide. Which
    tokens an overfull expert keeps does not: DeepSpeed takes the C largest entries of the 0/1
    choice column with torch.topk, and among equal entries that picks an unspecified subset (not
    the first C in token order, which is what mk keeps). Experts within capacity coincide exactly."""
    x = make_logits(T, E, seed=T * 7 + E, kind=kind)
    d = ds_top1(x, cf, min_cap)
    r = mk.route(x, 1, renormalize=False, capacity_factor=cf, min_capacity=min_cap)
    ids, loc = mk_routes(r)
    C = r.capacity
    assert d.capacity == C
    choice = r.topk_ids[:, 0].long()
    load = torch.bincount(choice, minlength=E)
    assert torch.equal(d.exp_counts, load)
    assert torch.equal(kept_per_expert(d.ids, E), torch.clamp(load, max=C))
    assert torch.equal(kept_per_expert(d.ids, E), r.counts.long())
    assert torch.equal(d.ids[d.keep], choice[d.keep[:, 0]])  # a kept token goes to its argmax
    within = (load <= C)[choice]
    assert torch.equal(d.ids[within], ids[within]) and torch.equal(d.loc[within], loc[within])
    # The documented rule for the overfull experts: the rows torch.topk picks from the choice mask.
    picked = torch.zeros(T, E, dtype=torch.bool).scatter_(
        0, torch.topk(F.one_hot(choice, E), k=min(C, T), dim=0).indices, True)
    assert torch.equal(d.keep[:, 0], picked.gather(1, choice[:, None])[:, 0])
    # Positions are token order among the kept tokens, on both sides.
    for e in range(E):
        toks = (d.ids[:, 0] == e).nonzero()[:, 0]
        assert torch.equal(d.loc[toks, 0], torch.arange(toks.numel()))
    torch.testing.assert_close(d.w, torch.where(d.keep, r.topk_weights, 0.0), **W_TOL)
    torch.testing.assert_close(d.l_aux, mk.load_balancing_loss(x, r), **LAUX_TOL)


@pytest.mark.parametrize("T,E,kind", [(37, 7, "randn"), (64, 8, "one_expert"), (37, 1, "randn"),
                                      (1, 7, "randn")])
def test_top1_random_token_selection_is_score_policy_on_priorities(T, E, kind):
    """use_rts=True (DeepSpeed's default): an overfull expert keeps the C tokens with the largest
    uniform draws u[t, e] (torch.rand under the same seed). Transforming the mk side makes it exact:
    logits whose top-1 is the same expert and whose top-1 (sigmoid) score grows with u, routed
    with drop_policy="score", keep the same tokens at the same positions."""
    x = make_logits(T, E, seed=3 * T + E, kind=kind)
    cf = 0.5
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        d = ds_top1(x, cf, use_rts=True)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        u = torch.rand(T, E)
    choice = mk.route(x, 1).topk_ids[:, 0].long()
    prio = u.gather(1, choice[:, None])[:, 0]
    rank = torch.empty(T).scatter_(0, prio.argsort(), torch.arange(T, dtype=torch.float32))
    y = torch.zeros(T, E)
    y[torch.arange(T), choice] = 4.0 + 0.01 * rank  # distinct, monotone in u, same argmax
    # sigmoid scores: with E = 1 a softmax score would be 1 for every token.
    r = mk.route(y, 1, score="sigmoid", capacity=d.capacity, drop_policy="score")
    ids, loc = mk_routes(r)
    assert torch.equal(d.ids, ids) and torch.equal(d.loc, loc)
    # ...and the per-expert kept counts equal those of mk's position policy on the real logits.
    rp = mk.route(x, 1, capacity_factor=cf)
    assert rp.capacity == d.capacity
    assert torch.equal(kept_per_expert(d.ids, E), rp.counts.long())


def test_top1_rsample_noise_moves_choice_but_not_weights():
    """noisy_gate_policy='RSample': the expert is the argmax of logits + Gumbel noise (reproduced
    with the same seed and mk.route on the noisy logits); the weight stays the clean softmax
    probability of that expert (mk: the clean score of the same expert)."""
    T, E = 37, 7
    x = make_logits(T, E, seed=11)
    with torch.random.fork_rng():
        torch.manual_seed(99)
        d = ds_top1(x, 1.0, drop_tokens=False, noisy_gate_policy="RSample")
    with torch.random.fork_rng():
        torch.manual_seed(99)
        noise = torch.distributions.Gumbel(torch.tensor(0.0), torch.tensor(1.0)).rsample((T, E))
    noisy = mk.route(x + noise, 1)
    assert torch.equal(d.ids, noisy.topk_ids.long())
    assert not torch.equal(d.ids, mk.route(x, 1).topk_ids.long())  # the noise did move some
    clean = mk.route(x, E, renormalize=False).dense_weights()
    torch.testing.assert_close(d.w, clean.gather(1, d.ids), **W_TOL)


def test_top1_min_capacity_above_token_count():
    """top1gating refuses T < min_capacity (an assertion); top2/topk and mk accept it and just use
    the larger capacity."""
    x = make_logits(1, 7, seed=5)
    with pytest.raises(AssertionError):
        ds_top1(x, 1.0, 4)
    assert mk.route(x, 1, capacity_factor=1.0, min_capacity=4).capacity == 4
    d = ds_topk(x, 3, 1.0, 4, drop_policy="position")
    r = mk.route(x, 3, capacity_factor=1.0, min_capacity=4)
    assert d.capacity == r.capacity == 4
    assert torch.equal(d.ids, r.topk_ids.long())


# ----------------------------------------------------------------------------- top-2

TOP2_CASES = [  # T, E, kind, cf, min_cap
    (1, 2, "randn", 1.0, 0), (16, 2, "randn", 0.5, 0), (37, 7, "randn", 0.5, 0),
    (37, 7, "randn", 0.25, 0), (64, 8, "randn", 1.0, 0), (37, 7, "one_expert", 1.0, 0),
    (37, 7, "empty", 1.0, 0), (37, 7, "tied", 0.5, 0), (5, 7, "randn", 0.25, 3),
]


@pytest.mark.parametrize("T,E,kind,cf,min_cap", TOP2_CASES)
def test_top2_equals_mk_on_choice_major_assignments(T, E, kind, cf, min_cap):
    """top2gating fills every expert with all first choices (token order) before any second
    choice; mk numbers assignments token-major. Transform: route the 2T assignments as 2T
    single-choice rows (all first choices, then all second choices) with mk at k=1 and DeepSpeed's
    capacity: kept set and positions are then identical. Expert choice (ties to the lower id on
    both sides), loads, capacity and the number kept per expert coincide with mk at k=2 directly;
    DeepSpeed's weights are renormalised over the surviving choices only."""
    x = make_logits(T, E, seed=T + 13 * E, kind=kind)
    d = ds_top2(x, cf, min_cap)
    r2 = mk.route(x, 2, renormalize=False, capacity_factor=cf, min_capacity=min_cap)
    C = d.capacity
    assert C == r2.capacity
    full = ds_top2(x, cf, min_cap, drop_tokens=False)
    assert torch.equal(full.ids, r2.topk_ids.long())  # choices before the capacity
    assert torch.equal(d.exp_counts, torch.bincount(r2.topk_ids.flatten().long(), minlength=E))
    assert torch.equal(kept_per_expert(d.ids, E), r2.counts.long())

    choices = r2.topk_ids.t().reshape(-1).long()  # row j*T + t = choice j of token t
    rc = mk.route(one_hot_rows(choices, E), 1, capacity=C)
    ids_c, loc_c = mk_routes(rc)
    assert torch.equal(d.ids, ids_c.view(2, T).t()) and torch.equal(d.loc, loc_c.view(2, T).t())

    w = renorm_over_kept(r2.topk_weights, d.keep)
    torch.testing.assert_close(d.w, w, **W_TOL)
    both = d.keep.all(1)
    torch.testing.assert_close(d.w[both], mk.route(x, 2).topk_weights[both], **W_TOL)
    # l_aux counts first choices only: it equals mk's loss for the top-1 routing.
    torch.testing.assert_close(d.l_aux, mk.load_balancing_loss(x, mk.route(x, 1)), **LAUX_TOL)
    assert_dense(ds_top2(x, cf, min_cap, sparse=False), d.ids, d.loc, w, E, C)


def test_top2_priority_differs_from_token_order():
    """Token 0 picks (0, 1), token 1 picks (1, 0), capacity 1: DeepSpeed keeps both first choices,
    mk keeps token 0's two choices (assignments 0 and 1 come first in token-major order)."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = ds_top2(x, 0.5)
    r = mk.route(x, 2, capacity_factor=0.5)
    assert d.capacity == r.capacity == 1
    assert d.ids.tolist() == [[0, -1], [1, -1]]
    assert mk_routes(r)[0].tolist() == [[0, 1], [-1, -1]]
    assert d.w.tolist() == [[1.0, 0.0], [1.0, 0.0]]  # renormalised over the surviving choice
    torch.testing.assert_close(r.topk_weights, torch.softmax(x, 1).sort(1, descending=True).values)


def test_top2_dropless():
    """drop_tokens=False: capacity = the largest load, nothing dropped; choices and weights equal
    mk's dropless k=2 routing (renormalised over both choices)."""
    T, E = 37, 7
    x = make_logits(T, E, seed=2)
    d = ds_top2(x, 1.0, drop_tokens=False)
    r = mk.route(x, 2)
    ids, loc = mk_routes(r)
    assert torch.equal(d.ids, ids)
    assert d.capacity == int(r.counts.max()) and int(r.num_dropped) == 0
    # Nothing is dropped, yet the buffer positions still differ: DeepSpeed places all first
    # choices of an expert before its second choices, mk in token order. The choice-major
    # construction reproduces DeepSpeed's positions exactly.
    rc = mk.route(one_hot_rows(r.topk_ids.t().reshape(-1).long(), E), 1)
    assert torch.equal(d.loc, mk_routes(rc)[1].view(2, T).t())
    torch.testing.assert_close(d.w, r.topk_weights, **W_TOL)


def test_top2_second_choice_by_logit_where_scores_underflow():
    """DeepSpeed picks the second expert by argmax of the logits (first one masked); mk ranks by
    the upcast logit too. Where two fp32 scores underflow to 0 the logit still separates them, so
    both pick expert 2 (a score-based ranking would tie and take expert 1). Weights agree ([1, 0])."""
    x = torch.tensor([[100.0, -101.0, -100.0]])
    d = ds_top2(x, 1.0)
    r = mk.route(x, 2)
    assert d.ids.tolist() == [[0, 2]]
    assert r.topk_ids.tolist() == [[0, 2]]
    assert d.w.tolist() == r.topk_weights.tolist() == [[1.0, 0.0]]


def test_top2_sampling_is_random_and_mutates_logits():
    """top2_2nd_expert_sampling=True (DeepSpeed's default) adds Gumbel noise to the logits in place
    and draws the second expert from them; the first expert is still mk's."""
    x = make_logits(37, 7, seed=8)
    arg = x.clone()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        out = ds.top2gating(arg, 4.0, 0, drop_tokens=False, top2_2nd_expert_sampling=True,
                            sparse_routes=True)
    d = _from_ds(out)
    r = mk.route(x, 2)
    assert not torch.equal(arg, x)  # the caller's tensor was modified
    assert torch.equal(d.ids[:, 0], r.topk_ids[:, 0].long())
    assert not torch.equal(d.ids[:, 1], r.topk_ids[:, 1].long())
    assert bool((d.ids[:, 1] != d.ids[:, 0]).all())


def test_top2_single_expert():
    """E=1: top2gating sends both choices to expert 0 with weight 1/2 each; mk refuses k > E."""
    x = make_logits(4, 1, seed=1)
    d = ds_top2(x, 1.0)
    assert d.ids.tolist() == [[0, 0]] * 4
    assert d.w.tolist() == [[0.5, 0.5]] * 4
    with pytest.raises(ValueError, match="argument 'k' must be <= the number of experts"):
        mk.route(x, 2)


# ----------------------------------------------------------------------------- top-k

TOPK_CASES = [  # T, E, k, kind, cf, min_cap
    (1, 7, 3, "randn", 1.0, 0), (37, 7, 1, "randn", 0.5, 0), (37, 7, 2, "randn", 0.5, 0),
    (37, 7, 3, "randn", 0.5, 0), (37, 7, 7, "randn", 0.25, 0), (37, 7, 7, "randn", 1.0, 0),
    (64, 8, 3, "one_expert", 1.0, 0), (37, 7, 2, "empty", 1.0, 0), (5, 7, 3, "randn", 0.25, 2),
    (16, 2, 2, "randn", 0.5, 0), (37, 1, 1, "randn", 0.5, 0), (64, 8, 4, "randn", 1.25, 9),
]


def _check_topk(x, d, r, E, cf, min_cap, policy):
    """Shared assertions: mk's routing r (renormalize=False) against DeepSpeed's d."""
    ids, loc = mk_routes(r)
    assert d.capacity == r.capacity
    assert torch.equal(d.exp_counts, torch.bincount(r.topk_ids.flatten().long(), minlength=E))
    assert torch.equal(d.ids, ids) and torch.equal(d.loc, loc)
    assert torch.equal(kept_per_expert(d.ids, E), r.counts.long())
    w = renorm_over_kept(r.topk_weights, d.keep)
    torch.testing.assert_close(d.w, w, **W_TOL)
    full = d.keep.all(1)
    torch.testing.assert_close(d.w[full], mk.route(x, r.k).topk_weights[full], **W_TOL)
    torch.testing.assert_close(d.l_aux, mk.load_balancing_loss(x, r), **LAUX_TOL)
    dense = ds_topk(x, r.k, cf, min_cap, drop_policy=policy, sparse=False)
    assert_dense(dense, ids, loc, w, E, d.capacity)


@pytest.mark.parametrize("T,E,k,kind,cf,min_cap", TOPK_CASES)
def test_topk_position_policy(T, E, k, kind, cf, min_cap):
    """topkgating(drop_policy="position") == mk.route(drop_policy="position"): an expert sees a
    token at most once, so DeepSpeed's per-expert token order is mk's assignment order."""
    x = make_logits(T, E, seed=5 * T + E + k, kind=kind)
    d = ds_topk(x, k, cf, min_cap, drop_policy="position")
    r = mk.route(x, k, renormalize=False, capacity_factor=cf, min_capacity=min_cap)
    _check_topk(x, d, r, E, cf, min_cap, "position")


# E = 1 is left out: every score is 1, an all-tie case (see test_topk_score_ties).
@pytest.mark.parametrize("T,E,k,kind,cf,min_cap", [c for c in TOPK_CASES if c[1] > 1])
def test_topk_probs_policy(T, E, k, kind, cf, min_cap):
    """topkgating(drop_policy="probs", its default) == mk.route(drop_policy="score") when the
    scores competing for an expert are distinct (DeepSpeed leaves ties to torch.topk)."""
    x = make_logits(T, E, seed=5 * T + E + k, kind=kind)
    d = ds_topk(x, k, cf, min_cap, drop_policy="probs")
    r = mk.route(x, k, renormalize=False, capacity_factor=cf, min_capacity=min_cap,
                 drop_policy="score")
    _check_topk(x, d, r, E, cf, min_cap, "probs")


@pytest.mark.parametrize("T,E,k", [(1, 7, 7), (37, 7, 3), (64, 8, 2)])
def test_topk_dropless(T, E, k):
    x = make_logits(T, E, seed=T * E)
    d = ds_topk(x, k, 1.0, drop_tokens=False)
    r = mk.route(x, k, renormalize=False)
    ids, loc = mk_routes(r)
    assert int(r.num_dropped) == 0 and d.capacity == int(r.counts.max())
    assert torch.equal(d.ids, ids) and torch.equal(d.loc, loc)
    torch.testing.assert_close(d.w, mk.route(x, k).topk_weights, **W_TOL)


def test_topk_bf16_logits_upcast():
    """DeepSpeed's TopKGate computes the logits in fp32; mk.route upcasts bf16 logits to fp32
    internally. Same routing."""
    x = make_logits(37, 7, seed=4).bfloat16()
    d = ds_topk(x.float(), 3, 0.5, drop_policy="position")
    r = mk.route(x, 3, renormalize=False, capacity_factor=0.5)
    _check_topk(x.float(), d, r, 7, 0.5, 0, "position")


def test_topk_score_ties():
    """Exact score ties between experts: mk takes the lower id, top1gating/top2gating (argmax) too,
    topkgating whatever torch.topk returns (unspecified). The chosen score values agree."""
    T, E, k = 37, 7, 3
    x = make_logits(T, E, seed=6, kind="tied")
    r = mk.route(x, k, renormalize=False)
    d = ds_topk(x, k, 1.0, drop_tokens=False)
    ds_rule = torch.topk(torch.softmax(x, 1), k, dim=1).indices
    assert torch.equal(d.ids, ds_rule)
    scores = torch.softmax(x, 1)
    # same values (each backend's own fp32 softmax), maybe other ids
    torch.testing.assert_close(scores.gather(1, d.ids), r.topk_weights, **W_TOL)
    lower_id = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(r.topk_ids.long(), lower_id)
    assert torch.equal(ds_top1(x, 1.0, drop_tokens=False).ids, r.topk_ids[:, :1].long())
    assert torch.equal(ds_top2(x, 1.0, drop_tokens=False).ids, r.topk_ids[:, :2].long())


@pytest.mark.parametrize("T,E,k", [(37, 1, 1), (37, 7, 3)])
def test_topk_probs_policy_with_tied_scores(T, E, k):
    """drop_policy="probs" among equal scores: mk ("score") keeps the earlier tokens, DeepSpeed an
    unspecified subset chosen by torch.topk. Only the number kept per expert coincides."""
    x = make_logits(T, E, seed=9, kind="tied")
    r = mk.route(x, k, capacity_factor=0.5, drop_policy="score")
    d = ds_topk(x, k, 0.5, drop_policy="probs")
    assert d.capacity == r.capacity
    assert torch.equal(kept_per_expert(d.ids, E), r.counts.long())
    full = ds_topk(x, k, 0.5, drop_tokens=False)
    assert torch.equal(d.ids[d.keep], full.ids[d.keep])  # kept routes keep their expert


def test_topk_k_larger_than_experts_rejected():
    x = make_logits(5, 2, seed=0)
    with pytest.raises(RuntimeError):
        ds_topk(x, 3, 1.0)
    with pytest.raises(ValueError, match="argument 'k' must be <= the number of experts"):
        mk.route(x, 3)
