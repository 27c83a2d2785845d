// Output shapes of cpu_kernels.c's ops, for graphs compiled with a dynamic token axis (one graph for every step
// size instead of one per padded size). MindSpore's Custom "aot" ops take a C++ shape function named
// <op>InferShape when the op is defined with out_shape=None; it must return a std::vector, so this file is C++.
#include <cstdint>
#include <vector>

namespace {
// x (..., K) with weight w: (N, K), panels (P, K, NR) or AMX (2, Np / 16, K / 2, 16) -> (..., N)
std::vector<int64_t> linear_shape(const int *ndims, int64_t **shapes) {
    std::vector<int64_t> out(shapes[0], shapes[0] + ndims[0]);
    const int64_t *w = shapes[1];
    out.back() = ndims[1] == 2 ? w[0] : ndims[1] == 3 ? w[0] * w[2] : w[1] * 16;
    return out;
}

// x (..., K) with int8 panels and scales s (N,) -> (..., N)
std::vector<int64_t> linear_q8_shape(const int *ndims, int64_t **shapes, int scale) {
    std::vector<int64_t> out(shapes[0], shapes[0] + ndims[0]);
    out.back() = shapes[scale][0];
    return out;
}
}  // namespace

extern "C" {
std::vector<int64_t> LinearInferShape(int *ndims, int64_t **shapes, void *) { return linear_shape(ndims, shapes); }
std::vector<int64_t> LinearGeluInferShape(int *ndims, int64_t **shapes, void *) { return linear_shape(ndims, shapes); }
std::vector<int64_t> LinearAddInferShape(int *ndims, int64_t **shapes, void *) { return linear_shape(ndims, shapes); }
// (x, g, b, eps, w ...): layer norm, then Linear
std::vector<int64_t> LnLinearInferShape(int *ndims, int64_t **shapes, void *) {
    const int nd[2] = {ndims[0], ndims[4]};
    int64_t *sh[2] = {shapes[0], shapes[4]};
    return linear_shape(nd, sh);
}
std::vector<int64_t> LnLinearGeluInferShape(int *ndims, int64_t **shapes, void *) {
    return LnLinearInferShape(ndims, shapes, nullptr);
}
// (x, wq, s ...) and (x, g, b, eps, wq, s ...)
std::vector<int64_t> LinearQ8InferShape(int *ndims, int64_t **shapes, void *) {
    return linear_q8_shape(ndims, shapes, 2);
}
std::vector<int64_t> LinearQ8GeluInferShape(int *ndims, int64_t **shapes, void *) {
    return linear_q8_shape(ndims, shapes, 2);
}
std::vector<int64_t> LinearQ8AddInferShape(int *ndims, int64_t **shapes, void *) {
    return linear_q8_shape(ndims, shapes, 2);
}
std::vector<int64_t> LnLinearQ8InferShape(int *ndims, int64_t **shapes, void *) {
    return linear_q8_shape(ndims, shapes, 5);
}
std::vector<int64_t> LnLinearQ8GeluInferShape(int *ndims, int64_t **shapes, void *) {
    return linear_q8_shape(ndims, shapes, 5);
}
// Block: (x (B, T, d), the layer's norms, weights and caches) -> x's shape
std::vector<int64_t> BlockInferShape(int *ndims, int64_t **shapes, void *) {
    return std::vector<int64_t>(shapes[0], shapes[0] + ndims[0]);
}
// qkv (B, T, 3d) -> (B, T, d)
std::vector<int64_t> CachedAttentionInferShape(int *ndims, int64_t **shapes, void *) {
    std::vector<int64_t> out(shapes[0], shapes[0] + ndims[0]);
    if (out.back() > 0) out.back() /= 3;
    return out;
}
}
