# Entry points for a fresh machine; each creates .venv and installs what it needs once.
#   make demo       the main job: MC-SGD vs the offline 8x8-digits task sequence (a few minutes on CPU)
#   make test       lint and the whole test suite, as CI runs it (with the `sweep` extra, Ray Tune, which
#                   `make demo` does not need); about 17 minutes on 2 cores from a fresh clone (docs/speed.md)
#   make test-fast  the fast tier for the inner loop: every test not marked slow (no processes, no Ray, no
#                   whole training runs), about a minute
#   make protocol   the paper protocol's table: every method's search on validation data and its selected
#                   setting over 10 test seeds (configs/protocol/), benchmark by benchmark; tens of core-hours,
#                   rerun to resume (docs/sweep.md#the-paper-protocol)
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_CONFIG ?= configs/mcsgd/permuted_digits.yaml
# Two pytest workers (CI has 2 cores), each taking the next test or group when free: tests/conftest.py groups
# the tests that share a module fixture or a Ray and hands out the long ones first, which --no-loadscope-reorder keeps.
PARALLEL ?= -n 2 --dist loadgroup --no-loadscope-reorder

.PHONY: demo test test-fast protocol install install-test

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: install
	$(BIN)/cl-lightning fit --config $(DEMO_CONFIG)

# One pip run for everything the tests need (not `.installed` first: that resolved and built the package twice).
$(VENV)/.installed-test: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,sweep]"
	touch $@

test: install-test
	$(BIN)/ruff check .
	$(BIN)/pytest -q $(PARALLEL)

test-fast: install-test
	$(BIN)/pytest -q -m "not slow" $(PARALLEL)

# The paper protocol, one `sweep` per method and benchmark (each resumes where it stopped), then the table of
# the selected settings' test runs and what the search cost. Populations of up to 10: the 10 test seeds train as one.
PROTOCOL_BENCHMARKS ?= rotated_fashion_mnist permuted_fashion_mnist
PROTOCOL_METHODS ?= mcsgd naive er agem ewc stable_sgd derpp multitask
PROTOCOL_ROOT ?= lightning_logs/protocol
protocol: install-test
	set -e; for benchmark in $(PROTOCOL_BENCHMARKS); do for method in $(PROTOCOL_METHODS); do \
	  $(BIN)/cl-lightning sweep --config configs/$$method/$$benchmark.yaml \
	    --grid configs/protocol/$${method}_$$benchmark.yaml --root $(PROTOCOL_ROOT) --members_per_trial 10 \
	    -- $(PROTOCOL_ARGS); \
	done; done
	$(BIN)/cl-lightning report $(PROTOCOL_ROOT)/*/final --out $(PROTOCOL_ROOT)/table
	$(BIN)/cl-lightning report $(PROTOCOL_ROOT)/*/search --out $(PROTOCOL_ROOT)/search_cost --no-plots > /dev/null
	@echo "search: $$(grep -h '^Whole grid' $(PROTOCOL_ROOT)/search_cost/report.md)"
	@echo "test runs: $$(grep -h '^Whole grid' $(PROTOCOL_ROOT)/table/report.md)"
