#!/usr/bin/env bash
# The GPU check in one call (bench/gpu_check.py says what each step shows). On the GPU machine,
# from the repository root, with the wheels bench/gpu_wheels.sh put in .whl/ carried along:
#   bench/gpu_check.sh            results under $OUT (or runs/gpu_check): gpu_check.json, .log,
#                                 profile.txt
#   bench/gpu_check.sh --cpu      the same steps on this machine's CPU at tiny sizes
# Never waits for input; every step has its own timeout inside an overall budget of 480 s (--budget;
# GPU_CHECK_TIMEOUT, 510 s, stops the whole script; twice both with --cpu).
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
export DS_BUILD_OPS=0 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1  # DeepSpeed's sdist builds no ops
if [ -x .venv/bin/python ]; then
    PY=.venv/bin/python
else
    PY=python3
    if ls .whl/*.whl >/dev/null 2>&1; then  # the GPU image lacks these packages; nothing downloads there
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
            --no-build-isolation .whl/*.whl .whl/*.tar.gz >"$OUT/install.log" 2>&1 || echo "wheel install failed: $OUT/install.log"
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
# --cpu doubles the steps' budget (gpu_check.py): the whole script's limit follows it
limit=510
case " $* " in *" --cpu "*) limit=1020 ;; esac
exec timeout "${GPU_CHECK_TIMEOUT:-$limit}" "$PY" bench/gpu_check.py --out "$OUT" "$@" </dev/null
