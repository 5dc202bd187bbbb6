# The README's commands. `make serve` sets up a virtual environment and serves the offline
# default base; `make test` runs the test suite (the same command CI runs).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEPS := $(VENV)/.embedlift-deps
STAMP := $(VENV)/.embedlift-installed
FILES := $(VENV)/.embedlift-files

.PHONY: setup serve test typecheck bench-quality bench-serving clean

setup: $(STAMP)

# torch first, pinned to the CPU build, so the project's `torch<2.14` is already satisfied.
$(DEPS): pyproject.toml client/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ./client -e '.[dev]' --config-settings editable_mode=strict
	touch $(DEPS)

# The editable install is setuptools' strict mode: a tree of links under build/__editable__.* that type
# checkers and editors read as the real package `embedlift.*`. It links the files present when it ran, so the
# list of source files is kept in $(FILES) and a file added or removed re-links (seconds, no dependencies).
$(shell mkdir -p $(VENV) && find models training service client/src -type f -not -path '*/__pycache__/*' | sort > $(FILES).new \
	&& (cmp -s $(FILES).new $(FILES) || cp $(FILES).new $(FILES)); rm -f $(FILES).new)

$(STAMP): $(DEPS) $(FILES)
	$(BIN)/pip install -q --no-deps -e ./client -e . --config-settings editable_mode=strict
	touch $(STAMP)

serve: setup
	$(BIN)/embedlift serve

test: setup
	$(BIN)/python -m pytest -q

# mypy over the three code folders, through the installed package (see pyproject's [tool.mypy]).
typecheck: setup
	$(BIN)/mypy

# The quality benchmark with its LlamaIndex peer, in a venv of its own (the peer pins openai<3).
bench-quality:
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/pip install -q --upgrade pip
	.venv-bench/bin/pip install -q torch==2.13.0
	.venv-bench/bin/pip install -q -e ./client -e '.[bench]' --config-settings editable_mode=strict
	.venv-bench/bin/python benchmarks/quality.py

# The serving benchmark: embedlift vs in-process sentence-transformers vs infinity, under wrk.
# infinity pins an old sentence-transformers and numpy<2: it gets a venv of its own, never a project extra.
INFINITY_VENV ?= .venv-infinity
INFINITY_STAMP := $(INFINITY_VENV)/.installed
$(INFINITY_STAMP):
	$(PYTHON) -m venv $(INFINITY_VENV)
	$(INFINITY_VENV)/bin/pip install -q --upgrade pip
	$(INFINITY_VENV)/bin/pip install -q torch==2.13.0
	echo "torch==2.13.0" > $(INFINITY_VENV)/constraints.txt
	$(INFINITY_VENV)/bin/pip install -q -c $(INFINITY_VENV)/constraints.txt "infinity-emb[server,torch]==0.0.78"
	touch $(INFINITY_STAMP)

bench-serving: setup $(INFINITY_STAMP)
	command -v wrk >/dev/null || (apt-get update -q && apt-get install -y -q wrk)
	INFINITY=$(INFINITY_VENV)/bin/infinity_emb $(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) .venv-bench $(INFINITY_VENV) build *.egg-info
