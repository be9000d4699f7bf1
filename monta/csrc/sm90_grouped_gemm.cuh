// Hopper (sm_90a) bf16 grouped GEMM for MoE experts, built on CUTLASS 3.x collectives.
//
// Why our own next to torch._grouped_mm: torch builds one CUTLASS kernel with 2x1 clusters of
// 128x256 tiles, so each expert pays for its rows rounded up to 256; with fine-grained experts
// (~770 rows each) about half of them pay for 1024. Here the tile and cluster shape are template
// parameters, so a config whose row granularity is 128 (cluster 1x2 multicasts A along N instead
// of B along M) or 64 (ping-pong 64-row tiles) can be picked per GEMM (monta/expert_gemm.py says
// which is the default and what it measured).
//
// Two kinds of call, both with the experts' cumulative row ends `ends` read on the device (so no
// host sync):
//   rows   (forward, input gradient)  D[rows_g] = A[rows_g] @ B_g   A [n, K] row-major, B_g [K, N]
//                                                                    row- or column-major
//   wgrad  (weight gradient)          D_g = X[rows_g]^T @ Y[rows_g]  X [n, M], Y [n, N] row-major,
//                                                                    D [G, M, N] row-major
// In the weight gradient the rows are the reduction: CUTLASS sees A = X^T column-major.
#pragma once

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace monta {

using namespace cute;

// The builder's mainloop as it is; sm90_swiglu_fc1.cuh passes one that reads B differently.
struct BuiltMainloop {
  template <class Mainloop>
  using apply = Mainloop;
};

// Fusion: the epilogue (D = accumulator by default; sm90_swiglu_dgrad.cuh and
// sm90_swiglu_fc1.cuh pass their own visitor trees); ElementC: the source operand's type, void
// for an epilogue that reads none; MainloopAdapter::apply<M>: the mainloop run in place of the
// builder's M.
template <class TileShape, class ClusterShape, bool PingPong, bool AColumnMajor, bool BColumnMajor,
          class Fusion = cutlass::epilogue::fusion::LinearCombination<cutlass::bfloat16_t, float>,
          class ElementC = cutlass::bfloat16_t, class MainloopAdapter = BuiltMainloop>
struct GroupedGemm {
  using Element = cutlass::bfloat16_t;
  using Accumulator = float;
  static constexpr bool kHasSource = !cute::is_void_v<ElementC>;
  using LayoutA = cute::conditional_t<AColumnMajor, cutlass::layout::ColumnMajor,
                                      cutlass::layout::RowMajor>;
  using LayoutB = cute::conditional_t<BColumnMajor, cutlass::layout::ColumnMajor,
                                      cutlass::layout::RowMajor>;
  using LayoutD = cutlass::layout::RowMajor;
  static constexpr int kAlignment = 16 / sizeof(Element);
  using ProblemShape = cutlass::gemm::GroupProblemShape<Shape<int, int, int>>;
  using MainloopSchedule =
      cute::conditional_t<PingPong, cutlass::gemm::KernelPtrArrayTmaWarpSpecializedPingpong,
                          cutlass::gemm::KernelPtrArrayTmaWarpSpecializedCooperative>;
  using EpilogueSchedule =
      cute::conditional_t<PingPong, cutlass::epilogue::PtrArrayTmaWarpSpecializedPingpong,
                          cutlass::epilogue::PtrArrayTmaWarpSpecializedCooperative>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator,
      ElementC, LayoutD*, kAlignment, Element, LayoutD*, kAlignment, EpilogueSchedule,
      Fusion>::CollectiveOp;

  using Mainloop = typename MainloopAdapter::template apply<
      typename cutlass::gemm::collective::CollectiveBuilder<
          cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA*, kAlignment,
          Element, LayoutB*, kAlignment, Accumulator, TileShape, ClusterShape,
          cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
              sizeof(typename Epilogue::SharedStorage))>,
          MainloopSchedule>::CollectiveOp>;

  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
  using StrideA = typename Kernel::InternalStrideA;
  using StrideB = typename Kernel::InternalStrideB;
  using StrideD = typename Kernel::InternalStrideD;
  using Shape3 = typename ProblemShape::UnderlyingProblemShape;
  using FusionArguments = typename Epilogue::FusionCallbacks::Arguments;

  // The per-group argument arrays CUTLASS reads, laid out at the front of the workspace.
  struct Arrays {
    const Element** a;
    const Element** b;
    Element** d;
    StrideA* stride_a;
    StrideB* stride_b;
    StrideD* stride_d;
    Shape3* shapes;
    size_t bytes;
  };

  // CUTLASS keeps TMA descriptors in its workspace, which need 64-byte alignment (a first
  // version with 16-byte regions faulted with a misaligned address); every region here starts
  // on a 128-byte boundary.
  static size_t round_up(size_t n) { return (n + 127) / 128 * 128; }

  static Arrays carve(void* base, int groups) {
    char* p = static_cast<char*>(base);
    Arrays r;
    size_t off = 0;
    auto take = [&](size_t bytes) { char* q = p + off; off += round_up(bytes); return q; };
    r.a = reinterpret_cast<const Element**>(take(groups * sizeof(void*)));
    r.b = reinterpret_cast<const Element**>(take(groups * sizeof(void*)));
    r.d = reinterpret_cast<Element**>(take(groups * sizeof(void*)));
    r.stride_a = reinterpret_cast<StrideA*>(take(groups * sizeof(StrideA)));
    r.stride_b = reinterpret_cast<StrideB*>(take(groups * sizeof(StrideB)));
    r.stride_d = reinterpret_cast<StrideD*>(take(groups * sizeof(StrideD)));
    r.shapes = reinterpret_cast<Shape3*>(take(groups * sizeof(Shape3)));
    r.bytes = off;
    return r;
  }

  // `thread`: the epilogue's own arguments; the default epilogue's are alpha = 1, beta = 0.
  static typename Gemm::Arguments arguments(const Arrays& arrays, int groups, int sm_count,
                                            FusionArguments thread = {}) {
    typename Gemm::Arguments args;
    args.mode = cutlass::gemm::GemmUniversalMode::kGrouped;
    args.problem_shape = {groups, arrays.shapes, nullptr};
    args.mainloop = {arrays.a, arrays.stride_a, arrays.b, arrays.stride_b};
    args.epilogue.thread = thread;
    if constexpr (kHasSource) {
      args.epilogue.ptr_C = const_cast<const Element**>(arrays.d);
      args.epilogue.dC = arrays.stride_d;
      args.epilogue.thread.alpha = 1.0f;
      args.epilogue.thread.beta = 0.0f;
    }
    args.epilogue.ptr_D = arrays.d;
    args.epilogue.dD = arrays.stride_d;
    args.hw_info.sm_count = sm_count;
    return args;
  }
};

// One thread per group: its row range from the cumulative ends, then its pointers and shape.
// Row-grouped (forward, input gradient; dims = n, k): A and D advance by the group's first row
// (D's rows are ld_d apart), B by group. K-grouped (weight gradient; dims = m, n): the group's
// rows are the reduction, A (= X) and B (= Y) advance by its first row, D by group.
template <class G, bool KGrouped>
__global__ void fill_group_arrays(typename G::Arrays arrays, const typename G::Element* a,
                                  const typename G::Element* b, typename G::Element* d,
                                  const int32_t* ends, int groups, int dim0, int dim1,
                                  typename G::StrideA stride_a, typename G::StrideB stride_b,
                                  typename G::StrideD stride_d, int64_t ld_d) {
  int g = threadIdx.x;
  if (g >= groups) return;
  int64_t start = g == 0 ? 0 : ends[g - 1];
  int rows = static_cast<int>(ends[g] - start);
  if constexpr (KGrouped) {
    arrays.a[g] = a + start * dim0;
    arrays.b[g] = b + start * dim1;
    arrays.d[g] = d + static_cast<int64_t>(g) * dim0 * dim1;
    arrays.shapes[g] = typename G::Shape3(dim0, dim1, rows);
  } else {
    arrays.a[g] = a + start * dim1;
    arrays.b[g] = b + static_cast<int64_t>(g) * dim1 * dim0;
    arrays.d[g] = d + start * ld_d;
    arrays.shapes[g] = typename G::Shape3(rows, dim0, dim1);
  }
  arrays.stride_a[g] = stride_a;
  arrays.stride_b[g] = stride_b;
  arrays.stride_d[g] = stride_d;
}

inline int sm_count_of_current_device() {
  static int cached[64] = {0};
  int device = 0;
  cudaGetDevice(&device);
  if (!cached[device]) cudaDeviceGetAttribute(&cached[device], cudaDevAttrMultiProcessorCount, device);
  return cached[device];
}

template <class G>
int64_t workspace_bytes(int groups) {
  // CUTLASS's own workspace does not depend on the pointers, only on the group count and grid.
  typename G::Arrays arrays = G::carve(nullptr, groups);
  auto args = G::arguments(arrays, groups, sm_count_of_current_device());
  return static_cast<int64_t>(arrays.bytes + G::round_up(G::Gemm::get_workspace_size(args)));
}

// Error codes: 0 ok, 1 workspace too small, 2 too many groups, 3 cannot implement,
// 4 initialize failed, 5 run failed, 6 launch error.
template <class G, class Fill>
int launch(void* workspace, int64_t workspace_size, int groups, cudaStream_t stream, Fill fill,
           typename G::FusionArguments thread = {}) {
  if (groups > 1024) return 2;
  typename G::Arrays arrays = G::carve(workspace, groups);
  auto args = G::arguments(arrays, groups, sm_count_of_current_device(), thread);
  size_t cutlass_bytes = G::Gemm::get_workspace_size(args);
  if (static_cast<int64_t>(arrays.bytes + G::round_up(cutlass_bytes)) > workspace_size) return 1;
  fill(arrays);
  if (cudaGetLastError() != cudaSuccess) return 6;
  typename G::Gemm gemm;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 3;
  void* cutlass_workspace = static_cast<char*>(workspace) + arrays.bytes;
  if (gemm.initialize(args, cutlass_workspace, stream) != cutlass::Status::kSuccess) return 4;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return 5;
  return cudaGetLastError() == cudaSuccess ? 0 : 6;
}

template <class G>
int run_rows(const void* a, const void* b, void* d, const int32_t* ends, int groups, int n,
             int k, void* workspace, int64_t workspace_size, cudaStream_t stream) {
  using E = typename G::Element;
  auto stride_a = cutlass::make_cute_packed_stride(typename G::StrideA{}, {1, k, 1});
  auto stride_b = cutlass::make_cute_packed_stride(typename G::StrideB{}, {n, k, 1});
  auto stride_d = cutlass::make_cute_packed_stride(typename G::StrideD{}, {1, n, 1});
  return launch<G>(workspace, workspace_size, groups, stream, [&](typename G::Arrays arrays) {
    fill_group_arrays<G, false><<<1, groups, 0, stream>>>(
        arrays, static_cast<const E*>(a), static_cast<const E*>(b), static_cast<E*>(d), ends,
        groups, n, k, stride_a, stride_b, stride_d, n);
  });
}

template <class G>
int run_wgrad(const void* x, const void* y, void* d, const int32_t* ends, int groups, int m,
              int n, void* workspace, int64_t workspace_size, cudaStream_t stream) {
  using E = typename G::Element;
  auto stride_a = cutlass::make_cute_packed_stride(typename G::StrideA{}, {m, 1, 1});
  auto stride_b = cutlass::make_cute_packed_stride(typename G::StrideB{}, {n, 1, 1});
  auto stride_d = cutlass::make_cute_packed_stride(typename G::StrideD{}, {m, n, 1});
  return launch<G>(workspace, workspace_size, groups, stream, [&](typename G::Arrays arrays) {
    fill_group_arrays<G, true><<<1, groups, 0, stream>>>(
        arrays, static_cast<const E*>(x), static_cast<const E*>(y), static_cast<E*>(d), ends,
        groups, m, n, stride_a, stride_b, stride_d, 0);
  });
}

}  // namespace monta

// One exported pair of functions per config and kind (rows with B row- or column-major, wgrad);
// the build script writes one translation unit per instantiation so that they compile in
// parallel. `dims` are (n, k) for rows and (m, n) for wgrad, as in run_rows / run_wgrad.
#define MONTA_GROUPED_GEMM_INSTANCE(NAME, TM, TN, TK, CM, CN, PINGPONG, KIND)                   \
  using NAME##_t = monta::GroupedGemm<cute::Shape<cute::_##TM, cute::_##TN, cute::_##TK>,      \
                                      cute::Shape<cute::_##CM, cute::_##CN, cute::_1>,         \
                                      PINGPONG, MONTA_A_COLUMN_MAJOR_##KIND,                   \
                                      MONTA_B_COLUMN_MAJOR_##KIND>;                            \
  extern "C" int64_t NAME##_workspace(int groups) {                                           \
    return monta::workspace_bytes<NAME##_t>(groups);                                          \
  }                                                                                           \
  extern "C" int NAME##_run(const void* a, const void* b, void* d, const int32_t* ends,        \
                            int groups, int dim0, int dim1, void* ws, int64_t ws_bytes,       \
                            void* stream) {                                                   \
    return MONTA_RUN_##KIND<NAME##_t>(a, b, d, ends, groups, dim0, dim1, ws, ws_bytes,        \
                                      static_cast<cudaStream_t>(stream));                     \
  }

#define MONTA_A_COLUMN_MAJOR_row false
#define MONTA_B_COLUMN_MAJOR_row false
#define MONTA_RUN_row monta::run_rows
#define MONTA_A_COLUMN_MAJOR_col false
#define MONTA_B_COLUMN_MAJOR_col true
#define MONTA_RUN_col monta::run_rows
#define MONTA_A_COLUMN_MAJOR_wgrad true
#define MONTA_B_COLUMN_MAJOR_wgrad false
#define MONTA_RUN_wgrad monta::run_wgrad
