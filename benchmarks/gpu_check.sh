#!/usr/bin/env bash
# The GPU check, as run on a lent GPU machine (no TensorFlow, no Keras there):
# Keras 3 and its two missing wheels are carried in .whl/ (see docs/benchmarks.md).
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 -d .whl keras==3.15.1 namex optree
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, torch, keras; print('jax', jax.__version__, jax.devices(), 'torch', torch.__version__, 'keras', keras.__version__)"
python3 benchmarks/gpu_check_backends.py "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
