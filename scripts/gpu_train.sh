#!/usr/bin/env bash
# How the v1 weights were trained on a lent GPU machine (one H100): the data cache
# (python -m deface.data.cache -o data_cache) and wheels of monai/nibabel/hydra travel along.
# Training runs detached so it can outlive one command; poll /tmp/train.log.
set -eu
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export DEFACE_CACHE=$PWD/data_cache DEFACE_LOGS=/tmp/logs PYTHONUNBUFFERED=1
setsid nohup python3 -m deface.train experiment=v1_gpu "$@" > /tmp/train.log 2>&1 < /dev/null &
echo "training started (pid $!)"
