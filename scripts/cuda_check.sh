#!/usr/bin/env bash
# The GPU check of issue #20 as ONE command for a lent device machine (no package registry there, torch
# preinstalled): `bash scripts/cuda_check.sh`, with the wheels of `make gpu-wheels` carried in .whl/.
# Every step runs even when one before it failed, each under its own time limit (together 570 s: one device
# call may run 600 s), and writes its log to $OUT (what the device tool brings back). On a GPU machine with
# a registry, `make cuda-check` does the same.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/cuda-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" CI=true PYTHONUNBUFFERED=1
step() {   # step NAME SECONDS COMMAND...: run, keep the log, say how it ended
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: rc=$rc"
}
step env 30 $PY -c "import torch, diffusers; print(torch.__version__, diffusers.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
step pytest 160 $PY -m pytest -q -rs -p no:cacheprovider -k "cuda and not test_compiled_cuda" tests
step kernels 120 $PY benchmarks/cuda_kernels.py --json "$OUT/cuda_kernels.json"
# the demo pipeline on the GPU; FID off (the Inception weights, 95 MB, do not travel to a lent machine)
sed -e 's/^fid = true.*/fid = false/' -e 's#^workdir = .*#workdir = "/tmp/cuda-demo"#' sample_configs/demo.toml > /tmp/cuda-demo.toml
step demo 200 $PY -m diffpro_cli run /tmp/cuda-demo.toml --device cuda
cp /tmp/cuda-demo/bench/report.md "$OUT/demo-report.md" 2>/dev/null
cp /tmp/cuda-demo/bench/report.json "$OUT/demo-report.json" 2>/dev/null
# bench --compile's GPU path (compiled_cuda.py): the quantized DiT compiled with its CUDA kernels traced (triton)
step compile 60 $PY -m pytest -q -rs -p no:cacheprovider tests/test_compiled_cuda.py -k gpu
exit 0
