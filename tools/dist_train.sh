#!/usr/bin/env bash
# Distributed training with torchrun (NNODES, NODE_RANK, MASTER_ADDR, PORT: dist_launch.sh).
#   bash tools/dist_train.sh CONFIG NUM_PROCESSES [train.py options...]
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "usage: $0 CONFIG NUM_PROCESSES_PER_NODE [tools/train.py options...]" >&2
    exit 2
fi
exec bash "$(dirname "$0")/dist_launch.sh" "$2" train.py "$1" --launcher pytorch "${@:3}"
