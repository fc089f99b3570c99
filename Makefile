# The README's two commands: `make demo` (set up, run the main job on the embedded
# default) and `make test` (set up, run the tests). CI runs `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
IMAGEFARM := $(VENV)/bin/imagefarm
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup test demo bench doctor clean

setup:
	scripts/setup

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(IMAGEFARM) demo

# BENCH_ARGS: e.g. --quick, or --only derive,copy (see bench/README.md)
bench: setup
	$(PY) -c 'import matplotlib' 2>/dev/null || $(VENV)/bin/pip install -q -e '.[bench]'
	$(PY) -m bench $(BENCH_ARGS)

doctor: setup
	$(IMAGEFARM) doctor

clean:
	-$(IMAGEFARM) dev down
	rm -rf $(VENV) .pytest_cache
