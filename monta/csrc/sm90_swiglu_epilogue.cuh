// What the SwiGLU epilogue nodes share (sm90_swiglu_dgrad.cuh, sm90_swiglu_fc1.cuh): the parts
// of CUTLASS's Sm90 epilogue-visitor interface that a node reading no source tensor and needing
// no workspace defines the same way, and the per-element arithmetic.
#pragma once

#include "sm90_grouped_gemm.cuh"

namespace monta {

using namespace cute;

// A visitor node whose Params are its Arguments, with no workspace and no producer loads.
template <class Arguments>
struct SourcelessNode {
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return args;
  }
  template <class ProblemShape>
  static size_t get_workspace_size(ProblemShape const&, Arguments const&) {
    return 0;
  }
  template <class ProblemShape>
  static cutlass::Status initialize_workspace(ProblemShape const&, Arguments const&, void*,
                                              cudaStream_t, cutlass::CudaHostAdapter* = nullptr) {
    return cutlass::Status::kSuccess;
  }

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(
      cutlass::epilogue::fusion::detail::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::detail::EmptyProducerLoadCallbacks{};
  }
};

// sigmoid(g) = (1 + tanh(g/2)) / 2 with the hardware's tanh: one special-function op where
// exp and a division take two (its ~2^-11 relative error is below the bf16 outputs')
CUTLASS_DEVICE float swiglu_sigmoid(float g) {
  float t;
  asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(0.5f * g));
  return 0.5f + 0.5f * t;
}

// Two bf16 values of adjacent columns in one 32-bit word, and back to fp32.
CUTLASS_DEVICE float bf16_low(uint32_t pair) { return __uint_as_float(pair << 16); }
CUTLASS_DEVICE float bf16_high(uint32_t pair) { return __uint_as_float(pair & 0xffff0000u); }
CUTLASS_DEVICE uint32_t bf16_pair(cutlass::bfloat16_t low, cutlass::bfloat16_t high) {
  return uint32_t(low.raw()) | (uint32_t(high.raw()) << 16);
}

// A per-row value (stride 0 along N in this thread's partition, so a row's elements alias one
// register) loaded for the rows inside the problem, zero elsewhere.
template <class RowRegs, class RowGmem, class CoordTensor, class Residue>
CUTLASS_DEVICE void load_row_values(RowRegs& regs, RowGmem const& gmem, CoordTensor const& coords,
                                    Residue const& residue) {
  Tensor values = filter_zeros(regs);
  Tensor from = filter_zeros(gmem);
  Tensor at = filter_zeros(coords, gmem.stride());
  CUTLASS_PRAGMA_UNROLL
  for (int i = 0; i < size(values); ++i) {
    values(i) = elem_less(at(i), residue) ? from(i) : 0.0f;
  }
}

}  // namespace monta
