#!/usr/bin/env bash
# The accelerator numbers quoted in README.md: run from the repository root on a GPU machine.
#   bash experiments/gpu_bench.sh 2>&1 | tee gpu_bench.log
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
bench() { echo "== $*"; timeout 240 python3 experiments/bench_train.py "$@" 2>&1 | grep -v Warning; }
bench --preset gpt2-small --batch-size 16 --steps 20 --repeats 2
bench --preset gpt2-small --batch-size 32 --steps 10 --repeats 2
bench --preset gpt2-small --batch-size 16 --steps 20 --attention xla
bench --preset gpt2-small --batch-size 16 --steps 20 --strategy single
bench --preset shakespeare-char --steps 50 --dtype bfloat16
echo "== generate"; timeout 120 python3 experiments/bench_generate.py --preset shakespeare-char
