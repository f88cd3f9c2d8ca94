#!/usr/bin/env bash
# torchrun for dist_train.sh and dist_test.sh: one process per GPU (per CPU slot without
# CUDA, on the gloo backend). Multi-node: run it on every node with the same MASTER_ADDR and
# PORT, NNODES set, and NODE_RANK from 0 to NNODES-1.
#   bash tools/dist_launch.sh NUM_PROCESSES_PER_NODE TOOL.py [TOOL.py arguments...]
set -euo pipefail
GPUS=$1
TOOL=$2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
PORT=${PORT:-29500}
MASTER_ADDR=${MASTER_ADDR:-"127.0.0.1"}
PYTHON=${PYTHON:-python}
TOOLS=$(dirname "$0")

"$PYTHON" -m torch.distributed.run \
    --nnodes="$NNODES" \
    --node_rank="$NODE_RANK" \
    --master_addr="$MASTER_ADDR" \
    --master_port="$PORT" \
    --nproc_per_node="$GPUS" \
    "$TOOLS/$TOOL" \
    "${@:3}"
