# moeflow: `make demo` runs the embedded default end to end, `make test` runs every test.
# Both create .venv on first use, installing from constraints.txt (CPU torch, pinned).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_MODEL := .cache/tiny-qwen3-moe
OUT    := out

.PHONY: demo test install bench typecheck clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	$(BIN)/python -m moeflow.ops.cpu
	touch $(STAMP)

$(DEMO_MODEL)/config.json: | $(STAMP)
	$(BIN)/moeflow make-tiny qwen3_moe $(DEMO_MODEL) --layers 4 --experts 16 --top-k 4 \
		--hidden 256 --heads 8 --kv-heads 2 --head-dim 32 --intermediate 256 \
		--vocab 2048 --dtype bfloat16 --seed 0

demo: $(STAMP) $(DEMO_MODEL)/config.json
	@echo "# a random-weight checkpoint: the words are noise; watch the speed and the graph"
	$(BIN)/moeflow generate $(DEMO_MODEL) --prompt "Once upon a time" --max-new-tokens 48 \
		--devices cpu:0,cpu:1 --stats
	$(BIN)/moeflow graph $(DEMO_MODEL) --layer 0 --devices cpu:0,cpu:1 \
		--out $(OUT)/graph-layer0.html
	@echo "# serving: moeflow serve with 2 actor processes, a short Poisson load at three rates,"
	@echo "# fine-ep against batch-ep"
	$(BIN)/python benchmarks/serving.py --real --quick --model $(DEMO_MODEL)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/foundation.py
	$(BIN)/python benchmarks/calibration.py
	$(BIN)/python benchmarks/actors.py
	$(BIN)/python benchmarks/serving.py
	$(BIN)/python benchmarks/serving.py --http
	$(BIN)/python benchmarks/kernels.py

typecheck: $(STAMP)
	$(BIN)/mypy --strict moeflow/scheduler moeflow/dataflow moeflow/actors/messages.py \
		moeflow/serve/protocol.py

clean:
	rm -rf $(VENV) .cache $(OUT) .pytest_cache .hypothesis
