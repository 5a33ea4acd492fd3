#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests and for trying slurm/train.sbatch.
#
#   slurm/local_cluster.sh start     # write /etc/slurm/slurm.conf, start munged, slurmctld, slurmd
#   slurm/local_cluster.sh status    # sinfo
#   slurm/local_cluster.sh stop
#
# Needs root and Debian's packages: apt-get install slurmctld slurmd slurm-client munge.
# No systemd: the daemons are started by hand. State from an earlier cluster is cleared at start
# (a stale ClusterName makes slurmctld exit). Accounting is off: use `scontrol show job`, not sacct.
# Environment: LOCAL_SLURM_CPUS (CPUs declared for the node) [nproc], LOCAL_SLURM_MEM_MB [4000].
set -euo pipefail
host="$(hostname -s)"
conf=/etc/slurm/slurm.conf

write_conf() {
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > "$conf" <<CONF
ClusterName=distscale-local
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${LOCAL_SLURM_CPUS:-$(nproc)} RealMemory=${LOCAL_SLURM_MEM_MB:-4000} State=UNKNOWN
PartitionName=debug Nodes=${host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
}

start() {
  command -v slurmctld >/dev/null || { echo "slurmctld not found: apt-get install slurmctld slurmd slurm-client munge" >&2; exit 1; }
  stop >/dev/null 2>&1 || true
  [ -s /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge: /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge && chown munge: /run/munge /var/log/munge /var/lib/munge
  runuser -u munge -- /usr/sbin/munged
  write_conf
  rm -rf /var/spool/slurmctld/* /var/spool/slurmd/*
  slurmctld
  slurmd
  for _ in $(seq 1 60); do
    if sinfo -h -o "%t" 2>/dev/null | grep -qE "^idle"; then sinfo; return 0; fi
    sleep 0.5
  done
  echo "Slurm did not become idle within 30 s; logs in /var/log/slurm" >&2
  tail -n 20 /var/log/slurm/*.log >&2 || true
  exit 1
}

stop() {
  pkill -x slurmd 2>/dev/null || true
  pkill -x slurmctld 2>/dev/null || true
  pkill -x munged 2>/dev/null || true
  for _ in $(seq 1 20); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x munged >/dev/null || return 0
    sleep 0.25
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
