"""Triton kernels for the one-rank dispatch path (CUDA): the expert order and the k-way sum.

Shapes: T tokens, E experts, k = top-k, H hidden; n = T·k expert rows.

Why kernels: on one GPU the layer's work before the first expert GEMM is a chain of small
launches, each costing the host ~40 µs (H200 machine, measured) while the GPU waits, so the
torch version of :func:`monta.dispatch.plan.order_by_expert_topk` (topk over the mask, a radix
argsort, index_add, scatter: ~15 launches, ~1 ms of host time at Mixtral shapes) delays every
GEMM behind it. :func:`expert_order` is two launches: each program of the first counts a
block of tokens' copies per expert and the last one to finish scans the blocks' counts; each
program of the second places its block's copies. :func:`topk_softmax_order` goes further for
MoNTA's router: from the gating logits to the expert order and the routing probabilities
already in that order, replacing megatron's top-k, softmax and two [T, E] scatters plus the
order and a gather (~15 host ops) with the same two launches, the first also routing its block.
(While the last program placed every copy alone, it took 0.69 ms, 12 % of the fine-grained
layer on an H200: bench/results/gpu_moe_runs/gpu_moe_8b43a16.json has the layer after.)
:func:`gather_sum` replaces
``index_select`` + ``view`` + ``sum`` (two passes and a [n, H] temporary) in the combine and in
the dispatch's backward: at Mixtral shapes 0.22 → 0.065 ms each.

They compute what the torch versions compute (the order: rows ascending within each expert;
the sum: fp32 accumulation, one rounding; the softmax: fp32, as megatron's), checked in
tests/gpu.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: callers use the torch versions
    triton = None


def available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


if triton is not None:

    @triton.jit
    def _exactly_k(m, K: tl.constexpr):
        """Each row of the 0/1 matrix ``m`` [BT, EP] with exactly K ones, as
        ``torch.topk(mask, K)`` picks them: rows with fewer get their first unselected columns
        (their probabilities are 0: extra copies that add nothing); extra ones are dropped."""
        short = K - tl.sum(m, axis=1)
        free_rank = tl.cumsum(1 - m, axis=1)  # 1-based among unselected
        m = tl.where((m == 0) & (free_rank <= short[:, None]), 1, m)
        return tl.where(tl.cumsum(m, axis=1) <= K, m, 0)

    @triton.jit
    def _selected(mask_ptr, t, cols, T, E: tl.constexpr, K: tl.constexpr):
        """[BT, EP] 0/1: the experts of tokens ``t`` from the [T, E] mask, each row with
        exactly K ones."""
        ok = (t < T)[:, None] & (cols < E)[None, :]
        m = tl.load(mask_ptr + t[:, None] * E + cols[None, :], mask=ok, other=0).to(tl.int32)
        return tl.where(ok, _exactly_k(m, K), 0)

    @triton.jit
    def _place(m, t, cols, next_row, rows_ptr, experts_ptr, flat_ptr, inverse_ptr,
               K: tl.constexpr):
        """Rows for tokens ``t``'s copies (``m`` [BT, EP] 0/1), from ``next_row`` [EP], the
        first free row of each expert: rows ascending with the token within an expert.
        Returns (dest rows, selected, tokens, experts, copies) as [BT, EP]."""
        sel = m != 0
        dest = (next_row[None, :] + tl.cumsum(m, axis=0) - 1).to(tl.int64)
        choice = tl.cumsum(m, axis=1) - 1  # j: copy t·K + j, experts ascending
        tokens = tl.broadcast_to(t[:, None], m.shape).to(tl.int64)
        experts = tl.broadcast_to(cols[None, :], m.shape).to(tl.int64)
        copy = tokens * K + choice
        tl.store(inverse_ptr + copy, dest, mask=sel)
        tl.store(rows_ptr + dest, tokens, mask=sel)
        tl.store(experts_ptr + dest, experts, mask=sel)
        return dest, sel, tokens, experts, copy

    @triton.jit
    def _count_and_scan(m, table_ptr, ticket_ptr, counts_ptr, ends_ptr, cols,
                        E: tl.constexpr, EP: tl.constexpr):
        """This block's copies per expert (``m`` [BT, EP] 0/1) into row ``program_id`` of the
        [NB, EP] table; the last program to finish turns the table into each block's first row
        per expert among that expert's rows (an exclusive scan over blocks, NB·EP entries) and
        writes the per-expert counts (int64) and ends (int32). The barrier puts this program's
        stores before its ticket; the ticket (acq_rel, GPU scope) orders every program's stores
        before the last one's loads, which read L2 (``.cg``) past this SM's L1."""
        tl.store(table_ptr + tl.program_id(0) * EP + cols, tl.sum(m, axis=0))
        tl.debug_barrier()
        ticket = tl.atomic_add(ticket_ptr, 1)
        if ticket == tl.num_programs(0) - 1:
            running = tl.zeros([EP], dtype=tl.int32)
            for b in range(0, tl.num_programs(0), 64):
                blocks = b + tl.arange(0, 64)
                here = (blocks < tl.num_programs(0))[:, None]
                block_counts = tl.load(table_ptr + blocks[:, None] * EP + cols[None, :],
                                       mask=here, other=0, cache_modifier=".cg")
                tl.store(table_ptr + blocks[:, None] * EP + cols[None, :],
                         running[None, :] + tl.cumsum(block_counts, axis=0) - block_counts,
                         mask=here)
                running += tl.sum(block_counts, axis=0)
            tl.store(counts_ptr + cols, running.to(tl.int64), mask=cols < E)
            tl.store(ends_ptr + cols, tl.cumsum(running, axis=0), mask=cols < E)
            tl.atomic_xchg(ticket_ptr, 0)  # ready for the next launch

    @triton.jit
    def _count_blocks_kernel(mask_ptr, table_ptr, ticket_ptr, counts_ptr, ends_ptr, T,
                             E: tl.constexpr, EP: tl.constexpr, K: tl.constexpr,
                             BT: tl.constexpr):
        cols = tl.arange(0, EP)
        m = _selected(mask_ptr, tl.program_id(0) * BT + tl.arange(0, BT), cols, T, E, K)
        _count_and_scan(m, table_ptr, ticket_ptr, counts_ptr, ends_ptr, cols, E, EP)

    @triton.jit
    def _topk_softmax_order_kernel(logits_ptr, idx_ptr, p_ptr, mask_ptr, p_full_ptr, table_ptr,
                                   ticket_ptr, counts_ptr, ends_ptr, T, E: tl.constexpr,
                                   EP: tl.constexpr, K: tl.constexpr, BT: tl.constexpr):
        # 1) every program: top-k of BT tokens' logits (ties: the lower expert id), softmax over
        #    the K picked in fp32, stored with each token's experts ascending
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        cols = tl.arange(0, EP)
        ok = (t < T)[:, None] & (cols < E)[None, :]
        x = tl.load(logits_ptr + t[:, None] * E + cols[None, :], mask=ok,
                    other=float("-inf")).to(tl.float32)
        sel = tl.zeros([BT, EP], dtype=tl.int32)
        for _ in tl.static_range(K):
            free = (sel == 0) & (cols < E)[None, :]
            best = tl.max(tl.where(free, x, float("-inf")), axis=1)
            pick = tl.min(tl.where(free & (x == best[:, None]), cols[None, :], EP), axis=1)
            sel = tl.where(cols[None, :] == pick[:, None], 1, sel)
        top = tl.max(tl.where(sel != 0, x, float("-inf")), axis=1)
        w = tl.where(sel != 0, tl.exp(x - top[:, None]), 0.0)
        p = w / tl.sum(w, axis=1)[:, None]
        keep = (sel != 0) & ok
        copy = t[:, None] * K + tl.cumsum(sel, axis=1) - 1
        tl.store(idx_ptr + copy, tl.broadcast_to(cols[None, :], (BT, EP)).to(tl.int64), mask=keep)
        tl.store(p_ptr + copy, p, mask=keep)
        # and for the order: as [T, E] (mask; p where picked, for contiguous loads)
        tl.store(mask_ptr + t[:, None] * E + cols[None, :], sel.to(tl.int8), mask=ok)
        tl.store(p_full_ptr + t[:, None] * E + cols[None, :], p, mask=keep)
        # 2) this block's copies per expert and, in the last program, the scan over blocks;
        #    :func:`_place_kernel`, the next launch, places every block's copies in parallel
        _count_and_scan(keep.to(tl.int32), table_ptr, ticket_ptr, counts_ptr, ends_ptr, cols,
                        E, EP)

    @triton.jit
    def _place_kernel(mask_ptr, p_full_ptr, table_ptr, counts_ptr, ends_ptr, rows_ptr,
                      experts_ptr, flat_ptr, inverse_ptr, probs_ptr, T, E: tl.constexpr,
                      EP: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                      ROUTED: tl.constexpr):
        # one program per block of tokens: its copies' rows from the scanned table. ROUTED
        # (after _topk_softmax_order_kernel): flat = the copy t·K + j, and its probability
        # ([T, E]) in expert order; else (a mask from torch): flat = t·E + e
        cols = tl.arange(0, EP)
        t = tl.program_id(0) * BT + tl.arange(0, BT)
        if ROUTED:  # exactly K per row, written by the routing launch
            ok = (t < T)[:, None] & (cols < E)[None, :]
            m = tl.load(mask_ptr + t[:, None] * E + cols[None, :], mask=ok, other=0).to(tl.int32)
        else:
            m = _selected(mask_ptr, t, cols, T, E, K)
        expert_start = (tl.load(ends_ptr + cols, mask=cols < E, other=0)
                        - tl.load(counts_ptr + cols, mask=cols < E, other=0).to(tl.int32))
        next_row = expert_start + tl.load(table_ptr + tl.program_id(0) * EP + cols)
        dest, sel, tokens, experts, copy = _place(m, t, cols, next_row, rows_ptr, experts_ptr,
                                                  flat_ptr, inverse_ptr, K)
        if ROUTED:
            tl.store(flat_ptr + dest, copy, mask=sel)
            p = tl.load(p_full_ptr + tokens * E + experts, mask=sel, other=0.0)
            tl.store(probs_ptr + dest, p.to(probs_ptr.dtype.element_ty), mask=sel)
        else:
            tl.store(flat_ptr + dest, tokens * E + experts, mask=sel)

    @triton.jit
    def _gather_sum_kernel(y_ptr, idx_ptr, out_ptr, H, K: tl.constexpr, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < H
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            row = tl.load(idx_ptr + t * K + j).to(tl.int64)
            acc += tl.load(y_ptr + row * H + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + t.to(tl.int64) * H + cols, acc.to(out_ptr.dtype.element_ty),
                 mask=mask)


def _block_rows(num_experts: int) -> tuple[int, int]:
    """(EP, BT): experts padded to a power of two, and tokens per [BT, EP] block of 4K entries
    (what a program holds in registers)."""
    ep = triton.next_power_of_2(num_experts)
    return ep, max(16, min(256, 4096 // ep))


def expert_order(mask: torch.Tensor, topk: int):
    """``mask`` [T, E] bool → (rows [n], experts [n], flat [n] = rows·E + experts,
    inverse [n], counts [E]), all int64, n = T·topk; see plan.order_by_expert_topk. Two
    launches: each program counts a block of tokens' copies per expert (the last one scans the
    blocks), then each places its block's copies."""
    T, E = mask.shape
    n = T * topk
    out = torch.empty(4, n, dtype=torch.int64, device=mask.device)
    counts = torch.empty(E, dtype=torch.int64, device=mask.device)
    rows, experts, flat, inverse = out.unbind(0)
    if not T:
        counts.zero_()
        return rows, experts, flat, inverse, counts
    ep, bt = _block_rows(E)
    blocks = triton.cdiv(T, bt)
    int32s = torch.empty(blocks * ep + E, dtype=torch.int32, device=mask.device)
    mask = mask.contiguous().view(torch.uint8)
    sizes = dict(E=E, EP=ep, K=topk, BT=bt, num_warps=8)
    _count_blocks_kernel[(blocks,)](mask, int32s, _ticket(mask.device), counts,
                                    int32s[blocks * ep:], T, **sizes)
    _place_kernel[(blocks,)](mask, int32s, int32s, counts, int32s[blocks * ep:], rows, experts,
                             flat, inverse, int32s, T, ROUTED=False, **sizes)
    return rows, experts, flat, inverse, counts


_TICKETS: dict[torch.device, torch.Tensor] = {}


def _ticket(device: torch.device) -> torch.Tensor:
    """The per-device counter the counting launches' programs take tickets from; each launch
    leaves it at zero. Launches on one device must not overlap (one stream, as here)."""
    ticket = _TICKETS.get(device)
    if ticket is None:
        ticket = _TICKETS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return ticket


def topk_softmax_order(logits: torch.Tensor, topk: int):
    """Router top-k, softmax over the picked logits and the expert order, in two launches.

    ``logits`` [T, E] → (probs [n] (logits' dtype, in expert order), idx [T, k] int64 (each
    token's experts ascending), p [T, k] fp32 softmax in idx's order, rows, experts, flat,
    inverse [n] int64 and counts [E] int64 as :func:`expert_order` returns them, except that
    ``flat`` is each row's copy t·k + j: its entry of ``p``), and the int32 row ends of the
    experts, cumsum(counts), as ``torch._grouped_mm`` takes them (None for no tokens). Ties
    between logits go to the lower expert id. See monta/dispatch/routed_order.py.
    """
    T, E = logits.shape
    n = T * topk
    ints = torch.empty(5 * n + E, dtype=torch.int64, device=logits.device)
    floats = torch.empty(n + T * E, dtype=torch.float32, device=logits.device)
    mask = torch.empty(T, E, dtype=torch.int8, device=logits.device)  # scratch
    probs = torch.empty(n, dtype=logits.dtype, device=logits.device)
    idx, rows, experts, flat, inverse = ints[:5 * n].view(5, n).unbind(0)
    counts, p = ints[5 * n:], floats[:n]
    if not T:
        counts.zero_()
        return probs, idx.view(T, topk), p.view(T, topk), rows, experts, flat, inverse, counts, None
    ep, bt = _block_rows(E)
    blocks = triton.cdiv(T, bt)
    int32s = torch.empty(blocks * ep + E, dtype=torch.int32, device=logits.device)
    ends = int32s[blocks * ep:]
    routing = (logits.contiguous(), idx, p, mask, floats[n:], int32s, _ticket(logits.device))
    _topk_softmax_order_kernel[(blocks,)](*routing, counts, ends, T, E=E, EP=ep, K=topk, BT=bt,
                                          num_warps=8)
    _place_kernel[(blocks,)](mask, floats[n:], int32s, counts, ends, rows, experts, flat,
                             inverse, probs, T, E=E, EP=ep, K=topk, BT=bt, ROUTED=True,
                             num_warps=8)
    return probs, idx.view(T, topk), p.view(T, topk), rows, experts, flat, inverse, counts, ends


def gather_sum(y: torch.Tensor, index: torch.Tensor, topk: int, block: int = 1024):
    """``out[t] = Σ_j y[index[t·topk + j]]`` for y [n, H] → [n / topk, H], y's dtype."""
    y = y.contiguous()
    tokens, hidden = index.numel() // topk, y.size(1)
    out = torch.empty(tokens, hidden, dtype=y.dtype, device=y.device)
    if tokens and hidden:
        _gather_sum_kernel[(tokens, triton.cdiv(hidden, block))](y, index, out, hidden, K=topk,
                                                                 BLOCK=block)
    return out
