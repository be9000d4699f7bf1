// fc2's input gradient with SwiGLU x router probability's backward in its epilogue (sm_90a).
//
// Unfused, the expert FFN's backward writes fc2's input gradient d = dout @ W2_e^T [rows, F] and
// a Triton kernel (monta/swiglu.py) reads it back with fc1's output h = [gate | up] to write
//     dh = [d*p*u*silu'(g) | d*p*silu(g)]   and   dp = sum over columns of d*silu(g)*u.
// Here that runs on the accumulator tile while it is in registers, so d is never written and
// the activation's pass over h is no kernel of its own. The GEMM is sm90_grouped_gemm.cuh's
// (same tiles, same device row ends); only the epilogue differs:
//   D (the kernel's TMA-stored output)  the gate half of dh: group g's rows at dh + start_g * 2F
//   this node's direct stores             the up half, F columns further
//   this node's fp32 atomics              dp, one per row and column tile (dp must start zeroed)
// The tile's gate and up values of h arrive by cp.async into shared memory at the epilogue's
// start, one group per column block of subtiles, and the sigmoid comes from tanh.approx: with
// an IEEE division the kernel took 1.00 ms against the plain GEMM's 0.54 at the fine-grained
// shapes (with exp and a fast division 0.73 ms); the loads of h and the arithmetic then each
// added ~0.1 ms, and the column-block staging with tanh.approx made it 0.66 ms (scratch builds
// on an H200; docs/gpu_tier.md). It is opt-in (MONTA_FUSED_SWIGLU=bwd, monta/swiglu_gemm.py):
// the stage is faster, the FFN back to back is not.
// Rounding is the unfused path's: d is rounded to bf16 before the activation's backward uses it.
#pragma once

#include "sm90_swiglu_epilogue.cuh"

namespace monta {

using namespace cute;

struct SwigluBackwardArguments {
  cutlass::bfloat16_t const* h = nullptr;  // [rows, 2F]: fc1's output, gate | up
  cutlass::bfloat16_t* dh = nullptr;       // [rows, 2F]: this node writes the up half
  float const* probs = nullptr;            // [rows]
  float* dprobs = nullptr;                 // [rows], zeroed before the GEMM
  int32_t const* ends = nullptr;           // the experts' cumulative row ends
  int ffn = 0;                             // F
};

// An epilogue visitor node (CUTLASS's Sm90 EVT interface) whose child is the accumulator.
template <class CtaTileShapeMNK>
struct SwigluBackwardNode : SourcelessNode<SwigluBackwardArguments> {
  using Element = cutlass::bfloat16_t;
  static constexpr int kTileM = size<0>(CtaTileShapeMNK{});
  static constexpr int kTileN = size<1>(CtaTileShapeMNK{});
  // +16 bytes per row: the 8 rows a warp reads at once then start in 8 different bank quads
  static constexpr int kPitch = kTileN + 8;
  static constexpr int kThreads = cutlass::NumThreadsPerWarpGroup;

  struct SharedStorage {
    alignas(128) Element gate[kTileM * kPitch];
    alignas(128) Element up[kTileM * kPitch];
  };
  using Arguments = SwigluBackwardArguments;
  using Params = Arguments;

  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.h && args.dh && args.probs && args.dprobs && args.ends && args.ffn % 8 == 0;
  }

  CUTLASS_HOST_DEVICE SwigluBackwardNode() {}
  CUTLASS_HOST_DEVICE SwigluBackwardNode(Params const& params, SharedStorage const& shared)
      : params(params), smem(const_cast<SharedStorage*>(&shared)) {}
  Params params;
  SharedStorage* smem = nullptr;

  // Tensors are this thread's partition of the tile, (CPY,CPY_M,CPY_N,EPI_M,EPI_N): its
  // elements' coordinates in the tile and relative to its first element, the up half of dh,
  // and per row (stride 0 along N, so all of a row's elements alias one register) the
  // probability and the partial sum for dp. Elements 2i and 2i + 1 are adjacent columns of one
  // row (Hopper's accumulator layout), so h and dh move as bf16 pairs.
  template <class TileCoords, class DupTensor, class RowRegs, class ProbGmem, class DprobGmem,
            class CoordTensor, class Residue>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::detail::EmptyConsumerStoreCallbacks {
    static constexpr int kEpiN = decltype(size<4>(typename TileCoords::layout_type{}))::value;
    static constexpr int kBlockN = kTileN / kEpiN;
    CUTLASS_DEVICE ConsumerStoreCallbacks(Element const* h_tile, int64_t ld, int rows, int cols,
                                          SharedStorage* smem, int thread_idx,
                                          TileCoords tile_coords, DupTensor dup, RowRegs prob,
                                          RowRegs dprob_partial, ProbGmem prob_gmem,
                                          DprobGmem dprob_gmem, CoordTensor coords,
                                          Residue residue, int ffn)
        : h_tile(h_tile), ld(ld), rows(rows), cols(cols), smem(smem), thread_idx(thread_idx),
          tCcTile(tile_coords), tCgDup(dup), tCrProb(prob), tCrDprob(dprob_partial),
          tCgProb(prob_gmem), tCgDprob(dprob_gmem), tCcD(coords), residue(residue), ffn(ffn) {}

    Element const* h_tile;  // h at the tile's first row and column
    int64_t ld;
    int rows, cols;         // of the tile inside the group's problem
    SharedStorage* smem;
    int thread_idx;
    TileCoords tCcTile;
    DupTensor tCgDup;
    RowRegs tCrProb;
    RowRegs tCrDprob;
    ProbGmem tCgProb;
    DprobGmem tCgDprob;
    CoordTensor tCcD;
    Residue residue;
    int ffn;

    static CUTLASS_DEVICE void copy_async(Element* to, Element const* from) {
      uint32_t address = cute::cast_smem_ptr_to_uint(to);
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(from));
    }

    // The tile's h into shared memory by column blocks of one subtile's width, each block one
    // cp.async group, so the first subtiles wait for their block only; 16-byte chunks, a row's
    // chunks on consecutive threads. Rows and columns outside the problem are not read (visit()
    // never uses them).
    CUTLASS_DEVICE void begin() {
      constexpr int kChunksPerRow = kBlockN / 8;
      CUTLASS_PRAGMA_UNROLL
      for (int block = 0; block < kEpiN; ++block) {
        CUTLASS_PRAGMA_UNROLL
        for (int c = thread_idx; c < kTileM * kChunksPerRow; c += kThreads) {
          int r = c / kChunksPerRow, col = block * kBlockN + (c % kChunksPerRow) * 8;
          if (r < rows && col < cols) {  // F is a multiple of 8: a chunk is in or out whole
            Element const* from = h_tile + r * ld + col;
            copy_async(smem->gate + r * kPitch + col, from);
            copy_async(smem->up + r * kPitch + col, from + ffn);
          }
        }
        asm volatile("cp.async.commit_group;\n" ::);
      }
      load_row_values(tCrProb, tCgProb, tCcD, residue);
      fill(tCrDprob, 0.0f);
    }

    // Subtiles go M-fastest: at a column block's first one, wait for that block's copies (the
    // groups complete in order), then for every thread's (the warpgroup's barrier).
    CUTLASS_DEVICE void begin_loop(int epi_m, int epi_n) {
      if (epi_m != 0) return;
      wait_for_block(epi_n, cute::make_int_sequence<kEpiN>{});
      cutlass::arch::NamedBarrier::sync(kThreads,
                                        cutlass::arch::ReservedNamedBarriers::EpilogueBarrier);
    }

    template <int InFlight>
    static CUTLASS_DEVICE void wait_group() {
      asm volatile("cp.async.wait_group %0;\n" ::"n"(InFlight) : "memory");
    }

    // cp.async.wait_group takes a constant (the groups still allowed in flight): one branch
    // per block
    template <int... Blocks>
    static CUTLASS_DEVICE void wait_for_block(int block, cute::int_sequence<Blocks...>) {
      ((block == Blocks ? wait_group<kEpiN - 1 - Blocks>() : void()), ...);
    }

    template <typename ElementAccumulator, typename ElementInput, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n,
        cutlass::Array<ElementInput, FragmentSize> const& frg_input) {
      static_assert(FragmentSize % 2 == 0, "bf16 pairs need an even fragment");
      Tensor tile_coords = tCcTile(_, _, _, epi_m, epi_n);
      Tensor dup = tCgDup(_, _, _, epi_m, epi_n);
      Tensor prob = tCrProb(_, _, _, epi_m, epi_n);
      Tensor dprob = tCrDprob(_, _, _, epi_m, epi_n);
      Tensor coords = tCcD(_, _, _, epi_m, epi_n);
      cutlass::Array<float, FragmentSize> dgate;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; i += 2) {
        int j = epi_v * FragmentSize + i;
        bool inside = elem_less(coords(j), residue);  // both elements of the pair (F is even)
        int at = get<0>(tile_coords(j)) * kPitch + get<1>(tile_coords(j));
        uint32_t gates = inside ? *reinterpret_cast<uint32_t const*>(smem->gate + at) : 0u;
        uint32_t ups = inside ? *reinterpret_cast<uint32_t const*>(smem->up + at) : 0u;
        float p = prob(j);  // one row
        float du[2];
        CUTLASS_PRAGMA_UNROLL
        for (int k = 0; k < 2; ++k) {
          float d = float(Element(frg_input[i + k]));  // d in bf16, as the unfused path stores it
          float g = k ? bf16_high(gates) : bf16_low(gates);
          float u = k ? bf16_high(ups) : bf16_low(ups);
          float sig = swiglu_sigmoid(g);
          float silu = g * sig;
          dgate[i + k] = d * p * u * sig * (1.0f + g * (1.0f - sig));
          du[k] = d * p * silu;
          dprob(j + k) += d * silu * u;
        }
        if (inside) {
          *reinterpret_cast<uint32_t*>(&dup(j)) = bf16_pair(Element(du[0]), Element(du[1]));
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
    static_assert(decltype(size(args.tiled_copy))::value == kThreads,
                  "one warpgroup runs a tile's epilogue");
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto [m, n, k, l] = args.tile_coord_mnkl;
    int group = static_cast<int>(l);
    int64_t start = group == 0 ? 0 : params.ends[group - 1];
    int64_t ld = 2 * static_cast<int64_t>(params.ffn);
    int m0 = static_cast<int>(m) * kTileM, n0 = static_cast<int>(n) * kTileN;
    auto matrix = make_layout(make_shape(M, N, L), make_stride(ld, _1{}, _0{}));
    auto column = make_layout(make_shape(M, N, L), make_stride(_1{}, _0{}, _0{}));
    auto partition = [&](auto tensor) {
      return cutlass::epilogue::fusion::sm90_partition_for_epilogue<ReferenceSrc>(
          tensor, args.tile_shape_mnk, args.tile_coord_mnkl, args.epi_tile, args.tiled_copy,
          args.thread_idx);
    };
    Tensor tile_coords = cutlass::epilogue::fusion::sm90_partition_for_epilogue<ReferenceSrc>(
        make_identity_tensor(take<0, 2>(args.tile_shape_mnk)), args.epi_tile, args.tiled_copy,
        args.thread_idx);
    Tensor dup = partition(make_tensor(make_gmem_ptr(params.dh + start * ld + params.ffn), matrix));
    Tensor prob_gmem = partition(make_tensor(make_gmem_ptr(params.probs + start), column));
    Tensor dprob_gmem = partition(make_tensor(make_gmem_ptr(params.dprobs + start), column));
    Tensor prob = make_tensor_like<float>(prob_gmem);
    Tensor dprob_partial = make_tensor_like<float>(prob_gmem);
    return ConsumerStoreCallbacks<decltype(tile_coords), decltype(dup), decltype(prob),
                                  decltype(prob_gmem), decltype(dprob_gmem), decltype(args.tCcD),
                                  decltype(args.residue_tCcD)>(
        params.h + (start + m0) * ld + n0, ld, static_cast<int>(M) - m0,
        static_cast<int>(N) - n0, smem, args.thread_idx, tile_coords, dup, prob, dprob_partial,
        prob_gmem, dprob_gmem, args.tCcD, args.residue_tCcD, params.ffn);
  }
};

template <class TileShape, class ClusterShape, bool PingPong>
using SwigluDgradGemm =
    GroupedGemm<TileShape, ClusterShape, PingPong, false, true,
                cutlass::epilogue::fusion::Sm90EVT<SwigluBackwardNode<TileShape>,
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
