#!/usr/bin/env bash
# GPU benchmark for a machine with an NVIDIA card and no internet. At most ~5 minutes.
#
# Prepare on a machine with internet:  make gpu-wheels   (fills bench/wheels: onnxruntime-gpu, the CUDA 13 and cuDNN
# runtime wheels, and everything livernode's base install needs), and make gpu-model (make demo's network with
# float16 weights, bench/work/demo-fp16.onnx). Then carry the repository, bench/wheels and bench/work along and
# run:  bench/gpu.sh   (extra arguments go to bench/gpu.py, e.g. --trained-size 256 512)
#
# On a CUDA image whose python3 already has numpy, scipy, OpenCV, onnx and the CUDA 13 libraries (as pip packages),
# set SITE to a folder instead: only the wheels in $WHEELS are installed there (no dependencies resolved), and the
# repository is imported from where it is, so python3 need not be the 3.11 that pyproject.toml asks for.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-bench/wheels}
VENV=${VENV:-/tmp/livernode-gpu-venv}
MODEL=${MODEL:-bench/work/demo-fp16.onnx}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"
if [ -n "${SITE:-}" ]; then
  PY=python3
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "$WHEELS"/*.whl
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # the image's CUDA libraries, where onnxruntime's own preloading does not look
  libs=$("$PY" -c "import glob, site; print(':'.join(sorted({d for s in site.getsitepackages() for d in glob.glob(s + '/nvidia/*/lib') + glob.glob(s + '/nvidia/cu13/lib')})))")
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
else
  PY="$VENV/bin/python"
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --no-index --find-links "$WHEELS" 'onnxruntime-gpu[cuda,cudnn]' \
      'nvidia-cublas~=13.0'
    "$VENV/bin/pip" install --quiet --no-index --find-links "$WHEELS" -c "$WHEELS/constraints-gpu.txt" \
      numpy scipy pydicom pynetdicom highdicom watchdog opencv-python-headless pydantic tqdm prometheus-client \
      python-gdcm pylibjpeg pylibjpeg-openjpeg pyjpegls onnx connected-components-3d setuptools wheel
    # livernode itself without its dependency list, which names the CPU build of ONNX Runtime
    "$VENV/bin/pip" install --quiet --no-index --no-deps --no-build-isolation -e .
  fi
fi
# onnxruntime-gpu finds the CUDA and cuDNN libraries installed as wheels once they are preloaded
"$PY" -c "import onnxruntime as o; getattr(o, 'preload_dlls', lambda: None)(); print(o.__version__, o.get_available_providers())"
exec "$PY" -c "import onnxruntime as o; getattr(o, 'preload_dlls', lambda: None)(); import runpy, sys; sys.argv = ['bench/gpu.py', '--model', '$MODEL', '--trained', '$MODEL', *sys.argv[1:]]; runpy.run_path('bench/gpu.py', run_name='__main__')" "$@"
