#!/usr/bin/env bash
# Issue #19 on a CPU without VNNI, as ONE command from a fresh clone: `bash scripts/avx2_check.sh`.
# 1. the CPU's flags (says so if this CPU has VNNI after all: then it is not the machine #19 asks for);
# 2. `make demo` into a fresh work directory, timed (the 10-minute bar includes the install);
# 3. the demo bars, read off that report (benchmarks/acceptance.py: PASS / FAIL per bar);
# 4. the DiT-XL/2 W8A8 forward against fp32 (benchmarks/kernels.py; #19's bar: >= 1.8x on AVX2).
# Logs go to $OUT (default /tmp/avx2-check). Every step runs even when one before it failed.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/avx2-check}
mkdir -p "$OUT"
echo "== cpu"
grep -m1 "model name" /proc/cpuinfo
flags=$(grep -m1 ^flags /proc/cpuinfo)
for f in avx2 avx512f avx512_vnni avx_vnni amx_int8 avx512_bf16; do
  case " $flags " in *" $f "*) echo "  $f: yes";; *) echo "  $f: no";; esac
done
case " $flags " in *" avx512_vnni "*|*" avx_vnni "*|*" amx_int8 "*)
  echo "  NOTE: this CPU has VNNI: these are VNNI figures, not the AVX2-only run #19 asks for";; esac
echo "== demo (fresh work directory $OUT/demo)"
sed "s#^workdir = .*#workdir = \"$OUT/demo\"#" sample_configs/demo.toml > "$OUT/demo.toml"
rm -rf "$OUT/demo"
start=$(date +%s)
make install > "$OUT/install.log" 2>&1
CI=true .venv/bin/diffpro run "$OUT/demo.toml" > "$OUT/demo.log" 2>&1
echo "  rc=$? in $(( $(date +%s) - start )) s including install (log: $OUT/demo.log)"
echo "== bars"
.venv/bin/python benchmarks/acceptance.py "$OUT/demo/bench/report.json" | tee "$OUT/bars.txt"
echo "== DiT-XL/2 forward (random weights, 28 blocks, batch 2)"
.venv/bin/python benchmarks/kernels.py --skip-layers --skip-builtin --skip-memory --skip-sizes --no-torchao \
  > "$OUT/kernels.log" 2>&1
tail -n 15 "$OUT/kernels.log"
exit 0
