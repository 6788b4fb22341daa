"""The Triton kernels of :mod:`moe_dist.moe.kernels.grouped_swiglu` (see there).

``dim`` and ``ffn`` are compile-time constants: a model has few of them, and the K loop then
drops its tail mask where ``BLOCK_K`` divides ``dim``.

A module of its own because a ``@triton.jit`` function calls another only through its module
globals, and this import needs Triton: it is imported on the first launch, so CPU installs
without Triton and ``TRITON_INTERPRET`` set by a test before that launch both work.
"""

import triton
import triton.language as tl


@triton.jit
def block_of_program(offsets_ptr, num_groups, num_rows, ffn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
                     GROUPS_P2: tl.constexpr):
    """This program's tile: (group, rows as int64, row mask, columns, column mask). Rows past
    the group's end are masked; a group id of ``num_groups`` means there is no tile to compute."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(num_rows, BLOCK_M) + num_groups
    blocks_n = tl.cdiv(ffn, BLOCK_N)
    band = pid // (GROUP_M * blocks_n)
    band_start = band * GROUP_M
    band_rows = tl.minimum(blocks_m - band_start, GROUP_M)
    pid_m = band_start + (pid % (GROUP_M * blocks_n)) % band_rows
    pid_n = (pid % (GROUP_M * blocks_n)) // band_rows

    gids = tl.arange(0, GROUPS_P2)
    real = gids < num_groups
    ends = tl.load(offsets_ptr + gids, mask=real, other=0).to(tl.int32)
    begins = tl.load(offsets_ptr + gids - 1, mask=real & (gids > 0), other=0).to(tl.int32)
    blocks = (ends - begins + BLOCK_M - 1) // BLOCK_M
    blocks_end = tl.cumsum(blocks, 0)
    group = tl.sum(((blocks_end <= pid_m) & real).to(tl.int32), 0)
    mine = gids == group
    first_block = tl.sum(tl.where(mine, blocks_end - blocks, 0), 0)
    row_begin = tl.sum(tl.where(mine, begins, 0), 0) + (pid_m - first_block) * BLOCK_M
    row_end = tl.sum(tl.where(mine, ends, 0), 0)
    rows = row_begin + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return group, rows.to(tl.int64), rows < row_end, cols, cols < ffn


@triton.jit
def grouped_gate_up_swiglu_kernel(x_ptr, w_ptr, h_ptr, act_ptr, offsets_ptr, num_groups, num_rows,
                                  dim: tl.constexpr, ffn: tl.constexpr, stride_we, stride_wk, stride_wn,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                  GROUP_M: tl.constexpr, GROUPS_P2: tl.constexpr):
    group, rows, row_ok, cols, col_ok = block_of_program(
        offsets_ptr, num_groups, num_rows, ffn, BLOCK_M, BLOCK_N, GROUP_M, GROUPS_P2)
    if group >= num_groups:
        return
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * dim + ks[None, :]
    gate_ptrs = w_ptr + group.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    up_ptrs = gate_ptrs + ffn * stride_wn
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(dim, BLOCK_K)):
        k_ok = (ks < dim - k * BLOCK_K) | (dim % BLOCK_K == 0)  # folds to no K mask when K divides
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b_gate = tl.load(gate_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        b_up = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_gate = tl.dot(a, b_gate, acc_gate)
        acc_up = tl.dot(a, b_up, acc_up)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K * stride_wk
        up_ptrs += BLOCK_K * stride_wk
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    out_ok = row_ok[:, None] & col_ok[None, :]
    h_ptrs = h_ptr + rows[:, None] * (2 * ffn) + cols[None, :]
    tl.store(h_ptrs, acc_gate.to(h_ptr.dtype.element_ty), mask=out_ok)
    tl.store(h_ptrs + ffn, acc_up.to(h_ptr.dtype.element_ty), mask=out_ok)
    tl.store(act_ptr + rows[:, None] * ffn + cols[None, :], act.to(act_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def grouped_swiglu_input_grad_kernel(g_ptr, w_ptr, h_ptr, dh_ptr, offsets_ptr, num_groups, num_rows,
                                     dim: tl.constexpr, ffn: tl.constexpr, stride_we, stride_wn, stride_wk,
                                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                     GROUP_M: tl.constexpr, GROUPS_P2: tl.constexpr):
    # d_act[r, n] = sum_k g[r, k] * w2[e, n, k]; w2[e] is [ffn, dim], read transposed.
    group, rows, row_ok, cols, col_ok = block_of_program(
        offsets_ptr, num_groups, num_rows, ffn, BLOCK_M, BLOCK_N, GROUP_M, GROUPS_P2)
    if group >= num_groups:
        return
    ks = tl.arange(0, BLOCK_K)
    g_ptrs = g_ptr + rows[:, None] * dim + ks[None, :]
    w_ptrs = w_ptr + group.to(tl.int64) * stride_we + ks[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(dim, BLOCK_K)):
        k_ok = (ks < dim - k * BLOCK_K) | (dim % BLOCK_K == 0)  # folds to no K mask when K divides
        a = tl.load(g_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        g_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    out_ok = row_ok[:, None] & col_ok[None, :]
    h_ptrs = h_ptr + rows[:, None] * (2 * ffn) + cols[None, :]
    gate = tl.load(h_ptrs, mask=out_ok, other=0.0).to(tl.float32)
    up = tl.load(h_ptrs + ffn, mask=out_ok, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    d_gate = acc * up * sig * (1.0 + gate * (1.0 - sig))
    d_up = acc * gate * sig
    dh_ptrs = dh_ptr + rows[:, None] * (2 * ffn) + cols[None, :]
    tl.store(dh_ptrs, d_gate.to(dh_ptr.dtype.element_ty), mask=out_ok)
    tl.store(dh_ptrs + ffn, d_up.to(dh_ptr.dtype.element_ty), mask=out_ok)
