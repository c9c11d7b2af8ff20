#!/usr/bin/env bash
# Start one training run under torchrun; every argument that is not a flag below is a Hydra override.
#
#   launch/torchrun.sh --nproc 2 engine=zero3 model=tiny          # one node, 2 processes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh ... # on each node, c10d rendezvous
#
# Flags (or environment): --nproc (NPROC_PER_NODE, default: GPUs on this node, else 1),
# --nnodes (NNODES, 1), --node-rank (NODE_RANK, 0), --master-addr (MASTER_ADDR, 127.0.0.1),
# --master-port (MASTER_PORT, 29500), --max-restarts (MAX_RESTARTS, 0).
set -euo pipefail

nproc=${NPROC_PER_NODE:-}
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
master_addr=${MASTER_ADDR:-127.0.0.1}
master_port=${MASTER_PORT:-29500}
max_restarts=${MAX_RESTARTS:-0}
overrides=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) nproc=$2; shift 2 ;;
    --nnodes) nnodes=$2; shift 2 ;;
    --node-rank) node_rank=$2; shift 2 ;;
    --master-addr) master_addr=$2; shift 2 ;;
    --master-port) master_port=$2; shift 2 ;;
    --max-restarts) max_restarts=$2; shift 2 ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) overrides+=("$1"); shift ;;
  esac
done

python=${PYTHON:-python3}
if [[ -z "$nproc" ]]; then
  nproc=$("$python" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
fi
# One process per device shares the node's cores: without this every process starts one
# thread per core and they fight over them.
cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nproc > 0 ? cores / nproc : 1 ))}

exec "$python" -m torch.distributed.run \
  --nnodes "$nnodes" --nproc-per-node "$nproc" --node-rank "$node_rank" \
  --rdzv-backend c10d --rdzv-endpoint "$master_addr:$master_port" --rdzv-id "${RDZV_ID:-trainer}" \
  --max-restarts "$max_restarts" \
  -m trainer.train "${overrides[@]}"
