// fc1's forward with SwiGLU x router probability in its epilogue (sm_90a).
//
// Unfused, fc1 writes h = x @ W1_e = [gate | up] ([rows, 2F], megatron's GLU layout) and a
// Triton kernel (monta/swiglu.py) reads it back to write y = silu(gate) * up * prob [rows, F].
// For the epilogue to compute y, a tile must hold the gate and the up columns of the same y
// columns. So here column tile n of the GEMM reads W1_e's columns
//     [n*T/2, (n+1)*T/2)  (gate)   and   [F + n*T/2, F + (n+1)*T/2)  (up)       (T: tile width)
// -- the weights stay as megatron stores them; only the B tile's two TMA boxes start elsewhere
// (GluPairedColumns) -- and the kernel's D, h as saved for the backward, comes out *paired*:
// each run of T columns is T/2 gate columns followed by the T/2 up columns of the same y
// columns. monta/swiglu.py's backward reads that layout and writes dh in megatron's.
//
// The epilogue (SwigluForwardNode) sees a tile's gate subtiles before its up subtiles (CUTLASS
// walks subtiles M-fastest, so all of the first half's columns come first), keeps the gate
// values in registers as the bf16 h stores them, and at each up value writes y's element with
// direct stores. Rounding is the unfused path's: y is computed from h rounded to bf16.
#pragma once

#include "sm90_swiglu_epilogue.cuh"

namespace monta {

using namespace cute;

// The builder's mainloop with B's column tiles paired as above (B N-major, [K, 2F] per group).
// load_init gives the producer B's tiles as TMA coordinates; here tile n's first T/2 columns
// map to coordinates n*T/2 + i and its last T/2 to F + n*T/2 + i. The TMA boxes are T/2 = 64
// columns wide (the 128-byte swizzle's span), so each box is one contiguous run of either half.
template <class Built>
struct GluPairedColumns : Built {
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL,
                                typename Built::Params const& params) const {
    using X = Underscore;
    using TileShape = typename Built::TileShape;
    constexpr int kHalf = size<1>(TileShape{}) / 2;
    auto inputs = Built::load_init(problem_shape_MNKL, params);
    auto [M, N, K, L] = problem_shape_MNKL;
    Tensor mB = params.tma_load_b.get_tma_tensor(make_shape(N, K, 1));  // (n,k,l)
    auto n_unit = get<0>(mB.stride());
    auto paired_n = make_layout(make_shape(Int<kHalf>{}, _2{}, N / (2 * kHalf)),
                                make_stride(n_unit, (N / 2) * n_unit, Int<kHalf>{} * n_unit));
    Tensor mB_paired = make_tensor(mB.data(), make_layout(paired_n, layout<1>(mB), layout<2>(mB)));
    Tensor gB = local_tile(mB_paired, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{});
    return cute::make_tuple(get<0>(inputs), gB);
  }
};

struct PairedGluColumns {
  template <class Mainloop>
  using apply = GluPairedColumns<Mainloop>;
};

struct SwigluForwardArguments {
  cutlass::bfloat16_t* y = nullptr;  // [rows, F]
  float const* probs = nullptr;      // [rows]
  int32_t const* ends = nullptr;     // the experts' cumulative row ends
  int ffn = 0;                       // F
};

// An epilogue visitor node whose child is the accumulator: passes it on (D = h) and writes y.
template <class CtaTileShapeMNK>
struct SwigluForwardNode : SourcelessNode<SwigluForwardArguments> {
  using Element = cutlass::bfloat16_t;
  static constexpr int kTileM = size<0>(CtaTileShapeMNK{});
  static constexpr int kTileN = size<1>(CtaTileShapeMNK{});
  static constexpr int kHalf = kTileN / 2;

  struct SharedStorage {};
  using Arguments = SwigluForwardArguments;
  using Params = Arguments;

  template <class ProblemShape>
  static bool can_implement(ProblemShape const&, Arguments const& args) {
    return args.y && args.probs && args.ends && args.ffn % kHalf == 0;
  }

  CUTLASS_HOST_DEVICE SwigluForwardNode() {}
  CUTLASS_HOST_DEVICE SwigluForwardNode(Params const& params, SharedStorage const&)
      : params(params) {}
  Params params;

  // Tensors are this thread's partition of the tile, (CPY,CPY_M,CPY_N,EPI_M,EPI_N): its
  // elements' coordinates in the tile and relative to the tile's first element, and per row
  // (stride 0 along N) the probability. Subtile (m, n + EPI_N/2) holds, element for element, the
  // up values of the gate values of subtile (m, n) (the same partition, T/2 columns on), so a
  // gate kept at its element's index is found again by the same thread at the same index.
  // Elements 2i and 2i + 1 are adjacent columns of one row (Hopper's accumulator layout).
  template <class TileCoords, class RowRegs, class ProbGmem, class CoordTensor, class Residue>
  struct ConsumerStoreCallbacks : cutlass::epilogue::fusion::detail::EmptyConsumerStoreCallbacks {
    static constexpr int kEpiM = decltype(size<3>(typename TileCoords::layout_type{}))::value;
    static constexpr int kEpiN = decltype(size<4>(typename TileCoords::layout_type{}))::value;
    static constexpr int kPerSubtile =
        decltype(size(typename TileCoords::layout_type{}))::value / (kEpiM * kEpiN);
    static_assert(kEpiN % 2 == 0, "a tile's gate and up columns must be whole subtiles");
    // the gate half's elements of this thread, as bf16 pairs
    static constexpr int kGatePairs = kEpiM * (kEpiN / 2) * kPerSubtile / 2;

    CUTLASS_DEVICE ConsumerStoreCallbacks(Element* y_tile, int ffn, TileCoords tile_coords,
                                          RowRegs prob, ProbGmem prob_gmem, CoordTensor coords,
                                          Residue residue)
        : y_tile(y_tile), ffn(ffn), tCcTile(tile_coords), tCrProb(prob), tCgProb(prob_gmem),
          tCcD(coords), residue(residue) {}

    Element* y_tile;  // y at the tile's first row and first y column
    int ffn;
    TileCoords tCcTile;
    RowRegs tCrProb;
    ProbGmem tCgProb;
    CoordTensor tCcD;
    Residue residue;
    cutlass::Array<uint32_t, kGatePairs> gates;

    CUTLASS_DEVICE void begin() { load_row_values(tCrProb, tCgProb, tCcD, residue); }

    template <typename ElementAccumulator, typename ElementInput, int FragmentSize>
    CUTLASS_DEVICE cutlass::Array<float, FragmentSize> visit(
        cutlass::Array<ElementAccumulator, FragmentSize> const&, int epi_v, int epi_m, int epi_n,
        cutlass::Array<ElementInput, FragmentSize> const& frg_input) {
      static_assert(FragmentSize % 2 == 0, "bf16 pairs need an even fragment");
      bool up_half = epi_n >= kEpiN / 2;
      int slot0 = ((epi_n % (kEpiN / 2)) * kEpiM + epi_m) * (kPerSubtile / 2);
      Tensor tile_coords = tCcTile(_, _, _, epi_m, epi_n);
      Tensor prob = tCrProb(_, _, _, epi_m, epi_n);
      Tensor coords = tCcD(_, _, _, epi_m, epi_n);
      cutlass::Array<float, FragmentSize> out;
      CUTLASS_PRAGMA_UNROLL
      for (int i = 0; i < FragmentSize; i += 2) {
        int j = epi_v * FragmentSize + i;
        Element h0 = Element(frg_input[i]), h1 = Element(frg_input[i + 1]);
        out[i] = float(frg_input[i]);
        out[i + 1] = float(frg_input[i + 1]);
        if (!up_half) {
          gates[slot0 + j / 2] = bf16_pair(h0, h1);
        } else if (elem_less(coords(j), residue)) {
          uint32_t g = gates[slot0 + j / 2];
          float p = prob(j);
          float g0 = bf16_low(g), g1 = bf16_high(g);
          Element y0 = Element(g0 * swiglu_sigmoid(g0) * float(h0) * p);
          Element y1 = Element(g1 * swiglu_sigmoid(g1) * float(h1) * p);
          int r = get<0>(tile_coords(j)), c = get<1>(tile_coords(j)) - kHalf;
          *reinterpret_cast<uint32_t*>(y_tile + static_cast<int64_t>(r) * ffn + c) =
              bf16_pair(y0, y1);
        }
      }
      return out;
    }
  };

  template <bool ReferenceSrc, class... Args>
  CUTLASS_DEVICE auto get_consumer_store_callbacks(
      cutlass::epilogue::fusion::detail::ConsumerStoreArgs<Args...> const& args) {
    auto [M, N, K, L] = args.problem_shape_mnkl;
    auto [m, n, k, l] = args.tile_coord_mnkl;
    int group = static_cast<int>(l);
    int64_t start = group == 0 ? 0 : params.ends[group - 1];
    int64_t m0 = static_cast<int64_t>(m) * kTileM;
    auto column = make_layout(make_shape(M, N, L), make_stride(_1{}, _0{}, _0{}));
    Tensor tile_coords = cutlass::epilogue::fusion::sm90_partition_for_epilogue<ReferenceSrc>(
        make_identity_tensor(take<0, 2>(args.tile_shape_mnk)), args.epi_tile, args.tiled_copy,
        args.thread_idx);
    Tensor prob_gmem = cutlass::epilogue::fusion::sm90_partition_for_epilogue<ReferenceSrc>(
        make_tensor(make_gmem_ptr(params.probs + start), column), args.tile_shape_mnk,
        args.tile_coord_mnkl, args.epi_tile, args.tiled_copy, args.thread_idx);
    Tensor prob = make_tensor_like<float>(prob_gmem);
    Element* y_tile = params.y + (start + m0) * params.ffn + static_cast<int64_t>(n) * kHalf;
    return ConsumerStoreCallbacks<decltype(tile_coords), decltype(prob), decltype(prob_gmem),
                                  decltype(args.tCcD), decltype(args.residue_tCcD)>(
        y_tile, params.ffn, tile_coords, prob, prob_gmem, args.tCcD, args.residue_tCcD);
  }
};

template <class TileShape, class ClusterShape, bool PingPong>
using SwigluFc1Gemm =
    GroupedGemm<TileShape, ClusterShape, PingPong, false, false,
                cutlass::epilogue::fusion::Sm90EVT<SwigluForwardNode<TileShape>,
                                                   cutlass::epilogue::fusion::Sm90AccFetch>,
                void, PairedGluColumns>;

// x [n, H] row-major, w1 [E, H, 2F] row-major (B_e = W1_e, N-major), h [n, 2F] (paired, see
// above), y [n, F], probs [n] fp32. dims: F and H (the GEMM's K).
template <class G>
int run_swiglu_fc1(const void* x, const void* w1, void* h, void* y, const float* probs,
                   const int32_t* ends, int groups, int ffn, int hidden, void* workspace,
                   int64_t workspace_size, cudaStream_t stream) {
  using E = typename G::Element;
  int width = 2 * ffn;
  auto stride_a = cutlass::make_cute_packed_stride(typename G::StrideA{}, {1, hidden, 1});
  auto stride_b = cutlass::make_cute_packed_stride(typename G::StrideB{}, {width, hidden, 1});
  auto stride_d = cutlass::make_cute_packed_stride(typename G::StrideD{}, {1, width, 1});
  typename G::FusionArguments thread{{}, {static_cast<E*>(y), probs, ends, ffn}};
  return launch<G>(
      workspace, workspace_size, groups, stream,
      [&](typename G::Arrays arrays) {
        fill_group_arrays<G, false><<<1, groups, 0, stream>>>(
            arrays, static_cast<const E*>(x), static_cast<const E*>(w1), static_cast<E*>(h),
            ends, groups, width, hidden, stride_a, stride_b, stride_d, width);
      },
      thread);
}

}  // namespace monta

#define MONTA_SWIGLU_FC1_INSTANCE(NAME, TM, TN, TK, CM, CN, PINGPONG)                           \
  using NAME##_t = monta::SwigluFc1Gemm<cute::Shape<cute::_##TM, cute::_##TN, cute::_##TK>,    \
                                        cute::Shape<cute::_##CM, cute::_##CN, cute::_1>,       \
                                        PINGPONG>;                                            \
  extern "C" int64_t NAME##_workspace(int groups) {                                           \
    return monta::workspace_bytes<NAME##_t>(groups);                                          \
  }                                                                                           \
  extern "C" int NAME##_run(const void* x, const void* w1, void* h, void* y, const float* probs, \
                            const int32_t* ends, int groups, int ffn, int hidden, void* ws,     \
                            int64_t ws_bytes, void* stream) {                                 \
    return monta::run_swiglu_fc1<NAME##_t>(x, w1, h, y, probs, ends, groups, ffn, hidden, ws,   \
                                           ws_bytes, static_cast<cudaStream_t>(stream));       \
  }
