#!/usr/bin/env bash
# Start one training run under torchrun; every argument that is not a flag below is a Hydra override.
#
#   launch/torchrun.sh --nproc 2 engine=zero3 model=tiny             # one node, 2 processes
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=host0 launch/torchrun.sh ...    # on host0, then NODE_RANK=1 on host1
#   launch/torchrun.sh --nnodes 2 --node-rank 1 --master-addr host0 --master-port 29500 ...
#
# Flags (or environment variables), defaults in brackets:
#   --nproc N          (NPROC_PER_NODE) processes on this node [SLURM_GPUS_ON_NODE, else GPUs, else 1]
#   --nnodes N         (NNODES) [1]
#   --node-rank R      (NODE_RANK) this node's index [SLURM_NODEID under srun, else 0]
#   --master-addr HOST (MASTER_ADDR) where node rank 0 runs and hosts the c10d rendezvous;
#                      needed with --nnodes > 1 [127.0.0.1 on one node]
#   --master-port PORT (MASTER_PORT) [29500; any free port on one node]
#   --max-restarts N   (MAX_RESTARTS) elastic restarts of all workers after a failure [0]
#   --rdzv-timeout S   (RDZV_TIMEOUT) wait this long for the rendezvous host and all nodes [300]
#   --rdzv-id ID       (RDZV_ID) [trainer]
#   PYTHON             the interpreter [python3]
# Each process gets OMP_NUM_THREADS = this node's cores / processes, unless it is set already.
# Exit code: the trainer's; 85 (trainer.signals.EXIT_REQUEUE) when the workers saved a checkpoint
# after SIGUSR1/SIGTERM and want to be restarted. Both signals sent to this script reach the workers.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
nproc=${NPROC_PER_NODE:-}
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-${SLURM_NODEID:-0}}  # under srun: this task's node
master_addr=${MASTER_ADDR:-}
master_port=${MASTER_PORT:-}
max_restarts=${MAX_RESTARTS:-0}
rdzv_timeout=${RDZV_TIMEOUT:-300}
rdzv_id=${RDZV_ID:-trainer}
overrides=()
die() { echo "torchrun.sh: error: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc|--nnodes|--node-rank|--master-addr|--master-port|--max-restarts|--rdzv-timeout|--rdzv-id)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case "$1" in
        --nproc) nproc=$2 ;;
        --nnodes) nnodes=$2 ;;
        --node-rank) node_rank=$2 ;;
        --master-addr) master_addr=$2 ;;
        --master-port) master_port=$2 ;;
        --max-restarts) max_restarts=$2 ;;
        --rdzv-timeout) rdzv_timeout=$2 ;;
        --rdzv-id) rdzv_id=$2 ;;
      esac
      shift 2 ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) overrides+=("$1"); shift ;;
  esac
done

python=${PYTHON:-python3}
if [[ -z "$nproc" ]]; then
  if [[ ${SLURM_GPUS_ON_NODE:-0} -gt 0 ]]; then
    nproc=$SLURM_GPUS_ON_NODE
  else
    nproc=$("$python" -c 'import torch; print(max(torch.cuda.device_count(), 1))')
  fi
fi
for pair in "nproc:$nproc" "nnodes:$nnodes" "max-restarts:$max_restarts" "rdzv-timeout:$rdzv_timeout"; do
  [[ ${pair#*:} =~ ^[0-9]+$ ]] || die "--${pair%%:*}=${pair#*:} is not a whole number"
done
# Base 10 from here on: bash arithmetic reads a leading zero as octal (08 is an error there).
nproc=$((10#$nproc)) nnodes=$((10#$nnodes)) max_restarts=$((10#$max_restarts)) rdzv_timeout=$((10#$rdzv_timeout))
((nproc >= 1 && nnodes >= 1 && rdzv_timeout >= 1)) ||
  die "--nproc, --nnodes and --rdzv-timeout must be >= 1"
[[ $node_rank =~ ^[0-9]+$ ]] && node_rank=$((10#$node_rank)) && ((node_rank < nnodes)) ||
  die "--node-rank=$node_rank must be one of 0..$((nnodes - 1)) (NODE_RANK, with --nnodes=$nnodes)"

if ((nnodes == 1)); then
  master_addr=${master_addr:-127.0.0.1}
  master_port=${master_port:-0}  # 0: any free port, so two single-node runs never collide
else
  [[ -n $master_addr ]] || die "--nnodes=$nnodes needs --master-addr (MASTER_ADDR): the host of node rank 0"
  master_port=${master_port:-29500}
fi
[[ $master_port =~ ^[0-9]+$ ]] && master_port=$((10#$master_port)) && ((master_port <= 65535)) ||
  die "--master-port=$master_port is not a port number"
((nnodes == 1 || master_port > 0)) ||
  die "--master-port=0 (any free port) works on one node only: give every node the same port"
getent ahosts "$master_addr" >/dev/null ||
  die "cannot resolve the rendezvous host '$master_addr' (--master-addr / MASTER_ADDR)"
# Node rank 0 hosts the rendezvous store: a taken port fails here, at once and by name.
if ((node_rank == 0 && master_port != 0)); then
  in_use="port $master_port is in use on this machine: pick another --master-port (MASTER_PORT)"
  "$python" - "$master_port" 2>/dev/null <<'EOF' || die "$in_use"
import socket, sys
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the store binds it
    s.bind(("", int(sys.argv[1])))
EOF
fi

# The processes share this node's cores: without this each one starts a thread per core and
# they fight over them. Under SLURM the allocation's CPUs count, not the whole machine's.
cores=${SLURM_CPUS_ON_NODE:-$(nproc)}
threads=$((cores / nproc > 0 ? cores / nproc : 1))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$threads}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
export TRAINER_RDZV_ENDPOINT="$master_addr:$master_port"
is_host=$([[ $node_rank == 0 ]] && echo true || echo false)
echo "torchrun.sh: node $node_rank of $nnodes, $nproc process(es), rendezvous $master_addr:$master_port," \
  "OMP_NUM_THREADS=$OMP_NUM_THREADS" >&2

exec "$python" "$here/elastic.py" \
  --nnodes "$nnodes" --nproc-per-node "$nproc" --node-rank "$node_rank" \
  --rdzv-backend c10d --rdzv-endpoint "$master_addr:$master_port" --rdzv-id "$rdzv_id" \
  --rdzv-conf "is_host=$is_host,join_timeout=$rdzv_timeout,read_timeout=$rdzv_timeout" \
  --max-restarts "$max_restarts" \
  -m trainer.train "${overrides[@]}"
