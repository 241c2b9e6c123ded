#!/usr/bin/env bash
# Installs what is missing for chunkpose, and nothing that is already there.
# - torch: an existing torch (e.g. the user's CUDA build) is always kept; with none, the
#   CPU build 2.13.0 is installed, so a machine without a GPU never downloads a CUDA torch.
# - EGL/Mesa (headless OpenGL for the CPU renderer) through apt when we are root.
# - the package itself, editable, built against the installed torch (--no-build-isolation,
#   otherwise pip's isolated build environment would fetch its own torch).
set -euo pipefail
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[bootstrap] no torch found: installing the CPU build torch==2.13.0"
  "$PY" -m pip install -q torch==2.13.0
fi

if ! ldconfig -p 2>/dev/null | grep -q 'libEGL_mesa.so'; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[bootstrap] installing headless OpenGL (EGL + Mesa)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libegl1 libgl1-mesa-dri libegl-mesa0 >/dev/null
  else
    echo "[bootstrap] warning: no EGL found and not root; the OpenGL renderer will be unavailable" >&2
  fi
fi

extras="test"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  extras="test,cuda"
fi

stamp=build/.bootstrap-stamp
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ] || [ -n "$(find csrc -newer "$stamp" -type f 2>/dev/null | head -n1)" ] \
   || ! "$PY" -c "import chunkpose, chunkpose._C" 2>/dev/null; then
  echo "[bootstrap] installing chunkpose (editable, extras: $extras) and building csrc/"
  "$PY" -m pip install -q --no-build-isolation -e ".[$extras]"
  mkdir -p build && touch "$stamp"
fi
"$PY" -c "import torch, chunkpose.ops as o; print('[bootstrap] torch', torch.__version__, '| cuda', torch.cuda.is_available(), '| ops backend', o.backend())"
