// fc2's input gradient with SwiGLU x router probability's backward in its epilogue (Hopper, sm_90a).
//
// Unfused, the expert FFN's backward writes fc2's input gradient d = dout @ W2_e^T [rows, F] and
// a Triton kernel (monta/swiglu.py) reads it back with fc1's output h = [gate | up] to write
//     dh = [d*p*u*silu'(g) | d*p*silu(g)]   and   dp = sum over columns of d*silu(g)*u.
// Here that runs on the accumulator tile while it is in registers: on the ping-pong kernel
// the epilogue of one consumer warpgroup overlaps the other's mainloop, so the activation's
// pass over h costs loads hidden behind GEMM work instead of a kernel of its own, and d is never
// written. The GEMM is sm90_grouped_gemm.cuh's (same tiles, same device row ends); only the
// epilogue differs:
//   D (the kernel's TMA-stored output)  the gate half of dh: group g's rows at dh + start_g * 2F
//   this node's direct stores             the up half, F columns further
//   this node's fp32 atomics              dp, one per row and column tile (dp must start zeroed)
// Rounding is the unfused path's: d is rounded to bf16 before the activation's backward uses it.
#pragma once

#include "sm90_grouped_gemm.cuh"

namespace monta {

using namespace cute;

// An epilogue visitor node (CUTLASS's Sm90 EVT interface) whose child is the accumulator.
struct SwigluBackwardNode {
  using Element = cutlass::bfloat16_t;

  struct SharedStorage {};
  struct Arguments {
    Element const* h = nullptr;    // [rows, 2F]: fc1's output, gate | up
    Element* dh = nullptr;         // [rows, 2F]: this node writes the up half
    float const* probs = nullptr;  // [rows]
    float* dprobs = nullptr;       // [rows], zeroed before the GEMM
    int32_t const* ends = nullptr; // the experts' cumulative row ends
    int ffn = 0;                   // F
  };
  using Params = Arguments;

  template <class ProblemShape>
  static constexpr Params to_underlying_arguments(ProblemShape const&, Arguments const& args,
                                                  void*) {
    return args;
  }
  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.h && args.dh && args.probs && args.dprobs && args.ends && args.ffn % 8 == 0;
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

  CUTLASS_HOST_DEVICE SwigluBackwardNode() {}
  CUTLASS_HOST_DEVICE SwigluBackwardNode(Params const& params, SharedStorage const&)
      : params(params) {}
  Params params;

  CUTLASS_DEVICE bool is_producer_load_needed() const { return false; }
  CUTLASS_DEVICE bool is_C_load_needed() const { return false; }

  template <class... Args>
  CUTLASS_DEVICE auto get_producer_load_callbacks(
      cutlass::epilogue::fusion::detail::ProducerLoadArgs<Args...> const&) {
    return cutlass::epilogue::fusion::detail::EmptyProducerLoadCallbacks{};
  }

  // Tensors are this thread's partition of the tile, (CPY,CPY_M,CPY_N,EPI_M,EPI_N): the gate
  // half of h and the up half of dh element by element, and per row (stride 0 along N, so all
  // of a row's elements alias one register) the probability and the partial sum for dp.
  template <class GateTensor, class DupTensor, class RowRegs, class ProbGmem, class DprobGmem,
            class CoordTensor, class Residue>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::detail::EmptyConsumerStoreCallbacks {
    CUTLASS_DEVICE ConsumerStoreCallbacks(GateTensor gate, DupTensor dup, RowRegs prob,
                                          RowRegs dprob_partial, ProbGmem prob_gmem,
                                          DprobGmem dprob_gmem, CoordTensor coords,
                                          Residue residue, int ffn)
        : tCgGate(gate), tCgDup(dup), tCrProb(prob), tCrDprob(dprob_partial),
          tCgProb(prob_gmem), tCgDprob(dprob_gmem), tCcD(coords), residue(residue), ffn(ffn) {}

    GateTensor tCgGate;
    DupTensor tCgDup;
    RowRegs tCrProb;
    RowRegs tCrDprob;
    ProbGmem tCgProb;
    DprobGmem tCgDprob;
    CoordTensor tCcD;
    Residue residue;
    int ffn;

    CUTLASS_DEVICE void begin() {
      Tensor prob = filter_zeros(tCrProb);
      Tensor prob_gmem = filter_zeros(tCgProb);
      Tensor coords = filter_zeros(tCcD, tCgProb.stride());
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(prob); ++i) {
        prob(i) = elem_less(coords(i), residue) ? prob_gmem(i) : 0.0f;
      }
      fill(tCrDprob, 0.0f);
    }

    template <typename ElementAccumulator, typename ElementInput, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n,
        cutlass::Array<ElementInput, FragmentSize> const& frg_input) {
      Tensor gate = tCgGate(_, _, _, epi_m, epi_n);
      Tensor dup = tCgDup(_, _, _, epi_m, epi_n);
      Tensor prob = tCrProb(_, _, _, epi_m, epi_n);
      Tensor dprob = tCrDprob(_, _, _, epi_m, epi_n);
      Tensor coords = tCcD(_, _, _, epi_m, epi_n);
      cutlass::Array<float, FragmentSize> dgate;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; ++i) {
        int j = epi_v * FragmentSize + i;
        dgate[i] = 0.0f;
        if (elem_less(coords(j), residue)) {
          // d in bf16, as the unfused path stores it
          float d = float(Element(frg_input[i]));
          Element const* gate_ptr = &gate(j);
          float g = float(gate_ptr[0]);
          float u = float(gate_ptr[ffn]);
          float p = prob(j);
          float sig = 1.0f / (1.0f + __expf(-g));
          float silu = g * sig;
          dgate[i] = d * p * u * sig * (1.0f + g * (1.0f - sig));
          dup(j) = Element(d * p * silu);
          dprob(j) += d * silu * u;
        }
      }
      return dgate;
    }

    CUTLASS_DEVICE void end() {
      // The four lanes of a quad hold the same rows (Hopper's accumulator layout: lane / 4 is
      // the row, lane % 4 the column pair), so a quad's sum is a row's sum over this tile.
      Tensor partial = filter_zeros(tCrDprob);
      Tensor dprob_gmem = filter_zeros(tCgDprob);
      Tensor coords = filter_zeros(tCcD, tCgDprob.stride());
      bool first_of_quad = (threadIdx.x & 3) == 0;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < size(partial); ++i) {
        float v = partial(i);
        v += __shfl_xor_sync(0xffffffff, v, 1);
        v += __shfl_xor_sync(0xffffffff, v, 2);
        if (first_of_quad && elem_less(coords(i), residue)) atomicAdd(&dprob_gmem(i), v);
      }
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(
      cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    int group = static_cast<int>(get<3>(args.tile_coord_mnkl));
    int64_t start = group == 0 ? 0 : params.ends[group - 1];
    int64_t ld = 2 * static_cast<int64_t>(params.ffn);
    auto matrix = make_layout(make_shape(M, N, L), make_stride(ld, _1{}, _0{}));
    auto column = make_layout(make_shape(M, N, L), make_stride(_1{}, _0{}, _0{}));
    auto partition = [&](auto tensor) {
      return cutlass::epilogue::fusion::sm90_partition_for_epilogue<ReferenceSrc>(
          tensor, args.tile_shape_mnk, args.tile_coord_mnkl, args.epi_tile, args.tiled_copy,
          args.thread_idx);
    };
    Tensor gate = partition(make_tensor(make_gmem_ptr(params.h + start * ld), matrix));
    Tensor dup = partition(make_tensor(make_gmem_ptr(params.dh + start * ld + params.ffn), matrix));
    Tensor prob_gmem = partition(make_tensor(make_gmem_ptr(params.probs + start), column));
    Tensor dprob_gmem = partition(make_tensor(make_gmem_ptr(params.dprobs + start), column));
    Tensor prob = make_tensor_like<float>(prob_gmem);
    Tensor dprob_partial = make_tensor_like<float>(prob_gmem);
    return ConsumerStoreCallbacks<decltype(gate), decltype(dup), decltype(prob),
                                  decltype(prob_gmem), decltype(dprob_gmem), decltype(args.tCcD),
                                  decltype(args.residue_tCcD)>(
        gate, dup, prob, dprob_partial, prob_gmem, dprob_gmem, args.tCcD, args.residue_tCcD,
        params.ffn);
  }
};

template <class TileShape, class ClusterShape, bool PingPong>
using SwigluDgradGemm =
    GroupedGemm<TileShape, ClusterShape, PingPong, false, true,
                cutlass::epilogue::fusion::Sm90EVT<SwigluBackwardNode,
                                                   cutlass::epilogue::fusion::Sm90AccFetch>,
                void>;

// dout [n, H] row-major, w2 [E, F, H] (B_e = W2_e^T, column-major), h and dh [n, 2F], probs and
// dprobs [n] fp32 (dprobs zeroed). dims: F (the GEMM's N) and H (its K).
template <class G>
int run_swiglu_dgrad(const void* dout, const void* w2, const void* h, void* dh, const float* probs,
                     float* dprobs, const int32_t* ends, int groups, int ffn, int hidden,
                     void* workspace, int64_t workspace_size, cudaStream_t stream) {
  using E = typename G::Element;
  auto stride_a = cutlass::make_cute_packed_stride(typename G::StrideA{}, {1, hidden, 1});
  auto stride_b = cutlass::make_cute_packed_stride(typename G::StrideB{}, {ffn, hidden, 1});
  auto stride_d = cutlass::make_cute_packed_stride(typename G::StrideD{}, {1, 2 * ffn, 1});
  typename G::FusionArguments thread{
      {}, {static_cast<const E*>(h), static_cast<E*>(dh), probs, dprobs, ends, ffn}};
  return launch<G>(
      workspace, workspace_size, groups, stream,
      [&](typename G::Arrays arrays) {
        fill_group_arrays<G, false><<<1, groups, 0, stream>>>(
            arrays, static_cast<const E*>(dout), static_cast<const E*>(w2), static_cast<E*>(dh),
            ends, groups, ffn, hidden, stride_a, stride_b, stride_d, 2 * static_cast<int64_t>(ffn));
      },
      thread);
}

}  // namespace monta

#define MONTA_SWIGLU_DGRAD_INSTANCE(NAME, TM, TN, TK, CM, CN, PINGPONG)                         \
  using NAME##_t = monta::SwigluDgradGemm<cute::Shape<cute::_##TM, cute::_##TN, cute::_##TK>,  \
                                          cute::Shape<cute::_##CM, cute::_##CN, cute::_1>,     \
                                          PINGPONG>;                                          \
  extern "C" int64_t NAME##_workspace(int groups) {                                           \
    return monta::workspace_bytes<NAME##_t>(groups);                                          \
  }                                                                                           \
  extern "C" int NAME##_run(const void* dout, const void* w2, const void* h, void* dh,         \
                            const float* probs, float* dprobs, const int32_t* ends, int groups, \
                            int ffn, int hidden, void* ws, int64_t ws_bytes, void* stream) {    \
    return monta::run_swiglu_dgrad<NAME##_t>(dout, w2, h, dh, probs, dprobs, ends, groups, ffn, \
                                             hidden, ws, ws_bytes,                            \
                                             static_cast<cudaStream_t>(stream));              \
  }
