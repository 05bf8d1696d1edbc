"""The kernel contract (moe_kernels/backends/contract.py): every registered backend conforms to it.

Static rules hold for every backend package, available here or not (its modules must import without
its optional dependencies); behavioural rules are checked by calling the kernels of every backend
available for CPU tensors, below the ops (through the op layer's runner, which applies the
validation policy).
"""

import ast
import importlib
import inspect
import pathlib

import pytest
import torch

import moe_kernels as mk
from moe_kernels.backends import BACKENDS, NAMES, contract
from moe_kernels.ops._runner import IMPLS, run

from .helpers import tensors
from .kernel_cases import kernel_args

SPECS = contract.KERNELS
PKG = pathlib.Path(mk.__file__).parent


# ---------------------------------------------------------------- static rules, every backend

@pytest.mark.parametrize("name", NAMES)
def test_backend_package_layout(name):
    pkg = importlib.import_module(f"moe_kernels.backends.{name}")
    for attr in ("DEVICES", "HOW_TO_GET", "probe"):
        assert hasattr(pkg, attr), f"{name}: missing {attr}"
    for stem in contract.MODULES:
        importlib.import_module(f"moe_kernels.backends.{name}.{stem}")  # imports without optional deps


@pytest.mark.parametrize("name", NAMES)
def test_kernel_signatures_and_places(name):
    table = BACKENDS[name].declared_kernels()  # raises TypeError for a signature off the contract
    for kname, k in table.items():
        assert k.spec is SPECS[kname]
        if not k.delegated_to:
            assert k.fn.__module__ == f"moe_kernels.backends.{name}.{k.spec.module}", kname
    if name != "reference":
        # a public function in a backend module is a kernel of the contract (no near-miss names)
        for stem in contract.MODULES:
            mod = importlib.import_module(f"moe_kernels.backends.{name}.{stem}")
            for fname, fn in vars(mod).items():
                if inspect.isfunction(fn) and fn.__module__ == mod.__name__ and not fname.startswith("_"):
                    assert fname in SPECS and SPECS[fname].module == stem, \
                        f"{mod.__name__}.{fname} is not a kernel of the contract in this module"


def test_reference_implements_every_kernel():
    assert set(BACKENDS["reference"].declared_kernels()) == set(SPECS)


def test_every_op_has_its_kernels_and_schema():
    ns = torch.ops.moe_kernels
    ops = {n for n in dir(ns) if isinstance(getattr(ns, n), torch._ops.OpOverloadPacket)}
    assert ops == set(SPECS) == set(IMPLS)
    for name, spec in SPECS.items():
        schema = getattr(ns, name).default._schema
        args = [a.name for a in schema.arguments]
        assert args[:len(spec.params)] == list(spec.params), (name, args)


@pytest.mark.parametrize("name", NAMES)
def test_forward_kernels_come_with_their_backward(name):
    table = BACKENDS[name].declared_kernels()
    for kname in table:
        if f"{kname}_backward" in SPECS:
            assert f"{kname}_backward" in table, f"{name}: {kname} without {kname}_backward"


def test_no_hand_written_op_lists():
    """No module of the package spells out the list of kernels: the contract is the one list."""
    kernel_names = set(SPECS)
    for path in PKG.rglob("*.py"):
        if path.name == "contract.py":
            continue
        tree = ast.parse(path.read_text())
        exports = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                   and any(isinstance(t, ast.Name) and t.id == "__all__" for t in n.targets)}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Dict, ast.List, ast.Tuple, ast.Set)) and id(node) not in exports:
                elts = node.keys if isinstance(node, ast.Dict) else node.elts
                strs = {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
                hits = strs & kernel_names
                assert len(hits) < 6, f"{path.relative_to(PKG)}:{node.lineno} lists kernels {sorted(hits)}"


def test_no_import_cycles():
    """Module-level imports inside the package form no cycle."""
    graph = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        mod = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        pkg = mod if rel.name == "__init__" else mod.rpartition(".")[0]
        deps = set()
        for node in ast.parse(path.read_text()).body:  # module level only (lazy imports are fine)
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    deps.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                             or (PKG.parent / sub.replace(".", "/")).is_dir() else target)
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("moe_kernels"):
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("moe_kernels"))
        graph[mod] = {d for d in deps if d != mod and d != pkg or mod.endswith("__init__")}
    # the package roots import their submodules by design; a cycle is a path back to the start
    # that does not go through a package's own __init__ importing its children
    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                if nxt == start:
                    return path + [nxt]
                if nxt not in seen and not start.startswith(nxt + "."):
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    for mod in graph:
        if mod == "moe_kernels" or mod.count(".") == 0:
            continue
        cyc = cycle_from(mod)
        assert cyc is None, "import cycle: " + " -> ".join(cyc)


# ---------------------------------------------------------------- behaviour, every available backend

def _host_kernels(backend):
    return sorted(n for n, k in BACKENDS[backend].kernels.items())


@pytest.mark.parametrize("name", sorted(SPECS))
def test_outputs_are_new_tensors_in_contract_order(name, backend):
    if name not in BACKENDS[backend].kernels:
        pytest.skip(f"{backend} has no kernel {name}")
    spec = SPECS[name]
    args = kernel_args(name)
    with mk.value_checks(True):
        out = run(backend, name, *args)
    if spec.mutates:
        assert out is None
        return
    outs = out if len(spec.returns) > 1 else (out,)
    assert len(outs) == len(spec.returns)
    inputs = {t.untyped_storage().data_ptr() for t in tensors(args) if t.numel()}
    for o in tensors(outs):
        if o.numel():
            assert o.untyped_storage().data_ptr() not in inputs, f"{name}: an output aliases an input"


@pytest.mark.parametrize("name", sorted(n for n, s in SPECS.items() if s.optional))
def test_unneeded_or_absent_gradients_are_none(name, backend):
    """Rule 3: an optional output is None exactly when its flag is False or its parameter None."""
    if name not in BACKENDS[backend].kernels:
        pytest.skip(f"{backend} has no kernel {name}")
    spec = SPECS[name]
    base = list(kernel_args(name))
    flags = sorted({p for v in spec.optional.values() for p in (v if isinstance(v, tuple) else (v,))})
    for off in flags:
        args = list(base)
        i = spec.params.index(off)
        args[i] = False if isinstance(base[i], bool) else None
        with mk.value_checks(True):
            out = run(backend, name, *args)
        for ret, need in spec.optional.items():
            needs = need if isinstance(need, tuple) else (need,)
            value = out[spec.returns.index(ret)]
            if off in needs:
                assert value is None, f"{name}: {ret} should be None with {off}={args[i]}"
            elif all(args[spec.params.index(n)] is not None and args[spec.params.index(n)] is not False
                     for n in needs):
                assert isinstance(value, torch.Tensor), f"{name}: {ret} missing with {off} off"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_bitwise_deterministic(name, backend):
    """Rule 5: the same inputs give the same bits, call after call."""
    if name not in BACKENDS[backend].kernels or SPECS[name].mutates:
        pytest.skip("not a functional kernel of this backend")
    a = list(tensors(run(backend, name, *kernel_args(name))))
    b = list(tensors(run(backend, name, *kernel_args(name))))
    for u, v in zip(a, b):
        assert torch.equal(u, v), name


def _corrupt(check, args, spec):
    """``args`` with the value that ``check`` must catch (None when the case cannot be built)."""
    args = list(args)
    named = dict(zip(spec.params, args))
    if check.output:
        return None
    t = named[check.arg]
    if t is None:
        return None
    t = t.clone()
    if check.kind == "finite":
        t.view(-1)[t.numel() // 2] = float("nan")
    elif check.kind == "index":
        t.view(-1)[t.numel() // 2] = int(check.bound(named))
    elif check.kind == "ids":  # below -1 (a repeated expert in a token: tests/test_plan.py)
        t.view(-1)[t.numel() // 2] = -2
    elif check.kind == "priority":
        t.view(-1)[t.numel() // 2] = float("nan")
    else:  # offsets: non-decreasing broken
        t[1], t[2] = t[2] + 1, t[2]
    args[spec.params.index(check.arg)] = t
    return args


CHECKED = [(n, i) for n, s in SPECS.items() for i, c in enumerate(s.checks) if not c.output]


@pytest.mark.parametrize("name,i", CHECKED, ids=[f"{n}-{SPECS[n].checks[i].name}" for n, i in CHECKED])
def test_value_checks_give_the_op_layers_error(name, i, fast_backend):
    """Rule 4, checking policy: a kernel that checks a value itself raises exactly the op layer's
    error, and one that does not is checked before it runs: the same error either way."""
    if name not in BACKENDS[fast_backend].kernels:
        pytest.skip(f"{fast_backend} has no kernel {name}")
    spec = SPECS[name]
    bad = _corrupt(spec.checks[i], kernel_args(name), spec)
    msgs = {}
    for b in ("reference", fast_backend):
        with mk.value_checks(True), pytest.raises(mk.MoEKernelsError) as err:
            run(b, name, *[a.clone() if isinstance(a, torch.Tensor) else a for a in bad])
        msgs[b] = str(err.value)
    assert msgs[fast_backend] == msgs["reference"]
    assert f"argument '{spec.checks[i].name}'" in msgs["reference"]


@pytest.mark.parametrize("name,i", CHECKED, ids=[f"{n}-{SPECS[n].checks[i].name}" for n, i in CHECKED])
def test_sync_free_policy_never_lets_a_bad_value_pass(name, i, backend):
    """Rule 4, sync-free policy: an id or offset out of range stops the call (on the CPU: an
    exception); a non-finite value is not an error but must reach the outputs as NaN."""
    if name not in BACKENDS[backend].kernels:
        pytest.skip(f"{backend} has no kernel {name}")
    spec = SPECS[name]
    check = spec.checks[i]
    bad = _corrupt(check, kernel_args(name), spec)
    if check.kind == "priority":
        pytest.skip("plan's gate weights pass through to the Routing: tests/test_plan.py checks that a NaN "
                    "among them reaches the layer's output")
    with mk.value_checks(False):
        if check.kind != "finite":
            with pytest.raises((RuntimeError, ValueError)):
                run(backend, name, *bad)
            return
        out = run(backend, name, *bad)
    if spec.mutates:
        assert not bool(torch.isfinite(bad[0]).all()), f"{name}: the NaN did not reach the buffer"
        return
    floats = [t for t in tensors(out) if t.is_floating_point()]
    assert any(not bool(torch.isfinite(t).all()) for t in floats), f"{name}: the non-finite input vanished"
