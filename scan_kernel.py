"""
scan_kernel.py: the selective scan (S6) of Mamba, five ways (a loop, Triton, PyTorch, C++ for the
CPU, export), one contract.

Reading guide
-------------
Paper: Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"
(arXiv 2312.00752), Algorithm 2 / eq. (2a)-(2b) with the ZOH discretisation of A and the
Euler discretisation of B. LocalMamba (arXiv 2403.09338) runs K of these per layer, one per
scan direction, as ONE grouped call (G = K groups of B/C).

Contract: the real-valued, input-dependent-B/C subset of `mamba_ssm.selective_scan_fn`
(state-spaces/mamba, mamba_ssm/ops/selective_scan_interface.py), with the same argument names,
layouts and results, so users can swap one for the other on what LocalMamba uses:

    selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, return_last_state=False, backend="auto")

Supported: real A (D, N); B and C both (batch, N, L) or both (batch, G, N, L); optional D,
z, delta_bias; fp32/fp16/bf16 inputs (fp64 on "ref"/"torch"), each input may have its own
dtype (the arithmetic is fp32 inside). Not supported (refused with a message): complex A,
input-independent (D, N) B or C, B grouped but C not (or the reverse), zero-size dimensions.
The hand-written backwards are once-differentiable: a double backward raises (use "ref").

Glossary (code name -> paper symbol):
    batch     B in the paper's tensors; called `batch` here because `B` is the input matrix
    D (dim)   number of channels (d_inner of the mixer; K*d_inner for a grouped call)
    L         sequence length (tokens in scan order)
    N         state size per channel (d_state, 16 in all LocalMamba models)
    G         groups of B/C: channel d reads group d // (D/G); G = K runs K directions at once
    u         x_t, the input sequence                       (batch, D, L)
    delta     Δ before softplus / bias                      (batch, D, L)
    A         the diagonal state matrix, negative           (D, N)
    B, C      input / output projections, input-dependent   (batch, N, L) or (batch, G, N, L)
    D (skip)  the skip connection                           (D,)
    z         the gate, out = y * silu(z)                   (batch, D, L)
    x         the hidden state h_t of the paper             (batch, D, N)

Math (state starts at 0, all arithmetic in fp32, or fp64 for fp64 inputs on ref/torch):
    Δ_l = softplus(delta_l + delta_bias)          (softplus only if delta_softplus)
    x_l = exp(Δ_l A) * x_{l-1} + Δ_l B_l u_l      per (batch, d, n)
    y_l = sum_n x_l C_l + D u_l
    out = y * silu(z)                             (if z is given), in u's dtype

The file, top to bottom (the backends, switched by one readable condition in `selective_scan`):
    input checks  `_check_inputs`: one message per bad argument, the same for every backend
    "ref"     `selective_scan_ref`: the obvious loop over L, autograd does the backward.
              The oracle every other path is tested against.
    "triton"  `_scan_fwd_kernel`, `_scan_bwd_kernel`: chunked Triton kernels, forward and
              backward. On CUDA, or on the CPU under TRITON_INTERPRET=1 (how CI tests them).
    "torch"   `selective_scan_torch`: the Triton kernels' chunked algorithm in PyTorch ops, with
              a hand-written backward; the path for CPU and MPS. With compile=True (or
              LOCALMAMBA_COMPILE=1, train_mini.py's CPU default) it runs "cpu" on the CPU.
    "cpu"     `selective_scan_cpu`: two hand-written C++ loops (forward, backward) whose source
              is scan_kernel_cpu.py (optional, as Triton is), built at first use by the C++
              toolchain torch.compile uses; the fast CPU path, fp32/fp16/bf16.
    the fused mixer's ops (localmamba.py's fused path; custom ops, C++ on the CPU, Triton on CUDA):
              `ordered_conv`, `ordered_scan` (the scan orders in their loads and stores, Δ's
              projection inside), `token_norm_mean` and `gated_sum` (SCAttn's statistics, its gate
              and the sum over the directions), each with its backward op; what the mixers call
              composes them into one autograd node each, so that no input's gradient is written
              twice and added: `x_proj_scan` (x_proj + ordered_scan), `scattn_sum` (SCAttn + sum);
              `rope_rms_norm` (LocalVim's block before its mixer: residual add, RoPE, RMSNorm).
    "export"  `selective_scan_export`: the "ref" math with its loop as torch's `scan` op, which
              torch.export and torch.onnx keep as one loop (an ONNX `Scan`). Forward only.
    "auto"    "export" while exporting ("ref" under the legacy ONNX exporter, which traces); "triton"
              for CUDA tensors when Triton imports; else "torch" (so "cpu" when compiling is on).
    then `selective_scan` (the one entry point) and `compile_check` (the GPU compiler, no GPU).

`python scan_kernel.py --compile-check 80 90` compiles the Triton kernels for A100 / H100 without
a GPU; `python experiments/bench_scan.py` times the backends available here (docs/scan.md).
"""
import contextlib
import functools
import os
import warnings
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

try:  # Triton is optional: it is missing on macOS/Windows wheels and not needed on CPU.
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton, tl, HAS_TRITON = None, None, False

try:  # the C++ CPU kernels' source is optional too: without it the CPU runs the PyTorch path
    import scan_kernel_cpu
except ImportError:  # pragma: no cover - a copy of scan_kernel.py alone
    scan_kernel_cpu = None

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

__all__ = ["selective_scan", "selective_scan_ref", "selective_scan_torch", "selective_scan_cpu",
           "selective_scan_triton", "selective_scan_export", "HAS_TRITON"]


# -----------------------------------------------------------------------------
# input checks, shared by every backend

def _check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """Raise one ValueError naming the argument, the shape it has and the shape it needs. Runs
    before any backend touches the data, so every backend refuses the same calls."""
    def need(cond, msg):
        if not cond:
            raise ValueError("selective_scan: " + msg)

    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        need(isinstance(t, torch.Tensor), f"{name} must be a torch.Tensor, got {type(t).__name__}")
    need(u.dim() == 3, f"u must be (batch, D, L), got shape {tuple(u.shape)}")
    batch, dim, L = u.shape
    need(delta.shape == u.shape, f"delta must be (batch, D, L) = {tuple(u.shape)} like u, got {tuple(delta.shape)}")
    need(A.dim() == 2 and A.shape[0] == dim, f"A must be (D, N) with D = {dim}, got {tuple(A.shape)}")
    N = A.shape[1]
    need(all(n >= 1 for n in (batch, dim, L, N)), f"every dimension must be at least 1, got u {tuple(u.shape)} and A "
                                     f"{tuple(A.shape)} (batch, D, L, N = {batch}, {dim}, {L}, {N})")
    for name, t in (("B", B), ("C", C)):
        ok = t.shape == (batch, N, L) if t.dim() == 3 else (t.dim() == 4 and t.shape[0] == batch
                                                             and t.shape[2:] == (N, L))
        need(ok, f"{name} must be (batch, N, L) = {(batch, N, L)} or (batch, G, N, L) = {(batch, 'G', N, L)}, "
                 f"got {tuple(t.shape)}")
        if t.dim() == 4:
            G = t.shape[1]
            need(G >= 1 and dim % G == 0, f"{name} has G = {G} groups, which must divide D = {dim} "
                                          f"(channel d uses group d // (D/G))")
    groups = lambda t: "(batch, N, L)" if t.dim() == 3 else f"(batch, G, N, L) with G = {t.shape[1]}"
    need(B.dim() == C.dim() and (B.dim() == 3 or B.shape[1] == C.shape[1]),
         f"B and C must have the same layout and groups, got B {groups(B)} and C {groups(C)}")
    for name, t, shape in (("D", D, (dim,)), ("delta_bias", delta_bias, (dim,)), ("z", z, tuple(u.shape))):
        if t is not None:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            need(isinstance(t, torch.Tensor) and tuple(t.shape) == shape, f"{name} must be {shape}, got {got}")
    need(isinstance(delta_softplus, bool), f"delta_softplus must be True or False, got {delta_softplus!r}")
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z),
                    ("delta_bias", delta_bias)):
        if t is not None:
            need(t.dtype in floats, f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    devices = {t.device for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}
    need(len(devices) == 1, f"all tensors must be on one device, got {sorted(str(d) for d in devices)}; "
                            f"move them with .to(u.device)")
    # A > 0 is valid arithmetic but a state that grows as exp(Δ A) per step, without bound (values to
    # 1e32 and beyond): said once. Only where reading A costs nothing: CPU tensors, not while tracing
    # (on a GPU the check would wait for the device at every call; the models' A = -exp(A_log) < 0).
    if (A.device.type == "cpu" and not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and bool((A > 0).any())):
        warnings.warn(f"selective_scan: A has positive entries (up to {A.max().item():.3g}): the state then grows "
                      f"by exp(Δ·A) > 1 at every step, without bound; Mamba keeps A = -exp(A_log) < 0",
                      stacklevel=4)   # the caller of selective_scan


def _as_groups(t):
    """(batch, N, L) -> (batch, 1, N, L); (batch, G, N, L) unchanged."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def _compute_dtype(u):
    """The arithmetic's dtype: fp32 for fp32/fp16/bf16 inputs (each input is cast to it inside, as
    the official LocalVMamba casts its scan inputs under AMP), fp64 when u is fp64."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


# -----------------------------------------------------------------------------
# "ref": the naive loop, written as the paper's equations. Autograd does the backward.

def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    """The oracle: a plain loop over L. Slow, obvious, differentiable, any float dtype."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    out_dtype, f = u.dtype, _compute_dtype(u)
    batch, dim, L = u.shape
    u, delta, A = u.to(f), delta.to(f), A.to(f)
    B, C = _as_groups(B).to(f), _as_groups(C).to(f)                          # (batch, G, N, L)
    G = B.shape[1]
    B = B.repeat_interleave(dim // G, dim=1)                                  # (batch, D, N, L)
    C = C.repeat_interleave(dim // G, dim=1)                                  # (batch, D, N, L)
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[None, :, None]
    if delta_softplus:
        delta = F.softplus(delta)                                             # threshold 20, as torch
    x = u.new_zeros(batch, dim, A.shape[1])                                   # (batch, D, N)
    ys = []
    for l in range(L):
        dA = torch.exp(delta[:, :, l, None] * A)                              # (batch, D, N)  ZOH
        dBu = delta[:, :, l, None] * B[:, :, :, l] * u[:, :, l, None]         # (batch, D, N)  Euler
        x = dA * x + dBu
        ys.append((x * C[:, :, :, l]).sum(-1))                                # (batch, D)
    y = torch.stack(ys, dim=-1)                                               # (batch, D, L)
    if D is not None:
        y = y + D.to(f)[None, :, None] * u
    out = y if z is None else y * F.silu(z.to(f))
    out = out.to(out_dtype)
    return (out, x.detach()) if return_last_state else out


# -----------------------------------------------------------------------------
# "triton": chunked forward and backward kernels.
#
# Program-id -> data (`_tile`, shared by both kernels): program (pid_d, pid_bg) owns batch
# b = pid_bg // G, group g = pid_bg % G and BLOCK_D consecutive channels of that group, all N
# states of each. A tile never crosses a group, so each B/C chunk is loaded once per tile and
# dB/dC are reduced over the tile's channels in registers before one atomic add per (n, l).
#
# Along L the program walks chunks of CHUNK steps (a launch constant from `_triton_config`: 16,
# or 4 for N > 64) in order (backward: in reverse order). Inside a chunk the recurrence
# x_l = a_l x_{l-1} + b_l is a `tl.associative_scan` over the chunk axis with the combine
# (a1, b1) ∘ (a2, b2) = (a1 a2, a2 b1 + b2): CHUNK steps in parallel, and the (BLOCK_D, N)
# state carried between chunks in registers. The forward writes the state at the start of
# every chunk (the chunk starts, (batch, D, n_chunks, N) fp32); the backward reloads it,
# recomputes the chunk's states (`_load_chunk`, `_scan_chunk`: the same code as the forward) and runs the
# reverse scan for dh in the same registers. Nothing of size (batch, D, L, N) ever touches
# memory. Offsets are int32: the wrapper refuses shapes whose largest offset reaches 2^31.

if HAS_TRITON:
    @triton.jit
    def _recurrence_combine(a1, b1, a2, b2):
        # x = a2 * (a1 * x0 + b1) + b2: the linear map of two consecutive steps
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _softplus(x):
        # torch's softplus with threshold 20: log1p(exp(x)) for x <= 20, x above
        return tl.where(x <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))), x)

    @triton.jit
    def _delta(dt_raw, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        # Δ before softplus (with its bias) and Δ, (BD, T)
        if HAS_BIAS:
            dt_raw += bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt_raw)
        else:
            dt = dt_raw
        return dt_raw, dt

    @triton.jit
    def _tile(A_ptr, D_ptr, bias_ptr, dim, L, N, G,
              HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        # program (pid_d, pid_bg) -> batch b, group g, channels offs_d of that group; the tile's
        # A (BD, BN), D skip and Δ bias (BD,); row / bc_row: where each channel's / B-C row starts
        pid_d = tl.program_id(0)
        pid_bg = tl.program_id(1)
        b = pid_bg // G
        g = pid_bg % G
        dg = dim // G                                               # channels per group
        offs_c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)            # channel within the group
        mask_d = offs_c < dg
        offs_d = g * dg + offs_c                                    # channel within D
        offs_n = tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        mask_dn = mask_d[:, None] & mask_n[None, :]
        A = tl.load(A_ptr + offs_d[:, None] * N + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
        Dskip = tl.zeros((BLOCK_D,), dtype=tl.float32)
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
        if HAS_D:
            Dskip = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        row = (b * dim + offs_d) * L                                # start of each channel's row
        bc_row = ((b * G + g) * N + offs_n) * L                     # start of each B/C row
        return b, offs_d, mask_d, offs_n, mask_n, mask_dn, A, Dskip, bias, row, bc_row

    @triton.jit
    def _load_chunk(u_ptr, dt_ptr, B_ptr, C_ptr, ptrs, m2, bc_ptrs, mbc, bias,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
        # one chunk's inputs, fp32: u (BD, T); Δ before softplus (dt_raw, for the backward's softplus
        # derivative) and Δ itself, 0 on padding steps (BD, T); B and C (BN, T)
        u = tl.load(u_ptr + ptrs, mask=m2, other=0.0).to(tl.float32)
        dt_raw, dt = _delta(tl.load(dt_ptr + ptrs, mask=m2, other=0.0).to(tl.float32), bias, HAS_BIAS, SOFTPLUS)
        dt = tl.where(m2, dt, 0.0)            # padding steps must leave the state unchanged
        Bc = tl.load(B_ptr + bc_ptrs, mask=mbc, other=0.0).to(tl.float32)
        Cc = tl.load(C_ptr + bc_ptrs, mask=mbc, other=0.0).to(tl.float32)
        return u, dt_raw, dt, Bc, Cc

    @triton.jit
    def _scan_chunk(u, dt, Bc, A, x0):
        # x_l = exp(Δ_l A) x_{l-1} + Δ_l B_l u_l over the chunk from x0 (BD, BN): one associative scan.
        # Returns ΔBu and the states x_l, each (BD, BN, T)
        dA = tl.exp(dt[:, None, :] * A[:, :, None])                                # (BD, BN, T)
        dBu = (dt * u)[:, None, :] * Bc[None, :, :]                                # (BD, BN, T)
        P, h = tl.associative_scan((dA, dBu), 2, _recurrence_combine)              # (BD, BN, T) x2
        return dBu, h + P * x0[:, :, None]

    @triton.jit
    def _scan_fwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr,  # inputs: (batch, D, L) x2, (D, N), (batch, G, N, L) x2
        D_ptr, z_ptr, bias_ptr,             # optional: (D,), (batch, D, L), (D,)
        out_ptr,            # (batch, D, L), u's dtype
        starts_ptr,         # (batch, D, n_chunks, N) fp32: the chunk starts, the state before each chunk
        last_ptr,           # (batch, D, N) fp32: x_{L-1}
        dim, L, N, G, n_chunks,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
    ):
        b, offs_d, mask_d, offs_n, mask_n, mask_dn, A, Dskip, bias, row, bc_row = _tile(
            A_ptr, D_ptr, bias_ptr, dim, L, N, G, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
        offs_t = tl.arange(0, CHUNK)
        x = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)                 # the state, carried across chunks
        for c in range(0, n_chunks):
            offs_l = c * CHUNK + offs_t
            ptrs, m2 = row[:, None] + offs_l[None, :], mask_d[:, None] & (offs_l[None, :] < L)         # (BD, T)
            bc_ptrs, mbc = bc_row[:, None] + offs_l[None, :], mask_n[:, None] & (offs_l[None, :] < L)  # (BN, T)
            # 1. save the chunk start (the state before this chunk) for the backward
            tl.store(starts_ptr + (((b * dim + offs_d[:, None]) * n_chunks + c) * N + offs_n[None, :]), x,
                     mask=mask_dn)
            # 2. load the chunk's inputs and scan its states from the carried state
            u, _, dt, Bc, Cc = _load_chunk(u_ptr, dt_ptr, B_ptr, C_ptr, ptrs, m2, bc_ptrs, mbc, bias,
                                           HAS_BIAS, SOFTPLUS)
            _, xs = _scan_chunk(u, dt, Bc, A, x)
            # 3. the output y_l = sum_n x_l C_l + D u_l, gated by silu(z_l)
            y = tl.sum(xs * Cc[None, :, :], axis=1)                                    # (BD, T)
            if HAS_D:
                y += Dskip[:, None] * u
            if HAS_Z:
                zz = tl.load(z_ptr + ptrs, mask=m2, other=0.0).to(tl.float32)
                y = y * zz * tl.sigmoid(zz)
            tl.store(out_ptr + ptrs, y.to(out_ptr.dtype.element_ty), mask=m2)
            # 4. carry the chunk's last state into the next chunk (BD, BN)
            x = tl.sum(tl.where(offs_t[None, None, :] == CHUNK - 1, xs, 0.0), axis=2)

        # x_{L-1}, for return_last_state
        tl.store(last_ptr + (b * dim + offs_d[:, None]) * N + offs_n[None, :], x, mask=mask_dn)

    @triton.jit
    def _scan_bwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, starts_ptr,  # as in the forward
        dim, L, N, G, n_chunks,
        dout_ptr,           # (batch, D, L)
        du_ptr, ddt_ptr, dz_ptr,    # (batch, D, L) fp32
        dA_ptr,             # (batch, D, N) fp32 partial sums, summed over batch by the wrapper
        dB_ptr, dC_ptr,     # (batch, G, N, L) fp32, zeroed: atomically accumulated over channel tiles; with
                            # DETERMINISTIC (n_tiles, batch, G, N, L): each tile stores its part, the wrapper sums
        dD_ptr, dbias_ptr,  # (batch, D) fp32 partial sums
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, DETERMINISTIC: tl.constexpr,
    ):
        b, offs_d, mask_d, offs_n, mask_n, mask_dn, A, Dskip, bias, row, bc_row = _tile(
            A_ptr, D_ptr, bias_ptr, dim, L, N, G, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
        offs_t = tl.arange(0, CHUNK)
        dh_carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)    # dh at the first step of the next chunk
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for i in range(0, n_chunks):
            c = n_chunks - 1 - i
            offs_l = c * CHUNK + offs_t
            ptrs, m2 = row[:, None] + offs_l[None, :], mask_d[:, None] & (offs_l[None, :] < L)         # (BD, T)
            bc_ptrs, mbc = bc_row[:, None] + offs_l[None, :], mask_n[:, None] & (offs_l[None, :] < L)  # (BN, T)
            # 1. recompute this chunk's states from its chunk start (the same code as the forward)
            x0 = tl.load(starts_ptr + (((b * dim + offs_d[:, None]) * n_chunks + c) * N + offs_n[None, :]),
                         mask=mask_dn, other=0.0)
            u, dt_raw, dt, Bc, Cc = _load_chunk(u_ptr, dt_ptr, B_ptr, C_ptr, ptrs, m2, bc_ptrs, mbc, bias,
                                                HAS_BIAS, SOFTPLUS)
            dBu, xs = _scan_chunk(u, dt, Bc, A, x0)
            a = xs - dBu                                                               # exp(Δ_l A) x_{l-1}
            # Δ at l+1, for the factor exp(Δ_{l+1} A) of the reverse scan
            m2n = mask_d[:, None] & (offs_l[None, :] + 1 < L)
            _, dtn = _delta(tl.load(dt_ptr + ptrs + 1, mask=m2n, other=0.0).to(tl.float32), bias, HAS_BIAS, SOFTPLUS)
            dtn = tl.where(m2n, dtn, 0.0)
            dout = tl.load(dout_ptr + ptrs, mask=m2, other=0.0).to(tl.float32)

            # 2. the gate and the output gradient
            y = tl.sum(xs * Cc[None, :, :], axis=1)                                    # (BD, T)
            if HAS_D:
                y += Dskip[:, None] * u
            if HAS_Z:
                zz = tl.load(z_ptr + ptrs, mask=m2, other=0.0).to(tl.float32)
                sz = tl.sigmoid(zz)
                gy = dout * zz * sz                                                    # dL/dy
                dz = dout * y * sz * (1.0 + zz * (1.0 - sz))
                tl.store(dz_ptr + ptrs, dz, mask=m2)
            else:
                gy = dout

            # 3. reverse scan: dh_l = gy_l C_l + exp(Δ_{l+1} A) dh_{l+1}, carried across chunks
            dA_next = tl.exp(dtn[:, None, :] * A[:, :, None])                          # (BD, BN, T)
            gC = gy[:, None, :] * Cc[None, :, :]
            Q, r = tl.associative_scan((dA_next, gC), 2, _recurrence_combine, reverse=True)
            dh = r + Q * dh_carry[:, :, None]                                          # (BD, BN, T)
            dh_carry = tl.sum(tl.where(offs_t[None, None, :] == 0, dh, 0.0), axis=2)

            # 4. gradients
            dhdt = dh * dt[:, None, :]
            ddt = tl.sum(dh * (A[:, :, None] * a + Bc[None, :, :] * u[:, None, :]), axis=1)   # (BD, T)
            dA_acc += tl.sum(dhdt * a, axis=2)
            du = tl.sum(dhdt * Bc[None, :, :], axis=1)
            if HAS_D:
                du += gy * Dskip[:, None]
                dD_acc += tl.sum(tl.where(m2, gy * u, 0.0), axis=1)
            dB = tl.sum(dhdt * u[:, None, :], axis=0)                                  # (BN, T) over the tile
            dC = tl.sum(xs * gy[:, None, :], axis=0)                                   # (BN, T)
            if DETERMINISTIC:   # no atomics: the sum over tiles happens in a fixed order, afterwards
                part = tl.program_id(0) * (tl.num_programs(1) * N * L)                   # this tile's slice
                tl.store(dB_ptr + part + bc_ptrs, dB, mask=mbc)
                tl.store(dC_ptr + part + bc_ptrs, dC, mask=mbc)
            else:               # atomics: the order of the adds varies from run to run on a GPU
                tl.atomic_add(dB_ptr + bc_ptrs, dB, mask=mbc)
                tl.atomic_add(dC_ptr + bc_ptrs, dC, mask=mbc)
            if SOFTPLUS:
                ddt = ddt * tl.where(dt_raw <= 20.0, tl.sigmoid(dt_raw), 1.0)
            ddt = tl.where(m2, ddt, 0.0)
            if HAS_BIAS:
                dbias_acc += tl.sum(ddt, axis=1)
            tl.store(du_ptr + ptrs, du, mask=m2)
            tl.store(ddt_ptr + ptrs, ddt, mask=m2)

        tl.store(dA_ptr + (b * dim + offs_d[:, None]) * N + offs_n[None, :], dA_acc, mask=mask_dn)
        if HAS_D:
            tl.store(dD_ptr + b * dim + offs_d, dD_acc, mask=mask_d)
        if HAS_BIAS:
            tl.store(dbias_ptr + b * dim + offs_d, dbias_acc, mask=mask_d)


def _triton_config(N, dg):
    """Launch heuristics: (BLOCK_D, BLOCK_N, CHUNK)."""
    BLOCK_N = triton.next_power_of_2(N)
    # CHUNK: steps scanned in parallel; 16 keeps the (BLOCK_D, N, CHUNK) tensors in registers.
    CHUNK = 16 if BLOCK_N <= 64 else 4
    # BLOCK_D: ~2K fp32 per (BLOCK_D, N, CHUNK) tensor, and no wider than the group.
    BLOCK_D = max(1, min(2048 // (BLOCK_N * CHUNK), triton.next_power_of_2(dg)))
    return BLOCK_D, BLOCK_N, CHUNK


INT32_LIMIT = 2 ** 31


def triton_largest_offset(batch, dim, L, N, G):
    """The largest element offset the kernels compute for this shape: over the (batch, D, L)
    rows, the (batch, G, N, L) B/C rows and the (batch, D, n_chunks, N) chunk starts."""
    n_chunks = -(-L // _triton_config(N, dim // G)[2])
    return max(batch * dim * L, batch * G * N * L, batch * dim * n_chunks * N, batch * dim * N)


def _launch_meta(D, z, delta_bias, delta_softplus, dim, L, N, G, batch):
    """The grid and the compile-time flags of one launch (forward or backward), after checking
    that every offset fits the kernels' int32 arithmetic."""
    largest = triton_largest_offset(batch, dim, L, N, G)
    if largest >= INT32_LIMIT:
        raise ValueError(f"selective_scan: backend='triton' computes offsets in int32, and this shape (batch "
                         f"{batch}, D {dim}, L {L}, N {N}, G {G}) needs offsets up to {largest:,} >= 2^31; "
                         f"split the batch, or use backend='torch'")
    BLOCK_D, BLOCK_N, CHUNK = _triton_config(N, dim // G)
    grid = (triton.cdiv(dim // G, BLOCK_D), batch * G)
    flags = dict(HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
                 SOFTPLUS=bool(delta_softplus), BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, CHUNK=CHUNK)
    return grid, triton.cdiv(L, CHUNK), flags


def _triton_deterministic(dim, G, N):
    """Whether the backward sums dB/dC without atomics: under torch.use_deterministic_algorithms(True),
    where a group's channels span more than one tile (with one tile there is one add per element)."""
    return torch.are_deterministic_algorithms_enabled() and triton.cdiv(dim // G, _triton_config(N, dim // G)[0]) > 1


def _or_dummy(t, dummy):
    """A kernel pointer argument for an optional tensor: its flag (HAS_D, ...) is off when t is
    None, and the kernel never reads the dummy it gets instead."""
    return dummy if t is None else t


class _SelectiveScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        batch, dim, L = u.shape
        N = A.shape[1]
        # the kernels index every tensor as dense row-major: make each one so (a no-op when it is)
        u, delta, A, Bg, Cg = (t.contiguous() for t in (u, delta, A, _as_groups(B), _as_groups(C)))
        D, z, delta_bias = (None if t is None else t.contiguous() for t in (D, z, delta_bias))
        G = Bg.shape[1]
        grid, n_chunks, flags = _launch_meta(D, z, delta_bias, delta_softplus, dim, L, N, G, batch)
        out = torch.empty_like(u)
        starts = torch.empty(batch, dim, n_chunks, N, device=u.device, dtype=torch.float32)
        last = torch.empty(batch, dim, N, device=u.device, dtype=torch.float32)
        with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():   # launch on u's GPU
            _scan_fwd_kernel[grid](
                u, delta, A, Bg, Cg, _or_dummy(D, u), _or_dummy(z, u), _or_dummy(delta_bias, u), out, starts, last,
                dim, L, N, G, n_chunks, **flags)
        ctx.save_for_backward(u, delta, A, Bg, Cg, D, z, delta_bias, starts)
        ctx.meta = (delta_softplus, B.dim() == 3, C.dim() == 3, B.dtype, C.dtype)
        ctx.mark_non_differentiable(last)
        return out, last

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlast):
        u, delta, A, Bg, Cg, D, z, delta_bias, starts = ctx.saved_tensors
        delta_softplus, squeeze_B, squeeze_C, B_dtype, C_dtype = ctx.meta
        batch, dim, L = u.shape
        N = A.shape[1]
        G = Bg.shape[1]
        grid, n_chunks, flags = _launch_meta(D, z, delta_bias, delta_softplus, dim, L, N, G, batch)
        dout = dout.contiguous()
        f32 = dict(device=u.device, dtype=torch.float32)
        du, ddt = torch.empty(batch, dim, L, **f32), torch.empty(batch, dim, L, **f32)
        dz = torch.empty(batch, dim, L, **f32) if z is not None else None
        dA = torch.empty(batch, dim, N, **f32)
        det = flags["DETERMINISTIC"] = _triton_deterministic(dim, G, N)
        if det and grid[0] * batch * G * N * L >= INT32_LIMIT:
            raise ValueError(f"selective_scan: the deterministic Triton backward keeps dB/dC per channel tile, "
                             f"{grid[0] * batch * G * N * L:,} values: past int32 offsets; split the batch")
        parts = (grid[0],) if det else ()          # per channel tile, summed below, or one atomic sum
        dB, dC = (torch.empty if det else torch.zeros)(2, *parts, batch, G, N, L, **f32).unbind(0)
        dD = torch.empty(batch, dim, **f32) if D is not None else None
        dbias = torch.empty(batch, dim, **f32) if delta_bias is not None else None
        with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
            _scan_bwd_kernel[grid](
                u, delta, A, Bg, Cg, _or_dummy(D, u), _or_dummy(z, u), _or_dummy(delta_bias, u), starts,
                dim, L, N, G, n_chunks,
                dout, du, ddt, _or_dummy(dz, du), dA, dB, dC, _or_dummy(dD, du), _or_dummy(dbias, du), **flags)
        if det:
            dB, dC = dB.sum(0), dC.sum(0)
        dB = dB.squeeze(1) if squeeze_B else dB
        dC = dC.squeeze(1) if squeeze_C else dC
        return (du.to(u.dtype), ddt.to(delta.dtype), dA.sum(0).to(A.dtype), dB.to(B_dtype), dC.to(C_dtype),
                None if D is None else dD.sum(0).to(D.dtype), None if z is None else dz.to(z.dtype),
                None if delta_bias is None else dbias.sum(0).to(delta_bias.dtype), None)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False):
    """The Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1). Inputs in fp32,
    fp16 or bf16 (each may differ); the arithmetic is fp32."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if not HAS_TRITON:
        raise RuntimeError("selective_scan: backend='triton' needs the triton package (pip install triton); "
                           "use backend='torch' instead")
    if u.device.type != "cuda" and not TRITON_INTERPRET:
        raise ValueError(f"selective_scan: backend='triton' needs CUDA tensors (u is on {u.device}); "
                         "set TRITON_INTERPRET=1 before importing triton to run the kernels on the CPU, "
                         "or use backend='torch'")
    if torch.float64 in {t.dtype for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None}:
        raise ValueError("selective_scan: backend='triton' computes in fp32 and takes fp32/fp16/bf16 tensors; "
                         "for float64 use backend='ref' or 'torch'")
    out, last = _SelectiveScanTriton.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last.detach()) if return_last_state else out


# -----------------------------------------------------------------------------
# "torch": the fallback for every non-CUDA tensor. The same algorithm as the Triton kernels,
# in PyTorch ops. L is cut into chunks of TORCH_CHUNK = 8 steps and the batch into blocks of a
# few samples, so that every temporary (T, block, G, Dg, N) stays in the CPU cache (T = steps in
# a chunk, Dg = D / G channels per group); in a chunk, everything that does not depend on the
# previous state (exp(ΔA), ΔBu, the contractions with C, every gradient) is one op over the
# chunk, and only the multiply-add of the recurrence loops over the T steps. The forward keeps
# the state at the start of each chunk; the backward walks the chunks in reverse, recomputes
# each chunk's states from its chunk start and runs the reverse scan. So autograd saves
# O(batch·D·L), not O(batch·D·L·N).
#
# The two chunk functions have static shapes (the last chunk is padded with Δ = 0 and the
# last block with u = 0, B = 0, which leave the state unchanged). On the CPU, compile=True runs
# the C++ kernels of the next section instead (`selective_scan_cpu`); on other devices it runs
# the chunk functions through `torch.compile`. Whether backend "torch" compiles is decided once,
# at start-up: LOCALMAMBA_COMPILE=1 in the environment, or `use_compiled_torch_path(True)` before
# the first scan (train_mini.py does this on CPU unless --no-compile).
# `selective_scan_torch(..., compile=...)` chooses per call.

LOG2E = 1.4426950408889634
TORCH_CHUNK = 8            # steps per chunk of the torch path (one saved chunk start each)
BLOCK_ELEMS = 1 << 19      # (TORCH_CHUNK, block, D, N) temporaries of about 2 MB


def compile_env():
    """LOCALMAMBA_COMPILE, read strictly: "1" True (compile), "0" False (eager), unset or empty None
    (the program's own default). Anything else is one ValueError naming the value: a typo such as
    "true" or "yes" must not quietly mean off."""
    value = os.environ.get("LOCALMAMBA_COMPILE", "")
    if value not in ("", "0", "1"):
        raise ValueError(f"LOCALMAMBA_COMPILE={value!r}: set it to 1 (compile the scan: the C++ kernels on the "
                         f"CPU) or 0 (run it eagerly), or unset it")
    return None if value == "" else value == "1"


try:
    COMPILE_TORCH_PATH = bool(compile_env())
    _COMPILE_ENV_ERROR = None
except ValueError as e:   # raised at the first scan that would read it, not at import (one message, not a traceback)
    COMPILE_TORCH_PATH, _COMPILE_ENV_ERROR = False, str(e)


def use_compiled_torch_path(enable=True):
    """Decide, once at start-up, whether backend "torch" compiles: the C++ kernels on the CPU, its
    chunk functions through torch.compile elsewhere. A build that fails later raises
    TorchCompileError saying how to turn it off."""
    global COMPILE_TORCH_PATH, _COMPILE_ENV_ERROR
    COMPILE_TORCH_PATH, _COMPILE_ENV_ERROR = bool(enable), None      # an explicit choice overrides the variable


class TorchCompileError(RuntimeError):
    """The compiled scan could not be built (no C++ compiler, an unsupported platform)."""


def _block_size(batch, dim, N):
    """Samples per block: a large batch runs in blocks whose chunk temporaries fit in cache."""
    return max(1, min(batch, BLOCK_ELEMS // (TORCH_CHUNK * dim * N)))


def _chunk_states(dt, u, A2, B, x0):
    """A chunk's states from the state x0 before it. dt, u: (T, b, G, Dg); A2 = A·log2(e):
    (G, Dg, N); B: (T, b, G, N); x0: (b, G, Dg, N). Returns exp(ΔA), ΔBu and the states x_t,
    each (T, b, G, Dg, N)."""
    dA = torch.exp2(dt[..., None] * A2)                                       # exp(Δ A)
    dBu = (dt * u)[..., None] * B[:, :, :, None, :]                          # Δ B u
    x, xs = x0, []
    for t in range(dt.shape[0]):
        x = dA[t] * x + dBu[t]                                                # x_t = exp(Δ_t A) x_{t-1} + Δ_t B_t u_t
        xs.append(x)
    return dA, dBu, torch.stack(xs)


def _chunk_fwd(dt, u, A2, B, C, x0):
    """One chunk forward (shapes in _chunk_states; C like B). Returns y (T, b, G, Dg) and the
    chunk's last state."""
    _, _, xs = _chunk_states(dt, u, A2, B, x0)
    y = (xs * C[:, :, :, None, :]).sum(-1)                                    # (T, b, G, Dg) = sum_n x C
    return y, xs[-1]


def _chunk_bwd(dt, u, A, A2, B, C, x0, g, dh_next, dA_next):
    """One chunk backward (the reverse scan of the module docstring's math). g = dL/dy
    (T, b, G, Dg); dh_next, dA_next: dh and exp(Δ A) at the step after the chunk."""
    dA, _, xs = _chunk_states(dt, u, A2, B, x0)                               # recomputed from x0
    gC = g[..., None] * C[:, :, :, None, :]
    dh, dhs = dh_next * dA_next, []
    for t in reversed(range(dt.shape[0])):
        dh = gC[t] + (dh if t == dt.shape[0] - 1 else dA[t + 1] * dh)        # dh_t = g_t C_t + exp(Δ_{t+1} A) dh_{t+1}
        dhs.append(dh)
    dhs = torch.stack(dhs[::-1])                                              # (T, b, G, Dg, N)
    xp = torch.cat([x0[None], xs[:-1]])                                       # x_{t-1}
    w = dhs * dA * xp              # dh · exp(Δ_t A) x_{t-1}: a product, not x_t - ΔBu (which cancels)
    dhB = (dhs * B[:, :, :, None, :]).sum(-1)                                 # sum_n dh B
    ddt = (w * A).sum(-1) + u * dhB                                           # dL/dΔ
    dA_part = (w * dt[..., None]).sum((0, 1))                                 # (G, Dg, N)
    du = dt * dhB
    dB = (dhs * (dt * u)[..., None]).sum(-2)                                  # (T, b, G, N): over the group's channels
    dC = (xs * g[..., None]).sum(-2)
    y = (xs * C[:, :, :, None, :]).sum(-1)
    return ddt, du, dA_part, dB, dC, y, dhs[0], dA[0]


def _compiled(fn):
    """fn through torch.compile; a failure (at the first call, when compiling happens) becomes
    one TorchCompileError that says how to run without it."""
    compiled = torch.compile(fn, dynamic=False)

    def run(*args):
        try:
            return compiled(*args)
        except Exception as e:
            raise TorchCompileError(
                f"torch.compile could not build the CPU scan ({type(e).__name__}: {str(e)[:300]}); run without "
                f"it: `python train_mini.py --no-compile`, or LOCALMAMBA_COMPILE=0, or "
                f"selective_scan_torch(compile=False)"
            ) from e
    return run


@functools.lru_cache(maxsize=None)
def _chunk_fns(compile):
    """(forward, backward) chunk functions, eager or compiled (compiled once per process)."""
    return (_compiled(_chunk_fwd), _compiled(_chunk_bwd)) if compile else (_chunk_fwd, _chunk_bwd)


def _torch_layout(u, delta, A, B, C, delta_bias, delta_softplus):
    """Cast to the compute dtype, pad L to whole chunks, lay out L-major with channels in groups."""
    f = _compute_dtype(u)
    batch, dim, L = u.shape
    Bg, Cg = _as_groups(B), _as_groups(C)
    G = Bg.shape[1]
    pad = -L % TORCH_CHUNK
    dt_raw = delta.to(f)
    if delta_bias is not None:
        dt_raw = dt_raw + delta_bias.to(f)[None, :, None]
    dt = F.softplus(dt_raw) if delta_softplus else dt_raw                     # (batch, D, L)
    lbgk = lambda t: F.pad(t.to(f), (0, pad)).permute(2, 0, 1).reshape(L + pad, batch, G, dim // G).contiguous()
    lbgn = lambda t: F.pad(t.to(f), (0, pad)).permute(3, 0, 1, 2).contiguous()  # (L', batch, G, N)
    A_g = A.to(f).reshape(G, dim // G, -1)                                     # (G, Dg, N)
    return dict(dt_raw=dt_raw, dt=lbgk(dt), u=lbgk(u), A=A_g, A2=A_g * LOG2E, B=lbgn(Bg), C=lbgn(Cg), L=L)


class _SelectiveScanTorch(torch.autograd.Function):
    """One block of the batch (see selective_scan_torch). `fns`: the (forward, backward) chunk
    functions, eager or compiled."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus, fns):
        f = _compute_dtype(u)
        batch, dim, L = u.shape
        p = _torch_layout(u, delta, A, B, C, delta_bias, delta_softplus)
        G, N = p["A"].shape[0], p["A"].shape[2]
        x = u.new_zeros(batch, G, dim // G, N, dtype=f)                       # (batch, G, Dg, N)
        ys, starts = [], []
        for c0 in range(0, L, TORCH_CHUNK):
            sl = slice(c0, c0 + TORCH_CHUNK)
            starts.append(x)
            y, x = fns[0](p["dt"][sl], p["u"][sl], p["A2"], p["B"][sl], p["C"][sl], x)
            ys.append(y)
        y = torch.cat(ys)[:L].reshape(L, batch, dim).permute(1, 2, 0)          # (batch, D, L)
        if D is not None:
            y = y + D.to(f)[None, :, None] * u.to(f)
        out = y if z is None else y * F.silu(z.to(f))
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, torch.stack(starts))
        ctx.delta_softplus, ctx.fns = delta_softplus, fns
        last = x.reshape(batch, dim, N).clone()
        ctx.mark_non_differentiable(last)
        return out.to(u.dtype), last

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        f = _compute_dtype(u)
        batch, dim, L = u.shape
        p = _torch_layout(u, delta, A, B, C, delta_bias, ctx.delta_softplus)
        G, N = p["A"].shape[0], p["A"].shape[2]
        Lp = p["dt"].shape[0]
        dout, uf = dout.to(f), u.to(f)
        if z is not None:                                                     # out = y silu(z)
            zf = z.to(f)
            sz = torch.sigmoid(zf)
            g = dout * zf * sz                                                # dL/dy, (batch, D, L)
        else:
            g = dout
        gT = F.pad(g, (0, Lp - L)).permute(2, 0, 1).reshape(Lp, batch, G, dim // G).contiguous()
        ddt, du, y = (torch.empty(Lp, batch, G, dim // G, dtype=f, device=u.device) for _ in range(3))
        dB, dC = (torch.empty(Lp, batch, G, N, dtype=f, device=u.device) for _ in range(2))
        dA_grad = torch.zeros_like(p["A"])                                    # (G, Dg, N)
        dh_next = torch.zeros_like(starts[0])                                  # dh after the last chunk: 0
        dA_next = torch.zeros_like(starts[0])
        for i in reversed(range(len(starts))):
            sl = slice(i * TORCH_CHUNK, (i + 1) * TORCH_CHUNK)
            ddt[sl], du[sl], dA_part, dB[sl], dC[sl], y[sl], dh_next, dA_next = ctx.fns[1](
                p["dt"][sl], p["u"][sl], p["A"], p["A2"], p["B"][sl], p["C"][sl], starts[i], gT[sl],
                dh_next, dA_next)
            dA_grad += dA_part
        to_bdl = lambda t: t[:L].reshape(L, batch, dim).permute(1, 2, 0)     # -> (batch, D, L)
        du, ddt = to_bdl(du), to_bdl(ddt)
        dD = dz = None
        if D is not None:
            du = du + g * D.to(f)[None, :, None]
            dD = (g * uf).sum((0, 2)).to(D.dtype)
        if z is not None:
            yf = to_bdl(y) + (D.to(f)[None, :, None] * uf if D is not None else 0)
            dz = (dout * yf * sz * (1 + zf * (1 - sz))).to(z.dtype)
        if ctx.delta_softplus:
            dt_raw = p["dt_raw"]
            ddt = ddt * torch.where(dt_raw <= 20.0, torch.sigmoid(dt_raw), torch.ones_like(dt_raw))
        ddelta_bias = None if delta_bias is None else ddt.sum((0, 2)).to(delta_bias.dtype)
        dB, dC = dB[:L].permute(1, 2, 3, 0), dC[:L].permute(1, 2, 3, 0)       # (batch, G, N, L)
        if B.dim() == 3:
            dB = dB.squeeze(1)
        if C.dim() == 3:
            dC = dC.squeeze(1)
        return (du.to(u.dtype), ddt.to(delta.dtype), dA_grad.reshape(dim, N).to(A.dtype), dB.to(B.dtype),
                dC.to(C.dtype), dD, dz, ddelta_bias, None, None)


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                         delta_softplus=False, return_last_state=False, compile=None):
    """The pure-PyTorch path (any device, any float dtype): see `_SelectiveScanTorch`. The batch
    runs in blocks of `_block_size` samples (the last block padded, so shapes stay static).
    compile: on the CPU, run the C++ kernels (`selective_scan_cpu`; fp64 stays eager); on other
    devices the chunk functions through torch.compile. None = the start-up choice
    (COMPILE_TORCH_PATH)."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if compile is None and _COMPILE_ENV_ERROR:
        raise ValueError("selective_scan: " + _COMPILE_ENV_ERROR)
    compile = COMPILE_TORCH_PATH if compile is None else bool(compile)
    if compile and _cpu_kernels_take(u, delta, A, B, C, D, z, delta_bias):
        out, last = _SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return (out, last.detach()) if return_last_state else out
    fns = _chunk_fns(compile and u.device.type != "cpu")                     # fp64 on the CPU: eager
    batch = u.shape[0]
    blk = _block_size(batch, u.shape[1], A.shape[1])
    pad = -batch % blk
    if pad:   # zero samples: Δ = softplus(bias) but u = 0 and B = 0, their outputs are dropped
        padb = lambda t: None if t is None else F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad))
        u, delta, B, C, z = padb(u), padb(delta), padb(B), padb(C), padb(z)
    parts = [_SelectiveScanTorch.apply(u[i:i + blk], delta[i:i + blk], A, B[i:i + blk], C[i:i + blk], D,
                                       None if z is None else z[i:i + blk], delta_bias, delta_softplus, fns)
             for i in range(0, u.shape[0], blk)]
    out = torch.cat([p[0] for p in parts])[:batch]
    last = torch.cat([p[1] for p in parts])[:batch]
    return (out, last.detach()) if return_last_state else out


# -----------------------------------------------------------------------------
# "cpu": the scan as two hand-written C++ loops (forward, backward), what "torch" runs on the CPU
# when compiling is on. Their source, and why they are written so, is scan_kernel_cpu.py; here is
# the Python side: fp32 contiguous inputs in the kernels' layouts (B and C transposed once to
# (batch, G, L, N)), the launch sizes, the autograd Function, and the backward's last sums (dB and
# dC over the channel splits, dA and dD over the batch).

CPU_CHUNK = scan_kernel_cpu.CPU_CHUNK if scan_kernel_cpu else 16   # steps per chunk start the kernels save
ORDERED_CHUNK = scan_kernel_cpu.ORDERED_CHUNK if scan_kernel_cpu else 32   # the same for the ordered scan's kernels


def _cpu_starts(batch, dim, n_chunks, N, like=None):
    """The C++ kernels' chunk starts: a (batch, dim, n_chunks, N) fp32 tensor held channel-fastest (memory
    (batch, n_chunks, N, dim)), so that a chunk's N states of VL channels are N vector loads and stores.
    like: a tensor whose device the fake (meta) version takes."""
    new = torch.empty if like is None else like.new_empty
    return new(batch, n_chunks, N, dim, dtype=torch.float32).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=None)
def _cpu_kernel(kind, N, T):
    """The forward or backward C++ loop for state size N, built once per process (a few seconds;
    Inductor caches the binary on disk too). A failure becomes one TorchCompileError."""
    try:
        return scan_kernel_cpu.build(kind, N, T)
    except Exception as e:
        raise TorchCompileError(
            f"the compiled CPU scan could not be built ({type(e).__name__}: {str(e)[:300]}); run without it: "
            f"`python train_mini.py --no-compile`, or LOCALMAMBA_COMPILE=0, or selective_scan_torch(compile=False)"
        ) from e

def _cpu_kernels_take(u, *others):
    """Whether the C++ kernels run this call: their source is here (scan_kernel_cpu.py), CPU tensors
    (all on u's device, checked before), no fp64 among them."""
    return scan_kernel_cpu is not None and u.device.type == "cpu" and all(
        t.dtype != torch.float64 for t in (u, *others) if t is not None)


CPU_WORK_ITEMS = 64        # (batch row, group, channel split) items the C++ kernels aim for: 4 per thread at 16
CPU_BWD_WORK_ITEMS = 32    # the same for ordered_scan_backward, whose every split also sums the lanes of its dB, dC
                           # block once per chunk (2 T N vectors): half the splits took LocalVim-T's call (batch 4,
                           # 2 threads) from 10.9 to 10.1 ms; 2 items per thread at 16


def _cpu_splits(batch, G, Dg, items=None):
    """Channel splits per (batch row, group): about `items` (CPU_WORK_ITEMS) work items in all, from
    the shape alone. Not from the thread count: the splits fix the order in which dB and dC are summed,
    so the same call gives the same bits on any number of cores (a run resumed elsewhere continues
    bitwise). The vectors are counted at AVX2's 8 lanes; with wider ones some splits are empty."""
    nvec = -(-Dg // 8)
    return max(1, min(nvec, -(-(CPU_WORK_ITEMS if items is None else items) // (batch * G))))


def _fixed_order_sum(t, dims):
    """t.sum(dims), in an order independent of the thread count. torch's CPU reductions run in
    parallel over the outputs, each output summed in one fixed order, except a reduction to a
    single value, which sums per-thread partials: that one is summed as a running (cumulative) sum."""
    out = t.sum(dims)
    if out.numel() == 1 and t.numel() > 1:
        out = t.reshape(-1).double().cumsum(0)[-1].to(t.dtype).reshape(out.shape)
    return out


def _cpu_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus):
    """fp32 contiguous inputs in the kernels' layouts, the launch sizes and the flag bits."""
    f32 = lambda t: t.detach().to(torch.float32).contiguous()
    batch, dim, L = u.shape
    Bg, Cg = _as_groups(B), _as_groups(C)
    G = Bg.shape[1]
    none = u.new_empty(0, dtype=torch.float32)
    opt = lambda t: none if t is None else f32(t)
    flags = (D is not None) | (z is not None) << 1 | (delta_bias is not None) << 2 | bool(delta_softplus) << 3
    ins = [f32(u), f32(delta), f32(A.detach().to(torch.float32) * LOG2E).t().contiguous(),
           f32(Bg.transpose(2, 3)), f32(Cg.transpose(2, 3)), opt(D), opt(z), opt(delta_bias)]
    return ins, (batch, dim, L, G, _cpu_splits(batch, G, dim // G), flags)


class _SelectiveScanCPU(torch.autograd.Function):
    """The compiled CPU scan (scan_kernel_cpu.py): one C++ call forward, one backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, delta_softplus):
        ins, sizes = _cpu_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        batch, dim, L = u.shape
        N = A.shape[1]
        f32 = dict(dtype=torch.float32)                                       # whatever the default dtype is
        out = torch.empty(batch, dim, L, **f32)
        starts = _cpu_starts(batch, dim, -(-L // CPU_CHUNK), N)
        last = torch.empty(batch, dim, N, **f32)
        _cpu_kernel("fwd", N, CPU_CHUNK)(*ins, out, starts, last, *sizes)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, starts)
        ctx.delta_softplus = delta_softplus
        ctx.mark_non_differentiable(last)
        return out.to(u.dtype), last

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dlast):
        u, delta, A, B, C, D, z, delta_bias, starts = ctx.saved_tensors
        ins, sizes = _cpu_args(u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus)
        batch, dim, L, G, S, _ = sizes
        N = A.shape[1]
        f32 = dict(dtype=torch.float32)                                       # whatever the default dtype is
        du, ddelta, dz = (torch.empty(batch, dim, L, **f32) for _ in range(3))
        dBs, dCs = (torch.zeros(batch, G, S, L, N, **f32) for _ in range(2))  # per channel split, summed below
        dAb, dDb = torch.empty(batch, dim, N, **f32), torch.empty(batch, dim, **f32)   # per batch row, summed below
        _cpu_kernel("bwd", N, CPU_CHUNK)(*ins, starts, dout.to(torch.float32).contiguous(), du, ddelta, dz,
                                         dBs, dCs, dAb, dDb, *sizes)
        dB, dC = (t.sum(2).transpose(2, 3) for t in (dBs, dCs))             # (batch, G, N, L)
        if B.dim() == 3:
            dB, dC = dB.squeeze(1), dC.squeeze(1)
        opt = lambda t, like: None if like is None else t.to(like.dtype)
        return (du.to(u.dtype), ddelta.to(delta.dtype), _fixed_order_sum(dAb, 0).to(A.dtype), dB.to(B.dtype),
                dC.to(C.dtype), opt(_fixed_order_sum(dDb, 0), D), opt(dz, z),
                opt(_fixed_order_sum(ddelta, (0, 2)), delta_bias), None)


def selective_scan_cpu(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, return_last_state=False):
    """The compiled CPU scan (`_SelectiveScanCPU`): CPU tensors in fp32, fp16 or bf16. What
    `selective_scan_torch(compile=True)` runs on the CPU."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    if scan_kernel_cpu is None:
        raise RuntimeError("selective_scan: backend 'cpu' needs scan_kernel_cpu.py (the C++ source) beside "
                           "scan_kernel.py; copy it there, or use backend='torch'")
    if not _cpu_kernels_take(u, delta, A, B, C, D, z, delta_bias):
        tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
        raise ValueError(f"selective_scan: backend 'cpu' takes CPU tensors in float32, float16 or bfloat16, got "
                         f"{sorted({str(t.dtype).replace('torch.', '') for t in tensors})} on {u.device}; "
                         f"use backend='torch' (any device, float64 too)")
    out, last = _SelectiveScanCPU.apply(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return (out, last.detach()) if return_last_state else out


# -----------------------------------------------------------------------------
# The mixer's kernels with the scan orders inside their loads and stores: `ordered_scan` and
# `ordered_conv`, the fused mixer path of localmamba.py (its readable path is scan_tokens -> conv
# -> selective_scan -> unscan_tokens). Every op of a mixer but the conv along the scan and the scan
# itself is per-token, and per-token ops commute with a permutation of the tokens: so no tensor
# needs to hold the tokens in scan order except what the conv writes. The kernels read a token at
# order[k][s] and write it back at its row-major place; order (K, Lmax) is MultiScan.index's, -1
# where a window scan pads the grid (a zero token, scanned like a real one, as the official code
# does). Tensors are channels-last, (batch, K, rows, channels) with any strides but a contiguous
# last axis, so a K-shared input (SS2D's u, LocalVim's gate z) is a stride-0 view, not K copies.
# Each is a PyTorch custom op (torch.library.custom_op through `_custom_op`: torch.compile, export, FX
# and profilers see one op) with a fake (meta) implementation and its backward registered. On the CPU they run the C++
# kernels of scan_kernel_cpu.py, on CUDA the Triton kernels below them (`ordered_scan_triton`, ...,
# which the tests also run on the CPU under TRITON_INTERPRET=1); `ordered_kernels_take` says when
# the models may use them.

_Tensor = torch.Tensor


def _custom_op(name):
    """torch.library.custom_op(name, mutates_args=()) for this file's ops, each kept visible to profilers:
    torch 2.14 calls a custom op whose arguments are all tensors through a Python fast path (the
    "PyObject dispatcher" of torch/_ops.py) that skips the C++ dispatcher, and with it the event a
    profiler records (ordered_conv and gated_sum vanished from torch.profiler's tables, their time
    counted nowhere). Each op goes through the C++ dispatcher instead, a few µs per call of ~1 ms."""
    def register(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        if hasattr(op._opoverload, "_enable_pyobj_dispatch"):       # torch without the fast path: nothing to undo
            op._opoverload._enable_pyobj_dispatch(False)
        return op
    return register


def ordered_kernels_take(x):
    """Whether the ordered kernels can run a mixer on x (fp32/fp16/bf16, nothing exporting the model):
    on CUDA the Triton kernels, where Triton imports; on the CPU the C++ kernels, where their source
    is here and the C++ scan is switched on (LOCALMAMBA_COMPILE=1, use_compiled_torch_path,
    train_mini.py's CPU default)."""
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or x.dtype == torch.float64:
        return False
    if x.device.type == "cuda":
        return HAS_TRITON
    return (scan_kernel_cpu is not None and COMPILE_TORCH_PATH and not _COMPILE_ENV_ERROR
            and x.device.type == "cpu")


def _f32(t):
    """fp32 with a contiguous last axis (the kernels' channel stride is 1); a view when it already is."""
    t = t.detach().to(torch.float32)
    return t if t.stride(-1) == 1 else t.contiguous()


def _f32_or_empty(t):
    """An optional input as the C++ kernels take it: fp32 contiguous, or an empty tensor for None (its flag off)."""
    return torch.empty(0, dtype=torch.float32) if t is None else t.detach().to(torch.float32).contiguous()


def _scan_strides(u, delta, B, z, out, L_out):
    """The 16 int64 the kernels index with: (batch, direction, row) strides of u, delta, B and C
    (one layout: they are views of one x_proj output), z, out; then L_out. A tensor with one
    direction (shared by the K) gets direction stride 0."""
    st = []
    for t in (u, delta, B, z, out):
        st += [0, 0, 0] if t is None else [t.stride(0), t.stride(1) if t.shape[1] > 1 else 0, t.stride(2)]
    return torch.tensor(st + [L_out], dtype=torch.long)


def _lowrank_weights(dt_proj):
    """dt_proj (K, E, R) as the kernels read it, (K, R, E) fp32, and R (0: Δ given whole)."""
    if dt_proj is None:
        return None, 0
    return dt_proj.detach().to(torch.float32).transpose(1, 2).contiguous(), dt_proj.shape[2]


def _ordered_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, idx_in, dt_proj, items=None):
    """The kernels' fp32 inputs (dt_proj as (K, R, E), empty if None), flag bits, work-item splits (about
    `items` work items, _cpu_splits) and R (Δ's rank, 0 when Δ comes whole)."""
    K, E = delta.shape[1], u.shape[3]
    u, delta, z = _f32(u), _f32(delta), None if z is None else _f32(z)
    B, C = _f32(B), _f32(C)
    if B.stride() != C.stride():                                               # one layout for both
        B, C = B.contiguous(), C.contiguous()
    none = torch.empty(0, dtype=torch.float32)
    opt = _f32_or_empty
    flags = ((D is not None) | (z is not None) << 1 | (delta_bias is not None) << 2 | bool(delta_softplus) << 3
             | bool(idx_in) << 4)
    A2t = (A.detach().to(torch.float32) * LOG2E).t().contiguous()             # (N, K*E)
    Wdt, R = _lowrank_weights(dt_proj)
    ins = [u, delta, A2t, B, C, opt(D), none if z is None else z, opt(delta_bias), none if Wdt is None else Wdt]
    return ins, flags, _cpu_splits(u.shape[0], K, E, items), R


def _need(name, cond, msg):
    if not cond:
        raise ValueError(f"{name}: {msg}")


def _check_shapes(name, tensors, shapes, device_of):
    """One ValueError naming the argument when a tensor of op `name` does not fit its contract:
    tensors {name: tensor or None}, shapes {name: the shape it needs, None for any size}, all on
    device_of's device."""
    for arg, t in tensors.items():                  # (the messages are built only for a failure: ~100 calls a step)
        if t is None:
            continue
        want = shapes[arg]
        if not (isinstance(t, torch.Tensor) and t.dim() == len(want)
                and all(w is None or s == w for s, w in zip(t.shape, want))):
            raise ValueError(f"{name}: {arg} must be ({', '.join('*' if w is None else str(w) for w in want)}"
                             f"{',' * (len(want) == 1)}), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != device_of.device:
            raise ValueError(f"{name}: {arg} is on {t.device}, not on {device_of.device} with the others")


def _check_ordered_inputs(name, tensors, shapes, order, L_in, device_of):
    """_check_shapes, and order (K, Lmax) int64 with entries in [-1, L_in) (read on the CPU only: on
    a GPU it would wait)."""
    _check_shapes(name, tensors, shapes, device_of)
    need = lambda cond, msg: _need(name, cond, msg)
    need(order.dtype == torch.long and order.dim() == 2, f"order must be (K, Lmax) int64, got {order.dtype}")
    if order.device.type == "cpu" and order.numel() and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.aminmax(order))
        need(lo >= -1 and hi < L_in, f"order holds {lo}..{hi}; each entry must be a token in [0, {L_in}) or -1")


def _check_ordered_scan(u, delta, A, B, C, D, z, delta_bias, order, L_out, idx_in, dt_proj):
    """ordered_scan's contract (its docstring), checked before any kernel reads memory."""
    if not (isinstance(delta, torch.Tensor) and delta.dim() == 4 and isinstance(u, torch.Tensor) and u.dim() == 4
            and isinstance(A, torch.Tensor) and A.dim() == 2 and isinstance(order, torch.Tensor) and order.dim() == 2
            and order.shape[0] == delta.shape[1]):
        raise ValueError("ordered_scan: u must be (batch, K or 1, rows, E), delta (batch, K, rows, E or R), A (K*E, N) "
                         "and order (K, Lmax)")
    batch, K, _, E = *delta.shape[:3], u.shape[3]
    rows, N = L_out if idx_in else order.shape[1], A.shape[1]
    R = dt_proj.shape[-1] if isinstance(dt_proj, torch.Tensor) and dt_proj.dim() == 3 else E
    _check_ordered_inputs("ordered_scan", dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias,
                                               dt_proj=dt_proj), dict(
        u=(batch, None, rows, E), delta=(batch, K, rows, R), A=(K * E, N), B=(batch, K, rows, N), C=(batch, K, rows, N),
        D=(K * E,), z=(batch, None, L_out, E), delta_bias=(K * E,), dt_proj=(K, E, None)), order, L_out, delta)
    if u.shape[1] not in (1, K) or (z is not None and z.shape[1] not in (1, K)):
        raise ValueError(f"ordered_scan: u and z have 1 direction (shared) or K = {K}")


def _check_ordered_conv(x, weight, bias, order, inv):
    """ordered_conv's contract, checked before any kernel reads memory."""
    if not (isinstance(x, torch.Tensor) and x.dim() == 3 and isinstance(order, torch.Tensor) and order.dim() == 2):
        raise ValueError("ordered_conv: x must be (batch, L_in, E) and order (K, Lmax)")
    (K, Lmax), (batch, L_in, E) = order.shape, x.shape
    _check_ordered_inputs("ordered_conv", dict(x=x, weight=weight, bias=bias, inv=inv), dict(
        x=(batch, L_in, E), weight=(K * E, 1, None), bias=(K * E,), inv=(K, L_in)), order, L_in, x)
    if inv.device.type == "cpu" and not torch.compiler.is_compiling() and not bool(((inv >= 0) & (inv < Lmax)).all()):
        raise ValueError(f"ordered_conv: inv must hold scan positions in [0, {Lmax}) (inverse_order of order)")


@_custom_op("localmamba::ordered_scan")
def ordered_scan(u: _Tensor, delta: _Tensor, A: _Tensor, B: _Tensor, C: _Tensor, D: Optional[_Tensor],
                 z: Optional[_Tensor], delta_bias: Optional[_Tensor], order: _Tensor, L_out: int,
                 delta_softplus: bool, idx_in: bool, need_starts: bool,
                 dt_proj: Optional[_Tensor] = None) -> Tuple[_Tensor, _Tensor]:
    """The selective scan of K directions with the orders inside (scan_kernel_cpu.ORDERED_SCAN_FWD).
    delta (batch, K, rows, E); u (batch, K or 1, rows, E); B, C (batch, K, rows, N); z (batch, K or
    1, L_out, E) or None; A (K*E, N); D, delta_bias (K*E,); order (K, Lmax). rows: L_out when
    idx_in (u, delta, B, C in row-major token order, read at order[k][s]), Lmax when not (already
    in scan order). dt_proj (K, E, R): delta is Δ's low-rank input (batch, K, rows, R) and the kernel
    computes Δ = dt_proj[k] delta per step (Δ never stored). Returns out (batch, K, L_out, E) in u's
    dtype, each direction's output at its tokens' row-major places, and the chunk starts for the
    backward ((batch, K*E, chunks, N) fp32, channel-fastest in memory on the CPU: _cpu_starts; empty
    unless need_starts)."""
    _check_ordered_scan(u, delta, A, B, C, D, z, delta_bias, order, L_out, idx_in, dt_proj)
    batch, K, E = delta.shape[0], delta.shape[1], u.shape[3]
    Lmax, N = order.shape[1], A.shape[1]
    ins, flags, S, R = _ordered_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, idx_in, dt_proj)
    out = torch.empty(batch, K, L_out, E, dtype=torch.float32)
    starts = _cpu_starts(batch, K * E, -(-Lmax // ORDERED_CHUNK), N) if need_starts else \
        torch.empty(0, dtype=torch.float32)
    st = _scan_strides(ins[0], ins[1], ins[3], ins[6] if z is not None else None, out, L_out)
    _cpu_kernel("ordered_scan_fwd", N, ORDERED_CHUNK)(*ins, order.contiguous(), st, out, starts, batch, K, E, Lmax,
                                                      S, R, flags | bool(need_starts) << 5)
    return out.to(u.dtype), starts


@ordered_scan.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, order, L_out, delta_softplus, idx_in, need_starts, dt_proj=None):
    batch, K, E = delta.shape[0], delta.shape[1], u.shape[3]
    chunk = ORDERED_CHUNK if delta.device.type == "cpu" else _triton_config(A.shape[1], E)[2]
    n = -(-order.shape[1] // chunk)
    if not need_starts:
        starts = delta.new_empty(0, dtype=torch.float32)
    elif delta.device.type == "cpu":
        starts = _cpu_starts(batch, K * E, n, A.shape[1], like=delta)
    else:
        starts = delta.new_empty(batch, K * E, n, A.shape[1], dtype=torch.float32)
    return u.new_empty(batch, K, L_out, E), starts


@_custom_op("localmamba::ordered_scan_backward")
def ordered_scan_backward(u: _Tensor, delta: _Tensor, A: _Tensor, B: _Tensor, C: _Tensor, D: Optional[_Tensor],
                          z: Optional[_Tensor], delta_bias: Optional[_Tensor], order: _Tensor, starts: _Tensor,
                          dout: _Tensor, delta_softplus: bool, idx_in: bool,
                          dt_proj: Optional[_Tensor] = None) -> List[_Tensor]:
    """ordered_scan's backward (scan_kernel_cpu.ORDERED_SCAN_BWD): [du, ddelta, dA, dB, dC, dD, dz, dbias,
    ddt_proj], each in its input's shape (du, dz summed over the directions where u, z are shared; dD,
    dz, dbias, ddt_proj empty where D, z, delta_bias, dt_proj are None)."""
    _check_ordered_scan_backward(u, delta, A, B, C, D, z, delta_bias, order, starts, dout, idx_in, dt_proj,
                                 ORDERED_CHUNK)
    batch, K, rows, E = *delta.shape[:3], u.shape[3]
    Lmax, N, L_out = order.shape[1], A.shape[1], dout.shape[2]
    ins, flags, S, R = _ordered_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_softplus, idx_in, dt_proj,
                                          CPU_BWD_WORK_ITEMS)
    g = dout.detach().to(torch.float32).contiguous()
    f32 = dict(dtype=torch.float32)
    du, ddelta = _du_like(u, K), torch.empty(batch, K, rows, E, **f32)
    st = torch.cat([_scan_strides(ins[0], ins[1], ins[3], ins[6] if z is not None else None, g, L_out),
                    torch.tensor(du.stride()[:2])])                          # + du's (batch, direction) strides
    dz = torch.empty(batch, K, L_out, E, **f32) if z is not None else torch.empty(0, **f32)
    dBs, dCs = (torch.empty(batch, K, S, rows, N, **f32) for _ in range(2))    # every row written (a permutation)
    dAb, dDb, dbb = torch.empty(batch, K * E, N, **f32), *torch.empty(2, batch, K * E, **f32).unbind(0)
    if not starts.permute(0, 2, 3, 1).is_contiguous():                       # made elsewhere: into the kernels' layout
        starts = _cpu_starts(*starts.shape).copy_(starts)
    _cpu_kernel("ordered_scan_bwd", N, ORDERED_CHUNK)(*ins, order.contiguous(), st, starts, g, du, ddelta, dz, dBs,
                                                      dCs, dAb, dDb, dbb, batch, K, E, Lmax, rows, S, R, flags)
    return _ordered_grads(u, delta, A, B, C, D, z, delta_bias, dt_proj, du, ddelta, dAb, dBs.sum(2), dCs.sum(2), dDb,
                          dz, dbb)


def _check_ordered_scan_backward(u, delta, A, B, C, D, z, delta_bias, order, starts, dout, idx_in, dt_proj, chunk):
    """ordered_scan_backward's contract: ordered_scan's, the chunk starts of `chunk` steps and dout
    (batch, K, L_out, E)."""
    ok = lambda t: isinstance(t, torch.Tensor) and t.dim() == 4
    L_out = (delta.shape[2] if idx_in and ok(delta) else z.shape[2] if ok(z) else      # the tokens: from the inputs,
             dout.shape[2] if ok(dout) else -1)                                       # else from dout
    _check_ordered_scan(u, delta, A, B, C, D, z, delta_bias, order, L_out, idx_in, dt_proj)
    (batch, K), E, Lmax, N = delta.shape[:2], u.shape[3], order.shape[1], A.shape[1]
    _check_shapes("ordered_scan_backward", dict(starts=starts, dout=dout), dict(
        starts=(batch, K * E, -(-Lmax // chunk), N), dout=(batch, K, L_out, E)), delta)


def _ordered_grads(u, delta, A, B, C, D, z, delta_bias, dt_proj, du, ddelta, dAb, dB, dC, dDb, dz, dbb):
    """The kernels' gradients (per direction; dA, dD, dbias per batch row; Δ's full gradient) as
    ordered_scan_backward returns them: du and dz summed over the directions where u and z are shared,
    dA, dD, dbias over the batch in a fixed order; with dt_proj, dΔ projected onto the low-rank input
    (dΔ dt_proj[k]) and onto dt_proj (dΔ^T delta, over the batch and the rows); each in its input's
    dtype, empty where the input is None."""
    if u.shape[1] == 1:
        du = du.sum(1, keepdim=True)
    if z is not None and z.shape[1] == 1:
        dz = dz.sum(1, keepdim=True)
    opt = lambda t, like: t.to(like.dtype) if like is not None else delta.new_empty(0)
    dW = None
    if dt_proj is not None:                                       # dΔ (batch, K, rows, E): matmuls per (batch, k)
        dW = _fixed_order_sum(ddelta.transpose(-1, -2) @ delta.detach().float(), 0)    # (K, E, R)
        ddelta = ddelta @ dt_proj.detach().float()                                    # (batch, K, rows, R)
    return [du.to(u.dtype), ddelta.to(delta.dtype), _fixed_order_sum(dAb, 0).to(A.dtype), dB.to(B.dtype),
            dC.to(C.dtype), opt(_fixed_order_sum(dDb, 0), D), opt(dz, z), opt(_fixed_order_sum(dbb, 0), delta_bias),
            opt(dW, dt_proj)]


@ordered_scan_backward.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, order, starts, dout, delta_softplus, idx_in, dt_proj=None):
    like = lambda t: delta.new_empty(0) if t is None else t.new_empty(t.shape)     # contiguous, as the kernels write
    du = _du_like(u, delta.shape[1]).to(u.dtype) if u.device.type == "cpu" and u.shape[1] == delta.shape[1] else \
        like(u)                                                                # as the kernels write it, or summed
    return [du] + [like(t) for t in (delta, A, B, C, D, z, delta_bias, dt_proj)]


def _du_like(u, K):
    """The C++ backward's du (fp32): in u's own layout where u is per direction and its rows are dense (E
    channels at stride 1), so that the gradient of a (K, batch, rows, E) u read as (batch, K, ...), the
    fused LocalVim conv's output, reaches the conv's backward without a copy; else contiguous (batch, K,
    rows, E), summed over K afterwards where u is shared."""
    batch, _, rows, E = u.shape
    if u.shape[1] == K:
        du = torch.empty_like(u, dtype=torch.float32)
        if du.stride(3) == 1 and du.stride(2) == E:
            return du
    return u.new_empty(batch, K, rows, E, dtype=torch.float32)


def _ordered_scan_setup(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, order, L_out, delta_softplus, idx_in, need_starts, dt_proj = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, order, output[1], dt_proj)
    ctx.flags = delta_softplus, idx_in
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)                     # the chunk starts get no gradient: none is zero-filled


def _ordered_scan_grad(ctx, dout, _dstarts):
    u, delta, A, B, C, D, z, delta_bias, order, starts, dt_proj = ctx.saved_tensors
    if dout is None:                                     # the output itself was not used
        return (None,) * 14
    if starts.numel() == 0:
        raise RuntimeError("ordered_scan: called with need_starts=False, so it has no backward; pass "
                           "need_starts=True when a gradient is wanted")
    grads = ordered_scan_backward(u, delta, A, B, C, D, z, delta_bias, order, starts, dout, *ctx.flags, dt_proj)
    inputs = (u, delta, A, B, C, D, z, delta_bias, dt_proj)
    grads = [g if like is not None else None for g, like in zip(grads, inputs)]
    return (*grads[:8], None, None, None, None, None, grads[8])


ordered_scan.register_autograd(_ordered_scan_grad, setup_context=_ordered_scan_setup)


class _XProjScan(torch.autograd.Function):
    """x_proj and ordered_scan as one autograd node (as mamba_ssm's mamba_inner_fn holds x_proj). Through
    the two apart, autograd would write u's gradient twice, the scan's and x_proj's, and add them in a pass
    of their own (~1 ms per LocalVim-T layer at batch 4), and build x_dbl's gradient from its three slices,
    each zero-filled. Here x_proj's part of du is added by its GEMM's own accumulate (baddbmm_ / addmm_ into
    the scan's du), and x_dbl's gradient is one cat."""

    @staticmethod
    def forward(ctx, u, x_proj_weight, A, D, z, delta_bias, order, L_out, dt_proj, need_starts):
        u = u.contiguous()                                  # its gradient is accumulated into in place, as a view
        x_dbl, us = _x_proj(u, x_proj_weight)
        out, starts = ordered_scan(us, *_x_dbl_parts(x_dbl, dt_proj, A), D, z, delta_bias, order, L_out, True,
                                   u.dim() == 3, need_starts, dt_proj)
        ctx.save_for_backward(u, x_proj_weight, A, D, z, delta_bias, order, dt_proj, starts, x_dbl)
        ctx.mark_non_differentiable(starts)
        ctx.set_materialize_grads(False)                    # the chunk starts get no gradient: none is zero-filled
        return out, starts

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, _dstarts):
        u, W, A, D, z, delta_bias, order, dt_proj, starts, x_dbl = ctx.saved_tensors
        if dout is None:                                    # the output itself was not used
            return (None,) * 10
        if starts.numel() == 0:
            raise RuntimeError("x_proj_scan: called with need_starts=False, so it has no backward")
        us = u.transpose(0, 1) if u.dim() == 4 else u.unsqueeze(1)
        du, dlow, dA, dB, dC, dD, dz, dbias, ddt = ordered_scan_backward(
            us, *_x_dbl_parts(x_dbl, dt_proj, A), D, z, delta_bias, order, starts, dout, True, u.dim() == 3, dt_proj)
        K, C2, E = W.shape
        cdt = x_dbl.dtype                                   # the dtype x_proj ran in (bf16 under autocast)
        if u.dim() == 4:                                    # per direction: (K, batch, rows, E), du in that layout
            dx = torch.cat([t.transpose(0, 1) for t in (dlow, dB, dC)], -1).to(cdt).view(K, -1, C2)
            du = du.transpose(0, 1)
            du.view(K, -1, E).baddbmm_(dx, W.to(cdt).to(du.dtype))             # + x_proj's part, in the GEMM
            dW = torch.bmm(dx.transpose(1, 2), u.reshape(K, -1, E).to(cdt))   # (K, R+2N, E)
        else:                                               # shared: (batch, rows, E), du summed over K
            dx = torch.cat([t.transpose(1, 2) for t in (dlow, dB, dC)], -1).to(cdt).view(-1, K * C2)
            du = du.squeeze(1)
            du.view(-1, E).addmm_(dx, W.reshape(K * C2, E).to(cdt).to(du.dtype))
            dW = (dx.t() @ u.reshape(-1, E).to(cdt)).view(K, C2, E)
        opt = lambda g, like: g if like is not None else None
        return (du, dW.to(W.dtype), dA, opt(dD, D), opt(dz, z), opt(dbias, delta_bias), None, None, ddt, None)


def _x_proj(u, weight):
    """x_dbl = x_proj(u) of each direction, (batch, K, rows, R + 2N) (a view), and u as ordered_scan reads
    it: u (K, batch, rows, E) one per direction (a bmm), or (batch, rows, E) shared (one matmul for all K)."""
    K, C2, E = weight.shape
    if u.dim() == 4:
        _, batch, rows, _ = u.shape
        x_dbl = torch.bmm(u.reshape(K, batch * rows, E), weight.transpose(1, 2))      # (K, batch*rows, R+2N)
        return x_dbl.view(K, batch, rows, C2).transpose(0, 1), u.transpose(0, 1)
    batch, rows, _ = u.shape
    x_dbl = u.reshape(batch * rows, E) @ weight.reshape(K * C2, E).t()               # every direction at once
    return x_dbl.view(batch, rows, K, C2).transpose(1, 2), u.unsqueeze(1)


def _x_dbl_parts(x_dbl, dt_proj, A):
    """ordered_scan's delta, A, B, C from x_dbl: its parts (views) Δ's low-rank input (dt_proj's rank), B and
    C (A's N states each), with A between them."""
    R, N = dt_proj.shape[2], A.shape[1]
    return x_dbl[..., :R], A, x_dbl[..., R:R + N], x_dbl[..., R + N:]


def x_proj_scan(u, x_proj_weight, A, D, z, delta_bias, order, L_out, dt_proj):
    """x_proj, then ordered_scan with Δ from its low-rank part (dt_proj inside the kernel), softplus on: the
    fused mixers' S6. u: (K, batch, Lmax, E) one per direction in scan order (LocalVim's conv output), or
    (batch, L_out, E) shared by the K directions, in token order (SS2D's); x_proj_weight (K, R + 2N, E);
    dt_proj (K, E, R); the rest as ordered_scan's. Returns out (batch, K, L_out, E). One autograd node
    (_XProjScan: u's gradient written once)."""
    return _XProjScan.apply(u, x_proj_weight, A, D, z, delta_bias, order, L_out, dt_proj, torch.is_grad_enabled())[0]


def _conv_args(x, weight, bias):
    """x (batch, L_in, E) fp32 with a contiguous last axis; weight (K*E, 1, dc) -> (K, dc, E); bias -> (K, E)."""
    E, dc = x.shape[2], weight.shape[-1]
    wt = weight.detach().to(torch.float32).reshape(-1, E, dc).transpose(1, 2).contiguous()
    return _f32(x), wt, bias.detach().to(torch.float32).reshape(-1, E).contiguous()


@_custom_op("localmamba::ordered_conv")
def ordered_conv(x: _Tensor, weight: _Tensor, bias: _Tensor, order: _Tensor, inv: _Tensor) -> _Tensor:
    """LocalVim's causal depthwise conv1d + SiLU of each direction, along its scan order
    (scan_kernel_cpu.ORDERED_CONV_FWD): x (batch, L_in, E), channels-last (the in_proj output's first
    half, a view); weight (K*E, 1, d_conv) and bias (K*E,), the K conv1d_k stacked; order (K, Lmax)
    and its inverse inv (K, L_in). Returns u (K, batch, Lmax, E) in scan order, x's dtype."""
    _check_ordered_conv(x, weight, bias, order, inv)
    batch, L_in, E = x.shape
    K, Lmax = order.shape
    xf, wt, b = _conv_args(x, weight, bias)
    u = torch.empty(K, batch, Lmax, E, dtype=torch.float32)
    _cpu_kernel("ordered_conv_fwd", 1, CPU_CHUNK)(xf, wt, b, order.contiguous(), u, batch, K, E, Lmax,
                                                  weight.shape[-1], xf.stride(0), xf.stride(1))
    return u.to(x.dtype)


@ordered_conv.register_fake
def _(x, weight, bias, order, inv):
    return x.new_empty(order.shape[0], x.shape[0], order.shape[1], x.shape[2])


def _check_ordered_conv_backward(x, weight, bias, order, inv, du):
    """ordered_conv_backward's contract: ordered_conv's, and du (K, batch, Lmax, E)."""
    _check_ordered_conv(x, weight, bias, order, inv)
    _check_shapes("ordered_conv_backward", dict(du=du), dict(du=(*order.shape[:1], x.shape[0], order.shape[1],
                                                                 x.shape[2])), x)


@_custom_op("localmamba::ordered_conv_backward")
def ordered_conv_backward(x: _Tensor, weight: _Tensor, bias: _Tensor, order: _Tensor, inv: _Tensor,
                          du: _Tensor) -> List[_Tensor]:
    """ordered_conv's backward (scan_kernel_cpu.ORDERED_CONV_BWD): [dx, dweight, dbias]."""
    _check_ordered_conv_backward(x, weight, bias, order, inv, du)
    batch, L_in, E = x.shape
    K, Lmax = order.shape
    dc = weight.shape[-1]
    xf, wt, b = _conv_args(x, weight, bias)
    f32 = dict(dtype=torch.float32)
    dpre, dx = torch.empty(K, batch, Lmax, E, **f32), torch.empty(batch, L_in, E, **f32)
    dwb, dbb = torch.empty(batch, K, dc, E, **f32), torch.empty(batch, K, E, **f32)
    _cpu_kernel("ordered_conv_bwd", 1, CPU_CHUNK)(xf, wt, b, order.contiguous(), inv.contiguous(),
                                                  du.detach().to(torch.float32).contiguous(), dpre, dx, dwb, dbb,
                                                  batch, K, E, Lmax, L_in, dc, xf.stride(0), xf.stride(1))
    dw = _fixed_order_sum(dwb, 0).transpose(1, 2).reshape(weight.shape)
    return [dx.to(x.dtype), dw.to(weight.dtype), _fixed_order_sum(dbb, 0).reshape(bias.shape).to(bias.dtype)]


@ordered_conv_backward.register_fake
def _(x, weight, bias, order, inv, du):
    return [t.new_empty(t.shape) for t in (x, weight, bias)]                      # contiguous, as the kernels write


def _ordered_conv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _ordered_conv_grad(ctx, du):
    x, weight, bias, order, inv = ctx.saved_tensors
    return (*ordered_conv_backward(x, weight, bias, order, inv, du), None, None)


ordered_conv.register_autograd(_ordered_conv_grad, setup_context=_ordered_conv_setup)


def _check_tokens(name, y):
    if not (isinstance(y, torch.Tensor) and y.dim() == 4 and y.dtype.is_floating_point):
        raise ValueError(f"{name}: y must be a float tensor (batch, K, L, E), got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")


@_custom_op("localmamba::token_norm_mean")
def token_norm_mean(y: _Tensor, eps: float) -> Tuple[_Tensor, _Tensor, _Tensor]:
    """The token mean of y's parameter-free LayerNorm, mean_t (y_t - mu_t) r_t with r_t = 1/sqrt(var_t + eps)
    over each token's E channels: SCAttn's statistics (scan_kernel_cpu.TOKEN_NORM_MEAN) in one read of y,
    where the readable path writes the normalised (batch, K, L, E) copy and reads it again. y (batch, K, L,
    E); returns the mean (batch, K, E), mu and r (batch, K, L), all fp32 (mu and r: for the backward)."""
    _check_tokens("token_norm_mean", y)
    batch, K, L, E = y.shape
    P = _token_parts(batch, K, L)
    yf = y.detach().to(torch.float32).contiguous()
    f32 = dict(dtype=torch.float32)
    parts, mu, rstd = torch.empty(batch, K, P, E, **f32), *(torch.empty(batch, K, L, **f32) for _ in range(2))
    _cpu_kernel("token_norm_mean", 1, CPU_CHUNK)(yf, parts, mu, rstd, batch, K, L, E, P, float(eps))
    return parts.sum(2) / L, mu, rstd


@token_norm_mean.register_fake
def _(y, eps):
    batch, K, L, E = y.shape
    f32 = dict(dtype=torch.float32)
    return y.new_empty(batch, K, E, **f32), y.new_empty(batch, K, L, **f32), y.new_empty(batch, K, L, **f32)


def _token_parts(batch, K, L):
    """Parts of the tokens per (batch row, direction) for the token kernels' work items: from the shape."""
    return max(1, min(L, -(-CPU_WORK_ITEMS // (batch * K))))


@_custom_op("localmamba::token_norm_mean_backward")
def token_norm_mean_backward(y: _Tensor, mu: _Tensor, rstd: _Tensor, dm: _Tensor, a: Optional[_Tensor] = None,
                             g: Optional[_Tensor] = None) -> _Tensor:
    """token_norm_mean's backward (scan_kernel_cpu.TOKEN_NORM_MEAN_BWD, one pass): LayerNorm's backward with
    the same gradient g = dm / L at every token, dy_t = r_t (g - mean_e g - x̂_t mean_e(g x̂_t)); in y's dtype.
    With a (batch, K, E) and g (batch, L, E), gated_sum's gradient of y, a[b, k] g[b, t], is added as dy is
    written (_SCAttnSum: y's two gradients in one pass)."""
    _check_tokens("token_norm_mean_backward", y)
    batch, K, L, E = y.shape
    _check_shapes("token_norm_mean_backward", dict(mu=mu, rstd=rstd, dm=dm, a=a, g=g), dict(
        mu=(batch, K, L), rstd=(batch, K, L), dm=(batch, K, E), a=(batch, K, E), g=(batch, L, E)), y)
    _need("token_norm_mean_backward", (a is None) == (g is None), "a and g come together (gated_sum's gradient)")
    dy = torch.empty(batch, K, L, E, dtype=torch.float32)
    gm = (dm.detach().to(torch.float32) / L).contiguous()
    yf, P = y.detach().to(torch.float32).contiguous(), _token_parts(batch, K, L)
    _cpu_kernel("token_norm_mean_bwd", 1, CPU_CHUNK)(yf, mu.contiguous(), rstd.contiguous(), gm, _f32_or_empty(a),
                                                     _f32_or_empty(g), dy, batch, K, L, E, P, int(a is not None))
    return dy.to(y.dtype)


@token_norm_mean_backward.register_fake
def _(y, mu, rstd, dm, a=None, g=None):
    return y.new_empty(y.shape)


def token_norm_mean_backward_torch(y, mu, rstd, dm, a=None, g=None):
    """token_norm_mean_backward in PyTorch ops (its CUDA implementation)."""
    r = rstd.unsqueeze(-1)
    xhat = (y.float() - mu.unsqueeze(-1)) * r                                 # (batch, K, L, E)
    gm = dm.float().unsqueeze(2) / y.shape[2]                                 # (batch, K, 1, E)
    dy = r * (gm - gm.mean(-1, keepdim=True) - xhat * (xhat * gm).mean(-1, keepdim=True))
    if a is not None:
        dy = dy + a.float().unsqueeze(2) * g.float().unsqueeze(1)
    return dy.to(y.dtype)


def _token_norm_mean_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1], output[2])
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _token_norm_mean_grad(ctx, dm, _dmu, _drstd):
    y, mu, rstd = ctx.saved_tensors
    return None if dm is None else token_norm_mean_backward(y, mu, rstd, dm), None


token_norm_mean.register_autograd(_token_norm_mean_grad, setup_context=_token_norm_mean_setup)


def _check_gated_sum(y, a):
    _check_tokens("gated_sum", y)
    if not (isinstance(a, torch.Tensor) and a.dim() == 3
            and a.shape == (y.shape[0], y.shape[1], y.shape[3]) and a.device == y.device):
        raise ValueError(f"gated_sum: y must be (batch, K, L, E) and a (batch, K, E) on y's device, got "
                         f"{tuple(getattr(y, 'shape', ()))} and {tuple(getattr(a, 'shape', ()))}")


@_custom_op("localmamba::gated_sum")
def gated_sum(y: _Tensor, a: _Tensor) -> _Tensor:
    """SCAttn's channel gate and the sum of the K directions in one pass: out[b, t] = sum_k a[b, k] * y[b, k, t]
    (scan_kernel_cpu.GATED_SUM), which the readable path computes as (y * a[:, :, None]).sum(1), writing the
    gated (batch, K, L, E) copy and reading it again. y (batch, K, L, E), a (batch, K, E); returns (batch, L,
    E) in y's dtype, computed in fp32."""
    _check_gated_sum(y, a)
    batch, K, L, E = y.shape
    yf, af = y.detach().to(torch.float32).contiguous(), a.detach().to(torch.float32).contiguous()
    out = torch.empty(batch, L, E, dtype=torch.float32)
    _cpu_kernel("gated_sum", 1, CPU_CHUNK)(yf, af, out, batch, K, L, E)
    return out.to(y.dtype)


@gated_sum.register_fake
def _(y, a):
    return y.new_empty(y.shape[0], y.shape[2], y.shape[3])


@_custom_op("localmamba::gated_sum_backward")
def gated_sum_backward(y: _Tensor, a: _Tensor, g: _Tensor, need_dy: bool = True) -> List[_Tensor]:
    """gated_sum's backward (scan_kernel_cpu.GATED_SUM_BWD, one pass): [dy, da], dy[b, k, t] = a[b, k] g[b, t]
    and da[b, k] = sum_t y[b, k, t] g[b, t], in y's and a's dtypes. need_dy=False: dy is not written (an empty
    tensor), for _SCAttnSum, whose token_norm_mean_backward adds that term."""
    _check_gated_sum(y, a)
    batch, K, L, E = y.shape
    _check_shapes("gated_sum_backward", dict(g=g), dict(g=(batch, L, E)), y)
    P = _token_parts(batch, 1, L)
    f32 = dict(dtype=torch.float32)
    dy, parts = torch.empty(*((batch, K, L, E) if need_dy else (0,)), **f32), torch.empty(batch, P, K, E, **f32)
    _cpu_kernel("gated_sum_bwd", 1, CPU_CHUNK)(y.detach().to(torch.float32).contiguous(),
                                               a.detach().to(torch.float32).contiguous(),
                                               g.detach().to(torch.float32).contiguous(), dy, parts, batch, K, L, E, P,
                                               int(need_dy))
    return [dy.to(y.dtype), parts.sum(1).to(a.dtype)]


@gated_sum_backward.register_fake
def _(y, a, g, need_dy=True):
    return [y.new_empty(y.shape if need_dy else (0,)), a.new_empty(a.shape)]


def gated_sum_backward_torch(y, a, g, need_dy=True):
    """gated_sum_backward in PyTorch ops (its CUDA implementation)."""
    g = g.unsqueeze(1)                                                          # (batch, 1, L, E)
    dy = (a.unsqueeze(2) * g).to(y.dtype) if need_dy else y.new_empty(0)
    return [dy, (y * g).sum(2).to(a.dtype)]


def _gated_sum_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gated_sum_grad(ctx, g):
    y, a = ctx.saved_tensors
    return tuple(gated_sum_backward(y, a, g))


gated_sum.register_autograd(_gated_sum_grad, setup_context=_gated_sum_setup)


def _channel_gate(m, norm_weight, norm_bias, reduce_weight, reduce_bias, select_weight, select_bias):
    """SCAttn.channel_branch's gate from m (batch, K, E), the token mean of y's parameter-free LayerNorm, in
    fp32: mean_u = m w + b (the LayerNorm's affine commutes with the mean), h = global_reduce(mean_u), a =
    sigmoid(channel_select(GELU(h))). Returns mean_u, h, a (the backward reuses all three)."""
    f = lambda t: t.detach().to(torch.float32)
    with torch.autocast(m.device.type, enabled=False):             # fp32 also under autocast: m is fp32
        mean_u = m * f(norm_weight) + f(norm_bias)
        h = F.linear(mean_u, f(reduce_weight), f(reduce_bias))
        return mean_u, h, torch.sigmoid(F.linear(F.gelu(h), f(select_weight), f(select_bias)))


class _SCAttnSum(torch.autograd.Function):
    """SCAttn's channel branch on each of the K directions and their sum, one autograd node: y (batch, K, L,
    E) -> (batch, L, E) in y's dtype (scattn_sum). Forward: token_norm_mean, the gate (_channel_gate), gated_sum.
    Backward: autograd through those ops would write y's gradient twice, (batch, K, L, E) each, and add them
    in a third pass. Here: gated_sum_backward without dy (da = sum_t y g), the gate's backward (small
    matmuls), then token_norm_mean_backward, which adds gated_sum's a g to LayerNorm's gradient as it
    writes dy: two reads of y and one write (LocalVMamba-T's gated_sum_backward: 22.5 -> 7.9 ms a step)."""

    @staticmethod
    def forward(ctx, y, eps, *params):
        m, mu, rstd = token_norm_mean(y, eps)
        mean_u, h, a = _channel_gate(m, *params)
        ctx.save_for_backward(y, mu, rstd, m, mean_u, h, a, *params)
        return gated_sum(y, a)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        y, mu, rstd, m, mean_u, h, a, norm_w, _, reduce_w, _, select_w, _ = ctx.saved_tensors
        params = ctx.saved_tensors[7:]
        da = gated_sum_backward(y, a, g, False)[1]                              # (batch, K, E)
        with torch.autocast(y.device.type, enabled=False):
            dsel = torch.ops.aten.sigmoid_backward(da.float(), a)                # through sigmoid(channel_select(.))
            dh = torch.ops.aten.gelu_backward(dsel @ select_w.float(), h)         # through GELU
            dmean_u = dh @ reduce_w.float()                                     # through global_reduce
            flat = lambda t: t.reshape(-1, t.shape[-1])                        # (batch * K, features)
            grads = (_fixed_order_sum(dmean_u * m, (0, 1)), _fixed_order_sum(dmean_u, (0, 1)),   # LayerNorm's w, b
                     flat(dh).t() @ flat(mean_u), _fixed_order_sum(dh, (0, 1)),                  # global_reduce's
                     flat(dsel).t() @ flat(F.gelu(h)), _fixed_order_sum(dsel, (0, 1)))               # channel_select's
        dy = token_norm_mean_backward(y, mu, rstd, dmean_u * norm_w.float(), a, g)   # y's two gradients at once
        return dy, None, *(d.to(p.dtype) for d, p in zip(grads, params))


def scattn_sum(y, eps, norm_weight, norm_bias, reduce_weight, reduce_bias, select_weight, select_bias):
    """SCAttn's channel branch (LayerNorm(eps, norm_*), global_reduce, GELU, channel_select, sigmoid) on each
    of the K directions of y (batch, K, L, E), and the sum over K: (batch, L, E) in y's dtype, the same
    numbers as MultiScan.combine(SCAttn(y)). Its ops: token_norm_mean, gated_sum and their backwards
    (_SCAttnSum: y's gradient written once)."""
    return _SCAttnSum.apply(y, eps, norm_weight, norm_bias, reduce_weight, reduce_bias, select_weight, select_bias)


# --- LocalVim's block before its mixer: the residual add, RoPE and RMSNorm per token in one pass ---

def _check_rope_rms_norm(residual, hidden, cos, sin, weight):
    if not (isinstance(hidden, torch.Tensor) and hidden.dim() == 3 and hidden.dtype.is_floating_point):
        raise ValueError(f"rope_rms_norm: hidden must be a float tensor (batch, L, D), got "
                         f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}")
    batch, L, D = hidden.shape
    _check_shapes("rope_rms_norm", dict(residual=residual, cos=cos, sin=sin, weight=weight), dict(
        residual=(batch, L, D), cos=(L, D), sin=(L, D), weight=(D,)), hidden)
    _need("rope_rms_norm", (cos is None) == (sin is None) and (cos is None or D % 2 == 0),
          "cos and sin come together (RoPE), over an even number of channels")


@_custom_op("localmamba::rope_rms_norm")
def rope_rms_norm(residual: Optional[_Tensor], hidden: _Tensor, cos: Optional[_Tensor], sin: Optional[_Tensor],
                  weight: _Tensor, eps: float) -> Tuple[_Tensor, _Tensor, _Tensor]:
    """LocalVim's block before its mixer in one pass per token (scan_kernel_cpu.ROPE_RMS_NORM): res = RoPE(residual
    + hidden) (hidden alone where residual is None; no rotation where cos, sin are None), out = RMSNorm(res) =
    res / sqrt(mean_D res^2 + eps) * weight. hidden, residual (batch, L, D); cos, sin (L, D) (RoPE2D's).
    Returns res and out (batch, L, D) fp32 and 1/sqrt(...) (batch, L) fp32 for the backward."""
    _check_rope_rms_norm(residual, hidden, cos, sin, weight)
    batch, L, D = hidden.shape
    f32, c = dict(dtype=torch.float32), _f32_or_empty
    res, out, rstd = torch.empty(batch, L, D, **f32), torch.empty(batch, L, D, **f32), torch.empty(batch, L, **f32)
    _cpu_kernel("rope_rms_norm", 1, CPU_CHUNK)(c(residual), c(hidden), c(cos), c(sin), c(weight), res, out, rstd,
                                               batch * L, L, D, (residual is not None) | (cos is not None) << 1,
                                               float(eps))
    return res, out, rstd


@rope_rms_norm.register_fake
def _(residual, hidden, cos, sin, weight, eps):
    f32 = dict(dtype=torch.float32)
    return hidden.new_empty(hidden.shape, **f32), hidden.new_empty(hidden.shape, **f32), \
        hidden.new_empty(hidden.shape[:2], **f32)


@_custom_op("localmamba::rope_rms_norm_backward")
def rope_rms_norm_backward(res: _Tensor, rstd: _Tensor, cos: Optional[_Tensor], sin: Optional[_Tensor],
                           weight: _Tensor, dout: _Tensor, dres: Optional[_Tensor]) -> List[_Tensor]:
    """rope_rms_norm's backward (scan_kernel_cpu.ROPE_RMS_NORM_BWD, one pass): RMSNorm's backward of dout plus
    dres (res's gradient from its other reader), then RoPE's transpose: [ds, dweight], ds (batch, L, D) fp32 the
    gradient of residual + hidden, dweight in weight's dtype."""
    _check_rope_rms_norm(None, res, cos, sin, weight)
    batch, L, D = res.shape
    _check_shapes("rope_rms_norm_backward", dict(rstd=rstd, dout=dout, dres=dres), dict(
        rstd=(batch, L), dout=(batch, L, D), dres=(batch, L, D)), res)
    f32, c = dict(dtype=torch.float32), _f32_or_empty
    P = max(1, min(batch * L, CPU_WORK_ITEMS))
    ds, parts = torch.empty(batch, L, D, **f32), torch.empty(P, D, **f32)
    flags = (dres is not None) | (cos is not None) << 1
    _cpu_kernel("rope_rms_norm_bwd", 1, CPU_CHUNK)(c(res), c(rstd), c(cos), c(sin), c(weight), c(dout), c(dres), ds,
                                                   parts, batch * L, L, D, flags, P)
    return [ds, parts.sum(0).to(weight.dtype)]


@rope_rms_norm_backward.register_fake
def _(res, rstd, cos, sin, weight, dout, dres):
    return [res.new_empty(res.shape, dtype=torch.float32), weight.new_empty(weight.shape)]


def rope_rms_norm_torch(residual, hidden, cos, sin, weight, eps):
    """rope_rms_norm in PyTorch ops (its CUDA implementation; RoPE2D.forward's and RMSNorm's math)."""
    res = hidden.float() if residual is None else residual.float() + hidden.float()
    if cos is not None:
        t1, t2 = res.unflatten(-1, (-1, 2)).unbind(-1)
        res = res * cos.float() + torch.stack([-t2, t1], -1).flatten(-2) * sin.float()
    rstd = torch.rsqrt(res.pow(2).mean(-1) + eps)
    return res, res * rstd.unsqueeze(-1) * weight.float(), rstd


def rope_rms_norm_backward_torch(res, rstd, cos, sin, weight, dout, dres):
    """rope_rms_norm_backward in PyTorch ops (its CUDA implementation)."""
    r, g = rstd.unsqueeze(-1), dout.float() * weight.float()
    ds = r * g - res * r ** 3 * (g * res).mean(-1, keepdim=True)
    if dres is not None:
        ds = ds + dres.float()
    if cos is not None:                                                        # RoPE's transpose
        q = ds * sin.float()
        q1, q2 = q.unflatten(-1, (-1, 2)).unbind(-1)
        ds = ds * cos.float() + torch.stack([q2, -q1], -1).flatten(-2)
    return [ds, (dout.float() * res * r).sum((0, 1)).to(weight.dtype)]


torch.library.register_kernel("localmamba::rope_rms_norm", "cuda", rope_rms_norm_torch)
torch.library.register_kernel("localmamba::rope_rms_norm_backward", "cuda", rope_rms_norm_backward_torch)


def _rope_rms_norm_setup(ctx, inputs, output):
    residual, hidden, cos, sin, weight, _ = inputs
    ctx.save_for_backward(output[0], output[2], cos, sin, weight)
    ctx.dtypes = None if residual is None else residual.dtype, hidden.dtype
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)


def _rope_rms_norm_grad(ctx, dres, dout, _drstd):
    res, rstd, cos, sin, weight = ctx.saved_tensors
    if dout is None and dres is None:
        return (None,) * 6
    dout = torch.zeros_like(res) if dout is None else dout
    ds, dw = rope_rms_norm_backward(res, rstd, cos, sin, weight, dout, dres)
    r_dtype, h_dtype = ctx.dtypes
    return None if r_dtype is None else ds.to(r_dtype), ds.to(h_dtype), None, None, dw, None


rope_rms_norm.register_autograd(_rope_rms_norm_grad, setup_context=_rope_rms_norm_setup)


# --- the ordered kernels in Triton: the same ops on CUDA tensors (and on the CPU under TRITON_INTERPRET=1) ---
# Program (pid_e, pid_bk) owns batch row b, direction k and BLOCK_D channels e of it, all N states;
# along the scan it walks chunks of CHUNK steps as _scan_fwd_kernel / _scan_bwd_kernel do (the same
# `_scan_chunk`), but every load and store goes through the row of each step: order[k][s] (IDX_IN,
# and always for z and out) or s, -1 a padding step (u, B, C zero, Δ its bias alone). Strides st
# as in scan_kernel_cpu.ORDERED_SCAN_FWD: (batch, direction, row) of u, Δ, B/C, z, out; channels 1.

if HAS_TRITON:
    @triton.jit
    def _ordered_rows(order_ptr, k, Lmax, offs_l, IDX_IN: tl.constexpr):
        # the token rows of steps offs_l: ro (z, out) and r (u, Δ, B, C), -1 at padding and past Lmax
        ro = tl.load(order_ptr + k * Lmax + offs_l, mask=offs_l < Lmax, other=-1)
        if IDX_IN:
            r = ro
        else:
            r = tl.where(offs_l < Lmax, offs_l, -1)
        return ro, r

    @triton.jit
    def _at(st_ptr, i: tl.constexpr, b, k, rows):
        # the element offset of (batch row b, direction k, rows) in the tensor whose strides are st[i:i+3]
        return b * tl.load(st_ptr + i) + k * tl.load(st_ptr + i + 1) + rows * tl.load(st_ptr + i + 2)

    @triton.jit
    def _ordered_chunk(u_ptr, dt_ptr, W_ptr, B_ptr, C_ptr, st_ptr, b, k, r, in_seq, offs_e, mask_e, offs_n, mask_n,
                       bias, E, R, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, LOWRANK: tl.constexpr):
        # one chunk's inputs at rows r (BT,): u, Δ before softplus, Δ (BE, BT); B, C (BN, BT); in_seq: steps < Lmax.
        # LOWRANK: dt holds Δ's low-rank input (rows of R), W (K, R, E) the dt_proj weights: Δ = W[k]^T dt here
        ok = mask_e[:, None] & (r[None, :] >= 0)
        u = tl.load(u_ptr + _at(st_ptr, 0, b, k, r[None, :]) + offs_e[:, None], mask=ok, other=0.0).to(tl.float32)
        if LOWRANK:
            rowp = dt_ptr + _at(st_ptr, 3, b, k, r)
            dt_raw = tl.zeros((offs_e.shape[0], r.shape[0]), dtype=tl.float32)
            for j in range(0, R):
                wj = tl.load(W_ptr + (k * R + j) * E + offs_e, mask=mask_e, other=0.0)
                dj = tl.load(rowp + j, mask=r >= 0, other=0.0).to(tl.float32)
                dt_raw += wj[:, None] * dj[None, :]
        else:
            dt_raw = tl.load(dt_ptr + _at(st_ptr, 3, b, k, r[None, :]) + offs_e[:, None], mask=ok,
                             other=0.0).to(tl.float32)
        dt_raw, dt = _delta(dt_raw, bias, HAS_BIAS, SOFTPLUS)
        dt = tl.where(in_seq[None, :], dt, 0.0)        # past Lmax: the state unchanged; padding steps keep Δ
        okn = mask_n[:, None] & (r[None, :] >= 0)
        bc = _at(st_ptr, 6, b, k, r[None, :]) + offs_n[:, None]
        Bc = tl.load(B_ptr + bc, mask=okn, other=0.0).to(tl.float32)
        Cc = tl.load(C_ptr + bc, mask=okn, other=0.0).to(tl.float32)
        return u, dt_raw, dt, Bc, Cc

    @triton.jit
    def _ordered_tile(A_ptr, D_ptr, bias_ptr, K, E, N, HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
        # the scan's `_tile` with the K directions as its groups (E channels each): b, k, channels offs_e of
        # direction k (offs_d = k * E + offs_e in A, D, bias), and the tile's A, D skip, Δ bias
        b, offs_d, mask_e, offs_n, mask_n, mask_dn, A, Dskip, bias, _, _ = _tile(
            A_ptr, D_ptr, bias_ptr, K * E, 1, N, K, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
        k = tl.program_id(1) % K
        return b, k, offs_d - k * E, mask_e, offs_d, offs_n, mask_n, mask_dn, A, Dskip, bias

    @triton.jit
    def _ordered_scan_fwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, W_ptr, order_ptr, st_ptr,
        out_ptr, starts_ptr,  # out (batch, K, L_out, E) contiguous; starts (batch, K*E, n_chunks, N) fp32
        K, E, N, Lmax, n_chunks, R,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        IDX_IN: tl.constexpr, SAVE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
        LOWRANK: tl.constexpr,
    ):
        b, k, offs_e, mask_e, offs_d, offs_n, mask_n, mask_dn, A, Dskip, bias = _ordered_tile(
            A_ptr, D_ptr, bias_ptr, K, E, N, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
        offs_t = tl.arange(0, CHUNK)
        x = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        for c in range(0, n_chunks):
            offs_l = c * CHUNK + offs_t
            ro, r = _ordered_rows(order_ptr, k, Lmax, offs_l, IDX_IN)
            if SAVE:
                tl.store(starts_ptr + (((b * K * E + offs_d[:, None]) * n_chunks + c) * N + offs_n[None, :]), x,
                         mask=mask_dn)
            u, _, dt, Bc, Cc = _ordered_chunk(u_ptr, dt_ptr, W_ptr, B_ptr, C_ptr, st_ptr, b, k, r, offs_l < Lmax,
                                              offs_e, mask_e, offs_n, mask_n, bias, E, R, HAS_BIAS, SOFTPLUS, LOWRANK)
            _, xs = _scan_chunk(u, dt, Bc, A, x)
            y = tl.sum(xs * Cc[None, :, :], axis=1)                                    # (BD, T)
            if HAS_D:
                y += Dskip[:, None] * u
            mo = mask_e[:, None] & (ro[None, :] >= 0)
            if HAS_Z:
                zz = tl.load(z_ptr + _at(st_ptr, 9, b, k, ro[None, :]) + offs_e[:, None], mask=mo, other=0.0)
                y = y * zz.to(tl.float32) * tl.sigmoid(zz.to(tl.float32))
            tl.store(out_ptr + _at(st_ptr, 12, b, k, ro[None, :]) + offs_e[:, None], y.to(out_ptr.dtype.element_ty),
                     mask=mo)
            x = tl.sum(tl.where(offs_t[None, None, :] == CHUNK - 1, xs, 0.0), axis=2)

    @triton.jit
    def _ordered_scan_bwd_kernel(
        u_ptr, dt_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, W_ptr, order_ptr, st_ptr, starts_ptr, dout_ptr,
        du_ptr, ddt_ptr, dz_ptr,   # (batch, K, rows, E), (batch, K, rows, E), (batch, K, L_out, E) fp32
        dB_ptr, dC_ptr,            # (batch, K, rows, N) fp32 zeroed (atomics), or per channel tile (DETERMINISTIC)
        dA_ptr, dD_ptr, dbias_ptr,  # (batch, K*E, N), (batch, K*E) x2 fp32
        K, E, N, Lmax, rows, L_out, n_chunks, R,
        HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
        IDX_IN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
        DETERMINISTIC: tl.constexpr, LOWRANK: tl.constexpr,
    ):
        b, k, offs_e, mask_e, offs_d, offs_n, mask_n, mask_dn, A, Dskip, bias = _ordered_tile(
            A_ptr, D_ptr, bias_ptr, K, E, N, HAS_D, HAS_BIAS, BLOCK_D, BLOCK_N)
        offs_t = tl.arange(0, CHUNK)
        dh_carry = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        base = (b * K + k) * rows
        for i in range(0, n_chunks):
            c = n_chunks - 1 - i
            offs_l = c * CHUNK + offs_t
            in_seq = offs_l < Lmax
            ro, r = _ordered_rows(order_ptr, k, Lmax, offs_l, IDX_IN)
            x0 = tl.load(starts_ptr + (((b * K * E + offs_d[:, None]) * n_chunks + c) * N + offs_n[None, :]),
                         mask=mask_dn, other=0.0)
            u, dt_raw, dt, Bc, Cc = _ordered_chunk(u_ptr, dt_ptr, W_ptr, B_ptr, C_ptr, st_ptr, b, k, r, in_seq, offs_e,
                                                   mask_e, offs_n, mask_n, bias, E, R, HAS_BIAS, SOFTPLUS, LOWRANK)
            dBu, xs = _scan_chunk(u, dt, Bc, A, x0)
            a = xs - dBu                                                               # exp(Δ_l A) x_{l-1}
            _, rn = _ordered_rows(order_ptr, k, Lmax, offs_l + 1, IDX_IN)               # Δ at l+1
            _, _, dtn, _, _ = _ordered_chunk(u_ptr, dt_ptr, W_ptr, B_ptr, C_ptr, st_ptr, b, k, rn, offs_l + 1 < Lmax,
                                             offs_e, mask_e, offs_n, mask_n, bias, E, R, HAS_BIAS, SOFTPLUS, LOWRANK)
            mo = mask_e[:, None] & (ro[None, :] >= 0)
            dout = tl.load(dout_ptr + ((b * K + k) * L_out + ro[None, :]) * E + offs_e[:, None], mask=mo,
                           other=0.0).to(tl.float32)
            y = tl.sum(xs * Cc[None, :, :], axis=1)
            if HAS_D:
                y += Dskip[:, None] * u
            if HAS_Z:
                zz = tl.load(z_ptr + _at(st_ptr, 9, b, k, ro[None, :]) + offs_e[:, None], mask=mo, other=0.0)
                zz = zz.to(tl.float32)
                sz = tl.sigmoid(zz)
                gy = dout * zz * sz
                tl.store(dz_ptr + ((b * K + k) * L_out + ro[None, :]) * E + offs_e[:, None],
                         dout * y * sz * (1.0 + zz * (1.0 - sz)), mask=mo)
            else:
                gy = dout
            dA_next = tl.exp(dtn[:, None, :] * A[:, :, None])
            gC = gy[:, None, :] * Cc[None, :, :]
            Q, rr = tl.associative_scan((dA_next, gC), 2, _recurrence_combine, reverse=True)
            dh = rr + Q * dh_carry[:, :, None]
            dh_carry = tl.sum(tl.where(offs_t[None, None, :] == 0, dh, 0.0), axis=2)
            dhdt = dh * dt[:, None, :]
            ddt = tl.sum(dh * (A[:, :, None] * a + Bc[None, :, :] * u[:, None, :]), axis=1)
            dA_acc += tl.sum(dhdt * a, axis=2)
            du = tl.sum(dhdt * Bc[None, :, :], axis=1)
            if HAS_D:
                du += gy * Dskip[:, None]
                dD_acc += tl.sum(gy * u, axis=1)
            mr = mask_n[:, None] & (r[None, :] >= 0)
            bc = (base + r[None, :]) * N + offs_n[:, None]
            dB = tl.sum(dhdt * u[:, None, :], axis=0)
            dC = tl.sum(xs * gy[:, None, :], axis=0)
            if DETERMINISTIC:
                part = tl.program_id(0) * (tl.num_programs(1) * rows * N)
                tl.store(dB_ptr + part + bc, dB, mask=mr)
                tl.store(dC_ptr + part + bc, dC, mask=mr)
            else:
                tl.atomic_add(dB_ptr + bc, dB, mask=mr)
                tl.atomic_add(dC_ptr + bc, dC, mask=mr)
            if SOFTPLUS:
                ddt = ddt * tl.where(dt_raw <= 20.0, tl.sigmoid(dt_raw), 1.0)
            ddt = tl.where(in_seq[None, :], ddt, 0.0)
            if HAS_BIAS:
                dbias_acc += tl.sum(ddt, axis=1)                 # padding steps too: their Δ is the bias
            mi = mask_e[:, None] & (r[None, :] >= 0)
            tl.store(du_ptr + (base + r[None, :]) * E + offs_e[:, None], du, mask=mi)
            tl.store(ddt_ptr + (base + r[None, :]) * E + offs_e[:, None], ddt, mask=mi)
        tl.store(dA_ptr + (b * K * E + offs_d[:, None]) * N + offs_n[None, :], dA_acc, mask=mask_dn)
        if HAS_D:
            tl.store(dD_ptr + b * K * E + offs_d, dD_acc, mask=mask_e)
        if HAS_BIAS:
            tl.store(dbias_ptr + b * K * E + offs_d, dbias_acc, mask=mask_e)

    @triton.jit
    def _conv_x(x_ptr, order_ptr, b, k, sj, offs_e, mask_e, Lmax, sx_b, sx_r):
        # x at the rows of steps sj (BS,) of direction k, (BS, BE) fp32: zero before the sequence and at padding
        r = tl.load(order_ptr + k * Lmax + sj, mask=(sj >= 0) & (sj < Lmax), other=-1)
        return tl.load(x_ptr + b * sx_b + r[:, None] * sx_r + offs_e[None, :], mask=(r[:, None] >= 0) & mask_e[None, :],
                       other=0.0).to(tl.float32)

    @triton.jit
    def _conv_pre(x_ptr, w_ptr, bias_ptr, order_ptr, b, k, offs_s, offs_e, mask_e, E, Lmax, sx_b, sx_r,
                  D_CONV: tl.constexpr):
        # the pre-activation (BS, BE): bias + sum_j w[j] x[order[s - (D_CONV-1) + j]], zero outside the sequence
        acc = tl.zeros((offs_s.shape[0], offs_e.shape[0]), dtype=tl.float32)
        acc += tl.load(bias_ptr + k * E + offs_e, mask=mask_e, other=0.0).to(tl.float32)[None, :]
        for j in tl.static_range(D_CONV):
            xv = _conv_x(x_ptr, order_ptr, b, k, offs_s - (D_CONV - 1) + j, offs_e, mask_e, Lmax, sx_b, sx_r)
            wv = tl.load(w_ptr + (k * D_CONV + j) * E + offs_e, mask=mask_e, other=0.0)
            acc += wv[None, :] * xv
        return acc

    @triton.jit
    def _ordered_conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, order_ptr, u_ptr, batch, E, Lmax, sx_b, sx_r,
                                 D_CONV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
        # u (K, batch, Lmax, E) = SiLU(the pre-activation); program (s block, e block, k * batch + b)
        k, b = tl.program_id(2) // batch, tl.program_id(2) % batch
        offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        acc = _conv_pre(x_ptr, w_ptr, bias_ptr, order_ptr, b, k, offs_s, offs_e, mask_e, E, Lmax, sx_b, sx_r, D_CONV)
        tl.store(u_ptr + ((k * batch + b) * Lmax + offs_s[:, None]) * E + offs_e[None, :],
                 (acc * tl.sigmoid(acc)).to(u_ptr.dtype.element_ty), mask=(offs_s[:, None] < Lmax) & mask_e[None, :])

    @triton.jit
    def _ordered_conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, order_ptr, du_ptr, dpre_ptr, dwp_ptr, dbp_ptr, batch, K, E,
                                 Lmax, sx_b, sx_r, D_CONV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
        # pass 1: dpre (K, batch, Lmax, E) = du SiLU'(pre); this program's part of dw (K, D_CONV, E) and dbias (K, E)
        # in its own slot of dwp (s blocks, batch, ...), dbp: summed afterwards in a fixed order, no atomics
        k, b = tl.program_id(2) // batch, tl.program_id(2) % batch
        offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        m = (offs_s[:, None] < Lmax) & mask_e[None, :]
        acc = _conv_pre(x_ptr, w_ptr, bias_ptr, order_ptr, b, k, offs_s, offs_e, mask_e, E, Lmax, sx_b, sx_r, D_CONV)
        at = ((k * batch + b) * Lmax + offs_s[:, None]) * E + offs_e[None, :]
        sg = tl.sigmoid(acc)
        g = tl.where(m, tl.load(du_ptr + at, mask=m, other=0.0).to(tl.float32) * sg * (1.0 + acc * (1.0 - sg)), 0.0)
        tl.store(dpre_ptr + at, g, mask=m)
        slot = (tl.program_id(0) * batch + b) * K + k
        tl.store(dbp_ptr + slot * E + offs_e, tl.sum(g, axis=0), mask=mask_e)
        for j in tl.static_range(D_CONV):
            xv = _conv_x(x_ptr, order_ptr, b, k, offs_s - (D_CONV - 1) + j, offs_e, mask_e, Lmax, sx_b, sx_r)
            tl.store(dwp_ptr + (slot * D_CONV + j) * E + offs_e, tl.sum(g * xv, axis=0), mask=mask_e)

    @triton.jit
    def _ordered_conv_dx_kernel(w_ptr, inv_ptr, dpre_ptr, dx_ptr, batch, K, E, Lmax, Lin,
                                D_CONV: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr):
        # pass 2: dx[b][p] = sum_k sum_j w_k[j] dpre[k][b][inv_k[p] + D_CONV-1 - j], each token summed in one program
        b = tl.program_id(2)
        offs_p = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
        offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_p, mask_e = offs_p < Lin, offs_e < E
        acc = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.float32)
        for k in range(0, K):
            s0 = tl.load(inv_ptr + k * Lin + offs_p, mask=mask_p, other=0)
            for j in tl.static_range(D_CONV):
                s = s0 + (D_CONV - 1) - j
                m = (mask_p & (s < Lmax))[:, None] & mask_e[None, :]
                gv = tl.load(dpre_ptr + ((k * batch + b) * Lmax + s[:, None]) * E + offs_e[None, :], mask=m, other=0.0)
                wv = tl.load(w_ptr + (k * D_CONV + j) * E + offs_e, mask=mask_e, other=0.0)
                acc += wv[None, :] * gv
        tl.store(dx_ptr + (b * Lin + offs_p[:, None]) * E + offs_e[None, :], acc,
                 mask=mask_p[:, None] & mask_e[None, :])


    @triton.jit
    def _gated_sum_kernel(y_ptr, a_ptr, out_ptr, K, L, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
        # program (t block, e block, b): out[b, t, e] = sum_k a[b, k, e] y[b, k, t, e], k in order
        b = tl.program_id(2).to(tl.int64)
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_e = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
        mask_e = offs_e < E
        m = (offs_t < L)[:, None] & mask_e[None, :]
        acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
        for k in range(0, K):
            av = tl.load(a_ptr + (b * K + k) * E + offs_e, mask=mask_e, other=0.0).to(tl.float32)
            yv = tl.load(y_ptr + ((b * K + k) * L + offs_t[:, None]) * E + offs_e[None, :], mask=m, other=0.0)
            acc += av[None, :] * yv.to(tl.float32)
        tl.store(out_ptr + (b * L + offs_t[:, None]) * E + offs_e[None, :], acc.to(out_ptr.dtype.element_ty), mask=m)


    @triton.jit
    def _token_norm_mean_kernel(y_ptr, parts_ptr, mu_ptr, rstd_ptr, L, E, eps, BLOCK_T: tl.constexpr,
                                BLOCK_E: tl.constexpr):
        # program (part p, b * K + k): tokens [p BLOCK_T, (p+1) BLOCK_T), each a whole row (BLOCK_E >= E); their
        # mu, r, and the sum of their normalised rows in parts (batch, K, parts, E), summed afterwards in order
        p, bk = tl.program_id(0), tl.program_id(1).to(tl.int64)
        offs_t = p * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_e = tl.arange(0, BLOCK_E)
        mask_t, mask_e = offs_t < L, offs_e < E
        m = mask_t[:, None] & mask_e[None, :]
        yv = tl.load(y_ptr + (bk * L + offs_t[:, None]) * E + offs_e[None, :], mask=m, other=0.0).to(tl.float32)
        mean = tl.sum(yv, axis=1) / E
        d = tl.where(m, yv - mean[:, None], 0.0)
        r = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / E + eps)
        tl.store(mu_ptr + bk * L + offs_t, mean, mask=mask_t)
        tl.store(rstd_ptr + bk * L + offs_t, r, mask=mask_t)
        tl.store(parts_ptr + (bk * tl.num_programs(0) + p) * E + offs_e, tl.sum(d * r[:, None], axis=0), mask=mask_e)


def _ordered_triton_config(N, E, batch, K, rows, L_out, Lmax):
    """(BLOCK_D, BLOCK_N, CHUNK) as the scan's, after checking the int32 offsets."""
    BLOCK_D, BLOCK_N, CHUNK = _triton_config(N, E)
    largest = max(batch * K * max(rows, L_out) * max(E, N), batch * K * E * -(-Lmax // CHUNK) * N)
    if largest >= INT32_LIMIT:
        raise ValueError(f"ordered_scan: the Triton kernels compute offsets in int32 and this call needs {largest:,} "
                         f">= 2^31; split the batch")
    return BLOCK_D, BLOCK_N, CHUNK


def _lastdim(t):
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def ordered_scan_triton(u, delta, A, B, C, D, z, delta_bias, order, L_out, delta_softplus, idx_in, need_starts,
                        dt_proj=None):
    """ordered_scan's forward on the Triton kernels (its CUDA implementation; CPU tensors under
    TRITON_INTERPRET=1). The same contract, the chunk starts in the Triton kernels' chunks."""
    _check_ordered_scan(u, delta, A, B, C, D, z, delta_bias, order, L_out, idx_in, dt_proj)
    (batch, K, rows), E = delta.shape[:3], u.shape[3]
    W, R = _lowrank_weights(dt_proj)
    N, Lmax = A.shape[1], order.shape[1]
    u, delta, B, C, z = (_lastdim(t) for t in (u, delta, B, C, z))
    if B.stride() != C.stride():
        B, C = B.contiguous(), C.contiguous()
    BLOCK_D, BLOCK_N, CHUNK = _ordered_triton_config(N, E, batch, K, rows, L_out, Lmax)
    n_chunks = -(-Lmax // CHUNK)
    out = torch.empty(batch, K, L_out, E, dtype=u.dtype, device=u.device)
    starts = torch.empty(batch, K * E, n_chunks, N, dtype=torch.float32, device=u.device) if need_starts else \
        torch.empty(0, dtype=torch.float32, device=u.device)
    st = _scan_strides(u, delta, B, z, out, L_out).to(u.device)
    with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
        _ordered_scan_fwd_kernel[(triton.cdiv(E, BLOCK_D), batch * K)](
            u, delta, A.contiguous(), B, C, _or_dummy(D, u), _or_dummy(z, u), _or_dummy(delta_bias, u), _or_dummy(W, u),
            order.contiguous(), st, out, starts if need_starts else out, K, E, N, Lmax, n_chunks, R,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            IDX_IN=bool(idx_in), SAVE=bool(need_starts), BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, CHUNK=CHUNK,
            LOWRANK=R > 0)
    return out, starts


def ordered_scan_backward_triton(u, delta, A, B, C, D, z, delta_bias, order, starts, dout, delta_softplus, idx_in,
                                 dt_proj=None):
    """ordered_scan_backward on the Triton kernels: the same list of gradients."""
    _check_ordered_scan_backward(u, delta, A, B, C, D, z, delta_bias, order, starts, dout, idx_in, dt_proj,
                                 _triton_config(A.shape[1], u.shape[3])[2])
    (batch, K, rows), E = delta.shape[:3], u.shape[3]
    W, R = _lowrank_weights(dt_proj)
    N, Lmax, L_out = A.shape[1], order.shape[1], dout.shape[2]
    u, delta, B, C, z = (_lastdim(t) for t in (u, delta, B, C, z))
    if B.stride() != C.stride():
        B, C = B.contiguous(), C.contiguous()
    BLOCK_D, BLOCK_N, CHUNK = _ordered_triton_config(N, E, batch, K, rows, L_out, Lmax)
    grid = (triton.cdiv(E, BLOCK_D), batch * K)
    f32 = dict(dtype=torch.float32, device=u.device)
    du, ddt = torch.empty(batch, K, rows, E, **f32), torch.empty(batch, K, rows, E, **f32)
    dz = torch.empty(batch, K, L_out, E, **f32) if z is not None else None
    det = torch.are_deterministic_algorithms_enabled() and grid[0] > 1
    parts = (grid[0],) if det else ()
    dB, dC = (torch.empty if det else torch.zeros)(2, *parts, batch, K, rows, N, **f32).unbind(0)
    dA, dD, dbias = torch.empty(batch, K * E, N, **f32), *torch.empty(2, batch, K * E, **f32).unbind(0)
    st = _scan_strides(u, delta, B, z, None, L_out).to(u.device)
    with torch.cuda.device(u.device) if u.is_cuda else contextlib.nullcontext():
        _ordered_scan_bwd_kernel[grid](
            u, delta, A.contiguous(), B, C, _or_dummy(D, u), _or_dummy(z, u), _or_dummy(delta_bias, u), _or_dummy(W, u),
            order.contiguous(), st, starts, dout.contiguous(), du, ddt, _or_dummy(dz, du), dB, dC, dA, dD, dbias,
            K, E, N, Lmax, rows, L_out, -(-Lmax // CHUNK), R,
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus),
            IDX_IN=bool(idx_in), BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N, CHUNK=CHUNK, DETERMINISTIC=det, LOWRANK=R > 0)
    if det:
        dB, dC = dB.sum(0), dC.sum(0)
    return _ordered_grads(u, delta, A, B, C, D, z, delta_bias, dt_proj, du, ddt, dA, dB, dC, dD, dz, dbias)


def ordered_conv_triton(x, weight, bias, order, inv):
    """ordered_conv on the Triton kernels."""
    _check_ordered_conv(x, weight, bias, order, inv)
    batch, L_in, E = x.shape
    K, Lmax = order.shape
    x, wt, b = _lastdim(x), *_conv_args(x, weight, bias)[1:]
    u = torch.empty(K, batch, Lmax, E, dtype=x.dtype, device=x.device)
    BS, BE = 16, min(128, triton.next_power_of_2(E))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _ordered_conv_fwd_kernel[(triton.cdiv(Lmax, BS), triton.cdiv(E, BE), K * batch)](
            x, wt, b, order.contiguous(), u, batch, E, Lmax, x.stride(0), x.stride(1),
            D_CONV=weight.shape[-1], BLOCK_S=BS, BLOCK_E=BE)
    return u


def ordered_conv_backward_triton(x, weight, bias, order, inv, du):
    """ordered_conv_backward on the Triton kernels (no atomics: partial sums per program, summed in order)."""
    _check_ordered_conv_backward(x, weight, bias, order, inv, du)
    batch, L_in, E = x.shape
    K, Lmax = order.shape
    dc = weight.shape[-1]
    x, wt, b = _lastdim(x), *_conv_args(x, weight, bias)[1:]
    BS, BE = 16, min(128, triton.next_power_of_2(E))
    nblk = triton.cdiv(Lmax, BS)
    f32 = dict(dtype=torch.float32, device=x.device)
    dpre, dx = torch.empty(K, batch, Lmax, E, **f32), torch.empty(batch, L_in, E, **f32)
    dwp, dbp = torch.empty(nblk, batch, K, dc, E, **f32), torch.empty(nblk, batch, K, E, **f32)
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _ordered_conv_bwd_kernel[(nblk, triton.cdiv(E, BE), K * batch)](
            x, wt, b, order.contiguous(), du.contiguous(), dpre, dwp, dbp, batch, K, E, Lmax, x.stride(0), x.stride(1),
            D_CONV=dc, BLOCK_S=BS, BLOCK_E=BE)
        _ordered_conv_dx_kernel[(triton.cdiv(L_in, BS), triton.cdiv(E, BE), batch)](
            wt, inv.contiguous(), dpre, dx, batch, K, E, Lmax, L_in, D_CONV=dc, BLOCK_S=BS, BLOCK_E=BE)
    dw = _fixed_order_sum(dwp.flatten(0, 1), 0).transpose(1, 2).reshape(weight.shape)
    db = _fixed_order_sum(dbp.flatten(0, 1), 0).reshape(bias.shape)
    return [dx.to(x.dtype), dw.to(weight.dtype), db.to(bias.dtype)]


def token_norm_mean_triton(y, eps):
    """token_norm_mean on the Triton kernel (its CUDA implementation; CPU tensors under TRITON_INTERPRET=1)."""
    _check_tokens("token_norm_mean", y)
    batch, K, L, E = y.shape
    y = y.contiguous()
    BE = triton.next_power_of_2(E)
    BT = max(1, min(16, 4096 // BE))
    P = triton.cdiv(L, BT)
    f32 = dict(dtype=torch.float32, device=y.device)
    parts, mu, rstd = torch.empty(batch, K, P, E, **f32), *(torch.empty(batch, K, L, **f32) for _ in range(2))
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():
        _token_norm_mean_kernel[(P, batch * K)](y, parts, mu, rstd, L, E, float(eps), BLOCK_T=BT, BLOCK_E=BE)
    return parts.sum(2) / L, mu, rstd


def gated_sum_triton(y, a):
    """gated_sum on the Triton kernel (its CUDA implementation; CPU tensors under TRITON_INTERPRET=1)."""
    _check_gated_sum(y, a)
    batch, K, L, E = y.shape
    y, a = y.contiguous(), a.contiguous()
    out = torch.empty(batch, L, E, dtype=y.dtype, device=y.device)
    BT, BE = 16, min(128, triton.next_power_of_2(E))
    with torch.cuda.device(y.device) if y.is_cuda else contextlib.nullcontext():
        _gated_sum_kernel[(triton.cdiv(L, BT), triton.cdiv(E, BE), batch)](y, a, out, K, L, E, BLOCK_T=BT, BLOCK_E=BE)
    return out


if HAS_TRITON:   # the CUDA implementations of the six ops
    ordered_scan.register_kernel("cuda")(ordered_scan_triton)
    ordered_scan_backward.register_kernel("cuda")(ordered_scan_backward_triton)
    ordered_conv.register_kernel("cuda")(ordered_conv_triton)
    ordered_conv_backward.register_kernel("cuda")(ordered_conv_backward_triton)
    gated_sum.register_kernel("cuda")(gated_sum_triton)
    token_norm_mean.register_kernel("cuda")(token_norm_mean_triton)
torch.library.register_kernel("localmamba::gated_sum_backward", "cuda", gated_sum_backward_torch)
torch.library.register_kernel("localmamba::token_norm_mean_backward", "cuda", token_norm_mean_backward_torch)


# -----------------------------------------------------------------------------
# "export": the recurrence as ONE loop that exporters keep (torch.export, torch.onnx's dynamo
# path): torch's `scan` higher-order op, which becomes a single ONNX `Scan` node. The "torch"
# path's Python chunk loop would be unrolled into ~100 nodes per chunk (tens of thousands per
# model). Chosen by "auto" while torch.compiler.is_exporting(); forward (inference) only.

try:
    from torch._higher_order_ops.scan import scan as _torch_scan
except ImportError:  # pragma: no cover - torch < 2.6: exporters unroll the "torch" path instead
    _torch_scan = None


def selective_scan_export(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                          delta_softplus=False, return_last_state=False):
    """The "ref" math with its loop over L as torch's `scan` op: one step per token, the state
    (batch, G, Dg, N) carried. For exporting (no hand-written backward)."""
    _check_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    out_dtype, f = u.dtype, _compute_dtype(u)
    batch, dim, L = u.shape
    Bg, Cg = _as_groups(B).to(f), _as_groups(C).to(f)                        # (batch, G, N, L)
    G, N = Bg.shape[1], A.shape[1]
    dt = delta.to(f) if delta_bias is None else delta.to(f) + delta_bias.to(f)[None, :, None]
    dt = F.softplus(dt) if delta_softplus else dt                             # (batch, D, L)
    A_g = A.to(f).reshape(G, dim // G, N)                                     # (G, Dg, N)
    lbgk = lambda t: t.to(f).permute(2, 0, 1).reshape(L, batch, G, dim // G)  # (L, batch, G, Dg)

    def step(x, xs):                                                          # x: (batch, G, Dg, N)
        dt_l, u_l, B_l, C_l = xs                                              # (batch, G, Dg) x2, (batch, G, N) x2
        x = torch.exp(dt_l[..., None] * A_g) * x + (dt_l * u_l)[..., None] * B_l[:, :, None, :]
        return x, (x * C_l[:, :, None, :]).sum(-1)                            # y_l: (batch, G, Dg)

    x0 = torch.zeros(batch, G, dim // G, N, dtype=f, device=u.device)
    x, ys = _torch_scan(step, x0, (lbgk(dt), lbgk(u), Bg.permute(3, 0, 1, 2), Cg.permute(3, 0, 1, 2)))
    y = ys.reshape(L, batch, dim).permute(1, 2, 0)                            # (batch, D, L)
    if D is not None:
        y = y + D.to(f)[None, :, None] * u.to(f)
    out = (y if z is None else y * F.silu(z.to(f))).to(out_dtype)
    return (out, x.reshape(batch, dim, N).detach()) if return_last_state else out


# -----------------------------------------------------------------------------
# the one entry point

_BACKENDS = {"ref": selective_scan_ref, "torch": selective_scan_torch, "cpu": selective_scan_cpu,
             "triton": selective_scan_triton, "export": selective_scan_export}


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                   delta_softplus=False, return_last_state=False, backend="auto"):
    """Mamba's selective scan with `mamba_ssm.selective_scan_fn`'s contract; see the module docstring.

    Returns out (batch, D, L) in u's dtype, and with return_last_state also the last state
    x_{L-1} (batch, D, N) fp32 (fp64 for fp64 inputs), which carries no gradient.
    """
    if backend == "auto":
        use_triton = HAS_TRITON and isinstance(u, torch.Tensor) and u.is_cuda
        exporting = _torch_scan is not None and torch.compiler.is_exporting()
        legacy_onnx = torch.onnx.is_in_onnx_export() and not exporting   # TorchScript-based: no scan op
        backend = "export" if exporting else "ref" if legacy_onnx else "triton" if use_triton else "torch"
    if backend not in _BACKENDS:
        raise ValueError(f"selective_scan: backend must be one of 'auto', {', '.join(map(repr, _BACKENDS))}; "
                         f"got {backend!r}")
    return _BACKENDS[backend](u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias,
                              delta_softplus=delta_softplus, return_last_state=return_last_state)

# -----------------------------------------------------------------------------
# GPU machine code without a GPU: python scan_kernel.py --compile-check 80 90

def compile_check(archs=(80, 90)):
    """Compile the kernels (the scan's two, the fused mixer's seven) to CUDA machine code for each
    compute capability in archs (80 = A100, 90 = H100) and read their resource use: Triton's
    compiler and the ptxas / cuobjdump that ship with it run on the CPU, so this catches what the
    interpreter cannot (code the GPU compiler rejects, register spills) on a machine with no GPU.
    Returns one row per compiled variant."""
    import subprocess
    import tempfile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    if not HAS_TRITON or TRITON_INTERPRET:
        raise RuntimeError("compile_check needs triton, imported without TRITON_INTERPRET=1")
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    io_dtype = ("u_ptr", "dt_ptr", "B_ptr", "C_ptr", "z_ptr", "out_ptr", "dout_ptr", "x_ptr")   # u's dtype; else fp32
    variants = [  # (dtype, HAS_D/HAS_Z/HAS_BIAS/SOFTPLUS, N, channels per group)
        ("fp32", True, 16, 96), ("bf16", True, 16, 96), ("fp16", False, 16, 96), ("fp32", True, 256, 96)]
    kernels = [(_scan_fwd_kernel, variants), (_scan_bwd_kernel, variants),                # the selective scan
               (_ordered_scan_fwd_kernel, variants[:3]), (_ordered_scan_bwd_kernel, variants[:3]),   # the fused mixer
               (_ordered_conv_fwd_kernel, variants[:2]), (_ordered_conv_bwd_kernel, variants[:1]),
               (_ordered_conv_dx_kernel, variants[:1]), (_gated_sum_kernel, variants[:1]),
               (_token_norm_mean_kernel, variants[:1])]
    rows = []
    for arch in archs:
        for kernel, kernel_variants in kernels:
            for dtype, flags, N, dg in kernel_variants:
                blocks = dict(zip(("BLOCK_D", "BLOCK_N", "CHUNK"), _triton_config(N, dg)))
                const = dict(HAS_D=flags, HAS_Z=flags, HAS_BIAS=flags, SOFTPLUS=flags, **blocks, DETERMINISTIC=flags,
                             IDX_IN=flags, LOWRANK=flags, SAVE=True, D_CONV=4, BLOCK_S=16, BLOCK_T=16, BLOCK_E=128)
                const = {k: v for k, v in const.items() if k in kernel.arg_names}
                sig = {a: "constexpr" if a in const else ("*i64" if a in ("order_ptr", "st_ptr", "inv_ptr") else
                                                          "*" + (dtype if a in io_dtype else "fp32"))
                       if a.endswith("_ptr") else "fp32" if a == "eps" else "i32" for a in kernel.arg_names}
                compiled = triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", arch, 32))
                usage = {}
                if os.path.exists(cuobjdump):
                    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                        f.write(compiled.asm["cubin"])
                        f.flush()
                        text = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True,
                                              text=True, check=True).stdout
                    for line in text.splitlines():
                        if "REG:" in line:
                            usage = {k: int(v) for k, v in (kv.split(":") for kv in line.split() if ":" in kv
                                                            and kv.split(":")[1].isdigit())}
                rows.append(dict(arch=arch, kernel=kernel.__name__, dtype=dtype, flags=flags, N=N, **blocks,
                                 registers=usage.get("REG"), spill_bytes=usage.get("LOCAL"),
                                 cubin_bytes=len(compiled.asm["cubin"])))
    return rows


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(
        description="selective scan: compile-check the GPU kernels without a GPU (timings: experiments/bench_scan.py)")
    ap.add_argument("--compile-check", type=int, nargs="*", metavar="ARCH",
                    help="compile the Triton kernels for these compute capabilities (e.g. 80 90); no GPU needed")
    args = ap.parse_args()
    if args.compile_check is not None:
        print("| sm | kernel | dtype | D/z/bias/softplus | N | BLOCK_D×BLOCK_N×CHUNK | registers | spill bytes |")
        print("|---|---|---|---|---|---|---|---|")
        for r in compile_check(tuple(args.compile_check) or (80, 90)):
            print(f"| {r['arch']} | {r['kernel']} | {r['dtype']} | {r['flags']} | {r['N']} | "
                  f"{r['BLOCK_D']}×{r['BLOCK_N']}×{r['CHUNK']} | {r['registers']} | {r['spill_bytes']} |", flush=True)
    else:
        ap.print_help()
