# The two commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean

demo: $(STAMP)
	$(BIN)/fscl demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check benchmark strategies streams reports tests benchmarks

install: $(STAMP)

# The stdlib venv's own pip is kept on purpose: newer pips honour avalanche's
# qpsolvers[open_source_solvers] extra and pull jax and a dozen QP solvers.
# constraints.txt pins a CPU torch beside PyPI's CUDA torchvision, which imports only after
# benchmark/compat.py's repair: install_startup_repair puts a .pth file into the venv that
# applies it at interpreter start, so plain scripts (`import open_clip`) work too. The stamp
# depends on this Makefile and compat.py, so existing venvs get such changes at the next make.
$(STAMP): setup.cfg constraints.txt Makefile benchmark/compat.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/python -c 'from benchmark.compat import install_startup_repair as i; i()'
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs *.egg-info .pytest_cache
