#!/usr/bin/env bash
# Where fTRI's time goes on the CPU, op by op: llama.cpp's dense matmul (MUL_MAT) against the routed experts'
# matmul (MUL_MAT_ID), per weight type, measured by llama.cpp's own tests/test-backend-ops.cpp (perf mode) from
# the pinned sdist, built against the installed engine. About 3 minutes on 2 cores.
#
#   bash bench/ggml_op_speed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
src=$(python3 tools/upstream.py prepare --dest build/ops)
lib=$(python3 -c "import mote_local_engine, os; print(os.path.join(os.path.dirname(mote_local_engine.__file__), 'lib'))")
bin=build/ops/test-backend-ops
g++ -O2 -std=c++17 -I "$src/ggml/include" "$src/tests/test-backend-ops.cpp" -o "$bin" \
    -L "$lib" -lmote_ggml -lmote_ggml-base -Wl,-rpath,"$lib" -lpthread
"$bin" perf -b CPU -o MUL_MAT -p 'type_a=(f16|bf16|q8_0|q4_K),type_b=f32,m=4096,n=(8|512),k=14336,'
"$bin" perf -b CPU -o MUL_MAT_ID -p 'type_a=(f16|q8_0|q4_K),type_b=f32,n_mats=128,n_used=8,.*n=(8|512),'
