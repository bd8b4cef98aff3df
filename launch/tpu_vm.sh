#!/usr/bin/env bash
# Runs jclip on every host of a Cloud TPU VM slice (v4/v5e/v5p/v6e): installs the repo and starts the same
# command on all workers; jax.distributed configures itself from the TPU metadata.
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/clip.py:model=B/32,batch=32768 gs://BUCKET/runs/b32 [--config.x=y ...]
#
# The workdir should be a gs:// path (Orbax and the metrics writer write there from every host).
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,8p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO_URL=${JCLIP_REPO_URL:-$(git config --get remote.origin.url)}
BRANCH=${JCLIP_BRANCH:-$(git rev-parse --abbrev-ref HEAD)}
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  if [ ! -d jclip ]; then git clone -q '$REPO_URL' jclip; fi
  cd jclip && git fetch -q && git checkout -q '$BRANCH' && git pull -q
  python3 -m pip install -q -U 'jax[tpu]' -e .
  JCLIP_DISTRIBUTED=on python3 -m jclip.main --config='$CONFIG' --workdir='$WORKDIR' $*
"
