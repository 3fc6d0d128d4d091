#!/usr/bin/env bash
# GPU benchmark for a machine with an NVIDIA card and no internet. At most ~5 minutes.
#
# Prepare on a machine with internet:  make gpu-wheels   (fills bench/wheels: onnxruntime-gpu, the CUDA and cuDNN
# runtime wheels, and everything livernode's base install needs), and make bench (writes the benchmark models).
# Then carry the repository, bench/wheels and bench/work along and run:  bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-bench/wheels}
VENV=${VENV:-/tmp/livernode-gpu-venv}
MODEL=${MODEL:-bench/work/bench-512-fp16.onnx}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi not found"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --no-index --find-links "$WHEELS" onnxruntime-gpu \
    nvidia-cudnn-cu12 nvidia-cublas-cu12 nvidia-cuda-runtime-cu12 nvidia-cufft-cu12 nvidia-curand-cu12 \
    nvidia-cuda-nvrtc-cu12
  "$VENV/bin/pip" install --quiet --no-index --find-links "$WHEELS" -c "$WHEELS/constraints-gpu.txt" \
    numpy scipy pydicom pynetdicom highdicom watchdog opencv-python-headless pydantic tqdm prometheus-client \
    python-gdcm pylibjpeg pylibjpeg-openjpeg pyjpegls onnx setuptools wheel
  # livernode itself without its dependency list, which names the CPU build of ONNX Runtime
  "$VENV/bin/pip" install --quiet --no-index --no-deps --no-build-isolation -e .
fi
# onnxruntime-gpu finds the CUDA and cuDNN libraries installed as wheels once they are preloaded
"$VENV/bin/python" -c "import onnxruntime as o; getattr(o, 'preload_dlls', lambda: None)(); print(o.get_available_providers())"
exec "$VENV/bin/python" -c "import onnxruntime as o; getattr(o, 'preload_dlls', lambda: None)(); import runpy, sys; sys.argv = ['bench/gpu.py', '--model', '$MODEL', *sys.argv[1:]]; runpy.run_path('bench/gpu.py', run_name='__main__')" "$@"
