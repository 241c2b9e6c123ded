PY ?= python3
export PYTHON := $(PY)

.PHONY: setup demo test test-all bench bench-cpu bench-quick clean

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

# The documented sweeps at 3072x2048 (sized for a GPU; hours on a CPU), written to
# benchmarks/results/<machine>/.
bench: setup
	-$(PY) benchmarks/vram_vs_speed.py
	$(PY) benchmarks/accuracy_vs_scale.py
	$(PY) benchmarks/ops_bench.py

# The committed CPU results (benchmarks/results/cpu-*): the same registration (252 hypotheses,
# 5 iterations) and budget sweep, plus two budgets that force chunking on a CPU; accuracy on
# fewer scenes. One after the other so that neither run's times are disturbed; about 40 min
# on 2 cores.
bench-cpu: setup
	-$(PY) benchmarks/vram_vs_speed.py --budgets none,16,8,4,2,1,0.5,0.25,0.125
	$(PY) benchmarks/accuracy_vs_scale.py --footprints 0.005,0.02,0.07,0.2 --meshes drill,duck --seeds 2

# Smoke runs (seconds to a minute), into out/bench-quick/ so the committed results stay as they are.
# ("-": vram_vs_speed exits 1 when a measured peak passed its budget; the reports are still written.)
bench-quick: setup
	-$(PY) benchmarks/vram_vs_speed.py --quick --out out/bench-quick
	$(PY) benchmarks/accuracy_vs_scale.py --quick --out out/bench-quick

clean:
	rm -rf build out *.egg-info chunkpose/*.so
