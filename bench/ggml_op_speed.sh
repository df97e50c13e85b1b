#!/usr/bin/env bash
# Where fTRI's time goes on the CPU, op by op: llama.cpp's dense matmul (MUL_MAT) against the routed experts'
# matmul (MUL_MAT_ID), per weight type, measured by llama.cpp's own tests/test-backend-ops.cpp (perf mode) from
# the pinned sdist, built against the installed engine. MUL_MAT_ID runs twice per round, on the engine's grouped
# path (default) and on ggml-cpu's stock path (MOTE_MOE_GEMM=0), in an order that alternates between rounds.
# The suite has no BF16 MUL_MAT_ID case: the copy built here adds BF16 to its Qwen3-30B-A3B-shaped expert cases.
#
#   bash bench/ggml_op_speed.sh [ROUNDS]      (default 3; about 3 minutes a round on 2 cores)
#   PYTHON=/path/to/venv/bin/python bash bench/ggml_op_speed.sh     (the engine of another environment)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
py=${PYTHON:-python3}
src=$("$py" tools/upstream.py prepare --dest build/ops)
lib=$("$py" -c "import mote_local_engine, os; print(os.path.join(os.path.dirname(mote_local_engine.__file__), 'lib'))")
bin=build/ops/test-backend-ops
sed 's/for (ggml_type type_a : {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_Q4_0, GGML_TYPE_Q8_0,/for (ggml_type type_a : {GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q4_0, GGML_TYPE_Q8_0,/' \
    "$src/tests/test-backend-ops.cpp" > build/ops/test-backend-ops-bf16.cpp
grep -q 'GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q4_0' build/ops/test-backend-ops-bf16.cpp \
    || { echo "test-backend-ops.cpp changed: the BF16 MUL_MAT_ID cases were not added" >&2; exit 1; }
g++ -O2 -std=c++17 -I "$src/ggml/include" build/ops/test-backend-ops-bf16.cpp -o "$bin" \
    -L "$lib" -lmote_ggml -lmote_ggml-base -Wl,-rpath,"$lib" -lpthread

dense='type_a=(f16|bf16|q8_0|q4_K),type_b=f32,m=4096,n=(8|512),k=14336,'
experts='type_a=(f16|bf16|q8_0|q4_K),type_b=f32,n_mats=128,n_used=8,b=0,m=768,n=(1|4|8|32|512),k=2048,amax'
out=build/ops/rounds.txt
: > "$out"
for r in $(seq 1 "$rounds"); do
    echo "round $r, load $(cut -d' ' -f1 /proc/loadavg)" | tee -a "$out"
    order=(grouped stock)
    if (( r % 2 == 0 )); then order=(stock grouped); fi
    "$bin" perf -b CPU -o MUL_MAT -p "$dense" | sed 's/^/dense /' | tee -a "$out"
    for path in "${order[@]}"; do
        if [[ $path == stock ]]; then export MOTE_MOE_GEMM=0; else unset MOTE_MOE_GEMM; fi
        "$bin" perf -b CPU -o MUL_MAT_ID -p "$experts" | sed "s/^/$path /" | tee -a "$out"
    done
    unset MOTE_MOE_GEMM
done

# median (min-max) GFLOPS per case and path over the rounds
"$py" - "$out" <<'EOF'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    line = re.sub(r"\x1b\[[0-9;]*m", " ", line)  # the colour codes glue 3-digit figures to the text before
    m = re.match(r"(dense|grouped|stock) +(MUL_MAT(?:_ID)?)\((.*?)\):.* ([\d.]+) ([GT])FLOPS", line)
    if m:
        path, op, params, value, unit = m.groups()
        kv = dict(re.findall(r"(\w+)=(\[[^\]]*\]|[^,]*)", params))  # values such as bs=[1,1] hold commas
        runs.setdefault((kv["type_a"], op, path, int(kv["n"])), []).append(float(value) * (1000 if unit == "T" else 1))
print("| weight type | op | path | n | GFLOPS, median (min-max) |")
print("|---|---|---|---:|---:|")
for (t, op, path, n), v in sorted(runs.items()):
    print(f"| {t} | {op} | {path} | {n} | {statistics.median(v):.1f} ({min(v):.1f}-{max(v):.1f}) |")
EOF
