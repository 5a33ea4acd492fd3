#!/usr/bin/env bash
# Run the main job under Open MPI's mpirun. Arguments go to launch/train.py.
#
#   launch/mpirun.sh --parallel ddp --steps 100
#   NP=4 HOSTFILE=hosts launch/mpirun.sh
#
# distscale.env detects the OMPI_COMM_WORLD_* variables; without MASTER_ADDR, rank 0's address
# and a free port are agreed through mpi4py (pip install 'distscale[mpi]').
#
# Environment overrides (defaults in brackets):
#   NP         total number of processes [2]
#   HOSTFILE   Open MPI hostfile for several nodes [none: this machine]
#   MPI_ARGS   extra mpirun arguments [--oversubscribe, plus --allow-run-as-root when root]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
args=(-np "${NP:-2}")
[ -n "${HOSTFILE:-}" ] && args+=(--hostfile "$HOSTFILE")
[ -n "${PYTHONPATH:-}" ] && args+=(-x PYTHONPATH)
if [ -z "${MPI_ARGS+x}" ]; then
  MPI_ARGS="--oversubscribe"
  [ "$(id -u)" = 0 ] && MPI_ARGS="$MPI_ARGS --allow-run-as-root"
fi
# shellcheck disable=SC2086  # MPI_ARGS is a list of words on purpose
exec mpirun "${args[@]}" $MPI_ARGS -x PATH python "$here/train.py" "$@"
