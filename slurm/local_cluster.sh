#!/usr/bin/env bash
# A Slurm cluster of N nodes on this machine, for tests and for trying slurm/train.sbatch.
#
#   slurm/local_cluster.sh start [N]       # N nodes (default 2): munged, slurmctld, one slurmd per node
#   slurm/local_cluster.sh status          # sinfo
#   slurm/local_cluster.sh stop            # daemons, namespaces, bridge and /etc/hosts entries gone
#   slurm/local_cluster.sh kill-node NODE  # crash NODE: SIGKILL its slurmd and every process on it
#   slurm/local_cluster.sh revive-node NODE  # start NODE's slurmd again (the machine came back)
#
# Each node (dsnode1 .. dsnodeN) is its own network and UTS namespace: its own hostname, its own
# address 10.77.0.(10+i) on a veth joined to the bridge dsbr0 (10.77.0.1, where slurmctld listens).
# The bridge, the namespaces and the addresses exist only while the cluster runs; nothing else on
# the machine uses them (start refuses a subnet already routed here; LOCAL_SLURM_SUBNET picks
# another /24 prefix). The nodes share the file system (a shared directory for free), munged's
# socket and /etc/hosts, where start adds the node names (and stop removes them).
#
# Needs root and Debian's packages: apt-get install slurmctld slurmd slurm-client munge iproute2.
# No systemd: the daemons are started by hand. State from an earlier cluster is cleared at start
# (a stale ClusterName makes slurmctld exit). Accounting is off: use `scontrol show job`, not sacct.
# Environment: LOCAL_SLURM_CPUS (CPUs declared per node) [nproc], LOCAL_SLURM_MEM_MB [4000],
# LOCAL_SLURM_SUBNET [10.77.0], LOCAL_SLURM_SLURMD_TIMEOUT (s before a silent node is DOWN) [10].
set -euo pipefail
host="$(hostname -s)"
conf=/etc/slurm/slurm.conf
subnet="${LOCAL_SLURM_SUBNET:-10.77.0}"
bridge=dsbr0
state=/run/distscale-local-cluster  # how many nodes the running cluster has
hosts_tag="# distscale local Slurm cluster"

die() { echo "local_cluster.sh: $*" >&2; exit 1; }
node_ns() { echo "$1"; }                      # a node's namespace is named after it
node_addr() { echo "${subnet}.$((10 + ${1#dsnode}))"; }
nodes() { local n; n="$(cat "$state" 2>/dev/null || echo 0)"; for i in $(seq 1 "$n"); do echo "dsnode$i"; done; }

require() {
  [ "$(id -u)" = 0 ] || die "needs root (namespaces, /etc/slurm, /etc/hosts)"
  command -v slurmctld >/dev/null || die "slurmctld not found: apt-get install slurmctld slurmd slurm-client munge"
  command -v ip >/dev/null || die "ip not found: apt-get install iproute2"
  command -v unshare >/dev/null && command -v nsenter >/dev/null || die "unshare/nsenter not found: apt-get install util-linux"
  ip netns add dsprobe$$ 2>/dev/null || die "cannot create a network namespace here (ip netns add failed: no CAP_SYS_ADMIN/CAP_NET_ADMIN?)"
  ip netns delete dsprobe$$
  unshare --uts true 2>/dev/null || die "cannot create a UTS namespace here (unshare --uts failed)"
  if ip -4 route show | grep -q "^${subnet}\."; then
    ip link show "$bridge" >/dev/null 2>&1 || die "${subnet}.0/24 is already routed on this machine: set LOCAL_SLURM_SUBNET"
  fi
}

write_conf() {
  local n="$1" cpus="${LOCAL_SLURM_CPUS:-$(nproc)}" mem="${LOCAL_SLURM_MEM_MB:-4000}"
  mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm
  {
    cat <<CONF
ClusterName=distscale-local
SlurmctldHost=${host}(${subnet}.1)
SlurmUser=root
AuthType=auth/munge
# Job credentials live 90 s (default 120): also how long a requeued job waits before it starts
# again. The wait lets slurmctld's retried kill requests for the failed run reach a revived node
# first: they carry the same job and step ids, and here, with 30 s, they arrived ~50 s after the
# failure and killed the new run's tasks.
AuthInfo=cred_expire=90
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdTimeout=${LOCAL_SLURM_SLURMD_TIMEOUT:-10}
KillWait=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
CONF
    for i in $(seq 1 "$n"); do
      echo "NodeName=dsnode$i NodeAddr=$(node_addr "dsnode$i") NodeHostname=dsnode$i CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=dsnode[1-$n] Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4"
  } > "$conf"
}

network_up() {
  local n="$1"
  ip link add "$bridge" type bridge
  ip addr add "${subnet}.1/24" dev "$bridge"
  ip link set "$bridge" up
  sed -i "/${hosts_tag}/d" /etc/hosts
  for i in $(seq 1 "$n"); do
    local node="dsnode$i" addr
    addr="$(node_addr "$node")"
    ip netns add "$node"
    ip link add "dsv${i}" type veth peer name eth0 netns "$node"
    ip link set "dsv${i}" master "$bridge" up
    ip -n "$node" addr add "${addr}/24" dev eth0
    ip -n "$node" link set eth0 up
    ip -n "$node" link set lo up
    ip -n "$node" route add default via "${subnet}.1"
    echo "${addr} ${node} ${hosts_tag}" >> /etc/hosts
  done
}

start_slurmd() {
  # Its own UTS namespace inside the node's network namespace: `hostname` says the node's name
  # there, for slurmd and everything it starts (job steps, torchrun, the training ranks).
  # nsenter, not `ip netns exec`: that remounts /sys, hiding the cgroup mounts slurmd needs.
  local node="$1"
  mkdir -p "/var/spool/slurmd/$node"
  nsenter --net="/run/netns/$node" -- unshare --uts sh -c "hostname $node && exec slurmd -N $node"
}

start() {
  local n="${1:-2}"
  [[ "$n" =~ ^[1-9][0-9]?$ ]] || die "the number of nodes must be 1-99, got '$n'"
  require
  stop >/dev/null 2>&1 || true
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge: /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge: /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  echo "$n" > "$state"
  network_up "$n"
  write_conf "$n"
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd
  slurmctld
  for node in $(nodes); do start_slurmd "$node"; done
  for _ in $(seq 1 90); do
    if [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -c '^idle')" = "$n" ]; then sinfo -N -o "%N %t %o"; return 0; fi
    sleep 0.5
  done
  echo "Slurm did not bring $n node(s) to idle within 45 s; logs in /var/log/slurm" >&2
  sinfo -N >&2 || true
  tail -n 20 /var/log/slurm/*.log >&2 || true
  exit 1
}

kill_node() {
  local node="${1:-}"
  nodes | grep -qx "$node" || die "no node '$node' in this cluster ($(nodes | tr '\n' ' '))"
  # As a crashed machine: everything running on it dies at once, nobody is told.
  local pids
  pids="$(ip netns pids "$node" 2>/dev/null || true)"
  [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  echo "killed $(echo "$pids" | wc -w) process(es) on $node"
}

revive_node() {
  local node="${1:-}"
  nodes | grep -qx "$node" || die "no node '$node' in this cluster ($(nodes | tr '\n' ' '))"
  [ -z "$(ip netns pids "$node" 2>/dev/null)" ] || die "$node is still running: kill-node it first"
  rm -f "/run/slurmd-$node.pid"
  start_slurmd "$node"
  echo "started slurmd on $node"
}

stop() {
  for node in $(nodes); do
    local pids
    pids="$(ip netns pids "$node" 2>/dev/null || true)"
    [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
  done
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
  for _ in $(seq 1 20); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x munged >/dev/null || break
    sleep 0.25
  done
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^dsnode[0-9]+$' || true); do
    ip netns delete "$ns"
  done
  ip link delete "$bridge" 2>/dev/null || true
  [ -f /etc/hosts ] && sed -i "/${hosts_tag}/d" /etc/hosts
  rm -f "$state"
  if pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null; then die "daemons still running after stop"; fi
}

case "${1:-}" in
  start) start "${2:-2}" ;;
  stop) stop ;;
  status) sinfo -N -o "%N %t %o" ;;
  kill-node) kill_node "${2:-}" ;;
  revive-node) revive_node "${2:-}" ;;
  *) echo "usage: $0 start [N] | stop | status | kill-node NODE | revive-node NODE" >&2; exit 2 ;;
esac
