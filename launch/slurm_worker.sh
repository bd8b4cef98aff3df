#!/usr/bin/env bash
# One Slurm task of a jclip job (started by launch/slurm.sbatch through srun): binds GPUs the way JAX's Slurm
# detection expects, then becomes `python -m jclip.main`, so that Slurm's signals reach Python directly.
#
# One task per GPU (the default): every task sees all of its node's GPUs and JAX takes GPU $SLURM_LOCALID.
# Where the cluster itself binds one GPU per task (CUDA_VISIBLE_DEVICES holds one id), that GPU is device 0.
# One task per node: the task drives every visible GPU.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${JCLIP_ENV:-}" ]; then
  # shellcheck source=/dev/null
  . "$JCLIP_ENV"
fi

visible=${CUDA_VISIBLE_DEVICES:-}
visible_count=0
if [ -n "$visible" ]; then
  IFS=, read -r -a visible_ids <<< "$visible"
  visible_count=${#visible_ids[@]}
fi
tasks_per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE%%(*}}
if [ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]; then
  if [ "${tasks_per_node:-0}" = 1 ]; then
    gpus=${visible_count}
    [ "$gpus" -gt 0 ] || gpus=${SLURM_GPUS_ON_NODE:-0}
    if [ "$gpus" -gt 0 ]; then
      JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
      export JAX_LOCAL_DEVICE_IDS
      export NCCL_LAUNCH_MODE=${NCCL_LAUNCH_MODE:-GROUP}  # one process driving many GPUs (JAX-Toolbox)
    fi
  elif [ "$visible_count" = 1 ]; then
    export JAX_LOCAL_DEVICE_IDS=0
  fi
fi
if [ "${SLURM_PROCID:-0}" = 0 ]; then
  echo "jclip task 0: ${SLURM_NTASKS:-1} tasks, ${tasks_per_node:-?} per node, JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-<from Slurm>}"
fi
cd "$repo"
exec "${JCLIP_PYTHON:-python}" -m jclip.main --distributed=on "$@"
