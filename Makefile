# The two front-door commands. Both create/update .venv first and are safe to rerun.
RUN_DIR ?= runs/tiny_cpu
PYTEST_ARGS ?=

.PHONY: run test bench

run:
	@scripts/setup_env.sh
	.venv/bin/megatron-fipo train examples/tiny_cpu.yaml run_dir=$(RUN_DIR)

test:
	@scripts/setup_env.sh requirements-test.txt requirements-test-nodeps.txt
	@tools/sglang_cpu/setup.sh
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)

bench:
	@scripts/setup_env.sh
	.venv/bin/python tools/bench_future_kl.py
