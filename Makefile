# dash_exp: `make run` trains the embedded default end to end; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned exactly (pyproject too) and installed first, alone: on CPU-only hosts this picks the
# CPU wheel instead of letting a looser dependency pull several GB of CUDA packages.
TORCH_PIN := torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.installed

.PHONY: install run test lint clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(TORCH_PIN) 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import importlib.metadata as m, sys; sys.exit(m.version('torch').split('+')[0] != '2.13.0')"
	$(PIP) install -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(BIN)/python -c "import dash_exp.run"
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m dash_exp.run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check dash_exp tests analysis

clean:
	rm -rf runs multirun outputs .pytest_cache
