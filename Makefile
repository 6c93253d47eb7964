VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test demo clean

# torch 2.13.0 (CPU) is installed first only where no torch is present, so pip never pulls a CUDA build;
# youtokentome needs Cython already installed and no build isolation.
$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install Cython setuptools wheel
	$(PY) -c "import youtokentome" 2>/dev/null || $(PIP) install --no-build-isolation youtokentome==1.0.6
	$(PIP) install --no-deps clip-anytorch
	$(PIP) install --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
