"""The ``cpu`` backend: the C++/OpenMP kernels of ``csrc/`` as ``torch.ops.moe_kernels_C`` operators.

The kernels are dispatcher ops registered under the CPU key (``csrc/registration.cpp`` holds every
schema), built just-in-time on first use or ahead of time (:mod:`moe_kernels.backends.compiled`).
The modules here bind them to the kernel contract: one function per kernel, which calls the op
and turns the op's value errors into :class:`moe_kernels.MoEKernelsError`. The kernels make their
own value checks while they read the data (``@checks_values``): ids and offsets always (on the
CPU an out-of-range id raises under either policy), finiteness of the router logits as the
policy asks.

By design the mutual-information losses run on the reference formulas (their work is a few
[M, E] reductions; see ``losses.py``), and ``reconcile`` in float64 (gradcheck) too.
"""

DEVICES = ("cpu",)
HOW_TO_GET = ("install a C++ compiler (g++ >= 9) and ninja (`pip install ninja`): the extension is built on "
              "first use and cached (or build it ahead of time with MOE_KERNELS_BUILD_OPS=1)")


def probe():
    from .. import compiled

    return compiled.load()


def workspace_bytes() -> int:
    """Bytes held by the cpu kernels' buffer pool, idle or in use (0 when the backend is not built).

    The fused ``moe_mlp`` takes its large buffers (the saved pre-activation, scratch and the expert
    weight gradients) from a pool that reuses a buffer once nothing else references it, so steps do
    not pay first-touch page faults on fresh memory. The pool keeps its idle buffers between steps
    (as ``zero_grad(set_to_none=False)`` keeps gradients); :func:`empty_cache` frees them and
    ``MOE_KERNELS_CPU_WORKSPACE=0`` turns the pool off.
    """
    from .. import compiled

    return compiled.workspace_bytes()


def empty_cache() -> int:
    """Free the pool's idle buffers (those nothing else references); returns the bytes freed."""
    from .. import compiled

    return compiled.empty_cache()
