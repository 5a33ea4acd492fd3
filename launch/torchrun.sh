#!/usr/bin/env bash
# Run the main job under torchrun. Arguments after the script go to launch/train.py.
#
#   launch/torchrun.sh --parallel fsdp --steps 200
#   NPROC_PER_NODE=4 launch/torchrun.sh                              # 4 ranks on this machine
#   NNODES=2 NODE_RANK=0 RDZV_ENDPOINT=head:29500 launch/torchrun.sh  # on every node, NODE_RANK ignored by c10d
#
# Environment overrides (defaults in brackets):
#   NPROC_PER_NODE  processes per node [2, or the number of GPUs when CUDA is present]
#   NNODES          number of nodes [1: --standalone]
#   RDZV_ENDPOINT   host:port of the c10d rendezvous, needed when NNODES > 1
#   RDZV_ID         rendezvous id shared by all nodes [distscale]
#   MAX_RESTARTS    torchrun --max-restarts, restarting all workers after a failure [0]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
gpus=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
nproc="${NPROC_PER_NODE:-$([ "$gpus" -gt 0 ] && echo "$gpus" || echo 2)}"
nnodes="${NNODES:-1}"
if [ "$nnodes" -gt 1 ]; then
  : "${RDZV_ENDPOINT:?NNODES>1 needs RDZV_ENDPOINT=host:port of the rendezvous (e.g. the first node)}"
  rdzv=(--nnodes "$nnodes" --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "${RDZV_ID:-distscale}")
else
  rdzv=(--standalone)
fi
exec torchrun "${rdzv[@]}" --nproc-per-node "$nproc" --max-restarts "${MAX_RESTARTS:-0}" "$here/train.py" "$@"
