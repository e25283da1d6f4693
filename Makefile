# Every target creates the virtualenv on first use, so a fresh clone needs only Python 3.11+.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
SHARED ?= $(abspath ../shared)
DEMO_OUT ?= demo-output

# Ray stays on loopback and sends nothing anywhere (its dashboard probes cloud-metadata addresses otherwise).
export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE := disabled
export http_proxy := http://127.0.0.1:9
export HTTP_PROXY := http://127.0.0.1:9
export no_proxy := 127.0.0.1,localhost
export NO_PROXY := 127.0.0.1,localhost
# Real users run nltk.download("punkt_tab") and nltk.download("averaged_perceptron_tagger_eng").
export NLTK_DATA ?= $(SHARED)/nltk_data

.PHONY: help demo test test-fast bench bench-gpu lint format clean
help:  ## list targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(BIN)/curation: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]' -c constraints.txt
	touch $@

demo: $(BIN)/curation  ## run the whole pipeline on the bundled sample images (tiny random models)
	$(BIN)/python -m jobs.demo --output $(DEMO_OUT)

test: $(BIN)/curation  ## run the test suite
	$(BIN)/pytest -q

test-fast: $(BIN)/curation  ## the suite without the slow fault-injection tests
	$(BIN)/pytest -q -m 'not slow'

bench: $(BIN)/curation  ## CPU benchmarks (speed goals live here, not in tests)
	$(BIN)/python bench/run_all.py

bench-gpu: $(BIN)/curation  ## GPU benchmarks at real shapes, random weights, no downloads (a CUDA machine; ~10 min)
	$(BIN)/python bench/gpu_caption.py
	$(BIN)/python bench/gpu_features.py
	$(BIN)/python bench/gpu_quality.py

lint: $(BIN)/curation  ## ruff check + format check
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

format: $(BIN)/curation  ## ruff format + fixes
	$(BIN)/ruff format . && $(BIN)/ruff check --fix .

clean:  ## remove the demo output and caches (keeps the virtualenv)
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache
