#!/usr/bin/env bash
# Installs the OpenMMLab stack (mmengine 0.10.7, mmcv 2.1.0 with its compiled ops, mmdet 3.3.0,
# mmseg 1.2.2) and rest_mm (editable) into $VENV, on torch $TORCH (default: the CPU build
# that lies on this machine's disk).
# Idempotent: every step is a no-op when its pin is already satisfied, and mmcv's source
# build is cached by pip as a wheel, so a second venv reuses it.
# On a GPU machine: TORCH=2.1.2 MMCV_FIND_LINKS=<OpenMMLab's wheel index for cu121/torch2.1>
# takes mmcv's prebuilt CUDA wheel instead of building it (README, "On a GPU machine").
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH=${TORCH:-2.13.0}
MMCV_FIND_LINKS=${MMCV_FIND_LINKS:-}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# torch first: mmcv's build imports it. torch 2.14 cannot compile mmcv 2.1.0 (C++20).
# setuptools<82 keeps pkg_resources, which mmcv's setup.py and mmengine's `mmdet::`
# config lookup import.
"${PIP[@]}" install "torch==$TORCH" 'setuptools<82' wheel ninja 'numpy<2'

mmcv_ops_ok() { "$PY" -c 'import mmcv; assert mmcv.__version__ == "2.1.0"; from mmcv.ops import nms, RoIAlign' 2>/dev/null; }
if ! mmcv_ops_ok; then
  # An mmcv without compiled ops (a lite build) imports fine but fails on mmcv.ops:
  # never accept it.
  "${PIP[@]}" uninstall -y mmcv mmcv-lite >/dev/null 2>&1 || true
  if [ -n "$MMCV_FIND_LINKS" ]; then
    "${PIP[@]}" install 'mmcv==2.1.0' -f "$MMCV_FIND_LINKS"
  else
    # The wheel built here lands in pip's cache for the next install. FORCE_CUDA=1 (with
    # nvcc on the path) builds the CUDA ops too.
    echo "Building mmcv 2.1.0 from source (about 23 minutes on 2 cores; cached afterwards)..."
    MMCV_WITH_OPS=1 FORCE_CUDA=${FORCE_CUDA:-0} MAX_JOBS=${MAX_JOBS:-2} \
      "${PIP[@]}" install --no-build-isolation 'mmcv==2.1.0'
  fi
  mmcv_ops_ok || { echo "mmcv 2.1.0 installed without its compiled ops (from mmcv.ops import nms fails)" >&2; exit 1; }
fi

# The rest of the stack, rest_mm itself and the test/tool extras. ftfy and regex are
# imported by mmseg 1.2.2 without being declared.
# flock: the library environments' installs (make -j3) write the same rest_mm.egg-info
flock "${TMPDIR:-/tmp}/rest-mm-editable-install.lock" "${PIP[@]}" install -e '.[tests,tools]'
mmcv_ops_ok || { echo "mmcv ops broke after installing the stack" >&2; exit 1; }
"$PY" -c 'import mmdet, mmseg, mmengine, rest_mm, torch; print("stack ok: torch", torch.__version__, "mmengine", mmengine.__version__, "mmdet", mmdet.__version__, "mmseg", mmseg.__version__)'
