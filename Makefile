# The two commands a newcomer runs: `make demo` and `make test`. Both set everything up first.
PY       ?= python3.11
VENV     := .venv
BIN      := $(VENV)/bin
STAMP    := $(VENV)/.installed
ORT_GPU  := onnxruntime-gpu==1.31.1
DEB_PKGS := dcmtk dicom3tools orthanc
PYTEST_ARGS ?=
# `make test` runs on two pytest-xdist workers: most tests keep one core busy (TensorFlow's training steps here run
# at about 100 % of one core) or wait on sockets, so two workers take about half the time on two cores. Which tests
# share a worker and the order they are handed out in: GROUPS and the hooks in tests/conftest.py.
TEST_WORKERS ?= 2

.PHONY: setup setup-gpu deb-deps demo test test-fast bench bench-sr bench-train compare compare-long gpu-model gpu-wheels lock \
        clean reliability-figures

setup: $(STAMP)

# Re-installs only when the lock or the project metadata changed, so a second `make setup` takes a second.
$(STAMP): constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[train,test]'
	touch $@

# GPU workstation: swap the CPU build of ONNX Runtime for the CUDA build (the two install into the same folder,
# so the CPU one is removed first; never keep both), and add TensorFlow's CUDA wheels at the pinned TensorFlow
# for training. `livernode version` then lists the GPUs both see.
TF_CUDA  := tensorflow[and-cuda]==$(shell sed -n 's/^tensorflow==//p' constraints.txt)
setup-gpu: setup
	$(BIN)/pip uninstall --yes onnxruntime
	$(BIN)/pip install --quiet '$(ORT_GPU)[cuda,cudnn]' 'nvidia-cublas~=13.0' '$(TF_CUDA)'
	$(BIN)/livernode version

# Debian tools the tests talk to (dcmtk, dciodvfy, Orthanc). Installed when run as root, otherwise explained.
deb-deps:
	@missing=""; \
	for t in /usr/bin/storescu /usr/bin/dciodvfy /usr/sbin/Orthanc; do [ -x $$t ] || missing="$$missing $$t"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing Debian packages: $(DEB_PKGS)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEB_PKGS) >/dev/null; \
	  else \
	    echo "missing:$$missing"; echo "run: sudo apt-get install -y $(DEB_PKGS)"; exit 1; \
	  fi; \
	fi

demo: setup
	$(BIN)/livernode demo

test: setup deb-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# Everything except the tests that train or export a network.
test-fast: setup deb-deps
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup -m "not slow" $(PYTEST_ARGS)

# RELIABILITY.md's appendix of measured figures, from the last `make test` (build/reliability-figures.json).
reliability-figures: setup
	$(BIN)/python tests/reliability/render_figures.py

bench: setup deb-deps
	$(BIN)/python bench/run.py

# The tail with the SR built in a helper process beside the SEG against after it (separate from `make bench`, which
# must stay within 20 minutes): four fresh nodes on the bench's 200-slice study. bench/sr-beside.json.
bench-sr: setup deb-deps
	$(BIN)/python bench/sr_beside.py

# Training at scale on this machine (separate from `make bench`): memory flat in the number of cases, the input
# pipeline against the model, cache preparation, and a projection of LiTS. bench/train_results.json.
bench-train: setup
	$(BIN)/python bench/train_scale.py
	$(BIN)/python bench/render_train.py

# The architecture comparison on 22 phantoms (README: Comparing architectures): U-Net, ResNet34-UNet, each with
# and without a slice of context on each side, and the 3-D V-Net, by config/compare.toml's short recipe (about a
# quarter of an hour on 2 cores); `compare-long` trains the two 2-D architectures by the longer recipe.
# Results in bench/compare*/, and the README's table from them.
COMPARE_DATA := bench/cache/compare-phantoms
$(COMPARE_DATA):
	$(BIN)/livernode synth $@ --cases 22 --slices 48 --size 128 --seed 0
compare: setup $(COMPARE_DATA)
	$(BIN)/livernode compare --data $(COMPARE_DATA) --format dicom --out bench/compare \
	  --archs unet,resnet34-unet,vnet --context 0,1 --config config/compare.toml
	$(BIN)/python bench/render_compare.py
compare-long: setup $(COMPARE_DATA)
	$(BIN)/livernode compare --data $(COMPARE_DATA) --format dicom --out bench/compare-long \
	  --archs unet,resnet34-unet --context 0 --config config/compare-long.toml
	$(BIN)/python bench/render_compare.py

# The network bench/gpu.sh measures: make demo's, exported with float16 weights (run there at 512 px, and end to
# end at 256 and 512 px).
gpu-model: demo
	mkdir -p bench/work
	$(BIN)/livernode export demo/run --out bench/work/demo-fp16.onnx --fp16

# Everything bench/gpu.sh installs on a GPU machine without internet (run this where there is internet):
# the CUDA build of ONNX Runtime, the CUDA and cuDNN runtime wheels, and livernode's base dependencies at the
# locked versions except the CPU build of ONNX Runtime (the two must never share an environment).
# 1.31.1 is the newest CUDA build on the package index (there is no 1.32.0 beside the CPU build's), made for CUDA 13.
GPU_WHEELS := $(ORT_GPU) 'nvidia-cudnn-cu13~=9.0' 'nvidia-cublas~=13.0' 'nvidia-cuda-runtime~=13.0' \
              'nvidia-cufft~=12.0' 'nvidia-curand~=10.0' 'nvidia-cuda-nvrtc~=13.0'
gpu-wheels: setup
	$(BIN)/pip download --quiet -d bench/wheels $(GPU_WHEELS)
	grep -v '^onnxruntime==' constraints.txt > bench/wheels/constraints-gpu.txt
	$(BIN)/pip download --quiet -d bench/wheels -c bench/wheels/constraints-gpu.txt \
	  numpy scipy pydicom pynetdicom highdicom watchdog opencv-python-headless pydantic tqdm prometheus-client \
	  python-gdcm pylibjpeg pylibjpeg-openjpeg pyjpegls onnx connected-components-3d setuptools wheel

# Refresh the lock from the current environment after a deliberate upgrade.
lock: setup
	{ echo "# Exact versions the test suite passed with (Python 3.11, Linux x86_64). Regenerate with 'make lock'."; \
	  $(BIN)/pip freeze --exclude-editable; } > constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
