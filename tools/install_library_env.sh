#!/usr/bin/env bash
# Installs a library-only environment into $VENV: torch==$TORCH, mmengine, mmcv-lite (the
# pure-Python part of mmcv, enough for the backbones) and rest_mm (editable, no deps), to run
# the library's tests on one torch of the supported range (mmdet/mmseg and mmcv's compiled
# ops are absent there; the tests that need them skip, saying why).
# Idempotent. The wheels are kept in $WHEELHOUSE: pip's own HTTP cache does not keep
# downloads on these machines, and torch 2.1's wheels with their nvidia packages are 2.5 GB.
set -euo pipefail
PYTHON=${PYTHON:-python3}
: "${VENV:?set VENV}" "${TORCH:?set TORCH, e.g. 2.1.2}"
WHEELHOUSE=${WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/rest-mm/wheels/torch-$TORCH}

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
REQUIREMENTS=("torch==$TORCH" 'numpy<2' 'setuptools<82' wheel
              'mmengine==0.10.7' 'mmcv-lite==2.1.0' pytest onnx onnxruntime)

mkdir -p "$WHEELHOUSE"
# pip download skips the files already in the wheelhouse; only metadata is fetched again
"${PIP[@]}" download -q -d "$WHEELHOUSE" "${REQUIREMENTS[@]}"
"${PIP[@]}" install -q --no-index --find-links "$WHEELHOUSE" "${REQUIREMENTS[@]}"
# flock: the other environments' installs (make -j3) write the same rest_mm.egg-info
flock "${TMPDIR:-/tmp}/rest-mm-editable-install.lock" \
  "${PIP[@]}" install -q --no-deps --no-build-isolation -e .
"$PY" -c 'import torch, mmengine, rest_mm; print("library env ok: torch", torch.__version__, "mmengine", mmengine.__version__)'
