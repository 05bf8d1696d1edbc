"""A DeepSpeed job with the library's MoE layer (``moe_kernels.deepspeed.MoE``).

Runs here on 2 CPU processes (gloo) and unchanged on GPUs (NCCL). See run.sh for the launch commands.

    bash examples/deepspeed/run.sh                  # 2 CPU processes, expert parallelism over both
    deepspeed --num_gpus 8 examples/deepspeed/train_moe.py \
        --deepspeed_config examples/deepspeed/ds_config.json

The model is a small residual MLP stack with an MoE layer every other block, trained on a synthetic
regression task where each "dataset" (token cluster) needs a different function, so experts have
something to specialise on. ``--convert`` builds the same model with DeepSpeed's own
``deepspeed.moe.layer.MoE`` first and swaps those layers for the library's in place (the converter's
worked example): the printed loss of the converted model equals the original's on the same batch.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch import nn


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deepspeed_config", default=os.path.join(os.path.dirname(__file__), "ds_config.json"))
    p.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--ep-size", type=int, default=0, help="expert-parallel size (default: the world size)")
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--drop-tokens", action="store_true", help="capacity mode (default: dropless)")
    p.add_argument("--convert", action="store_true",
                   help="build with deepspeed.moe.layer.MoE, then convert to moe_kernels in place")
    p.add_argument("--save", default="", help="directory for a checkpoint at the end (optional)")
    return p.parse_args()


class Block(nn.Module):
    def __init__(self, dim, hidden, moe=None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.moe = moe
        self.mlp = None if moe is not None else nn.Sequential(nn.Linear(dim, hidden), nn.GELU(),
                                                              nn.Linear(hidden, dim))

    def forward(self, x):
        h = self.norm(x)
        if self.moe is None:
            return x + self.mlp(h), x.new_zeros(())
        y, l_aux, _counts = self.moe(h)
        return x + y, l_aux


class Net(nn.Module):
    def __init__(self, args, moe_cls, ep_size):
        super().__init__()
        self.inp = nn.Linear(args.dim, args.dim)
        blocks = []
        for i in range(4):
            moe = None
            if i % 2 == 1:
                expert = nn.Sequential(nn.Linear(args.dim, args.hidden), nn.GELU(),
                                       nn.Linear(args.hidden, args.dim))
                moe = moe_cls(args.dim, expert, num_experts=args.experts, ep_size=ep_size, k=args.k,
                              drop_tokens=args.drop_tokens, min_capacity=0, top2_2nd_expert_sampling=False)
            blocks.append(Block(args.dim, args.hidden, moe))
        self.blocks = nn.ModuleList(blocks)
        self.out = nn.Linear(args.dim, 1)

    def forward(self, x, y):
        h = self.inp(x)
        aux = 0.0
        for b in self.blocks:
            h, l_aux = b(h)
            aux = aux + l_aux
        return F.mse_loss(self.out(h).squeeze(-1), y) + 0.01 * aux


def batch(step, rank, n, dim, num_clusters=8):
    """Tokens from 8 clusters; the target is a cluster-specific nonlinear function of the token."""
    g = torch.Generator().manual_seed(10_000 * step + rank)
    centers = torch.randn(num_clusters, dim, generator=torch.Generator().manual_seed(0)) * 2
    c = torch.randint(0, num_clusters, (n,), generator=g)
    x = centers[c] + torch.randn(n, dim, generator=g)
    w = torch.randn(num_clusters, dim, generator=torch.Generator().manual_seed(1)) / dim ** 0.5
    y = torch.sin((x * w[c]).sum(-1) * 3)
    return x, y


def main():
    args = parse_args()
    import deepspeed

    import moe_kernels.deepspeed as mkds

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    ep_size = args.ep_size or world
    torch.manual_seed(0)

    if args.convert:
        # The converter's worked example: a model written for DeepSpeed's own MoE layer (as an existing
        # DeepSpeed job builds it), converted in place. Groups are created first so DeepSpeed's layer can
        # run before deepspeed.initialize (the engine reuses them).
        from deepspeed.moe.layer import MoE as DeepSpeedMoE
        model = Net(args, DeepSpeedMoE, ep_size)
        for m in model.modules():
            if isinstance(m, DeepSpeedMoE):
                m.set_deepspeed_parallelism()
        model.eval()
        x, y = batch(0, rank, 32, args.dim)  # the same token count on every rank: DeepSpeed's layer needs it
        with torch.no_grad():
            before = model(x, y).item()
            mkds.convert_deepspeed_moe(model)   # every deepspeed.moe.layer.MoE -> moe_kernels.deepspeed.MoE
            after = model(x, y).item()
        model.train()
        print(f"[rank {rank}] converter: loss with deepspeed.moe.layer.MoE {before:.6f}, "
              f"after convert_deepspeed_moe {after:.6f}", flush=True)
    else:
        model = Net(args, mkds.MoE, ep_size)

    # DeepSpeed's engine splits MoE parameter groups itself when it builds the optimizer from the config;
    # with a client optimizer, pass mkds.param_groups(model) instead.
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                           config=args.deepspeed_config)
    micro = engine.train_micro_batch_size_per_gpu()
    t0 = time.perf_counter()
    for step in range(args.steps):
        # ranks get different token counts on purpose (the library's all-to-all takes variable splits)
        n = micro * (2 if rank == 0 else 1)
        x, y = batch(step, rank, n, args.dim)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
    if args.save:
        engine.save_checkpoint(args.save, tag="final")
        if rank == 0:
            print(f"checkpoint: {args.save}/final")


if __name__ == "__main__":
    main()
