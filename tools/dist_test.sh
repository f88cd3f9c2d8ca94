#!/usr/bin/env bash
# Distributed testing with torchrun (NNODES, NODE_RANK, MASTER_ADDR, PORT: dist_launch.sh).
#   bash tools/dist_test.sh CONFIG CHECKPOINT NUM_PROCESSES [test.py options...]
set -euo pipefail
if [ $# -lt 3 ]; then
    echo "usage: $0 CONFIG CHECKPOINT NUM_PROCESSES_PER_NODE [tools/test.py options...]" >&2
    exit 2
fi
exec bash "$(dirname "$0")/dist_launch.sh" "$3" test.py "$1" "$2" --launcher pytorch "${@:4}"
