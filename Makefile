# Two entry points for a fresh machine; each creates .venv and installs what it needs once.
#   make demo   the main job: MC-SGD vs the offline 8x8-digits task sequence (a few minutes on CPU)
#   make test   the test suite (with the `sweep` extra, Ray Tune, which `make demo` does not need)
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_CONFIG ?= configs/mcsgd/permuted_digits.yaml

.PHONY: demo test install install-test

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/cl-lightning fit --config $(DEMO_CONFIG)

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test,sweep]"
	touch $@

test: install-test
	$(BIN)/ruff check .
	$(BIN)/pytest -q
