PY ?= python3
export PYTHON := $(PY)

.PHONY: setup demo test test-all bench bench-quick clean

setup:
	bash scripts/bootstrap.sh

# The main job: a synthetic 3072x2048 scene registered and tracked under a 1 GiB budget.
demo: setup
	$(PY) -m chunkpose demo --width 3072 --height 2048 --budget-gb 1 --out out/demo

# The test suite CI runs (slow full-size runs are excluded; `make test-all` includes them).
test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ""

bench: setup
	$(PY) benchmarks/vram_vs_speed.py
	$(PY) benchmarks/accuracy_vs_scale.py
	$(PY) benchmarks/ops_bench.py

bench-quick: setup
	$(PY) benchmarks/vram_vs_speed.py --quick
	$(PY) benchmarks/accuracy_vs_scale.py --quick

clean:
	rm -rf build out *.egg-info chunkpose/*.so
