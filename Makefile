# Two commands do all the set-up: `make demo` and `make test`. Both create .venv when it is missing.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?= -q -rs -n 2 --dist loadfile --no-loadscope-reorder  # two workers, a test file each at a time, longest first (conftest.py)

.PHONY: demo test bench clean

# torch goes in FIRST and pinned: an unpinned torch pulls several GB of CUDA wheels on a CPU machine.
$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH bash run_all.sh tiny

test: $(VENV)/.installed
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest $(PYTEST_ARGS) tests

# the kernels against the peers' code; the whole-model ones: $(PY) scripts/bench.py --rollout (or --actor_memory,
# --ppo_memory, --save_model DIR)
bench: $(VENV)/.installed
	$(PY) kernels/bench.py

clean:
	rm -rf output .pytest_cache
