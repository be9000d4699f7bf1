// Hopper (sm_90a) bf16 GEMMs for MoE experts whose rows are tile-aligned, on CUTLASS 3.x.
//
// Why next to sm90_grouped_gemm.cuh: a pointer-array grouped GEMM gives every expert its own TMA
// descriptors, and a persistent CTA rewrites them whenever its next tile belongs to another
// expert -- with fine-grained experts that is nearly every tile. On an H200, with the same rows
// per expert, torch._grouped_mm ran below torch.bmm at 64 experts, forward and weight gradient
// (bench/gpu_batched_vs_grouped.py). When every expert's rows start at a multiple of the tile's
// M (the dispatcher pads each expert's rows with zero-probability copies,
// monta/dispatch/padded_order.py; opt-in, see monta/expert_gemm.py), one descriptor per operand covers
// all experts: A and D are single [rows, ...] matrices, B is [E, ...] with the expert as the
// batch coordinate, and only the tile scheduler knows about experts. It reads the padded row
// ends on the device (no host sync) and hands each tile its expert as the batch index.
//
//   rows  (forward, input gradient)  D[rows_e] = A[rows_e] @ B_e    A [R, K], D [R, N]; B_e [K, N]
//                                                                    row- or column-major
//   wgrad (weight gradient)          D_e = X[rows_e]^T @ Y[rows_e]  X [R, M], Y [R, N],
//                                                                    D [E, M, N] row-major
// R is the row capacity (a static bound: the padded ends' last entry is what is used). In the
// weight gradient each expert's rows are its tiles' reduction range, aligned to the tile's K.
#pragma once

#include <cuda_runtime.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/dispatch_policy.hpp"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/gemm/kernel/sm90_tile_scheduler.hpp"
// sm_count_of_current_device, and the MONTA_B_COLUMN_MAJOR_<kind> layouts the instances share
#include "sm90_grouped_gemm.cuh"

namespace monta {

using namespace cute;

// A static persistent scheduler (each CTA walks tile indices blockIdx.x, + gridDim.x, ...) over
// the work the padded ends describe. Rows kind: row tiles up to the last expert's end; the
// expert of a row tile is found by binary search in `ends`. Weight-gradient kind: every
// expert's (M, N) tiles, expert by expert, each with its own reduction range (K tiles) -- empty
// for an expert with no rows. Both walk their (M, N) tiles in bands (see place()), so the
// tiles in flight share A and B tiles in L2. Clusters are 1 x CN: the CTAs
// of a cluster share the row tile and take adjacent column tiles.
template <class TileShape, class ClusterShape, bool KGrouped>
class ExpertTileScheduler {
  using Stock = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90;
  static constexpr int kTileM = size<0>(TileShape{});
  static constexpr int kTileN = size<1>(TileShape{});
  static constexpr int kTileK = size<2>(TileShape{});
  static constexpr int kClusterN = size<1>(ClusterShape{});
  static_assert(size<0>(ClusterShape{}) == 1, "clusters along M would need 2-tile alignment");

 public:
  static constexpr bool IsDynamicPersistent = false;
  using Pipeline = Stock::Pipeline;
  using PipelineStorage = Stock::PipelineStorage;
  using ThrottlePipeline = Stock::ThrottlePipeline;
  using ThrottlePipelineStorage = Stock::ThrottlePipelineStorage;
  using CLCResponse = Stock::CLCResponse;
  using SharedStorage = Stock::SharedStorage;
  using RasterOrder = Stock::RasterOrder;
  using RasterOrderOptions = Stock::RasterOrderOptions;

  struct WorkTileInfo {
    int32_t M_idx = 0;
    int32_t N_idx = 0;
    int32_t L_idx = 0;
    bool is_valid_tile = false;
    int32_t k_start = 0;  // weight gradient: the expert's first and number of K tiles
    int32_t k_count = 0;

    CUTLASS_HOST_DEVICE bool is_valid() const { return is_valid_tile; }
    CUTLASS_HOST_DEVICE static WorkTileInfo invalid_work_tile() { return {-1, -1, -1, false}; }
    CUTLASS_HOST_DEVICE bool is_final_split(uint32_t) const { return true; }
    CUTLASS_HOST_DEVICE int32_t reduction_subtile_idx() const { return -1; }
  };

  struct Arguments {
    int max_swizzle_size = 1;  // unused; the kernel's grid query sets these two
    RasterOrderOptions raster_order = RasterOrderOptions::Heuristic;
    const int32_t* ends = nullptr;
    int groups = 0;
    int band_m = 8;
  };

  struct Params {
    int32_t log_swizzle_size_ = 0;
    RasterOrder raster_order_ = RasterOrder::AlongN;
    const int32_t* ends = nullptr;
    int groups = 0;
    int band_m = 8;
    int tiles_m = 0;     // of the problem's M (rows kind: the capacity)
    int clusters_n = 0;  // column tiles / CN, rounded up
  };

  template <class ProblemShapeMNKL, class... Ignored>
  static Params to_underlying_arguments(ProblemShapeMNKL problem, TileShape, ClusterShape,
                                        cutlass::KernelHardwareInfo const&, Arguments const& args,
                                        Ignored const&...) {
    Params p;
    p.ends = args.ends;
    p.groups = args.groups;
    p.band_m = args.band_m;
    p.tiles_m = (int(get<0>(problem)) + kTileM - 1) / kTileM;
    int tiles_n = (int(get<1>(problem)) + kTileN - 1) / kTileN;
    p.clusters_n = (tiles_n + kClusterN - 1) / kClusterN;
    return p;
  }

  static bool can_implement(Arguments const& args) {
    return args.ends != nullptr && args.groups > 0 && args.band_m > 0;
  }

  template <class ProblemShape, class ElementAccumulator, class... Ignored>
  static size_t get_workspace_size(Ignored const&...) {
    return 0;
  }

  template <class ProblemShape, class ElementAccumulator, class... Ignored>
  static cutlass::Status initialize_workspace(Ignored const&...) {
    return cutlass::Status::kSuccess;
  }

  // One CTA per SM (clusters of CN), never more clusters than the capacity has tiles.
  template <class ProblemShapeMNKL, class... Ignored>
  static dim3 get_grid_shape(Params const& p, ProblemShapeMNKL problem, TileShape, ClusterShape,
                             cutlass::KernelHardwareInfo hw_info, Ignored const&...) {
    int64_t most = int64_t(p.tiles_m) * p.clusters_n;
    if constexpr (KGrouped) most *= p.groups;
    int64_t clusters = hw_info.sm_count / kClusterN;
    clusters = clusters < most ? clusters : most;
    return dim3(static_cast<uint32_t>(clusters > 0 ? clusters : 1), kClusterN, 1);
  }

  CUTLASS_HOST_DEVICE ExpertTileScheduler() {}

  CUTLASS_DEVICE explicit ExpertTileScheduler(Params const& p) : params_(p) {
#if defined(__CUDA_ARCH__)
    linear_ = blockIdx.x;
    stride_ = gridDim.x;
    cta_n_ = static_cast<int>(cute::block_id_in_cluster().y);
    if constexpr (KGrouped) {
      total_ = int64_t(p.groups) * p.tiles_m * p.clusters_n;
    } else {
      tiles_m_used_ = p.ends[p.groups - 1] / kTileM;
      total_ = int64_t(tiles_m_used_) * p.clusters_n;
    }
#endif
  }

  CUTLASS_DEVICE WorkTileInfo work_at(int64_t index) const {
    if (index >= total_) return WorkTileInfo::invalid_work_tile();
    WorkTileInfo w;
    w.is_valid_tile = true;
    if constexpr (KGrouped) {
      int64_t per_expert = int64_t(params_.tiles_m) * params_.clusters_n;
      int e = static_cast<int>(index / per_expert);
      place(w, index % per_expert, params_.tiles_m);
      w.L_idx = e;
      int start = e == 0 ? 0 : params_.ends[e - 1];
      w.k_start = start / kTileK;
      w.k_count = (params_.ends[e] - start) / kTileK;
    } else {
      place(w, index, tiles_m_used_);
      w.L_idx = expert_of_row(w.M_idx * kTileM);
    }
    return w;
  }

  // Tile `index` of a tiles_m x clusters_n grid walked in bands of band_m row tiles, the row
  // tile changing fastest: the CTAs running at once read band_m A tiles and ~SMs/band_m B tiles.
  CUTLASS_DEVICE void place(WorkTileInfo& w, int64_t index, int tiles_m) const {
    int64_t per_band = int64_t(params_.band_m) * params_.clusters_n;
    int first = static_cast<int>(index / per_band) * params_.band_m;
    int r = static_cast<int>(index % per_band);
    int height = min(params_.band_m, tiles_m - first);
    w.M_idx = first + r % height;
    w.N_idx = (r / height) * kClusterN + cta_n_;
  }

  // The first expert whose end lies past `row` (empty experts end where they start).
  CUTLASS_DEVICE int expert_of_row(int row) const {
    int lo = 0, hi = params_.groups - 1;
    while (lo < hi) {
      int mid = (lo + hi) >> 1;
      if (params_.ends[mid] > row) hi = mid; else lo = mid + 1;
    }
    return lo;
  }

  template <class Cluster>
  CUTLASS_DEVICE WorkTileInfo initial_work_tile_info(Cluster) { return get_current_work(); }
  CUTLASS_DEVICE WorkTileInfo get_current_work() const { return work_at(linear_); }
  CUTLASS_DEVICE void advance_to_next_work(uint32_t count = 1) { linear_ += int64_t(stride_) * count; }

  CUTLASS_DEVICE auto fetch_next_work(WorkTileInfo) {
    advance_to_next_work();
    return cute::make_tuple(get_current_work(), true);
  }
  template <class SchedulerPipeline, class SchedulerPipelineState>
  CUTLASS_DEVICE auto fetch_next_work(WorkTileInfo info, SchedulerPipeline&, SchedulerPipelineState) {
    return fetch_next_work(info);
  }
  CUTLASS_DEVICE bool is_last_tile(WorkTileInfo&, uint32_t count = 1) const {
    return linear_ + int64_t(stride_) * count >= total_;
  }

  template <class ProblemShape, class Tile>
  CUTLASS_HOST_DEVICE static int get_work_k_tile_count(WorkTileInfo const& w, ProblemShape problem,
                                                       Tile) {
    if constexpr (KGrouped) return w.k_count;
    return (int(get<2>(problem)) + kTileK - 1) / kTileK;
  }
  CUTLASS_HOST_DEVICE static uint32_t get_work_k_tile_start(WorkTileInfo const& w) {
    return KGrouped ? uint32_t(w.k_start) : 0u;
  }
  CUTLASS_HOST_DEVICE static bool valid_warpgroup_in_work_tile(WorkTileInfo const&) { return true; }
  CUTLASS_HOST_DEVICE static bool requires_separate_reduction(Params const&) { return false; }
  CUTLASS_HOST_DEVICE static bool compute_epilogue(WorkTileInfo const&, Params const&) { return true; }
  CUTLASS_HOST_DEVICE static bool compute_epilogue(WorkTileInfo const&) { return true; }
  template <class FrgTensorC>
  CUTLASS_DEVICE static void fixup(Params const&, WorkTileInfo const&, FrgTensorC&, uint32_t,
                                   uint32_t) {}

 private:
  Params params_;
  int64_t linear_ = 0;
  int64_t total_ = 0;
  int stride_ = 1;
  int cta_n_ = 0;
  int tiles_m_used_ = 0;
};

// The stock mainloop waits for at least one K tile; an expert without rows has none, and its
// weight gradient is zero.
template <class Stock>
struct EmptyReductionMainloop : Stock {
  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(typename Stock::MainloopPipeline pipeline,
                          typename Stock::PipelineState read, FrgTensorC& accum, int k_tile_count,
                          int thread_idx, typename Stock::TensorStorage& storage,
                          typename Stock::Params const& params) {
    if (k_tile_count == 0) {
      clear(accum);
      return;
    }
    Stock::mma(pipeline, read, accum, k_tile_count, thread_idx, storage, params);
  }
};

template <class TileShape, class ClusterShape, bool PingPong, bool KGrouped, bool BColumnMajor>
struct AlignedGemm {
  // CUTLASS's ping-pong kernel gives every tile the whole K range.
  static_assert(!(PingPong && KGrouped), "the weight gradient needs the cooperative kernel");
  using Element = cutlass::bfloat16_t;
  using Accumulator = float;
  static constexpr int kAlignment = 16 / sizeof(Element);
  using ProblemShape = Shape<int, int, int, int>;  // (M, N, K, experts)
  // A single matrix shared by every expert (stride 0 along the expert mode), except where a
  // mode is per expert: B in the row GEMMs, D in the weight gradient.
  using StrideA = cute::conditional_t<KGrouped, Stride<_1, int64_t, _0>, Stride<int64_t, _1, _0>>;
  using StrideB = cute::conditional_t<KGrouped, Stride<_1, int64_t, _0>,
                                      cute::conditional_t<BColumnMajor, Stride<int64_t, _1, int64_t>,
                                                          Stride<_1, int64_t, int64_t>>>;
  using StrideD = cute::conditional_t<KGrouped, Stride<int64_t, _1, int64_t>, Stride<int64_t, _1, _0>>;
  using MainloopSchedule =
      cute::conditional_t<PingPong, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                          cutlass::gemm::KernelTmaWarpSpecializedCooperative>;
  using EpilogueSchedule = cute::conditional_t<PingPong, cutlass::epilogue::TmaWarpSpecialized,
                                               cutlass::epilogue::TmaWarpSpecializedCooperative>;

  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
      cutlass::epilogue::collective::EpilogueTileAuto, Accumulator, Accumulator, void, StrideD,
      kAlignment, Element, StrideD, kAlignment, EpilogueSchedule,
      cutlass::epilogue::fusion::LinearCombination<Element, Accumulator, void>>::CollectiveOp;

  using StockMainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, StrideA, kAlignment, Element,
      StrideB, kAlignment, Accumulator, TileShape, ClusterShape,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(
          sizeof(typename Epilogue::SharedStorage))>,
      MainloopSchedule>::CollectiveOp;
  using Mainloop = cute::conditional_t<KGrouped, EmptyReductionMainloop<StockMainloop>, StockMainloop>;

  using Scheduler = ExpertTileScheduler<TileShape, ClusterShape, KGrouped>;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<ProblemShape, Mainloop, Epilogue, Scheduler>;
  using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// dims: rows kind (n, k) = B_e's columns and reduction; weight gradient (m, n) = D_e's shape.
// Error codes as in sm90_grouped_gemm.cuh: 3 cannot implement, 4 initialize failed, 5 run
// failed, 6 launch error, 7 the kernel wants a workspace (none is passed).
template <class G, bool KGrouped, bool BColumnMajor>
int run_aligned(const void* a, const void* b, void* d, const int32_t* ends, int groups,
                int capacity, int dim0, int dim1, int band_m, cudaStream_t stream) {
  using E = typename G::Element;
  typename G::ProblemShape problem;
  typename G::StrideA stride_a;
  typename G::StrideB stride_b;
  typename G::StrideD stride_d;
  if constexpr (KGrouped) {
    int m = dim0, n = dim1;
    problem = make_shape(m, n, capacity, groups);
    stride_a = make_stride(_1{}, int64_t(m), _0{});
    stride_b = make_stride(_1{}, int64_t(n), _0{});
    stride_d = make_stride(int64_t(n), _1{}, int64_t(m) * n);
  } else {
    int n = dim0, k = dim1;
    problem = make_shape(capacity, n, k, groups);
    stride_a = make_stride(int64_t(k), _1{}, _0{});
    if constexpr (BColumnMajor) stride_b = make_stride(int64_t(k), _1{}, int64_t(n) * k);
    else stride_b = make_stride(_1{}, int64_t(n), int64_t(n) * k);
    stride_d = make_stride(int64_t(n), _1{}, _0{});
  }
  typename G::Gemm::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      problem,
      {static_cast<const E*>(a), stride_a, static_cast<const E*>(b), stride_b},
      {{}, nullptr, stride_d, static_cast<E*>(d), stride_d}};
  args.epilogue.thread.alpha = 1.0f;
  args.hw_info.sm_count = sm_count_of_current_device();
  args.scheduler.ends = ends;
  args.scheduler.groups = groups;
  args.scheduler.band_m = band_m;
  typename G::Gemm gemm;
  if (G::Gemm::get_workspace_size(args) != 0) return 7;
  if (gemm.can_implement(args) != cutlass::Status::kSuccess) return 3;
  if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return 4;
  if (gemm.run(stream) != cutlass::Status::kSuccess) return 5;
  return cudaGetLastError() == cudaSuccess ? 0 : 6;
}

}  // namespace monta

namespace cutlass::gemm::kernel::detail {
template <class TileShape, class ClusterShape, bool KGrouped, class ArchTag, class T, class C,
          uint32_t Stages, class ProblemShapeType>
struct TileSchedulerSelector<monta::ExpertTileScheduler<TileShape, ClusterShape, KGrouped>,
                             ArchTag, T, C, Stages, ProblemShapeType> {
  using Scheduler = monta::ExpertTileScheduler<TileShape, ClusterShape, KGrouped>;
};
}  // namespace cutlass::gemm::kernel::detail

// One exported function per config and kind (rows with B row- or column-major, wgrad); `dims` as
// in run_aligned, `band_m` the scheduler's band height in row tiles.
#define MONTA_ALIGNED_GEMM_INSTANCE(NAME, TM, TN, TK, CM, CN, PINGPONG, KIND)                    \
  using NAME##_t = monta::AlignedGemm<cute::Shape<cute::_##TM, cute::_##TN, cute::_##TK>,       \
                                      cute::Shape<cute::_##CM, cute::_##CN, cute::_1>,          \
                                      PINGPONG, MONTA_K_GROUPED_##KIND,                         \
                                      MONTA_B_COLUMN_MAJOR_##KIND>;                             \
  extern "C" int NAME##_run(const void* a, const void* b, void* d, const int32_t* ends,         \
                            int groups, int capacity, int dim0, int dim1, int band_m,           \
                            void* stream) {                                                     \
    return monta::run_aligned<NAME##_t, MONTA_K_GROUPED_##KIND, MONTA_B_COLUMN_MAJOR_##KIND>(   \
        a, b, d, ends, groups, capacity, dim0, dim1, band_m, static_cast<cudaStream_t>(stream)); \
  }

#define MONTA_K_GROUPED_row false
#define MONTA_K_GROUPED_col false
#define MONTA_K_GROUPED_wgrad true
