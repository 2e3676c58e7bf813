#!/usr/bin/env bash
# The sweep on fractional GPUs, on the GPU machine, after bench/gpu_check.sh ran there (its wheels in
# /tmp/site) and the two parts bench/gpu_ray_wheels.sh cut were carried in two calls:
#   bench/gpu_sweep.sh          join .whl-ray/ray-wheels.tar.part-*, install Ray, run bench/gpu_sweep.yaml
#                               (two 60m trials at 0.5 GPU each), $OUT/gpu_sweep.json says where they ran
#   bench/gpu_sweep.sh --cpu    the sweep file's dry run only (no GPU here)
# Never waits for input; the whole script stops after GPU_SWEEP_TIMEOUT (480 s).
set -u
cd "$(dirname "$0")/.."
export OUT="${OUT:-runs/gpu_sweep}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 DS_BUILD_OPS=0 RAY_AUTH_MODE=token
mkdir -p "$OUT"
if [ "${1:-}" = "--cpu" ]; then
    exec .venv/bin/loqt-ray sweep bench/gpu_sweep.yaml --dry-run </dev/null
fi
PY=python3
if ls .whl-ray/ray-wheels.tar.part-* >/dev/null 2>&1; then
    cat .whl-ray/ray-wheels.tar.part-* | tar -xf - -C /tmp
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-ray \
        /tmp/wheels/*.whl >"$OUT/install.log" 2>&1 || echo "Ray wheel install failed: $OUT/install.log"
fi
export PYTHONPATH="$PWD:/tmp/site-ray:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
timeout "${GPU_SWEEP_TIMEOUT:-480}" $PY -m loqt_ray.cli sweep bench/gpu_sweep.yaml \
    --set sweep.storage_path="$OUT/sweeps" >"$OUT/gpu_sweep.log" 2>&1 </dev/null
echo "sweep exit $?" >>"$OUT/gpu_sweep.log"
tail -20 "$OUT/gpu_sweep.log"
$PY bench/gpu_sweep.py "$OUT/sweeps/gpu-sweep" "$OUT/gpu_sweep.json"
