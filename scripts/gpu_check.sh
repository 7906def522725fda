#!/usr/bin/env bash
# One prepared GPU check (one NVIDIA H200, < 8 minutes): install JAX for CUDA 12 pinned to the project's jax
# version, install the project, run the benchmark's `gpu` suite (ViT-B steps in bf16 with cuDNN fused
# attention, an fp32 baseline, a CNN step; MFU against bf16/fp32 matmul peaks measured in the same run) and
# write the JSON (and the log) to $OUT.
#
#   OUT=/tmp/gpu_out bash scripts/gpu_check.sh
#
# Offline machines: set WHEELHOUSE=/path/to/wheels (a `pip download` of jax[cuda12]==<pin> and the project's
# requirements made elsewhere); pip then installs with --no-index from there.
# Budget: install ~1-2 min (cached wheels), import+peaks ~20 s, 4 cases x (compile 20-60 s + 5 timed steps).
set -euo pipefail

OUT="${OUT:-$(pwd)/gpu_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
exec > >(tee "$OUT/gpu_check.log") 2>&1

JAX_VERSION="$(python3 - <<'EOF'
import re
text = open("setup.py").read()
m = re.search(r'"jax==([0-9.]+)"', text) or re.search(r"jax==([0-9.]+)", text)
print(m.group(1) if m else "0.10.2")
EOF
)"
echo "== jax pin: $JAX_VERSION; $(date -u +%FT%TZ)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true

PIP_ARGS=()
if [[ -n "${WHEELHOUSE:-}" ]]; then
  PIP_ARGS=(--no-index --find-links "$WHEELHOUSE")
fi

if python3 -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu' or jax.__version__ != '$JAX_VERSION')" \
    2>/dev/null; then
  echo "== jax $JAX_VERSION with a GPU backend already installed: installing only the project (--no-deps)"
  python3 -m pip install -q --no-deps "${PIP_ARGS[@]}" -e . || python3 -m pip install -q --no-deps -e .
  PY=python3
else
  VENV="${VENV:-/tmp/ctglip_gpu_venv}"
  if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
  fi
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  # The project's pinned requirements (CPU jaxlib included), then the CUDA plugin for the same jax version.
  python -m pip install -q "${PIP_ARGS[@]}" -e .
  python -m pip install -q "${PIP_ARGS[@]}" "jax[cuda12]==${JAX_VERSION}"
  PY="$VENV/bin/python"
fi

"$PY" - <<'EOF'
import jax
print("== devices:", jax.devices(), "backend:", jax.default_backend())
assert jax.default_backend() == "gpu", "no GPU visible to JAX: check the CUDA plugin install above"
EOF

# XLA GPU: let the autotuner pick the best GEMM/fusion configs; keep the rest default.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
timeout 420 "$PY" scripts/benchmark.py --suite gpu --repeats 5 \
  --out "$OUT/benchmark_gpu.json" --plot "$OUT/benchmark_gpu.png"
echo "== done $(date -u +%FT%TZ); JSON in $OUT/benchmark_gpu.json"
