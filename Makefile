# Two entry points on a fresh machine:
#   make run   set up .venv, start inferd with the packaged default model, show calls to it
#   make test  set up .venv (plus test tools) and run the whole test suite
.PHONY: setup setup-test run test lint bench fuzz soak proto clean

setup:
	bash scripts/setup_env.sh

setup-test:
	bash scripts/setup_env.sh --test

run: setup
	bash scripts/demo.sh

test: setup-test
	.venv/bin/ruff check src tests bench scripts
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check src tests bench scripts

bench:
	.venv/bin/python bench/rpc_overhead.py

# 10k cases per rpc of every registered backend; prints status counts per rpc (FUZZ_ARGS to change).
fuzz: setup-test
	.venv/bin/python bench/fuzz.py $(FUZZ_ARGS)

# 16/64/256 concurrent clients mixing Predict, PredictStream, Embedding and Stores*.
soak: setup-test
	.venv/bin/python bench/soak.py $(SOAK_ARGS)

proto:
	.venv/bin/python scripts/gen_proto.py

clean:
	rm -rf .venv tests/node/node_modules
