// mote-moe-matmul.h — the experts' matmul (MUL_MAT_ID) as one tiled GEMM per expert, inside ggml-cpu.
//
// Stock ggml-cpu runs MUL_MAT_ID for Q8_0, BF16, F16 and F32 weights as one vec_dot per (weight row, token).
// Here each expert's tokens are gathered into a contiguous block, multiplied by llamafile_sgemm (the tiled
// kernels dense MUL_MAT already uses, for the ISA ggml-cpu was compiled for) and scattered back into dst.
// Experts with fewer routed rows than MOTE_MOE_GEMM_MIN_ROWS (decode) keep the stock path; MOTE_MOE_GEMM=0
// turns the whole path off, which leaves ggml-cpu's results bit-identical to stock llama.cpp.
#pragma once

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;
struct ggml_tensor;

// bytes of the work buffer the grouped path needs for the MUL_MAT_ID node dst (0: it never runs for dst)
size_t mote_moe_gemm_wdata_size(const struct ggml_tensor * dst);

// Computes expert `expert` of the MUL_MAT_ID node dst if the grouped path takes it, and returns true; false
// leaves the expert to the stock path. Every thread of the op calls it with the same arguments and gets the
// same answer. rows: the expert's n_rows (expert slot, token) int32 pairs; src1_rows: src1 in vec_dot_type
// (ggml-cpu's converted copy in wdata, or src1 itself when no conversion was needed); scratch: the
// mote_moe_gemm_wdata_size(dst) bytes reserved for it in wdata, 64-byte aligned.
bool mote_moe_gemm_expert(const struct ggml_compute_params * params, struct ggml_tensor * dst,
                          int64_t expert, int64_t n_rows, const int32_t * rows,
                          const void * src1_rows, char * scratch);

// experts and rows the grouped path computed in this process (tests and benchmarks: did it run, how much)
void mote_moe_gemm_counts(int64_t * experts, int64_t * rows);

#ifdef __cplusplus
}
#endif
