# Two entry points for a fresh machine: `make quickstart` (set-up + the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: quickstart test test-times setup setup-dev clean-cache gpu-checks

# Install torch first: on a CPU-only machine torch==$(TORCH_VERSION) is the CPU wheel; on a GPU machine the
# same pin from the registry is the CUDA build. Installing the rest afterwards then pulls no other torch.
$(BIN)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	touch $@

$(BIN)/.installed: $(BIN)/.torch pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

# The dev set-up also installs the example plug-in (examples/pointmass), which the tests train, study and report,
# and the LIBERO extra (about 2 GB), whose world the `libero`-marked tests build.
$(BIN)/.installed-dev: $(BIN)/.installed examples/pointmass/pyproject.toml
	$(BIN)/pip install -q -e '.[dev,libero]'
	$(BIN)/pip install -q --no-deps -e examples/pointmass
	touch $@

setup: $(BIN)/.installed
setup-dev: $(BIN)/.installed-dev

# The main job: a small real on/off study on the Meta-World quick suite (8 cells, 2 workers), then its report.
quickstart: setup
	$(BIN)/ript-ablate study run studies/quickstart.yaml --workers 2
	$(BIN)/ript-ablate report studies/quickstart.yaml

# Test files run on 2 processes, each kept to its own core (tests/conftest.py), heaviest file first by the seconds
# in tests/file_seconds.json (xdist's own order sorts files by their number of tests, which started long files
# last). On this project's slowest 2-core machine so far the suite took 14.3 and 15.4 minutes (fresh clones);
# figures by machine in docs/development.md, "Tests".
PYTEST_PARALLEL := -n 2 --dist loadfile --no-loadscope-reorder
test: setup-dev
	$(BIN)/python -m pytest -q $(PYTEST_PARALLEL) --durations=15

# Measure each test file's seconds anew into tests/file_seconds.json (the order `make test` hands files out in).
test-times: setup-dev
	RIPT_RECORD_FILE_SECONDS=1 $(BIN)/python -m pytest -q $(PYTEST_PARALLEL) --durations=15

# The figures only a GPU machine can take (docs/development.md, "Benchmarks"), each printed as it is measured.
gpu-checks: setup
	MUJOCO_GL=egl $(BIN)/python -m ript_ablate.bench.pixels --device cuda --sizes 64 128 --iterations 3 \
		--set training.contexts_per_iteration=16
	$(BIN)/python -m ript_ablate.bench.rollout_throughput configs/metaworld_quick.yaml --seconds 3 --rounds 1
	$(BIN)/python -m ript_ablate.bench.distributed configs/metaworld_quick.yaml --nproc 1 4 --iterations 2

clean-cache:
	rm -rf .ript_cache
