# vmbus-emu: `make demo` runs the narrated multi-partition demo, `make test` the whole suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck unit integration bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/parent-partition demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy --strict vmbus_proto parent_partition child_partition

test: lint typecheck
	$(VENV)/bin/pytest -q

unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

integration: $(STAMP)
	$(VENV)/bin/pytest -q tests/integration

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) run var .mypy_cache .ruff_cache .pytest_cache .hypothesis
