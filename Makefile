# One-word commands. Each creates .venv on first use and installs with the pinned constraints
# (torch==2.13.0 there keeps pip on the local CPU build instead of a multi-GB CUDA one).
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup demo test test-fast lint format bench bench-asha bench-quality clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The CPU demo sweep: a local Ray, 6 LoQT trials under Optuna + ASHA, then the leaderboard,
# runs/sweeps/demo-sweep/{best.yaml,report/}. Rerunning resumes (a finished sweep just reprints).
demo: $(STAMP)
	.venv/bin/loqt-ray sweep jobs/sweep.yaml

bench-asha: $(STAMP)
	$(PY) bench/bench_asha.py

# Every method tuned over lr x its matrix step (grids that grow past an edge best, two horizons):
# about two hours on 2 cores from nothing; resumable.
bench-quality: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt galore-torch
	$(PY) bench/bench_quality.py

# What CI runs: the linter and formatter check, then every test (Ray, DeepSpeed and job tests included).
test: $(STAMP) lint
	$(PY) -m pytest -q --durations=15

# The inner loop: everything but the multi-process tests (real Ray clusters, 2-worker DeepSpeed runs, jobs).
test-fast: $(STAMP) lint
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	.venv/bin/ruff check loqt_ray tests bench
	.venv/bin/ruff format --check loqt_ray tests bench

format: $(STAMP)
	.venv/bin/ruff format loqt_ray tests bench
	.venv/bin/ruff check --fix loqt_ray tests bench

bench: $(STAMP)
	$(PY) bench/bench_loqt.py

clean:
	rm -rf runs data .pytest_cache
