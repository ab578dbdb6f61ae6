# `make test` and `make demo` work on a fresh machine: each creates .venv if missing and installs
# what it needs (torch==2.13.0 is the CPU build; an unpinned torch would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BASE_STAMP := $(VENV)/.installed-base

.PHONY: test test-slow test-all test-numerics-isa test-aot demo demo-post install

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# the demo needs only the library; with torch and transformers installed (make install / make test) it
# also checks its export in transformers, and skips that stage with one line otherwise
$(BASE_STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e .
	touch $(BASE_STAMP)

install: $(STAMP)

# pytest-xdist: one worker per core (`make test PYTEST_WORKERS=0` runs in this process), work-stealing
# so the long training subprocess tests do not leave a worker idle at the end. The persistent
# compilation cache in .cache/ (tests/xla_env.py) makes a second run mostly cache hits.
PYTEST_WORKERS ?= auto
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal

test: $(STAMP)
	$(PYTEST)

test-slow: $(STAMP)
	$(PYTEST) -m slow

test-all: $(STAMP)
	$(PYTEST) -m ""

# The numerics-heavy tests again with XLA:CPU capped to SSE4.2 kernels (128-bit vectors: other accumulation
# orders than the AVX2 / AVX-512 default), so a tolerance that holds only on the machine at hand fails in CI
# before it lands. Tolerances and the floors they were measured from: tests/tolerances.py. With XLA's
# default code generation (QWEN2_JAX_TEST_XLA_OPT=full): the default set compiles at LLVM level 0 without
# the MLIR fusion emitters, for speed (tests/xla_env.py), so this run checks the machine code users get.
NUMERICS_TESTS := tests/test_parity_dense.py tests/test_moe.py tests/test_moe_block.py tests/test_sharding.py \
                  tests/test_generate.py tests/test_train_loss.py
ISA_CAP ?= SSE4_2
test-numerics-isa: $(STAMP)
	QWEN2_JAX_TEST_XLA_OPT=full XLA_FLAGS="$$XLA_FLAGS --xla_cpu_max_isa=$(ISA_CAP)" $(PYTEST) $(NUMERICS_TESTS)

# The ahead-of-time planner's tests with libtpu installed (the aot-tpu extra), slow ones included: a
# v5e:2x2 slice, the compiler's refusal of a step too big for HBM, and the 72B and 57B-A14B recipes
# compiled for v5p-256 and v5p-128. Its own venv: with libtpu installed, every `import jax` on a machine
# without TPUs prints a libtpu start-up error, which .venv's users should not see.
AOT_VENV := .venv-aot
AOT_PY := $(AOT_VENV)/bin/python
AOT_STAMP := $(AOT_VENV)/.installed
$(AOT_STAMP): pyproject.toml Makefile
	test -x $(AOT_PY) || $(PYTHON) -m venv $(AOT_VENV)
	$(AOT_PY) -m pip install --quiet --upgrade pip
	$(AOT_PY) -m pip install --quiet -e ".[aot-tpu]" "pytest>=8" "pytest-xdist>=3"
	touch $(AOT_STAMP)
# one worker per core as in make test: the recipes' compiles for v5p-256 / v5p-128 are independent
test-aot: $(AOT_STAMP)
	$(AOT_PY) -m pytest -q -n $(PYTEST_WORKERS) --dist worksteal -m "" tests/test_train_dry_run.py

# `make demo DEMO_ARGS="--keep out/demo"` keeps what it writes (python -m qwen2_jax.demo --help)
demo: $(BASE_STAMP)
	$(PY) -m qwen2_jax.demo $(DEMO_ARGS)

# SFT then DPO of the demo's model, held-out preference accuracy before / after each, then a chat
# (python -m qwen2_jax.demo.post --help). `make demo-post DEMO_POST_ARGS="--base out/demo"` reuses what
# `make demo DEMO_ARGS="--keep out/demo"` wrote (or trains the base model there first and keeps it).
demo-post: $(BASE_STAMP)
	$(PY) -m qwen2_jax.demo.post $(DEMO_POST_ARGS)
