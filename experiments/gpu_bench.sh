#!/usr/bin/env bash
# The accelerator numbers quoted in README.md: run from the repository root on a GPU machine.
#   bash experiments/gpu_bench.sh 2>&1 | tee gpu_bench.log        (about 4 minutes on one H100)
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
bench() { echo "== $*"; timeout 240 python3 experiments/bench_train.py "$@" 2>&1 | grep -v Warning; }
profile_dir="${PROFILE_DIR:-/tmp/genai_jax_profile}"
bench --preset gpt2-small --batch-size 64 --steps 8 --repeats 2
bench --preset gpt2-small --batch-size 32 --steps 15 --repeats 2
bench --preset gpt2-small --batch-size 16 --steps 30 --repeats 2 --breakdown --profile "$profile_dir"
python3 experiments/profile_summary.py "$profile_dir" --top 15
bench --preset shakespeare-char --steps 50 --dtype bfloat16
echo "== generate"; timeout 120 python3 experiments/bench_generate.py --preset shakespeare-char
