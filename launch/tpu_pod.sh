#!/usr/bin/env bash
# Trains on a Cloud TPU VM pod slice: the same `python -m kvp_jax.train --flagfile=...` on every worker
# (gcloud --worker=all); jax.distributed finds the other workers itself (--multiprocess=on).
#
#   launch/tpu_pod.sh TPU_NAME ZONE FLAGFILE [--mesh=fsdp:16 ...more train flags]
#
# Steps: copy this checkout to ~/kvp_jax on every worker, install it with jax[tpu] into ~/kvp_jax/.venv (skipped
# once done), then start training on all workers at once. The workdir in the flagfile must be a path every
# worker can write and later read (a GCS-fuse mount or shared disk): orbax writes each worker's shards there.
# Plan the mesh first: python -m kvp_jax.plan --flagfile=FLAGFILE --mesh=... --device_kind=v5e.
# DRY_RUN=1 prints the gcloud commands instead of running them. PROJECT=... adds --project.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE FLAGFILE [train flags...]" >&2
  exit 2
fi
TPU=$1 ZONE=$2 FLAGFILE=$3
shift 3
cd "$(dirname "$0")/.."
if [ ! -f "$FLAGFILE" ]; then
  echo "error: flagfile $FLAGFILE not found (a path relative to the repository root)" >&2
  exit 2
fi
JAX_VERSION=$(sed -n 's/^ *jax==\([0-9.]*\)$/\1/p' setup.cfg)
run() { if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
gc=(gcloud compute tpus tpu-vm)
where=("$TPU" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"})

# 1. the code (not the venv, runs or caches) on every worker
run tar --exclude=.venv --exclude=runs --exclude=.git --exclude='__pycache__' -czf /tmp/kvp_jax_src.tgz .
run "${gc[@]}" scp /tmp/kvp_jax_src.tgz "${TPU}:/tmp/kvp_jax_src.tgz" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} --worker=all
# 2. install once per worker (pinned jax with its TPU runtime)
setup="mkdir -p ~/kvp_jax && tar -xzf /tmp/kvp_jax_src.tgz -C ~/kvp_jax && cd ~/kvp_jax && \
  ( [ -x .venv/bin/python ] || python3 -m venv .venv ) && \
  .venv/bin/pip install -q -e . 'jax[tpu]==${JAX_VERSION}'"
run "${gc[@]}" ssh "${where[@]}" --worker=all --command="$setup"
# 3. train: every worker runs the same command; quoting keeps extra flags intact
extra=$(printf '%q ' "$@")
train="cd ~/kvp_jax && .venv/bin/python -m kvp_jax.train --flagfile=$FLAGFILE --multiprocess=on $extra"
run "${gc[@]}" ssh "${where[@]}" --worker=all --command="$train"
