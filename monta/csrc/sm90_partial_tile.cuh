// An expert's last tiles, computed only as far as its rows go (Hopper 128-row ping-pong kernels).
//
// Why: routed experts rarely hold a multiple of a tile's rows. At fine-grained shapes (~768 rows
// per expert) an expert with 770 rows pays for 896 in its forward and input-gradient GEMMs, and
// about half of all experts end in a row tile with 64 or fewer real rows. A 128-row ping-pong
// tile is two 64-row wgmma atoms stacked along M; where the second would only multiply the zeros
// TMA fills past the expert's last row, it is not issued, so such a tile takes about half the
// tensor-core time. Likewise along K in the weight gradient, whose reduction runs over the
// expert's rows: the last 64-row k tile issues only the 16-row k blocks that hold rows. What is
// skipped would have added exact zeros, so the results are the same bits.
//
// How the mainloop learns the tile's extent: CUTLASS's kernel hands mma() the k-tile count, not
// the tile's coordinates. It does, just before, ask the tile scheduler how many k tiles the tile
// has, with the work tile and the expert's problem shape -- which is all it takes.
// TailAwareScheduler answers that question as the stock group scheduler does and also writes the
// tile's real rows and last k tile's depth to a per-warp shared-memory slot, which the same
// threads read back in mma(). The scheduler is reached through the problem-shape type
// (TailAwareGroupShape), the one kernel template argument CUTLASS's ptr-array ping-pong kernel
// leaves open for it.
#pragma once

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/gemm/collective/collective_builder.hpp"  // sm90_smem_capacity_bytes
#include "cutlass/gemm/group_array_problem_shape.hpp"
#include "cutlass/gemm/kernel/sm90_tile_scheduler_group.hpp"
#include "cutlass/gemm/kernel/tile_scheduler.hpp"

namespace monta {

using namespace cute;

// Of the tile each warp is working on: its real rows, and the real depth of its last k tile.
struct TileExtent {
  int rows;
  int last_depth;
};

// Static shared memory comes before the kernel's dynamic shared memory, whose TMA buffers use the
// 128-byte swizzle: their pattern (and wgmma's descriptors) assume a 1024-byte aligned start. A
// bare 128-byte array moved that start to offset 128 and every result was wrong; padded to
// 1024 bytes, the dynamic part starts aligned again.
struct alignas(1024) TileExtentSlots {
  TileExtent of_warp[16];  // a ping-pong CTA has 12 warps
};
static_assert(sizeof(TileExtentSlots) % 1024 == 0, "keeps the dynamic shared memory aligned");

// Whether a kernel's shared storage still fits beside the slots (they take 1 KB of its 227).
template <class Kernel>
constexpr bool fits_beside_tile_extents() {
  return Kernel::SharedStorageSize + sizeof(TileExtentSlots) <=
         cutlass::gemm::collective::detail::sm90_smem_capacity_bytes;
}

CUTLASS_DEVICE TileExtent* tile_extent_slot() {
  __shared__ TileExtentSlots slots;
  return &slots.of_warp[(threadIdx.x / 32) % 16];
}

// GroupProblemShape under its own name, so that the scheduler selector below can pick ours.
struct TailAwareGroupShape : cutlass::gemm::GroupProblemShape<Shape<int, int, int>> {};

template <int SchedulerPipelineStageCount>
class TailAwareScheduler
    : public cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90Group<
          TailAwareGroupShape, SchedulerPipelineStageCount> {
  using Base = cutlass::gemm::kernel::detail::PersistentTileSchedulerSm90Group<
      TailAwareGroupShape, SchedulerPipelineStageCount>;

 public:
  using Base::Base;
  using typename Base::WorkTileInfo;

  template <class ProblemShapeMNKL, class TileShape>
  CUTLASS_HOST_DEVICE static int get_work_k_tile_count(WorkTileInfo const& work_tile_info,
                                                       ProblemShapeMNKL problem_shape,
                                                       TileShape tile_shape) {
    int k_tiles = Base::get_work_k_tile_count(work_tile_info, problem_shape, tile_shape);
#if defined(__CUDA_ARCH__)
    int tile_k = get<2>(tile_shape);
    *tile_extent_slot() = {int(get<0>(problem_shape)) - work_tile_info.M_idx * get<0>(tile_shape),
                           int(get<2>(problem_shape)) - (k_tiles - 1) * tile_k};
#endif
    return k_tiles;
  }
};

// CUTLASS's ptr-array mainloop with one change to mma(): wgmma is issued only where the tile has
// real rows -- atom 0 alone when they end in its first 64, and the last k tile's leading k
// blocks. A skipped atom's accumulators are set to zero, which is what multiplying TMA's zero
// fill gives, so any epilogue sees the same tile.
template <class Base>
struct TailAwareMainloop : Base {
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::TensorStorage;
  using typename Base::TiledMma;
  static constexpr int kAtomM = size<0>(typename TiledMma::AtomShape_MNK{});
  static constexpr int kAtomK = size<2>(typename TiledMma::AtomShape_MNK{});
  static constexpr int kTileM = size<0>(typename Base::TileShape{});
  static constexpr int kKBlocks = size<2>(typename Base::TileShape{}) / kAtomK;
  static_assert(size(TiledMma{}) == cutlass::NumThreadsPerWarpGroup,
                "one warpgroup per tile (ping-pong): its M atoms are the tile's rows in order");
  static_assert(Base::K_PIPE_MMAS == 1, "mma() keeps one k tile of wgmma in flight");
  static_assert(kTileM == 2 * kAtomM, "a 128-row tile of two 64-row atoms");
  static_assert(kKBlocks == 4, "with_k_blocks() names 1 to 4 k blocks");

  // trim_tiles = false issues every tile whole, as CUTLASS's mainloop does (to measure the gain).
  struct Arguments : Base::Arguments {
    bool trim_tiles = true;
  };
  struct Params : Base::Params {
    bool trim_tiles = true;
  };

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shapes, Arguments const& args,
                                        void* workspace) {
    return {Base::to_underlying_arguments(problem_shapes, args, workspace), args.trim_tiles};
  }

  template <class FrgTensorC>
  CUTLASS_DEVICE void mma(MainloopPipeline pipeline, PipelineState smem_pipe_read,
                          FrgTensorC& accum, int k_tile_count, int, TensorStorage& shared_tensors,
                          Params const& params) {
    // The same pipeline protocol as Base::mma: wait for a stage, issue its wgmma, wait for the
    // previous k tile's and release its stage (Base::mma_tail releases the last one). One code
    // path for whole and trimmed tiles: with two, ptxas keeps the accumulators in different
    // registers on each and serialises every wgmma of the kernel to join them. Broadcast from
    // lane 0 so that ptxas sees warp-uniform branches around the wgmma.
    TileExtent extent = *tile_extent_slot();
    const bool trim = params.trim_tiles;
    const bool second_atom = __shfl_sync(0xffffffff, !trim || extent.rows > kAtomM, 0);
    const int last_k_blocks = __shfl_sync(
        0xffffffff, trim ? min(kKBlocks, (extent.last_depth + kAtomK - 1) / kAtomK) : kKBlocks, 0);

    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    TiledMma tiled_mma;
    auto thread_mma = tiled_mma.get_slice(0);
    Tensor tCrA = thread_mma.make_fragment_A(thread_mma.partition_A(sA));  // (MMA,M,K,PIPE)
    Tensor tCrB = thread_mma.make_fragment_B(thread_mma.partition_B(sB));  // (MMA,N,K,PIPE)

    // One k tile's wgmma: the first `k_blocks` k blocks of atom 0, and of atom 1 when the tile
    // has rows there. Atom 0 alone still takes atom 1 through the first k block of the first k
    // tile (ScaleOut::Zero; TMA's zero rows give it zero accumulators), because ptxas serialises
    // every wgmma of a kernel whose accumulators other instructions write.
    auto issue = [&](int stage, auto atoms, auto first, auto k_blocks) {
      CUTLASS_PRAGMA_UNROLL
      for (int k_block = 0; k_block < decltype(k_blocks)::value; ++k_block) {
        CUTLASS_PRAGMA_UNROLL
        for (int n = 0; n < size<1>(tCrB); ++n) {
          cute::gemm(tiled_mma, accum(_, 0, n), tCrA(_, 0, k_block, stage),
                     tCrB(_, n, k_block, stage), accum(_, 0, n));
          if (decltype(atoms)::value == 2 || (decltype(first)::value && k_block == 0)) {
            cute::gemm(tiled_mma, accum(_, 1, n), tCrA(_, 1, k_block, stage),
                       tCrB(_, n, k_block, stage), accum(_, 1, n));
          }
        }
        tiled_mma.accumulate_ = GMMA::ScaleOut::One;
      }
    };
    // The branches are around whole wgmma batches (arrive ... commit): inside one, ptxas injects
    // fences.
    auto issue_batch = [&](int stage, auto first, bool last) {
      with_k_blocks(last ? last_k_blocks : kKBlocks, [&](auto k_blocks) {
        if (second_atom) {
          warpgroup_arrive();
          issue(stage, Int<2>{}, first, k_blocks);
          warpgroup_commit_batch();
        } else {
          warpgroup_arrive();
          issue(stage, Int<1>{}, first, k_blocks);
          warpgroup_commit_batch();
        }
      });
    };

    PipelineState smem_pipe_release = smem_pipe_read;
    tiled_mma.accumulate_ = GMMA::ScaleOut::Zero;
    warpgroup_fence_operand(accum);
    if (k_tile_count > 0) {
      pipeline.consumer_wait(smem_pipe_read, pipeline.consumer_try_wait(smem_pipe_read));
      issue_batch(smem_pipe_read.index(), cute::true_type{}, k_tile_count == 1);
      ++smem_pipe_read;
      --k_tile_count;
    }
    warpgroup_fence_operand(accum);
    CUTLASS_PRAGMA_NO_UNROLL
    for (; k_tile_count > 0; --k_tile_count) {
      pipeline.consumer_wait(smem_pipe_read, pipeline.consumer_try_wait(smem_pipe_read));
      warpgroup_fence_operand(accum);
      issue_batch(smem_pipe_read.index(), cute::false_type{}, k_tile_count == 1);
      warpgroup_wait<1>();
      warpgroup_fence_operand(accum);
      pipeline.consumer_release(smem_pipe_release);
      ++smem_pipe_read;
      ++smem_pipe_release;
    }
    warpgroup_fence_operand(accum);
  }

 private:
  template <class F>
  CUTLASS_DEVICE static void with_k_blocks(int k_blocks, F&& f) {
    switch (k_blocks) {
      case 1: f(Int<1>{}); break;
      case 2: f(Int<2>{}); break;
      case 3: f(Int<3>{}); break;
      default: f(Int<4>{}); break;
    }
  }
};

}  // namespace monta

namespace cutlass::gemm::kernel::detail {
template <class TileShape, class ClusterShape, uint32_t Stages>
struct TileSchedulerSelector<GroupScheduler, arch::Sm90, TileShape, ClusterShape, Stages,
                             monta::TailAwareGroupShape> {
  using Scheduler = monta::TailAwareScheduler<Stages>;
};
}  // namespace cutlass::gemm::kernel::detail
