# fdistill: two commands from a clean clone.
#   make demo   -- the paper in miniature, offline, on CPU (QUICK=1, SEEDS=N, DATA=PATH)
#   make test   -- the test suite (CPU, a few minutes)
#   make reproduce-mini -- the miniature test of the paper's claim, docs/evidence.md (QUICK=1: ~20 min)
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed-$(shell cat pyproject.toml requirements-torch.txt | cksum | cut -d' ' -f1)
QUICK  ?= 0
SEEDS  ?= 1
DATA   ?=
DEMO_OUT ?= runs/demo
MINI_OUT ?= runs/mini$(if $(filter 1,$(QUICK)),-quick)

.PHONY: install test test-fast demo reproduce-mini bench clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-torch.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the builds this project is tested with (CUDA wheels that also run on CPU)
	$(PY) -m pip install -q -r requirements-torch.txt
	$(PY) -m pip install -q -e ".[test,webdataset]"
	rm -f $(VENV)/.installed-*; touch $@

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests

demo: install
	$(VENV)/bin/fdistill demo --output $(DEMO_OUT) $(if $(filter 1,$(QUICK)),--quick) --seeds $(SEEDS) $(if $(DATA),--data $(DATA))

reproduce-mini: install
	$(VENV)/bin/fdistill reproduce-mini --output $(MINI_OUT) $(if $(filter 1,$(QUICK)),--quick)

bench: install
	$(PY) benchmarks/bench_distill.py --device cpu

clean:
	rm -rf $(VENV) runs .pytest_cache
