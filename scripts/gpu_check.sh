#!/usr/bin/env bash
# Run the GPU-only data-plane tests (cuda_ipc) plus the CPU transport suite on a CUDA host.
# Usage: scripts/gpu_check.sh            (from the repository root; needs torch with CUDA)
# Installs CuPy for CUDA 12 if missing (set EAAS_NO_INSTALL=1 to forbid that).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device visible to torch')"
if ! "$PY" -c "import cupy" 2>/dev/null; then
  if [[ "${EAAS_NO_INSTALL:-0}" == 1 ]]; then echo "cupy missing (pip install cupy-cuda12x)" >&2; exit 2; fi
  "$PY" -m pip install -q "cupy-cuda12x>=13"
fi
"$PY" -c "import torch, cupy; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| cupy', cupy.__version__, '|', torch.cuda.get_device_name(0))"
# -rs shows why anything was skipped: on a GPU host nothing in the cuda_ipc file may skip.
log=$(mktemp)
"$PY" -m pytest -q -rs tests/test_transport_cuda_ipc.py tests/test_transport.py tests/test_protocol.py "$@" | tee "$log"
if grep -q "SKIPPED.*test_transport_cuda_ipc" "$log"; then
  echo "cuda_ipc tests were skipped on a GPU host: FAIL" >&2; exit 1
fi
echo "gpu_check: OK"
