# Two commands do all the set-up: `make demo` runs the main job, `make test` the tests.
# Both create .venv on first use (torch 2.14.1, torchvision 0.29.1 and the rest of pyproject).
VENV ?= .venv
PY := $(VENV)/bin/python
# MNIST: the shared read-only copy when it is there, else ./data (downloaded when online).
DATA ?= $(firstword $(wildcard ../shared/data) data)
PRESET ?= pmnist-quick

.PHONY: demo test lint bench-population bench-pmnist bench-stages clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/qpacknet run --preset $(PRESET) --data-dir $(DATA)

test: $(VENV)/.installed
	$(VENV)/bin/ruff check qpacknet tests bench
	# two workers; the tests that start Ray run one after another on one of them (tests/conftest.py)
	$(PY) -m pytest -q -n 2

bench-population: $(VENV)/.installed
	$(PY) bench/population.py --data-dir $(DATA)

bench-stages: $(VENV)/.installed
	$(PY) bench/stages.py

bench-pmnist: $(VENV)/.installed
	$(PY) bench/pmnist.py --data-dir $(DATA)

clean:
	rm -rf runs .pytest_cache .ruff_cache
