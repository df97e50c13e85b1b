// mote-moe-matmul.cpp — the grouped expert matmul behind mote-moe-matmul.h, inside ggml-cpu.
//
// Compiled into every ggml-cpu target, so it takes that target's ISA (GGML_NATIVE, or each variant of
// GGML_CPU_ALL_VARIANTS, chosen at load time as ggml does) and reaches llamafile_sgemm of the same target.
#include "mote-moe-matmul.h"

#include "ggml-cpu-impl.h"
#include "ggml-cpu.h"
#include "ggml.h"

#if defined(GGML_USE_LLAMAFILE)
#include "llamafile/sgemm.h"
#endif

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace {

std::atomic<int64_t> g_experts{0};
std::atomic<int64_t> g_rows{0};

// Below this many rows an expert's matmul is a few matrix-vector products: the stock vec_dot path reads
// each weight row once as well, and keeps decode bit-identical to stock llama.cpp (bench/RESULTS.md,
// "The experts' matmul, grouped").
constexpr int64_t DEFAULT_MIN_ROWS = 4;

// MOTE_MOE_GEMM=0 turns the grouped path off; MOTE_MOE_GEMM_MIN_ROWS moves its threshold (tests, tuning).
// Read once: every op of the process sees the same setting, the planner's and the compute's sizes agree.
bool enabled() {
    static const bool on = [] {
        const char * env = std::getenv("MOTE_MOE_GEMM");
        return env == nullptr || std::atoi(env) != 0;
    }();
    return on;
}

int64_t min_rows() {
    static const int64_t rows = [] {
        const char * env = std::getenv("MOTE_MOE_GEMM_MIN_ROWS");
        const long long v = env ? std::atoll(env) : 0;
        return v >= 2 ? (int64_t) v : DEFAULT_MIN_ROWS;  // llamafile_sgemm needs two columns
    }();
    return rows;
}

// the weight types whose vec_dot_type llamafile_sgemm multiplies (others keep their own paths)
bool grouped_type(ggml_type type) {
    switch (type) {
        case GGML_TYPE_F32:
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
        case GGML_TYPE_Q8_0:
            return true;
        default:
            return false;
    }
}

bool takes(const ggml_tensor * dst) {
#if defined(GGML_USE_LLAMAFILE)
    return enabled() && dst->op == GGML_OP_MUL_MAT_ID && dst->type == GGML_TYPE_F32 &&
           grouped_type(dst->src[0]->type);
#else
    (void) dst;
    return false;
#endif
}

ggml_type vec_dot_type_of(const ggml_tensor * dst) {
    return ggml_get_type_traits_cpu(dst->src[0]->type)->vec_dot_type;
}

// an expert holds at most one row per token (top-k picks distinct experts), so scratch is sized for
// src1->ne[2] rows; an expert with more rows (repeated ids) goes to the stock path
int64_t row_capacity(const ggml_tensor * dst) { return dst->src[1]->ne[2]; }

size_t gathered_bytes(const ggml_tensor * dst) {
    return GGML_PAD(ggml_row_size(vec_dot_type_of(dst), dst->src[1]->ne[0]) * row_capacity(dst), 64);
}

} // namespace

extern "C" size_t mote_moe_gemm_wdata_size(const ggml_tensor * dst) {
    if (!takes(dst)) {
        return 0;
    }
    return gathered_bytes(dst) + sizeof(float) * dst->src[0]->ne[1] * row_capacity(dst);
}

extern "C" bool mote_moe_gemm_expert(const ggml_compute_params * params, ggml_tensor * dst,
                                     int64_t expert, int64_t n_rows, const int32_t * rows,
                                     const void * src1_rows, char * scratch) {
#if defined(GGML_USE_LLAMAFILE)
    if (!takes(dst) || params->use_ref || n_rows < min_rows() || n_rows > row_capacity(dst)) {
        return false;
    }
    const ggml_tensor * src0 = dst->src[0];
    const ggml_tensor * src1 = dst->src[1];
    const ggml_type vec_dot_type = vec_dot_type_of(dst);
    const size_t row_size = ggml_row_size(vec_dot_type, src1->ne[0]);
    const bool converted = src1->type != vec_dot_type;  // then src1_rows is ggml-cpu's packed copy
    const int64_t ne11 = src1->ne[1];
    const int64_t m = src0->ne[1];

    char * gathered = scratch;
    float * product = (float *) (scratch + gathered_bytes(dst));

    // gather: row j of the block is token rows[2j+1]'s input for slot rows[2j]
    for (int64_t j = params->ith; j < n_rows; j += params->nth) {
        const int64_t i11 = rows[2 * j] % ne11;
        const int64_t i12 = rows[2 * j + 1];
        const char * src = converted
            ? (const char *) src1_rows + (i11 + i12 * ne11) * row_size
            : (const char *) src1_rows + i11 * src1->nb[1] + i12 * src1->nb[2];
        std::memcpy(gathered + j * row_size, src, row_size);
    }
    ggml_barrier(params->threadpool);

    // product[j][i] = dot(weight row i, gathered row j); every thread takes its share
    if (!llamafile_sgemm(params, m, n_rows, src0->ne[0] / ggml_blck_size(src0->type),
                         (const char *) src0->data + expert * src0->nb[2], src0->nb[1] / ggml_type_size(src0->type),
                         gathered, row_size / ggml_type_size(vec_dot_type),
                         product, m, src0->type, vec_dot_type, GGML_TYPE_F32)) {
        return false;  // a shape sgemm does not tile (decided before it reads or writes anything)
    }
    ggml_barrier(params->threadpool);

    // scatter: dst[token][slot] = product row j
    for (int64_t j = params->ith; j < n_rows; j += params->nth) {
        char * out = (char *) dst->data + rows[2 * j] * dst->nb[1] + rows[2 * j + 1] * dst->nb[2];
        std::memcpy(out, product + j * m, sizeof(float) * m);
    }
    if (params->ith == 0) {
        g_experts.fetch_add(1, std::memory_order_relaxed);
        g_rows.fetch_add(n_rows, std::memory_order_relaxed);
    }
    return true;
#else
    (void) params; (void) dst; (void) expert; (void) n_rows; (void) rows; (void) src1_rows; (void) scratch;
    return false;
#endif
}

extern "C" void mote_moe_gemm_counts(int64_t * experts, int64_t * rows) {
    *experts = g_experts.load(std::memory_order_relaxed);
    *rows = g_rows.load(std::memory_order_relaxed);
}
