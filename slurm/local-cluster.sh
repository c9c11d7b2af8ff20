#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for development and tests.
#
#   slurm/local-cluster.sh start    # munge, slurmctld, slurmd node1 + node2 (idempotent)
#   slurm/local-cluster.sh status   # prints the daemons' state and `sinfo`; exit 0 only when usable
#   slurm/local-cluster.sh stop     # ends only the daemons this script started
#
# Needs root and Debian's packages: apt-get install -y slurm-wlm munge. Both "nodes" are this
# machine on loopback (node1/node2 are added to /etc/hosts), each with its own slurmd, spool
# and log; partition `local`, accounting off. Everything lives in $TRAINER_SLURM_DIR
# (default /tmp/trainer-slurm): slurm.conf, logs (slurmctld.log, node1/slurmd.log, ...).
# Clients find the cluster through SLURM_CONF=$TRAINER_SLURM_DIR/slurm.conf; /etc/slurm/slurm.conf
# is made a link to it when that file does not exist yet, so plain `sbatch` works too.
set -euo pipefail

state=${TRAINER_SLURM_DIR:-/tmp/trainer-slurm}
conf=$state/slurm.conf
ctld_port=${TRAINER_SLURM_PORT:-17000}  # slurmd ports follow: node1 = +1, node2 = +2
nodes=(node1 node2)
export SLURM_CONF=$conf

die() { echo "local-cluster: error: $*" >&2; exit 1; }
say() { echo "local-cluster: $*"; }

need_tools() {
  local missing=()
  for tool in munged munge slurmctld slurmd sinfo scontrol; do
    command -v "$tool" >/dev/null || [[ -x /usr/sbin/$tool ]] || missing+=("$tool")
  done
  ((${#missing[@]} == 0)) ||
    die "${missing[*]} not installed: run (as root) apt-get update && apt-get install -y slurm-wlm munge"
  [[ $(id -u) == 0 ]] || die "must run as root (slurmd launches jobs and needs root)"
}

# The pid in $1 if that process is alive, else nothing.
alive_pid() {
  local pid
  [[ -f $1 ]] || return 1
  pid=$(<"$1")
  [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

write_conf() {
  mkdir -p "$state/ctld" "${nodes[@]/#/$state/}"
  local host tmp
  host=$(hostname -s)
  tmp=$(mktemp "$state/slurm.conf.XXXX")
  cat >"$tmp" <<EOF
# Written by slurm/local-cluster.sh: two slurmd "nodes" on this machine (loopback).
ClusterName=trainer-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only once its old credential expired: keep that short here.
AuthInfo=cred_expire=5
StateSaveLocation=$state/ctld
SlurmctldPidFile=$state/slurmctld.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdSpoolDir=$state/%n
SlurmdPidFile=$state/%n/slurmd.pid
SlurmdLogFile=$state/%n/slurmd.log
# Several slurmd on one host: no cgroups, processes tracked by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
KillWait=15
MinJobAge=3600
InactiveLimit=0
SlurmdTimeout=60
GresTypes=gpu
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((ctld_port + 1))-$((ctld_port + 2)) CPUs=2 State=UNKNOWN
PartitionName=local Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$tmp" "$conf"
  # Plain `sbatch`/`squeue` in a new shell should find this cluster, unless another config is there.
  if [[ ! -e /etc/slurm/slurm.conf ]]; then
    mkdir -p /etc/slurm
    ln -s "$conf" /etc/slurm/slurm.conf
  fi
}

hosts_entries() {
  local name
  for name in "${nodes[@]}"; do
    getent hosts "$name" >/dev/null || echo "127.0.0.1 $name  # slurm/local-cluster.sh" >>/etc/hosts
  done
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return  # a munged answers already (ours from an earlier start, or the system's)
  fi
  [[ -s /etc/munge/munge.key ]] ||
    die "/etc/munge/munge.key missing: reinstall munge (apt-get install --reinstall munge)"
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  echo /run/munge/munged.pid >"$state/munged.pidfile"  # stop ends it because we started it
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "munged started but does not answer; see /var/log/munge/munged.log"
}

start_daemons() {
  if ! alive_pid "$state/slurmctld.pid" >/dev/null; then
    /usr/sbin/slurmctld -f "$conf" || die "slurmctld did not start; see $state/slurmctld.log"
  fi
  local node
  for node in "${nodes[@]}"; do
    if ! alive_pid "$state/$node/slurmd.pid" >/dev/null; then
      /usr/sbin/slurmd -f "$conf" -N "$node" || die "slurmd $node did not start; see $state/$node/slurmd.log"
    fi
  done
}

# Wait until both nodes are schedulable (idle/mixed/allocated); resume any left down or drained.
wait_ready() {
  local i states
  for i in $(seq 60); do
    states=$(sinfo -h -N -p local -o '%N %t' 2>/dev/null | sort -u || true)
    if [[ $(grep -cE ' (idle|mix|alloc|comp)$' <<<"$states") == "${#nodes[@]}" ]]; then
      return 0
    fi
    if ((i % 10 == 5)) && grep -qE ' (down|drain|drng|fail)' <<<"$states"; then
      scontrol update NodeName=node[1-2] State=RESUME 2>/dev/null || true
    fi
    sleep 1
  done
  die "nodes not ready after 60 s: $(tr '\n' ';' <<<"$states");" \
    "see $state/slurmctld.log and $state/node*/slurmd.log"
}

cmd_start() {
  need_tools
  mkdir -p "$state"
  hosts_entries
  write_conf
  start_munge
  start_daemons
  wait_ready
  say "up: partition local with node1, node2 (SLURM_CONF=$conf)"
}

cmd_stop() {
  local pidfile pid name
  for pidfile in "$state"/node*/slurmd.pid "$state/slurmctld.pid"; do
    name=slurmctld
    [[ $pidfile == */slurmd.pid ]] && name="slurmd $(basename "$(dirname "$pidfile")")"
    pid=$(alive_pid "$pidfile") || continue
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    say "stopped $name (pid $pid)"
  done
  if [[ -f $state/munged.pidfile ]] && pid=$(alive_pid "$(<"$state/munged.pidfile")"); then
    kill "$pid" && say "stopped munged (pid $pid)"
    rm -f "$state/munged.pidfile"
  fi
  if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$conf" ]]; then
    rm -f /etc/slurm/slurm.conf
  fi
}

cmd_status() {
  local ok=0 pid node
  if pid=$(alive_pid "$state/slurmctld.pid"); then
    say "slurmctld running (pid $pid)"
  else
    say "slurmctld not running"; ok=1
  fi
  for node in "${nodes[@]}"; do
    if pid=$(alive_pid "$state/$node/slurmd.pid"); then
      say "slurmd $node running (pid $pid)"
    else
      say "slurmd $node not running"; ok=1
    fi
  done
  if ((ok == 0)); then
    sinfo -p local || ok=1
  fi
  return $ok
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  *) sed -n '2,13p' "$0" >&2; exit 2 ;;
esac
