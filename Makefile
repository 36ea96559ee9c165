# One command each: `make test` (set-up + tests) and `make train` (set-up + a short run on sprites).
# Both create .venv and install fastvae with the pinned versions from constraints.txt.
PYTHON ?= python3
# The README's main command: 10 epochs (the default), a minute or two on a 2-core CPU.
TRAIN_ARGS ?= --likelihood bernoulli
VENV ?= .venv
PY := $(VENV)/bin/python
# Without a CUDA device the Triton kernels run under Triton's interpreter.
HAS_CUDA = $(shell $(PY) -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null)
INTERPRET = $(if $(filter 1,$(HAS_CUDA)),0,1)

.PHONY: setup test lint train bench clean

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

clean:
	rm -rf $(VENV) build *.egg-info
