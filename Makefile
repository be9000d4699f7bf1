# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.deps-installed
DATA_PREFIX := data/bundled_text_document
TOKENIZER := monta/data/bundled/tokenizer.model
PYTEST_ARGS ?=

.PHONY: demo plots test test-slow test-all data venv clean sm90-kernels

venv: $(DEPS)

$(DEPS): requirements.txt requirements-test.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-test.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

data: $(DATA_PREFIX).bin

$(DATA_PREFIX).bin: $(DEPS) monta/data/bundled/corpus.jsonl.gz $(TOKENIZER)
	mkdir -p data
	$(BIN)/python tools/preprocess_data.py --input monta/data/bundled/corpus.jsonl.gz \
		--json-keys text --output-prefix data/bundled --tokenizer-type SentencePieceTokenizer \
		--tokenizer-model $(TOKENIZER) --append-eod --workers 2

# A fresh run each time: runs/demo is the demo's scratch directory.
demo: $(DEPS) data
	rm -rf runs/demo
	PATH="$(CURDIR)/$(BIN):$$PATH" RUN_DIR=runs/demo bash examples/quickstart_cpu.sh

# PNGs of the demo's loss, throughput, expert load and link bytes (after `make demo`)
plots: $(DEPS)
	$(BIN)/python tools/plot_run.py --tensorboard-dir runs/demo/tensorboard --out runs/demo/plots

# Default suite (CI): everything not marked slow or gpu. pytest exits non-zero (5) on "no tests".
test: $(DEPS)
	$(BIN)/python -m pytest tests -m "not slow and not gpu" $(PYTEST_ARGS)

test-slow: $(DEPS)
	$(BIN)/python -m pytest tests -m "slow" $(PYTEST_ARGS)

test-all: $(DEPS)
	$(BIN)/python -m pytest tests -m "not gpu" $(PYTEST_ARGS)

# MoNTA's Hopper grouped-GEMM library (optional; needs no GPU to build, ~6 min on 2 cores)
sm90-kernels: $(DEPS)
	$(BIN)/python tools/build_sm90_kernels.py

clean:
	rm -rf $(VENV) data runs checkpoints *.egg-info build monta/_build
