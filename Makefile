# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install notebooks clean-demo bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Re-install only when the dependency list changes.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (covidlib)" >/dev/null
	touch $(STAMP)

install: $(STAMP)

# The whole notebook pipeline on the embedded synthetic data -> reports/runs/demo/
# (one ablation seed instead of three keeps the demo within its time budget)
demo: $(STAMP)
	$(PY) -m covidlib run --quiet -p RUN_DIR reports/runs/demo -p ABLATION_SEEDS "[0]"

# Two workers, one test file each at a time: module fixtures (the installed-wheel pipeline run)
# stay in one process, and the long single-threaded parts (graph tracing, kernel start-up) of two
# files overlap on a 2-core machine. `pytest tests/test_x.py` alone still runs in one process.
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

notebooks: $(STAMP)
	$(PY) tools/build_notebooks.py

bench: $(STAMP)
	$(PY) benchmarks/bench_enhance.py

clean-demo:
	rm -rf reports/runs/demo
