# Two commands on a fresh machine with only Python: `make demo` and `make test`.
# Both create .venv and install through constraints.txt on first use (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
export DS_BUILD_OPS := 0
export DS_ACCELERATOR ?= cpu
# DeepSpeed's JIT-built ops are cached per checkout: two checkouts never wait on each other's build lock.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: install demo test test-fast bench slurm-up slurm-down clean

install: $(STAMP)

$(STAMP): setup.py constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python launch/train.py configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python tools/benchmark.py --write-docs all

# The local SLURM cluster: NODES=1 (default) is this host alone; NODES=3 gives 3 nodes, each a
# network namespace (tests/slurm_cluster.py).
NODES ?= 1

slurm-up: $(STAMP)
	$(BIN)/python tests/slurm_cluster.py start --nodes $(NODES)

# Stops the local cluster only if `make slurm-up` of this checkout started it.
slurm-down: $(STAMP)
	$(BIN)/python tests/slurm_cluster.py stop --nodes $(NODES)

clean:
	rm -rf $(VENV) runs .cache
