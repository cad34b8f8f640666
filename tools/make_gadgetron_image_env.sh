#!/usr/bin/env bash
# A second virtual environment pinned to the Python stack of the official Gadgetron images
# (conda env /opt/conda/envs/gadgetron: numpy 1.26.4, gadgetron-python 1.4.1, ismrmrd 1.14.x,
# onnxruntime 1.18.1), so tests/test_gadgetron_chains.py can run our external-gadget targets on
# both version sets. The image has python 3.10; we use this machine's python (3.10-3.12 work).
#   bash tools/make_gadgetron_image_env.sh [VENV_DIR] [PYTHON]
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$here/.venv-gadgetron-image}"
python="${2:-python3}"
"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# Runtime only (no torch): what gadgets/ imports inside Gadgetron.
"$venv/bin/pip" install --quiet \
    "numpy==1.26.4" "gadgetron==1.4.1" "ismrmrd>=1.14,<1.15" "onnxruntime==1.18.1" \
    "h5py>=3.8" "pyyaml>=6" "pydicom>=2.4" "threadpoolctl>=3.1"
# Test tooling only (not in the image): lets our pytest files run on this version set too.
"$venv/bin/pip" install --quiet "pytest>=7" "pytest-timeout>=2.1"
"$venv/bin/python" - <<'PY'
import gadgetron, ismrmrd, numpy, onnxruntime
print("gadgetron-image env:", "numpy", numpy.__version__, "ismrmrd", ismrmrd.__version__ if hasattr(ismrmrd, "__version__") else "?",
      "gadgetron", gadgetron.__version__, "onnxruntime", onnxruntime.__version__)
PY
