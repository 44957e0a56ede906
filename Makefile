# Two entry points on a fresh machine:
#   make run   set up .venv, start inferd with the packaged default model, show calls to it
#   make test  set up .venv (plus test tools) and run the whole test suite
.PHONY: setup setup-test run test lint bench proto clean

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

proto:
	.venv/bin/python scripts/gen_proto.py

clean:
	rm -rf .venv tests/node/node_modules
