#!/usr/bin/env bash
# One command for a machine with one NVIDIA GPU (under 8 minutes): the GPU-marked tests (the Pallas attention
# kernel compiled, against XLA's form), `max generate` on gpu:0, and the decode benchmark at batch 1/8/32/128
# with the Pallas kernel and then with XLA's attention, each beside the weights-read bound.
#
#     scripts/device_check.sh [MODEL]        # MODEL: what --model takes (default: the default model)
#
# Installs the cuda12 extra into .venv first where JAX sees no GPU (that needs the network).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MODEL=()
if [[ $# -gt 0 ]]; then MODEL=(--model "$1"); fi

has_gpu() { "$PY" -c 'import jax, sys; sys.exit(0 if jax.devices("gpu") else 1)' >/dev/null 2>&1; }
if ! has_gpu; then
    echo "== JAX sees no GPU: installing the cuda12 extra"
    .venv/bin/pip install -q -e '.[cuda12]'
    has_gpu || { echo "JAX still sees no GPU after installing jax[cuda12]" >&2; exit 1; }
fi
"$PY" -c 'import jax; print("==", jax.__version__, jax.devices("gpu"))'
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv,noheader || true

echo "== GPU-marked tests"
timeout 180 "$PY" -m pytest -q -m gpu -rs tests

echo "== max generate on gpu:0"
timeout 120 .venv/bin/max generate "${MODEL[@]}" --devices gpu:0 --chat --temperature 0 --max-new-tokens 32 \
    --prompt "What is the capital of France?"

echo "== decode step, Pallas attention"
timeout 150 "$PY" scripts/bench_decode.py "${MODEL[@]}" --device gpu --batch 1 8 32 128 --runs 3
echo "== decode step, XLA's attention (to compare)"
timeout 120 "$PY" scripts/bench_decode.py "${MODEL[@]}" --device gpu --batch 1 8 32 128 --runs 3 --xla-attention
