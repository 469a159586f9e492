# Two commands on a fresh machine with Python 3.11 and pip:
#   make demo   set up, prepare the DVC-pinned data, retrain + register + export, promote, deploy to a local edge
#   make test   set up, run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
FASHION_DIR := /usr/share/datasets/fashion-mnist

.PHONY: setup sources data demo demo-vision test lint bench clean

setup: $(STAMP) sources

# Pinned versions (requirements/constraints.txt) make every machine resolve the same wheels. One pip call: the
# full install depends on the edge distribution (edge/, `transflow-edge`), which pip takes from this checkout.
$(STAMP): pyproject.toml edge/pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel setuptools
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e ./edge -e ".[dev]"
	touch $(STAMP)

# Fashion-MNIST (dataset-fashion-mnist) and chromium come from Debian; install them where we can, explain where we cannot.
sources:
	@if [ -f "$(FASHION_DIR)/train-images-idx3-ubyte.gz" ] || [ -n "$$TRANSFLOW_FASHION_MNIST_DIR" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq dataset-fashion-mnist >/dev/null)); \
	else \
	  echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist', or download the four"; \
	  echo "*-ubyte.gz files of Fashion-MNIST and export TRANSFLOW_FASHION_MNIST_DIR=/path/to/them."; exit 1; \
	fi
	@# Debian's chromium: the test that opens the candidate report in a real headless browser (never skipped).
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -qq chromium >/dev/null 2>&1 || \
	   (apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null)); \
	else \
	  echo "chromium is missing (tests/test_report_browser.py opens the report in it): sudo apt-get install chromium"; \
	  exit 1; \
	fi

data: setup
	$(BIN)/transflow data prepare
	$(BIN)/transflow data verify

demo: data
	$(BIN)/transflow retrain --config configs/text-tweets.yaml --summary run-summary.json
	scripts/demo_edge.sh

# Vision: supervised pretraining of a small ViT on Fashion-MNIST, then transfer to the digits.
demo-vision: data
	$(BIN)/transflow pretrain --config configs/pretrain-vision-supervised.yaml
	$(BIN)/transflow retrain --config configs/vision-digits.yaml

test: setup
	@$(BIN)/pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing on purpose" >&2; exit 1; fi; exit $$rc

lint: setup
	$(BIN)/ruff check .

# Every benchmark (inference, probe, edge, training, pipeline, limits): benchmarks/results/*.json + BENCHMARKS.md
bench: setup
	$(BIN)/python -m benchmarks run

clean:
	rm -rf $(VENV) data.partial data.old .pytest_cache .ruff_cache
