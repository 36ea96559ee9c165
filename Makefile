# One command each: `make test` (set-up + tests) and `make train` (set-up + a short run on sprites).
# Both create .venv and install fastvae with the pinned versions from constraints.txt.
# `make gpu-check` is for a lent GPU machine, whose Python already has torch and triton: no .venv there.
PYTHON ?= python3
# The README's main command: 10 epochs (the default), a minute or two on a 2-core CPU.
TRAIN_ARGS ?= --likelihood bernoulli
VENV ?= .venv
PY := $(VENV)/bin/python
# Without a CUDA device the Triton kernels run under Triton's interpreter.
HAS_CUDA = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
INTERPRET = $(if $(filter 1,$(HAS_CUDA)),0,1)

# The GPU check's folder: the device tool's $OUT when set, else a new one under runs/.
GPU_CHECK_OUT ?= $(or $(OUT),runs/gpu-check-$(shell date +%Y%m%d-%H%M%S))

.PHONY: setup test lint train bench gpu-check clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

test: setup
	TRITON_INTERPRET=$(INTERPRET) $(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

train: setup
	$(PY) -m fastvae.train --dataset sprites $(TRAIN_ARGS)

bench: setup
	TRITON_INTERPRET=$(INTERPRET) $(PY) -m bench.elbo_head $(BENCH_ARGS)

# python -m bench.gpu_check with $(PYTHON) (no .venv): fastvae is installed into it first, without
# dependencies or network, unless it is already. At most 5 minutes (--budget 300, everything included).
# GPU_CHECK_ARGS: e.g. --dry-run, or after a fix --steps tests,elbo_head (into a fresh OUT).
gpu-check:
	$(PYTHON) -c "import fastvae.kernels" 2>/dev/null || \
		$(PYTHON) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PYTHON) -m bench.gpu_check --out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
