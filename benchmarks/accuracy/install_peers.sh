#!/usr/bin/env bash
# The peer libraries in their own virtualenv (never a dependency of source-proj):
#   benchmarks/accuracy/install_peers.sh [VENV]              (default .venv-peers): kronfluence and dattri
#   benchmarks/accuracy/install_peers.sh --bergson [VENV]    (default .venv): bergson, beside the project's
#                                                            test extras (transformers, accelerate)
# kronfluence 1.0.1 and dattri 0.3.0 live beside the CPU torch 2.13.0 and this project (installed
# editable, for the settings and the cached trajectories). Then:
#   VENV/bin/python benchmarks/accuracy/peers.py --settings early,converged,two-stage,early-fast
#   .venv/bin/python benchmarks/accuracy/peers.py --settings early,two-stage --peers bergson
set -euo pipefail
cd "$(dirname "$0")/../.."
if [ "${1:-}" = "--bergson" ]; then
  VENV="${2:-.venv}"
  if [ ! -x "$VENV/bin/python" ]; then "${PYTHON:-python3}" -m venv "$VENV"; fi
  "$VENV/bin/python" -m pip install -q torch==2.13.0
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  # bergson 2.5.1 requires torchvision and torchaudio (which pin a CUDA torch) and none of the code paths
  # used here import them: install it without dependencies, then the modules its pipelines do import.
  "$VENV/bin/python" -m pip install -q --no-deps bergson==2.5.1 torchopt==0.7.3 optree graphviz
  "$VENV/bin/python" -m pip install -q datasets jaxtyping peft natsort simple-parsing petname ml_dtypes
  "$VENV/bin/python" -c "from bergson.approx_unrolling.pipeline import approx_unrolling_pipeline; print('bergson ready')"
  exit 0
fi
VENV="${1:-.venv-peers}"
if [ ! -x "$VENV/bin/python" ]; then "${PYTHON:-python3}" -m venv "$VENV"; fi
# The CPU build first: a bare torch requirement pulls a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q torch==2.13.0
# kronfluence declares torchvision, which pins another torch (a CUDA build) and which none of the code
# paths used here import: install it without dependencies, then the ones it does import.
"$VENV/bin/python" -m pip install -q --no-deps kronfluence==1.0.1
"$VENV/bin/python" -m pip install -q -e . "scikit-learn>=1.3" dattri==0.3.0 "accelerate>=0.31" "einops>=0.8" \
  "einconv>=0.1" "opt-einsum>=3.3" "safetensors>=0.4.2"
"$VENV/bin/python" -c "import kronfluence, dattri; print('peers ready:', kronfluence.__version__ if hasattr(kronfluence, '__version__') else 'kronfluence', 'dattri')"
