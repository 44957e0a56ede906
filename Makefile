# Two entry points on a fresh machine:
#   make run   set up .venv, start inferd with the packaged default model, show calls to it
#   make test  set up .venv (plus test tools) and run the whole test suite
.PHONY: setup setup-test run test lint bench charts fuzz soak proto clean

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

# Regenerate the charts the docs embed (docs/charts/*.png) from fresh, short bench runs (a few
# minutes), and the console's screenshot from its real-browser test. Never edit those PNGs by hand.
charts: setup-test
	.venv/bin/python bench/llm_throughput.py --repeat 1 --tokens 64 --plot docs/charts/llm_throughput.png
	.venv/bin/python bench/prefix_cache.py --rounds 1 --plot docs/charts/prefix_cache.png
	.venv/bin/python bench/store.py --sections sizes --queries 50 --plot docs/charts/store_find.png
	INFERD_CONSOLE_SCREENSHOT_DIR=docs/charts .venv/bin/python -m pytest -q tests/test_console_browser.py

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
