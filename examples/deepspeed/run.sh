#!/usr/bin/env bash
# A DeepSpeed job with the library's MoE layer on 2 CPU processes (gloo), expert parallelism over both
# (ep_size 2: 4 of the 8 experts per process), ZeRO-2, AdamW from ds_config.json. On GPUs the same
# command with --num_gpus N uses NCCL.
#
#   bash examples/deepspeed/run.sh               # train 30 steps
#   bash examples/deepspeed/run.sh --convert     # start from DeepSpeed's own MoE layers, convert in place
#   bash examples/deepspeed/run.sh --drop-tokens # capacity mode (fixed all-to-all splits)
#
# Without the deepspeed launcher: torchrun --nproc_per_node 2 examples/deepspeed/train_moe.py
set -euo pipefail
cd "$(dirname "$0")/../.."
PORT=${MASTER_PORT:-29512}
exec deepspeed --num_gpus 2 --master_port "$PORT" examples/deepspeed/train_moe.py \
  --deepspeed_config examples/deepspeed/ds_config.json "$@"
