"""
test_localmamba.py: every fast path against the naive reference, the models against the facts
of the paper and of the official code (hunto/LocalMamba, written into this file where a test
needs them), the trainer and the study end to end.

Run: `python -m pytest -q` (README.md's first test command, a few minutes) runs the tests not
marked `slow` and still runs every scan backend against the float64 reference;
`python -m pytest -q --runslow` (what .ci/run runs) is the full suite: the trainer and the study
in subprocesses, the exports, the install, the large interpreted Triton shapes (conftest.py
defines the switch). The Triton kernels run on the CPU under TRITON_INTERPRET=1, which must be
set before triton is imported: this file sets it first. Shapes are small on purpose: the
interpreter runs the same kernel code, slowly.

Contents (one section per module, the scan first):
    1. the selective scan (scan_kernel.py): every backend against the float64 loop
    2. shared: the one tiny-run preset, the trainer in a subprocess, a finished tiny run
    3. scan orders, SCAttn, the search relaxation (localmamba.py against the paper)
    4. the models against the official code: mixers, parameters, init, forward, MACs, the copy set
    5. the timm and backbone interface (localmamba_helpers.py's half of it too)
    6. checkpoints: layouts, weights-only loading, checksums, other sizes
    7. the recipe's pieces: weight-decay groups, the schedule, EMA, the data, the flags
    8. train_mini.py end to end (subprocesses on the CPU, tiny data)
    9. the small-scale studies (experiments/study_scans.py) and the receptive field (experiments/receptive_field.py)
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import argparse
import collections
import copy
import hashlib
import importlib.util
import itertools
import json
import math
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import localmamba as lm
import localmamba_data
import localmamba_helpers
import localmamba_run
import scan_kernel
import scan_kernel_cpu
import train_mini
from localmamba import create_model, derive_directions, load_checkpoint, scan_order
from scan_kernel import selective_scan, selective_scan_ref


# =============================================================================
# 1. The selective scan (scan_kernel.py): every backend against the float64 loop



# The Triton tests run on CPU tensors under the interpreter (CI), or on CUDA tensors when this
# file runs with TRITON_INTERPRET=0 on a machine with a GPU.
TRITON_DEVICE = "cpu" if scan_kernel.TRITON_INTERPRET else "cuda"


needs_triton = pytest.mark.skipif(
    not scan_kernel.HAS_TRITON or (TRITON_DEVICE == "cuda" and not torch.cuda.is_available()),
    reason="triton is not installed, or TRITON_INTERPRET=0 without a GPU")


def scan_inputs(batch=2, dim=12, L=65, N=5, G=2, dtype=torch.float32, seed=0, grouped=True):
    """Fresh random inputs in the ranges a Mamba layer sees (A < 0, Δ around softplus(0))."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    bc_shape = (batch, G, N, L) if grouped else (batch, N, L)
    return dict(
        u=r(batch, dim, L).to(dtype), delta=(0.5 * r(batch, dim, L)).to(dtype),
        A=-torch.exp(0.5 * r(dim, N)), B=r(*bc_shape), C=r(*bc_shape),
        D=r(dim), z=r(batch, dim, L).to(dtype), delta_bias=0.3 * r(dim),
    )


def loop_float64(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """An independent float64 loop, written here from Mamba's equations (arXiv 2312.00752 eq. 2
    with ZOH for A, Euler for B), not from scan_kernel: explicit group index per channel (channel
    d reads group d // (D/G)), softplus with torch's threshold 20 written out, the states as a list."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    batch, dim, L = u.shape
    if B.dim() == 3:
        B, C = B[:, None], C[:, None]
    G = B.shape[1]
    grp = torch.arange(dim) // (dim // G)                          # channel d -> group
    Bd, Cd = B[:, grp], C[:, grp]                                  # (batch, D, N, L)
    dt = delta + (delta_bias.double()[None, :, None] if delta_bias is not None else 0)
    if delta_softplus:
        dt = torch.where(dt <= 20, torch.log1p(torch.exp(torch.clamp(dt, max=20))), dt)
    states = [torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)]
    for l in range(L):
        states.append(torch.exp(dt[..., l, None] * A.double()) * states[-1]
                      + (dt[..., l] * u[..., l])[..., None] * Bd[..., l])
    y = torch.stack([(states[l + 1] * Cd[..., l]).sum(-1) for l in range(L)], -1)
    if D is not None:
        y = y + D.double()[None, :, None] * u
    if z is not None:
        y = y * z.double() * torch.sigmoid(z.double())
    return y, states[-1]


def run_scan(fn, inp, flags, dout, **kw):
    """Outputs and all gradients of one scan call; fn is selective_scan(backend=...) or loop_float64."""
    use_D, use_z, use_bias, softplus = flags
    dev = TRITON_DEVICE if kw.get("backend") == "triton" else "cpu"
    t = {k: v.detach().clone().to(dev).requires_grad_(True) for k, v in inp.items()}
    args = dict(D=t["D"] if use_D else None, z=t["z"] if use_z else None,
                delta_bias=t["delta_bias"] if use_bias else None, delta_softplus=softplus)
    out, last = fn(t["u"], t["delta"], t["A"], t["B"], t["C"], **args, **kw)
    out.backward(dout.to(dev, out.dtype))
    grads = {k: v.grad.cpu() for k, v in t.items() if v.grad is not None}
    return out.cpu(), last.cpu(), grads


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_scan_close(got, want, tol, what):
    """Relative L2 error and max error relative to the largest element, both under tol (a number, or
    a function of the tensor checked: a tolerance per dtype)."""
    out, last, grads = got
    out_w, last_w, grads_w = want
    pairs = [("out", out, out_w), ("last_state", last, last_w)] + [(f"d{k}", grads[k], grads_w[k]) for k in grads_w]
    assert set(grads) == set(grads_w), f"{what}: gradients for {sorted(grads)} but expected {sorted(grads_w)}"
    for name, a, b in pairs:
        assert torch.isfinite(a).all(), f"{what}: {name} has non-finite values"
        e = rel_err(a, b)
        m = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
        t = tol(a) if callable(tol) else tol
        assert e < t and m < t, f"{what}: {name} ({a.dtype}) rel L2 error {e:.2e}, rel max error {m:.2e} (tol {t:.0e})"


FLAGS = list(itertools.product([False, True], repeat=4))  # (D, z, delta_bias, softplus)
QUICK_FLAGS = [(False,) * 4, (True,) * 4, (True, False, True, False), (False, True, False, True)]


def backend_params(backends, cases, quick, ids):
    """(backend, case) pairs; the interpreted Triton runs of the cases outside `quick` are marked
    slow (seconds each): the quick loop still runs every backend, on fewer cases."""
    out = []
    for case in cases:
        for b in backends:
            marks = [needs_triton] if b == "triton" else []
            marks += [pytest.mark.slow] if b == "triton" and case not in quick else []
            out.append(pytest.param(b, case, marks=marks, id=f"{ids(case)}-{b}"))
    return out


@pytest.mark.parametrize("backend, flags", backend_params(["ref", "torch", "cpu", "triton"], FLAGS, QUICK_FLAGS,
                                                          lambda f: "D{}z{}b{}sp{}".format(*map(int, f))))
def test_scan_flags_against_float64_loop(backend, flags):
    """Every flag combination: out, last state and every gradient vs the independent loop."""
    inp = scan_inputs(batch=2, dim=12, L=37, N=5, G=2, seed=1)
    dout = torch.randn(2, 12, 37, generator=torch.Generator().manual_seed(2))
    want = run_scan(loop_float64, {k: v.double() for k, v in inp.items()}, flags, dout)
    got = run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend=backend)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert not got[1].requires_grad
    assert_scan_close(got, want, 1e-5, f"{backend} {flags}")


# shapes: L in {1, 7, 65, 197}; G in {1, 2, 4}; D not a multiple of the Triton tile; 3-D B/C
SHAPES = [
    dict(batch=1, dim=8, L=1, N=4, G=1),
    dict(batch=2, dim=12, L=7, N=16, G=2),
    dict(batch=2, dim=20, L=65, N=16, G=4),
    dict(batch=1, dim=6, L=197, N=3, G=2),
    dict(batch=2, dim=36, L=65, N=16, G=4),     # 9 channels per group: a partial tile
    dict(batch=2, dim=10, L=65, N=8, G=1, grouped=False),
    dict(batch=1, dim=4, L=9, N=200, G=1),      # a large N that is not a power of two
]


@pytest.mark.parametrize("backend, shape", backend_params(
    ["torch", "cpu", "triton"], SHAPES, [s for s in SHAPES if s["dim"] * s["L"] < 1000 or not s.get("grouped", True)],
    lambda s: "b{batch}d{dim}L{L}N{N}G{G}".format(**s) + ("" if s.get("grouped", True) else "_3d")))
def test_scan_shapes_against_ref_and_loop(backend, shape):
    inp = scan_inputs(seed=3, **shape)
    flags = (True, True, True, True)
    dout = torch.randn(shape["batch"], shape["dim"], shape["L"], generator=torch.Generator().manual_seed(4))
    want64 = run_scan(loop_float64, {k: v.double() for k, v in inp.items()}, flags, dout)
    want_ref = run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend="ref")
    got = run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend=backend)
    assert got[0].shape == (shape["batch"], shape["dim"], shape["L"])
    assert got[2]["B"].shape == inp["B"].shape and got[2]["C"].shape == inp["C"].shape
    assert_scan_close(got, want64, 1e-5, f"{backend} {shape} vs float64 loop")
    assert_scan_close(got, want_ref, 1e-5, f"{backend} {shape} vs selective_scan_ref")


def test_ref_matches_float64_loop():
    """The oracle itself against the independent loop, in float64: equal to rounding."""
    inp = {k: v.double() for k, v in scan_inputs(batch=2, dim=8, L=33, N=4, G=2, seed=5).items()}
    flags = (True, True, True, True)
    dout = torch.randn(2, 8, 33, dtype=torch.float64)
    got = run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend="ref")
    want = run_scan(loop_float64, inp, flags, dout)
    assert got[0].dtype == torch.float64
    assert_scan_close(got, want, 1e-12, "ref float64")


UNIT_ROUNDOFF = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11}   # half an ulp, relative: 7 / 10 stored bits


def assert_rounded(got, exact, dtype, what, ulps=0.5):
    """got (in dtype) is the exact value rounded to nearest: within half a unit in the last place
    of each element (u·|x|), plus the fp32 arithmetic's own error (1e-6 of the largest element)."""
    assert got.dtype == dtype, what
    err = (got.double() - exact).abs()
    bound = 2 * ulps * UNIT_ROUNDOFF[dtype] * exact.abs() + 1e-6 * exact.abs().max()
    assert (err <= bound).all(), f"{what}: {int((err > bound).sum())} elements off by more than {ulps} ulp " \
                                 f"(worst {((err - bound) / exact.abs().clamp_min(1e-30)).max().item():.2e} relative)"


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_half_precision(backend, dtype):
    """bf16/fp16 u, delta, z, B, C: fp32 state and arithmetic inside, output and the gradients of
    half inputs in their dtype, rounded once. Against the float64 loop on the same rounded inputs,
    so the only error allowed is that rounding (half an ulp: 2^-8 relative in bf16, 2^-11 in fp16),
    which truncation (up to a whole ulp) does not meet. One exception, named: the Triton
    INTERPRETER converts fp32 -> bf16 inside the kernel by truncation (numpy has no bf16), so there
    `out` in bf16 is allowed one ulp; a GPU rounds to nearest, and the same test asks half an ulp there."""
    inp = scan_inputs(batch=2, dim=12, L=40, N=8, G=2, seed=6)
    for k in ("u", "delta", "z", "B", "C"):
        inp[k] = inp[k].to(dtype)
    flags = (True, True, True, True)
    dout = torch.randn(2, 12, 40, generator=torch.Generator().manual_seed(7)).to(dtype)
    got = run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend=backend)
    want = run_scan(loop_float64, {k: v.double() for k, v in inp.items()}, flags, dout)
    truncating = backend == "triton" and scan_kernel.TRITON_INTERPRET and dtype == torch.bfloat16
    assert_rounded(got[0], want[0], dtype, f"{backend} out", ulps=1.0 if truncating else 0.5)
    for k in ("u", "delta", "z", "B", "C"):
        assert_rounded(got[2][k], want[2][k], dtype, f"{backend} d{k}")
    fp32 = [("last_state", got[1], want[1])] + [(f"d{k}", got[2][k], want[2][k]) for k in ("A", "D", "delta_bias")]
    for name, g, w in fp32:                                     # fp32 results: fp32 arithmetic's error only
        assert g.dtype == torch.float32 and rel_err(g, w) < 1e-5, f"{backend} {dtype} {name}: {rel_err(g, w):.2e}"


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_scan_gradcheck_float64(backend):
    inp = {k: v.double() for k, v in scan_inputs(batch=1, dim=4, L=6, N=3, G=2, seed=8).items()}
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    args = [inp[k].requires_grad_() for k in names]

    def f(u, delta, A, B, C, D, z, bias):
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, backend=backend)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("value, want", [("", None), ("1", True), ("0", False), ("true", ValueError),
                                         ("yes", ValueError), ("2", ValueError), (" 1", ValueError)])
def test_localmamba_compile_is_read_strictly(monkeypatch, value, want):
    """LOCALMAMBA_COMPILE is 1, 0 or unset; a typo ("true", "yes") is one message naming it, never a quiet
    "off". A bad value stops the first scan that reads it (not the import), and the trainer before any setup."""
    monkeypatch.setenv("LOCALMAMBA_COMPILE", value)
    if want is ValueError:
        with pytest.raises(ValueError, match=rf"LOCALMAMBA_COMPILE={value!r}: set it to 1 .* or 0"):
            scan_kernel.compile_env()
        monkeypatch.setattr(scan_kernel, "_COMPILE_ENV_ERROR", f"LOCALMAMBA_COMPILE={value!r}: set it to 1")
        inp = scan_inputs(batch=1, dim=4, L=3, N=2, G=1)
        with pytest.raises(ValueError, match="LOCALMAMBA_COMPILE"):
            scan_kernel.selective_scan_torch(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"])
        with pytest.raises(train_mini.UserError, match=rf"^LOCALMAMBA_COMPILE={value!r}"):
            train_mini.resolve_settings(train_mini.parse_args([]), None, torch.device("cpu"))
    else:
        assert scan_kernel.compile_env() is want


def test_compiled_torch_path_matches_the_loop():
    """The torch path compiled (LOCALMAMBA_COMPILE=1 or use_compiled_torch_path, train_mini's
    default on CPU: the C++ kernels) computes what the loop computes."""
    inp = scan_inputs(batch=3, dim=8, L=19, N=4, G=2, seed=11)
    flags = (True, True, True, True)
    dout = torch.randn(3, 8, 19, generator=torch.Generator().manual_seed(12))
    want = run_scan(loop_float64, {k: v.double() for k, v in inp.items()}, flags, dout)
    got = run_scan(scan_kernel.selective_scan_torch, inp, flags, dout, return_last_state=True, compile=True)
    assert_scan_close(got, want, 1e-5, "compiled torch path")
    assert scan_kernel.COMPILE_TORCH_PATH is False        # a per-call choice changes no global


def _with_threads(n, fn):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [(1, 96, 37, 16, 1), (2, 48, 20, 4, 2), (1, 1, 400000, 2, 1)])
def test_cpu_backend_gives_the_same_bits_on_any_number_of_threads(shape):
    """The C++ scan's results, all outputs and every gradient, are bitwise the same at 1, 2 and 3
    threads, without fixing anything: the channel splits (which order dB and dC are summed in) come
    from the shape alone (96 channels: 12 vectors, which a thread-count rule would split 4, 8 or 12
    ways), and the sums after the kernel are in a fixed order (D = 1, L = 400000: Δ's bias summed to one value)."""
    batch, dim, L, N, G = shape
    inp = scan_inputs(batch=batch, dim=dim, L=L, N=N, G=G, seed=23)
    dout = torch.randn(batch, dim, L, generator=torch.Generator().manual_seed(24))
    flags = (True, True, True, True)
    runs = [_with_threads(n, lambda: run_scan(selective_scan, inp, flags, dout, return_last_state=True,
                                              backend="cpu")) for n in (1, 2, 3)]
    for other in runs[1:]:
        for name in ("out", "last", *runs[0][2]):
            a = runs[0][0] if name == "out" else runs[0][1] if name == "last" else runs[0][2][name]
            b = other[0] if name == "out" else other[1] if name == "last" else other[2][name]
            assert torch.equal(a, b), name


@pytest.mark.parametrize("splits", [1, 2, 3])
def test_cpu_kernels_split_channels_without_changing_the_result(monkeypatch, splits):
    """The C++ kernels' work items (batch row, group, channel split): with 1, 2 or 3 splits of a
    group's 3 vectors of channels (the last one partial) the result is the loop's, and 1 or 2
    threads give the same bits (each item owns its outputs; dB, dC are summed over the splits
    afterwards, in order)."""
    inp = scan_inputs(batch=1, dim=40, L=37, N=16, G=2, seed=21)            # Dg = 20: 2 full vectors + 4 lanes
    flags = (True, True, True, True)
    dout = torch.randn(1, 40, 37, generator=torch.Generator().manual_seed(22))
    want = run_scan(loop_float64, {k: v.double() for k, v in inp.items()}, flags, dout)
    monkeypatch.setattr(scan_kernel, "_cpu_splits", lambda batch, G, Dg: splits)
    threads = torch.get_num_threads()
    try:
        runs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            runs.append(run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert_scan_close(runs[0], want, 1e-5, f"cpu, {splits} splits")
    for a, b in zip([runs[0][0], runs[0][1], *runs[0][2].values()], [runs[1][0], runs[1][1], *runs[1][2].values()]):
        assert torch.equal(a, b)


def test_cpu_backend_refuses_float64_and_names_the_fix():
    inp = {k: v.double() for k, v in scan_inputs(batch=1, dim=8, L=5, N=4, G=1).items()}
    with pytest.raises(ValueError, match=r"backend 'cpu' takes CPU tensors in float32, float16 or bfloat16.*"
                                         r"float64.*backend='torch'"):
        selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], backend="cpu")
    out = scan_kernel.selective_scan_torch(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"],
                                           compile=True)                  # fp64 compiled: the torch path
    want = selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], backend="ref")
    assert out.dtype == torch.float64 and rel_err(out, want) < 1e-12


def test_cpu_kernel_build_failure_is_one_message(monkeypatch):
    """No C++ compiler (or a platform Inductor cannot build for): one TorchCompileError that says
    how to run without compiling, not the toolchain's traceback."""
    from torch._inductor import codecache

    def fail(*a, **k):
        raise RuntimeError("g++: not found")
    monkeypatch.setattr(codecache.CppPythonBindingsCodeCache, "load_pybinding", fail)
    scan_kernel._cpu_kernel.cache_clear()
    try:
        inp = scan_inputs(batch=1, dim=8, L=5, N=4, G=1)
        with pytest.raises(scan_kernel.TorchCompileError, match=r"could not be built \(RuntimeError: g\+\+: not "
                                                                r"found\).*--no-compile.*LOCALMAMBA_COMPILE=0"):
            selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], backend="cpu")
    finally:
        scan_kernel._cpu_kernel.cache_clear()


# --- the fused mixer's ordered kernels (scan_kernel.ordered_scan / ordered_conv) ----------------

def ordered_case(dirs, H, W, cls_pos=None, idx_in=True, z=False, batch=2, E=20, N=16, seed=0, rank=0):
    """Inputs of ordered_scan for K = len(dirs) orders of an H×W grid, in the layouts the mixers pass:
    idx_in (SS2D): u (batch, 1, L, E) shared, delta (batch, K, L, E), B and C views of one
    (batch, L, K, 2N) tensor; not idx_in (LocalVim): u, delta, B, C in scan order (rows Lmax), z
    (batch, 1, L, E) shared. E = 20: two full AVX2 vectors and a partial one. rank > 0: delta is
    Δ's low-rank input (batch, K, rows, rank) and dt_proj (K, E, rank) its projection, as the mixers pass."""
    g = torch.Generator().manual_seed(seed)
    orders, inv, _ = lm.MultiScan(dirs).index(H, W, cls_pos)
    K, Lmax, L = len(dirs), orders.shape[1], inv.shape[1]
    rows = L if idx_in else Lmax
    r = lambda *s: torch.randn(*s, generator=g)
    x = dict(u=r(batch, 1 if idx_in else K, rows, E), delta=r(batch, K, rows, E) - 1, xd=r(batch, rows, K, 2 * N),
             A=-torch.rand(K * E, N, generator=g) * 2 - 0.2, D=r(K * E), delta_bias=r(K * E) * 0.5)
    x["z"] = r(batch, 1, L, E) if z else None
    if rank:
        x["delta"], x["dt_proj"] = r(batch, K, rows, rank) * 0.5, r(K, E, rank) * 0.5
    return x, orders, inv


def run_ordered(x, orders, L, idx_in, dout):
    """ordered_scan's output and the gradient of (out * dout).sum() for every input."""
    x = {k: None if v is None else v.detach().requires_grad_() for k, v in x.items()}
    N = x["A"].shape[1]
    Bv, Cv = x["xd"].transpose(1, 2)[..., :N], x["xd"].transpose(1, 2)[..., N:]
    out, _ = scan_kernel.ordered_scan(x["u"], x["delta"], x["A"], Bv, Cv, x["D"], x["z"], x["delta_bias"], orders,
                                      L, True, idx_in, True, x.get("dt_proj"))
    names = [k for k, v in x.items() if v is not None]
    return out, dict(zip(names, torch.autograd.grad(out, [x[k] for k in names], dout)))


def ordered_reference(x, orders, inv, idx_in):
    """The same in float64 by the readable path's ops: each direction's inputs gathered with
    scan_tokens, the loop, unscan_tokens; stacked to (batch, K, L, E)."""
    x = {k: None if v is None else v.double() for k, v in x.items()}
    if x.get("dt_proj") is not None:                                           # Δ from its low-rank input
        x["delta"] = torch.einsum("bkrj,kej->bkre", x["delta"], x["dt_proj"])
    K, E, N = orders.shape[0], x["delta"].shape[3], x["A"].shape[1]
    outs = []
    for k in range(K):
        to_seq = ((lambda t: lm.scan_tokens(t.transpose(-1, -2), orders[k])) if idx_in else
                  (lambda t: t.transpose(-1, -2)))
        u = to_seq(x["u"][:, min(k, x["u"].shape[1] - 1)])
        Bk, Ck = to_seq(x["xd"][:, :, k, :N]), to_seq(x["xd"][:, :, k, N:])
        z = None if x["z"] is None else lm.scan_tokens(x["z"][:, 0].transpose(1, 2), orders[k])
        ch = slice(k * E, (k + 1) * E)
        y = selective_scan_ref(u, to_seq(x["delta"][:, k]), x["A"][ch], Bk, Ck, D=x["D"][ch], z=z,
                               delta_bias=x["delta_bias"][ch], delta_softplus=True)
        outs.append(lm.unscan_tokens(y, inv[k]).transpose(1, 2))
    return torch.stack(outs, 1)


ORDERED_CASES = [   # (directions, H, W, cls_pos, idx_in, z, batch, rank of Δ's input: 0 = Δ given whole)
    (["h", "v_flip", "w2", "w3_flip"], 5, 7, None, True, False, 2, 3),   # SS2D: non-square, w2/w3 pad the grid
    (["h", "v_flip", "w2", "w3_flip"], 5, 7, None, False, True, 2, 3),   # LocalVim: scan-order inputs, shared z
    (["h_flip", "w7"], 4, 4, 8, False, True, 1, 0),                       # middle cls token, w7 > grid, batch 1
    (list(lm.DIRECTIONS), 3, 6, None, True, False, 1, 0),                 # a supernet's 8 directions
]


@pytest.mark.parametrize("dirs,H,W,cls_pos,idx_in,z,batch,rank", ORDERED_CASES)
def test_ordered_scan_matches_the_readable_ops_in_float64(dirs, H, W, cls_pos, idx_in, z, batch, rank):
    """ordered_scan (inputs read through each order, zeros at padding steps, outputs written at the
    row-major tokens; Δ from its low-rank input inside the kernel) against gather -> the float64 loop ->
    un-scan; the output and the gradient of every input (dt_proj's too), the K-shared u and z summed over
    their directions, Δ's bias over padding steps too."""
    x, orders, inv = ordered_case(dirs, H, W, cls_pos, idx_in, z, batch, rank=rank)
    want = ordered_reference({k: None if v is None else v.requires_grad_() for k, v in x.items()}, orders, inv, idx_in)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
    names = [k for k, v in x.items() if v is not None]
    want_g = dict(zip(names, torch.autograd.grad(want, [x[k] for k in names], dout.double())))
    got, got_g = run_ordered(x, orders, inv.shape[1], idx_in, dout)
    assert got.shape == want.shape and rel_err(got, want) < 1e-5
    for k in names:
        assert rel_err(got_g[k], want_g[k]) < 1e-5, k


def test_ordered_conv_matches_conv1d_on_the_gathered_sequence():
    """ordered_conv (LocalVim's K causal depthwise convs + SiLU, x read through each order) against
    scan_tokens -> F.conv1d -> SiLU in float64: output, dx (the K directions summed at each token),
    the stacked weights and biases; window padding (w3 on 5×7), a cls token, d_conv 4."""
    g = torch.Generator().manual_seed(3)
    for dirs, H, W, cls_pos in ((["h", "v_flip", "w2", "w3_flip"], 5, 7, None), (["h_flip", "w7"], 4, 4, 8)):
        orders, inv, _ = lm.MultiScan(dirs).index(H, W, cls_pos)
        K, Lmax, L, E, dc = len(dirs), orders.shape[1], inv.shape[1], 20, 4
        xz = torch.randn(2, L, 2 * E, generator=g, requires_grad=True)
        w = torch.randn(K * E, 1, dc, generator=g, requires_grad=True)
        b = torch.randn(K * E, generator=g, requires_grad=True)
        got = scan_kernel.ordered_conv(xz[..., :E], w, b, orders, inv)                  # (K, batch, Lmax, E)
        seq = lm.scan_tokens(xz[..., :E].double().transpose(1, 2), orders)              # (batch, E, K, Lmax)
        seq = seq.transpose(1, 2).reshape(2, K * E, Lmax)
        want = F.silu(F.conv1d(seq, w.double(), b.double(), padding=dc - 1, groups=K * E)[..., :Lmax])
        want = want.view(2, K, E, Lmax).permute(1, 0, 3, 2)
        assert rel_err(got, want) < 1e-6
        dout = torch.randn(got.shape, generator=g)
        got_g = torch.autograd.grad(got, (xz, w, b), dout)
        for a, c in zip(got_g, torch.autograd.grad(want, (xz, w, b), dout.double())):
            assert rel_err(a, c) < 1e-6


def test_ordered_ops_are_custom_ops_that_torch_checks():
    """Both ordered ops are registered torch.library custom ops: torch.library.opcheck runs their
    schema, fake (meta) implementations, autograd registration and AOT dispatch (what torch.compile
    and torch.export trace) against the real kernels; and every op's fake gives its real outputs'
    shapes and strides."""
    x, orders, inv = ordered_case(["h", "w2_flip"], 3, 5, idx_in=True, batch=2, E=12, N=4, rank=2)
    N = 4
    xd = x["xd"].requires_grad_()
    delta = x["delta"].transpose(0, 1).contiguous().transpose(0, 1)      # dense but permuted
    args = (x["u"].requires_grad_(), delta.requires_grad_(), x["A"].requires_grad_(),
            xd.transpose(1, 2)[..., :N], xd.transpose(1, 2)[..., N:], x["D"], None, x["delta_bias"], orders, 15,
            True, True, True, x["dt_proj"].requires_grad_())
    torch.library.opcheck(torch.ops.localmamba.ordered_scan.default, args)
    xz = torch.randn(2, 15, 24, requires_grad=True)
    conv_args = (xz[..., :12], torch.randn(24, 1, 4, requires_grad=True), torch.randn(24, requires_grad=True), orders,
                 inv)
    torch.library.opcheck(torch.ops.localmamba.ordered_conv.default, conv_args)
    # the fake implementations give the real outputs' shapes AND strides (a compiled graph asserts them), for
    # the backward ops too, which get the saved inputs in the mixers' permuted layouts
    from torch._subclasses.fake_tensor import FakeTensorMode
    out, starts = scan_kernel.ordered_scan(*args)
    dout = torch.randn(out.shape).transpose(0, 1).contiguous().transpose(0, 1)
    calls = [(torch.ops.localmamba.ordered_scan.default, args),
             (torch.ops.localmamba.ordered_scan_backward.default, (*args[:9], starts, dout, True, True, args[13])),
             (torch.ops.localmamba.ordered_scan_backward.default,     # u per direction, (K, batch, ...) in memory
              (torch.randn(2, 2, 15, 12).transpose(0, 1), *args[1:9], starts, dout, True, True, args[13])),
             (torch.ops.localmamba.ordered_conv.default, conv_args),
             (torch.ops.localmamba.ordered_conv_backward.default,
              (*conv_args, torch.randn(2, 2, orders.shape[1], 12)))]
    for op, call in calls:
        plain = [a.detach() if isinstance(a, torch.Tensor) else a for a in call]
        real = op(*plain)
        with FakeTensorMode() as mode:
            fake = op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in plain])
        real, fake = ((r,) if isinstance(r, torch.Tensor) else r for r in (real, fake))
        assert [(r.shape, r.stride(), r.dtype) for r in real] == [(f.shape, f.stride(), f.dtype) for f in fake], op
    # the C++ kernels hold the chunk starts channel-fastest; starts in another layout (made elsewhere, or
    # saved and loaded contiguous) are the same values, and the backward gives the same gradients from them
    assert starts.permute(0, 2, 3, 1).is_contiguous()
    bwd = lambda s: torch.ops.localmamba.ordered_scan_backward.default(
        *[a.detach() if isinstance(a, torch.Tensor) else a for a in args[:9]], s, dout, True, True, args[13].detach())
    for got, want in zip(bwd(starts.contiguous()), bwd(starts)):
        assert torch.equal(got, want)


def test_profilers_see_every_call_of_every_ordered_op(monkeypatch):
    """torch.profiler lists each of the ten ops once per call: a fused LocalVim training step
    (3 layers, SCAttn) calls each forward op and its backward op once per layer. torch 2.14's
    fast path for all-tensor custom ops recorded no event for ordered_conv and gated_sum."""
    monkeypatch.setattr(scan_kernel, "COMPILE_TORCH_PATH", True)
    monkeypatch.delenv("LOCALMAMBA_FUSED", raising=False)
    model = create_model("local_vim_nano", in_chans=1)
    x = torch.randn(2, 1, 28, 28)
    from torch.profiler import profile
    with profile() as p:
        model(x).square().mean().backward()
    counts = collections.Counter(e.name for e in p.events() if e.name.startswith("localmamba::"))
    ops = ("ordered_scan", "ordered_conv", "token_norm_mean", "gated_sum", "rope_rms_norm")
    assert counts == {f"localmamba::{op}{part}": NANO_DEPTH for op in ops for part in ("", "_backward")}


@pytest.mark.parametrize("per_direction", [True, False])
def test_x_proj_scan_matches_x_proj_then_ordered_scan(per_direction):
    """x_proj_scan (x_proj and ordered_scan as one autograd node, u's gradient accumulated inside x_proj's
    GEMM) against the same two steps through autograd, x_proj as a plain matmul and ordered_scan's
    registered backward: output and every gradient, within fp32 rounding. u per direction (LocalVim: (K,
    batch, Lmax, E) in scan order, shared z) and shared (SS2D: (batch, L, E)), on a 5×7 grid that w2 and
    w3 pad; without need_starts (no_grad) it has no backward to run. (No thread-count check: its x_proj
    GEMMs are BLAS's, whose sums, like every nn.Linear's, may split by thread count.)"""
    dirs, g = ["h", "v_flip", "w2", "w3_flip"], torch.Generator().manual_seed(5)
    x, orders, inv = ordered_case(dirs, 5, 7, idx_in=not per_direction, z=per_direction, rank=3)
    K, Lmax, L, E, R, N = len(dirs), orders.shape[1], inv.shape[1], 20, 3, 16
    u = torch.randn((K, 2, Lmax, E) if per_direction else (2, L, E), generator=g)
    leaves = dict(u=u, W=torch.randn(K, R + 2 * N, E, generator=g) * 0.3, A=x["A"], D=x["D"], z=x["z"],
                  bias=x["delta_bias"], dt_proj=x["dt_proj"])
    leaves = {k: v.clone().requires_grad_() for k, v in leaves.items() if v is not None}
    a = lambda k: leaves.get(k)
    got = scan_kernel.x_proj_scan(a("u"), a("W"), a("A"), a("D"), a("z"), a("bias"), orders, L, a("dt_proj"))
    if per_direction:                                  # the two steps as the mixers wrote them before
        x_dbl = torch.einsum("kme,kce->kmc", a("u").reshape(K, -1, E), a("W")).view(K, 2, Lmax, -1).transpose(0, 1)
        us = a("u").transpose(0, 1)
    else:
        x_dbl = (a("u") @ a("W").reshape(-1, E).t()).view(2, L, K, -1).transpose(1, 2)
        us = a("u").unsqueeze(1)
    want, _ = scan_kernel.ordered_scan(us, x_dbl[..., :R], a("A"), x_dbl[..., R:R + N], x_dbl[..., R + N:], a("D"),
                                       a("z"), a("bias"), orders, L, True, not per_direction, True, a("dt_proj"))
    assert rel_err(got, want) < 1e-6
    dout = torch.randn(got.shape, generator=g)
    for name, c, w in zip(leaves, torch.autograd.grad(got, list(leaves.values()), dout),
                          torch.autograd.grad(want, list(leaves.values()), dout)):
        assert rel_err(c, w) < 1e-5, name
    with torch.no_grad():
        assert torch.equal(scan_kernel.x_proj_scan(*(a(k) for k in ("u", "W", "A", "D", "z", "bias")), orders, L,
                                                   a("dt_proj")), got.detach())


@pytest.mark.parametrize("first,rope", [(False, True), (True, True), (False, False)])
def test_rope_rms_norm_matches_the_block_in_float64(first, rope):
    """rope_rms_norm (LocalVim's block before its mixer in one pass: the residual add, RoPE, RMSNorm) against
    RoPE2D and RMSNorm in float64: res and out, and the gradients of residual, hidden and the norm's weight
    from both outputs; the first block (no residual), no RoPE; D = 20 (a partial vector); its PyTorch version
    (CUDA's) too; opcheck; one ValueError for a bad shape; the same bits on 1, 2 and 3 threads."""
    g = torch.Generator().manual_seed(7)
    B, H, W, D = 2, 3, 5, 20
    rot, norm = lm.RoPE2D(D, H, W), lm.RMSNorm(D)
    with torch.no_grad():
        norm.weight.add_(0.3 * torch.randn(D, generator=g))
    cos, sin = rot.cos_sin() if rope else (None, None)
    residual = None if first else torch.randn(B, H * W, D, generator=g)
    hidden = torch.randn(B, H * W, D, generator=g) * 2
    d_res, d_out = torch.randn(B, H * W, D, generator=g), torch.randn(B, H * W, D, generator=g)

    def fused(fn=scan_kernel.rope_rms_norm):
        ins = [None if t is None else t.clone().requires_grad_() for t in (residual, hidden)]
        w = norm.weight.detach().clone().requires_grad_()
        res, out, _ = fn(*ins, cos, sin, w, norm.eps)
        leaves = [t for t in (*ins, w) if t is not None]
        return [res, out, *torch.autograd.grad([res, out], leaves, [d_res, d_out])]
    rd, nd = copy.deepcopy(rot).double(), copy.deepcopy(norm).double()
    ins = [None if t is None else t.double().requires_grad_() for t in (residual, hidden)]
    s_ = ins[1] if first else ins[0] + ins[1]
    res = rd(s_) if rope else s_
    out = nd(res)
    leaves = [t for t in (*ins, nd.weight) if t is not None]
    want = [res, out, *torch.autograd.grad([res, out], leaves, [d_res.double(), d_out.double()])]
    got = fused()
    assert len(got) == len(want)
    for i, (c, w) in enumerate(zip(got, want)):
        assert c.dtype == torch.float32 and rel_err(c, w) < 1e-5, i
    ref = scan_kernel.rope_rms_norm_torch(residual, hidden, cos, sin, norm.weight, norm.eps)
    for c, w in zip(ref, scan_kernel.rope_rms_norm(residual, hidden, cos, sin, norm.weight, norm.eps)):
        assert rel_err(c, w) < 1e-6
    real = scan_kernel.rope_rms_norm(residual, hidden, cos, sin, norm.weight, norm.eps)
    bwd = [real[0], real[2], cos, sin, norm.weight, d_out, None if first else d_res]
    for c, w in zip(scan_kernel.rope_rms_norm_backward_torch(*bwd), scan_kernel.rope_rms_norm_backward(*bwd)):
        assert rel_err(c, w) < 1e-5
    torch.library.opcheck(torch.ops.localmamba.rope_rms_norm.default,
                          (residual, hidden.requires_grad_(), cos, sin, norm.weight, norm.eps))
    with pytest.raises(ValueError, match=r"rope_rms_norm: weight must be \(20,\), got \(19,\)"):
        scan_kernel.rope_rms_norm(residual, hidden, cos, sin, norm.weight[:-1], norm.eps)
    runs = [_with_threads(n, fused) for n in (1, 2, 3)]
    assert all(torch.equal(a, c) for other in runs[1:] for a, c in zip(runs[0], other))


def test_scattn_sum_matches_scattn_and_the_sum_in_float64():
    """scattn_sum (SCAttn's channel branch on each direction and the K-sum: token_norm_mean, the gate,
    gated_sum; its backward writes y's gradient once) against MultiScan.combine(SCAttn(y)) in float64:
    the output and the gradients of y and of the six parameters; E = 20 (a partial vector); the same
    bits on 1, 2 and 3 threads."""
    g = torch.Generator().manual_seed(6)
    attn = lm.SCAttn(20)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    y = torch.randn(2, 4, 13, 20, generator=g) * 2 + 1
    dout = torch.randn(2, 13, 20, generator=g)
    params = [attn.norm.weight, attn.norm.bias, attn.global_reduce.weight, attn.global_reduce.bias,
              attn.channel_select.weight, attn.channel_select.bias]

    def fused():
        y_ = y.clone().requires_grad_()
        out = scan_kernel.scattn_sum(y_, attn.norm.eps, *params)
        return [out, *torch.autograd.grad(out, [y_, *params], dout)]
    ref = copy.deepcopy(attn).double()
    yd = y.double().requires_grad_()
    want = ref(yd).sum(1)
    want = [want, *torch.autograd.grad(want, [yd, ref.norm.weight, ref.norm.bias, ref.global_reduce.weight,
                                              ref.global_reduce.bias, ref.channel_select.weight,
                                              ref.channel_select.bias], dout.double())]
    got = fused()
    for name, c, w in zip(["out", "y", "norm.weight", "norm.bias", "global_reduce.weight", "global_reduce.bias",
                           "channel_select.weight", "channel_select.bias"], got, want):
        assert c.dtype == torch.float32 and rel_err(c, w) < 1e-5, name
    runs = [_with_threads(n, fused) for n in (1, 2, 3)]
    assert all(torch.equal(a, c) for other in runs[1:] for a, c in zip(runs[0], other))


@needs_triton
@pytest.mark.parametrize("dirs,H,W,cls_pos,idx_in,z,batch,rank", ORDERED_CASES[:3])
def test_ordered_triton_kernels_match_the_readable_ops_in_float64(dirs, H, W, cls_pos, idx_in, z, batch, rank):
    """The Triton versions of the ordered kernels (ordered_scan's CUDA implementation), run as CI runs
    Triton (on the CPU under the interpreter), against the same float64 reference as the C++ ones:
    the output and the gradient of every input."""
    x, orders, inv = ordered_case(dirs, H, W, cls_pos, idx_in, z, batch, E=12, N=4, rank=rank)
    want = ordered_reference({k: None if v is None else v.requires_grad_() for k, v in x.items()}, orders, inv, idx_in)
    dout = torch.randn(want.shape, generator=torch.Generator().manual_seed(5))
    names = [k for k, v in x.items() if v is not None]
    want_g = dict(zip(names, torch.autograd.grad(want, [x[k] for k in names], dout.double())))
    d = {k: None if v is None else v.detach().to(TRITON_DEVICE) for k, v in x.items()}
    Bv, Cv = d["xd"].transpose(1, 2)[..., :4], d["xd"].transpose(1, 2)[..., 4:]
    args = (d["u"], d["delta"], d["A"], Bv, Cv, d["D"], d["z"], d["delta_bias"], orders.to(TRITON_DEVICE))
    out, starts = scan_kernel.ordered_scan_triton(*args, inv.shape[1], True, idx_in, True, d.get("dt_proj"))
    du, ddelta, dA, dB, dC, dD, dz, dbias, dW = scan_kernel.ordered_scan_backward_triton(
        *args, starts, dout.to(TRITON_DEVICE), True, idx_in, d.get("dt_proj"))
    assert rel_err(out.cpu(), want) < 1e-5
    got_g = dict(u=du, delta=ddelta, A=dA, D=dD, delta_bias=dbias, z=dz, xd=torch.cat([dB, dC], -1).transpose(1, 2),
                 dt_proj=dW)
    for k in names:
        assert rel_err(got_g[k].cpu(), want_g[k]) < 1e-5, k


@needs_triton
def test_ordered_triton_conv_matches_the_cpu_kernel():
    """ordered_conv's Triton version (forward, dx through the inverse orders, dw and the bias in
    partial sums per program) against the C++ one, itself held to F.conv1d above."""
    g = torch.Generator().manual_seed(3)
    orders, inv, _ = lm.MultiScan(["h", "v_flip", "w2", "w3_flip"]).index(5, 7)
    xz = torch.randn(2, 35, 40, generator=g)
    w, b = torch.randn(80, 1, 4, generator=g), torch.randn(80, generator=g)
    du = torch.randn(4, 2, orders.shape[1], 20, generator=g)
    dev = lambda *ts: [t.to(TRITON_DEVICE) for t in ts]
    want = scan_kernel.ordered_conv(xz[..., :20], w, b, orders, inv)
    got = scan_kernel.ordered_conv_triton(dev(xz)[0][..., :20], *dev(w, b, orders, inv))
    assert rel_err(got.cpu(), want) < 1e-6
    want_g = scan_kernel.ordered_conv_backward(xz[..., :20], w, b, orders, inv, du)
    got_g = scan_kernel.ordered_conv_backward_triton(dev(xz)[0][..., :20], *dev(w, b, orders, inv, du))
    for a, c in zip(got_g, want_g):
        assert rel_err(a.cpu(), c) < 1e-6


def test_ordered_ops_refuse_calls_outside_their_contract():
    """The ordered kernels index memory with the orders and the shapes they are given: a call that
    does not fit (an order entry past the tokens, a shape that disagrees) is one ValueError naming
    the argument, before any kernel runs, on the C++ and the Triton path."""
    x, orders, inv = ordered_case(["h", "w2_flip"], 3, 5, idx_in=True, batch=1, E=12, N=4)
    Bv, Cv = x["xd"].transpose(1, 2)[..., :4], x["xd"].transpose(1, 2)[..., 4:]
    args = dict(u=x["u"], delta=x["delta"], A=x["A"], B=Bv, C=Cv, D=x["D"], z=None, delta_bias=x["delta_bias"],
                order=orders)
    bad_order = orders.clone()
    bad_order[0, 3] = 15                                              # one past the 15 tokens
    cases = [(dict(order=bad_order), r"order holds -1\.\.15; each entry must be a token in \[0, 15\) or -1"),
             (dict(order=orders.int()), r"order must be \(K, Lmax\) int64"),
             (dict(A=x["A"][:, :3]), r"B must be \(1, 2, 15, 3\), got \(1, 2, 15, 4\)"),
             (dict(D=x["D"][:-1]), r"D must be \(24,\), got \(23,\)"),
             (dict(u=x["u"][:, :, :-1]), r"u must be \(1, \*, 15, 12\), got \(1, 1, 14, 12\)"),
             (dict(z=torch.randn(1, 1, 14, 12)), r"z must be \(1, \*, 15, 12\), got \(1, 1, 14, 12\)")]
    fns = [scan_kernel.ordered_scan] + ([scan_kernel.ordered_scan_triton] if TRITON_DEVICE == "cpu" else [])
    for over, match in cases:
        for fn in fns:
            a = {**args, **over}
            with pytest.raises(ValueError, match="ordered_scan: " + match):
                fn(*a.values(), 15, True, True, True)
    if TRITON_DEVICE == "cpu":            # a tensor on another device (the C++ op: a meta one sends the call to its fake)
        with pytest.raises(ValueError, match=r"ordered_scan: D is on meta, not on cpu with the others"):
            scan_kernel.ordered_scan_triton(*{**args, "D": x["D"].to("meta")}.values(), 15, True, True, True)
    xz = torch.randn(1, 15, 24)
    w, b = torch.randn(24, 1, 4), torch.randn(24)
    with pytest.raises(ValueError, match=r"ordered_conv: order holds -1\.\.15"):
        scan_kernel.ordered_conv(xz[..., :12], w, b, bad_order, inv)
    with pytest.raises(ValueError, match=r"ordered_conv: inv must hold scan positions"):
        scan_kernel.ordered_conv(xz[..., :12], w, b, orders, inv + 100)
    with pytest.raises(ValueError, match=r"ordered_conv: weight must be \(24, 1, \*\), got \(20, 1, 4\)"):
        scan_kernel.ordered_conv(xz[..., :12], w[:20], b, orders, inv)
    # the backward ops (autograd calls them; a direct call with a wrong gradient's shape is refused too)
    bwd = [(scan_kernel.ordered_scan, scan_kernel.ordered_scan_backward)] + (
        [(scan_kernel.ordered_scan_triton, scan_kernel.ordered_scan_backward_triton)] if TRITON_DEVICE == "cpu" else [])
    for fwd, fn in bwd:                                            # each with its own chunk starts
        out, starts = fwd(*args.values(), 15, True, True, True)
        with pytest.raises(ValueError, match=r"ordered_scan_backward: dout must be \(1, 2, 15, 12\), got \(1, 2, 14, 12\)"):
            fn(*args.values(), starts, out[:, :, :-1], True, True)
    cbwd = [scan_kernel.ordered_conv_backward] + ([scan_kernel.ordered_conv_backward_triton]
                                                  if TRITON_DEVICE == "cpu" else [])
    for fn in cbwd:
        with pytest.raises(ValueError, match=r"ordered_conv_backward: du must be \(2, 1, \d+, 12\), got \(2, 1, 3, 12\)"):
            fn(xz[..., :12], w, b, orders, inv, torch.randn(2, 1, 3, 12))

def test_ordered_kernels_give_the_same_bits_on_any_number_of_threads():
    """The ordered kernels follow the C++ scan's rule: work items and every sum's order come from the
    shape, so 1, 2 and 3 threads give the same bits (outputs and all gradients, dt_proj's and Δ's low-rank
    input's too: the matmuls that project dΔ after the kernel)."""
    x, orders, inv = ordered_case(["h", "v_flip", "w2", "w3_flip"], 5, 7, None, False, True, 3, E=40, rank=5)
    dout = torch.randn(3, 4, 35, 40, generator=torch.Generator().manual_seed(6))
    xz = torch.randn(3, 35, 80, generator=torch.Generator().manual_seed(7))
    w, b = torch.randn(160, 1, 4), torch.randn(160)

    def both():
        out, grads = run_ordered(x, orders, 35, False, dout)
        xz_ = xz.clone().requires_grad_()
        u = scan_kernel.ordered_conv(xz_[..., :40], w, b, orders, inv)
        return [out, *grads.values(), u, *torch.autograd.grad(u, xz_, torch.ones_like(u))]
    runs = [_with_threads(n, both) for n in (1, 2, 3)]
    for other in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], other))



def gated_sum_case(batch=2, K=4, L=13, E=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, K, L, E, generator=g), torch.rand(batch, K, E, generator=g)


def test_gated_sum_matches_the_readable_ops_in_float64():
    """gated_sum (SCAttn's gate and the K-sum in one kernel; C++, and Triton under the interpreter)
    against (y * a).sum(1) in float64: output and both gradients; a registered custom op that
    opcheck passes, whose fake gives the real shape and strides; a bad shape is one ValueError;
    the same bits on 1, 2 and 3 threads."""
    y, a = gated_sum_case()
    want = (y.double() * a.double()[:, :, None]).sum(1)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1))
    yd, ad = y.double().requires_grad_(), a.double().requires_grad_()
    want_g = torch.autograd.grad((yd * ad[:, :, None]).sum(1), (yd, ad), g.double())
    triton_runs = scan_kernel.HAS_TRITON and (TRITON_DEVICE == "cpu" or torch.cuda.is_available())
    fns = [scan_kernel.gated_sum] + ([scan_kernel.gated_sum_triton] if triton_runs else [])
    for fn in fns:
        dev = "cpu" if fn is scan_kernel.gated_sum else TRITON_DEVICE
        assert rel_err(fn(y.to(dev), a.to(dev)).cpu(), want) < 1e-6, fn.__name__
    y_, a_ = y.clone().requires_grad_(), a.clone().requires_grad_()
    got = scan_kernel.gated_sum(y_, a_)
    for c, w in zip(torch.autograd.grad(got, (y_, a_), g), want_g):
        assert rel_err(c, w) < 1e-6
    torch.library.opcheck(torch.ops.localmamba.gated_sum.default, (y_, a_))
    # the backward op: C++ on the CPU, PyTorch ops on CUDA (run here on the CPU), and its fake
    cpp = scan_kernel.gated_sum_backward(y, a, g)
    for c, w in zip(scan_kernel.gated_sum_backward_torch(y, a, g), cpp):
        assert rel_err(c, w) < 1e-6
    for fn in (scan_kernel.gated_sum_backward, scan_kernel.gated_sum_backward_torch):   # da alone: dy not written
        no_dy, da = fn(y, a, g, False)
        assert no_dy.numel() == 0 and rel_err(da, cpp[1]) < 1e-6
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = scan_kernel.gated_sum(mode.from_tensor(y), mode.from_tensor(a))
        fake_b = scan_kernel.gated_sum_backward(*(mode.from_tensor(t) for t in (y, a, g)))
        fake_da = scan_kernel.gated_sum_backward(*(mode.from_tensor(t) for t in (y, a, g)), False)
    assert (fake.shape, fake.stride()) == (got.shape, got.stride())
    assert [(t.shape, t.stride()) for t in fake_b] == [(t.shape, t.stride()) for t in cpp]
    assert [t.shape for t in fake_da] == [t.shape for t in scan_kernel.gated_sum_backward(y, a, g, False)]
    for bad in (a[:, :3], a[..., :-1], a[0]):
        for fn in fns:
            with pytest.raises(ValueError, match=r"gated_sum: y must be \(batch, K, L, E\) and a \(batch, K, E\)"):
                fn(y, bad)
    with pytest.raises(ValueError, match=r"gated_sum_backward: g must be \(2, 13, 20\), got \(2, 12, 20\)"):
        scan_kernel.gated_sum_backward(y, a, g[:, :-1])
    y3, a3 = gated_sum_case(batch=3, L=37, E=40)
    g3 = torch.randn(3, 37, 40, generator=torch.Generator().manual_seed(4))
    runs = [_with_threads(n, lambda: [scan_kernel.gated_sum(y3, a3), *scan_kernel.gated_sum_backward(y3, a3, g3)])
            for n in (1, 2, 3)]
    assert all(torch.equal(a, c) for other in runs[1:] for a, c in zip(runs[0], other))


def test_token_norm_mean_matches_layer_norm_in_float64():
    """token_norm_mean (SCAttn's statistics in one read; C++, and Triton under the interpreter) against
    F.layer_norm(y).mean over the tokens in float64, the token means and scales against var_mean, and
    the gradient of y; E = 20 and 40 (partial vectors), a large offset (a two-pass variance), opcheck,
    the fake's shapes, one ValueError for a bad shape, the same bits on 1, 2 and 3 threads."""
    g = torch.Generator().manual_seed(2)
    triton_runs = scan_kernel.HAS_TRITON and (TRITON_DEVICE == "cpu" or torch.cuda.is_available())
    fns = [scan_kernel.token_norm_mean] + ([scan_kernel.token_norm_mean_triton] if triton_runs else [])
    for batch, K, L, E, eps in ((2, 4, 13, 20, 1e-5), (1, 3, 37, 40, 0.5)):
        y = torch.randn(batch, K, L, E, generator=g) * 2 + 30
        yd = y.double().requires_grad_()
        want = F.layer_norm(yd, (E,), eps=eps).mean(2)
        var, mu = torch.var_mean(y.double(), -1, correction=0)
        for fn in fns:
            dev = "cpu" if fn is scan_kernel.token_norm_mean else TRITON_DEVICE
            m, mu_, r_ = (t.cpu() for t in fn(y.to(dev), eps))
            assert rel_err(m, want) < 1e-5 and rel_err(mu_, mu) < 1e-6, fn.__name__
            assert rel_err(r_, (var + eps).rsqrt()) < 1e-5, fn.__name__
        dm = torch.randn(want.shape, generator=g)
        want_g, = torch.autograd.grad(want, yd, dm.double())
        y_ = y.clone().requires_grad_()
        got_g, = torch.autograd.grad(scan_kernel.token_norm_mean(y_, eps)[0], y_, dm)
        assert rel_err(got_g, want_g) < 1e-5
        _, mu_, r_ = scan_kernel.token_norm_mean(y, eps)                       # the CUDA backward, on the CPU here
        assert rel_err(scan_kernel.token_norm_mean_backward_torch(y, mu_, r_, dm), want_g) < 1e-5
        a, gs = torch.rand(batch, K, E, generator=g), torch.randn(batch, L, E, generator=g)   # + gated_sum's a g
        want_ag = want_g + a.double()[:, :, None] * gs.double()[:, None]
        for fn in (scan_kernel.token_norm_mean_backward, scan_kernel.token_norm_mean_backward_torch):
            assert rel_err(fn(y, mu_, r_, dm, a, gs), want_ag) < 1e-5, fn.__name__
    torch.library.opcheck(torch.ops.localmamba.token_norm_mean.default, (y_, 1e-5))
    from torch._subclasses.fake_tensor import FakeTensorMode
    real = scan_kernel.token_norm_mean(y, 1e-5)
    real_b = scan_kernel.token_norm_mean_backward(y, real[1], real[2], dm)
    with FakeTensorMode() as mode:
        fake = scan_kernel.token_norm_mean(mode.from_tensor(y), 1e-5)
        fake_b = scan_kernel.token_norm_mean_backward(*(mode.from_tensor(t) for t in (y, real[1], real[2], dm)))
    assert [(t.shape, t.stride(), t.dtype) for t in real] == [(t.shape, t.stride(), t.dtype) for t in fake]
    assert (real_b.shape, real_b.stride()) == (fake_b.shape, fake_b.stride())
    for fn in fns:
        with pytest.raises(ValueError, match=r"token_norm_mean: y must be a float tensor \(batch, K, L, E\)"):
            fn(y[0], 1e-5)
    with pytest.raises(ValueError, match=r"token_norm_mean_backward: dm must be \(1, 3, 40\), got \(1, 3, 39\)"):
        scan_kernel.token_norm_mean_backward(y, real[1], real[2], dm[..., :-1])
    with pytest.raises(ValueError, match=r"token_norm_mean_backward: a and g come together"):
        scan_kernel.token_norm_mean_backward(y, real[1], real[2], dm, dm)
    both = lambda: [*scan_kernel.token_norm_mean(y, 1e-5), scan_kernel.token_norm_mean_backward(y, *real[1:], dm)]
    runs = [_with_threads(n, both) for n in (1, 2, 3)]
    assert all(torch.equal(a, c) for other in runs[1:] for a, c in zip(runs[0], other))


DAMAGED_CACHE = """
import warnings, torch, scan_kernel, scan_kernel_cpu
u = torch.randn(1, 8, 5)
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    scan_kernel.selective_scan(u, u, -torch.ones(8, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5), backend="cpu")
print([str(x.message) for x in w])
"""


def test_a_damaged_cpu_kernel_in_the_cache_is_rebuilt_not_loaded(tmp_path):
    """A cached kernel binary cut short (a build killed while writing, a full disk) would be mapped and
    fault: a bus error that kills the process without a word. It is checked before loading, deleted,
    built again, and the warning names it."""
    u = torch.randn(1, 8, 5)
    selective_scan(u, u, -torch.ones(8, 3), torch.randn(1, 3, 5), torch.randn(1, 3, 5), backend="cpu")   # N = 3
    path = Path(scan_kernel_cpu.LIBRARIES["fwd", 3, scan_kernel.CPU_CHUNK])
    whole = path.read_bytes()
    assert scan_kernel_cpu.library_is_whole(path)
    cut = path.with_name(path.name + ".cut")
    cut.write_bytes(whole[:len(whole) // 5])   # inside its code: the loader would map it and fault
    os.replace(cut, path)           # a new file: this process keeps the whole one it has mapped
    assert not scan_kernel_cpu.library_is_whole(path)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", DAMAGED_CACHE], capture_output=True, text=True, cwd=HERE, env=env,
                       timeout=600)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    assert f"cached at {path} was damaged" in p.stdout and "built again" in p.stdout, p.stdout
    assert scan_kernel_cpu.library_is_whole(path)


def test_auto_backend_picks_torch_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setitem(scan_kernel._BACKENDS, "torch", lambda *a, **k: calls.append("torch") or "t")
    monkeypatch.setitem(scan_kernel._BACKENDS, "triton", lambda *a, **k: calls.append("triton") or "x")
    inp = scan_inputs(batch=1, dim=4, L=3, N=2, G=1)
    selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"])
    assert calls == ["torch"]


def _saved_numels(fn):
    """Run fn under saved_tensors_hooks and return the numel of every tensor autograd saves."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sizes


@needs_triton
@pytest.mark.slow
def test_triton_backward_is_deterministic_on_request(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the Triton backward sums dB/dC without atomics (each
    channel tile stores its part, the wrapper sums them in a fixed order), and gives what the loop gives;
    without it, the atomics (a group of 20 channels here spans 3 tiles of 8)."""
    inp = scan_inputs(batch=2, dim=40, L=21, N=16, G=2, seed=25)
    dout = torch.randn(2, 40, 21, generator=torch.Generator().manual_seed(26))
    flags = (True, True, True, True)
    want = run_scan(loop_float64, {k: v.double() for k, v in inp.items()}, flags, dout)
    launches = []
    real = scan_kernel._scan_bwd_kernel

    class Spy:                                  # records the backward's compile-time flags, then launches
        arg_names = real.arg_names

        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(k["DETERMINISTIC"]) or real[grid](*a, **k)
    monkeypatch.setattr(scan_kernel, "_scan_bwd_kernel", Spy())
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        got = run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend="triton")
    finally:
        torch.use_deterministic_algorithms(was)
    assert_scan_close(got, want, 1e-5, "triton, deterministic")
    run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend="triton")
    assert launches == [True, False]


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=needs_triton)])
def test_scan_saves_no_per_state_tensor_for_backward(backend):
    """What the fast paths keep for backward is O(batch·D·L) plus chunk checkpoints, never the
    (batch, D, L, N) states that the ref path (autograd through the loop) keeps."""
    batch, dim, L, N, G = 2, 8, 64, 16, 2
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    inp = {k: v.to(dev).requires_grad_() for k, v in scan_inputs(batch=batch, dim=dim, L=L, N=N, G=G).items()}
    call = lambda be: selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], D=inp["D"], z=inp["z"],
                                     delta_bias=inp["delta_bias"], delta_softplus=True, backend=be)
    sizes = _saved_numels(lambda: call(backend))
    full_states = batch * dim * L * N
    assert max(sizes) < full_states / 2, f"{backend} saved a tensor of {max(sizes)} elements"
    inputs = sum(t.numel() for t in inp.values())
    checkpoints = batch * dim * N * -(-L // 4)   # one state per chunk of >= 4 steps
    assert sum(sizes) <= inputs + checkpoints, f"{backend} saved {sum(sizes)} elements in all"
    if dev == "cpu":
        assert sum(_saved_numels(lambda: call("ref"))) > full_states  # the test can see the difference


def _gpu_compiler_available():
    if not scan_kernel.HAS_TRITON:
        return False
    import triton
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.mark.slow
@pytest.mark.skipif(not _gpu_compiler_available(), reason="triton's CUDA backend (ptxas) is not installed")
def test_triton_kernels_compile_to_gpu_code_without_spills():
    """What the interpreter cannot check: the kernels (the scan's and the fused mixer's) go through
    Triton's real compiler and ptxas for A100 (sm_80) and H100 (sm_90), and their state stays in
    registers (no local-memory spill).
    In a subprocess: the compiler needs triton imported without TRITON_INTERPRET."""
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = "import json, scan_kernel; print(json.dumps(scan_kernel.compile_check((80, 90))))"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env,
                       cwd=Path(__file__).resolve().parent)
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 * (2 * 4 + 2 * 3 + 2 + 1 + 1 + 1 + 1) and {r["arch"] for r in rows} == {80, 90}
    fused = {"_ordered_scan_fwd_kernel", "_ordered_scan_bwd_kernel", "_ordered_conv_fwd_kernel",
             "_ordered_conv_bwd_kernel", "_ordered_conv_dx_kernel", "_gated_sum_kernel", "_token_norm_mean_kernel"}
    assert {r["kernel"] for r in rows} >= fused
    for r in rows:
        assert r["cubin_bytes"] > 0
        if r["registers"] is not None:          # cuobjdump ships beside ptxas; read when present
            assert r["registers"] <= 255 and r["spill_bytes"] == 0, r


def _bad_call(**over):
    inp = scan_inputs(batch=2, dim=8, L=5, N=4, G=2)
    inp.update(over)
    return lambda: selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], D=inp["D"], z=inp["z"],
                                  delta_bias=inp["delta_bias"])


@pytest.mark.parametrize("over, match", [
    (dict(u=torch.randn(2, 8)), r"u must be \(batch, D, L\)"),
    (dict(delta=torch.randn(2, 8, 6)), r"delta must be \(batch, D, L\) = \(2, 8, 5\)"),
    (dict(A=torch.randn(7, 4)), r"A must be \(D, N\) with D = 8"),
    (dict(B=torch.randn(2, 3, 4, 5), C=torch.randn(2, 3, 4, 5)), r"G = 3 groups, which must divide D = 8"),
    (dict(C=torch.randn(2, 2, 4, 6)), r"C must be \(batch, N, L\)"),
    (dict(D=torch.randn(9)), r"D must be \(8,\)"),
    (dict(z=torch.randn(2, 8, 4)), r"z must be \(2, 8, 5\)"),
    (dict(delta=torch.randn(2, 8, 5).int()), r"delta must be float16, bfloat16, float32 or float64"),
    (dict(A=torch.randn(8, 4, device="meta")), r"all tensors must be on one device"),
])
def test_scan_bad_input_raises_value_error(over, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(**over)()


def test_scan_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan(*[scan_inputs(batch=1, dim=2, L=2, N=2, G=1)[k] for k in ("u", "delta", "A", "B", "C")], backend="cuda")


BACKENDS = ["ref", "torch", "cpu", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_takes_non_contiguous_inputs(backend):
    """Every tensor input may be a strided view (D and delta_bias sliced from a wider tensor, u a
    transposed copy, B/C sliced): the result equals the one from contiguous copies."""
    inp = scan_inputs(batch=2, dim=12, L=21, N=4, G=2, seed=13)
    flags = (True, True, True, True)
    dout = torch.randn(2, 12, 21, generator=torch.Generator().manual_seed(14))
    want = run_scan(loop_float64, {k: v.double() for k, v in inp.items()}, flags, dout)
    strided = dict(inp)
    strided["D"] = torch.stack([inp["D"], -inp["D"]], 1)[:, 0]                   # stride 2
    strided["delta_bias"] = torch.stack([inp["delta_bias"], 7 + inp["delta_bias"]], 1)[:, 0]
    strided["u"] = inp["u"].transpose(1, 2).contiguous().transpose(1, 2)         # (batch, L, D) memory
    strided["B"] = torch.cat([inp["B"], inp["B"]], 2)[:, :, :4]                  # a slice of a wider tensor
    assert not any(strided[k].is_contiguous() for k in ("D", "delta_bias", "u", "B"))
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    t = {k: v.detach().clone().to(dev) if k not in ("D", "delta_bias", "u", "B") else v.to(dev)
         for k, v in strided.items()}
    for v in t.values():
        v.requires_grad_(True) if v.is_leaf else v.retain_grad()
    out, last = selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"],
                               delta_bias=t["delta_bias"], delta_softplus=True, return_last_state=True, backend=backend)
    out.backward(dout.to(dev))
    got = (out.cpu(), last.cpu(), {k: v.grad.cpu() for k, v in t.items()})
    assert_scan_close(got, want, 1e-5, f"{backend} non-contiguous")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("over, match", [
    (dict(C=torch.randn(2, 4, 5)), r"B and C must have the same layout and groups, got B \(batch, G, N, L\) with G = 2"),
    (dict(B=torch.randn(2, 4, 5)), r"got B \(batch, N, L\) and C \(batch, G, N, L\) with G = 2"),
    (dict(B=torch.randn(2, 1, 4, 5)), r"B and C must have the same layout and groups"),
    (dict(delta_softplus=1), r"delta_softplus must be True or False, got 1"),
    (dict(delta_softplus="yes"), r"delta_softplus must be True or False"),
    (dict(u=torch.randn(0, 8, 5), delta=torch.randn(0, 8, 5), z=torch.randn(0, 8, 5), B=torch.randn(0, 2, 4, 5),
          C=torch.randn(0, 2, 4, 5)), r"every dimension must be at least 1"),
    (dict(u=torch.randn(2, 8, 0), delta=torch.randn(2, 8, 0), z=torch.randn(2, 8, 0), B=torch.randn(2, 2, 4, 0),
          C=torch.randn(2, 2, 4, 0)), r"every dimension must be at least 1"),
    (dict(A=torch.randn(8, 0), B=torch.randn(2, 2, 0, 5), C=torch.randn(2, 2, 0, 5)), r"every dimension"),
])
def test_every_backend_refuses_the_same_calls(backend, over, match):
    """B and C grouped differently, a non-bool delta_softplus, zero-size dimensions: refused with
    one ValueError before any backend runs (mamba_ssm refuses mismatched B/C too)."""
    inp = scan_inputs(batch=2, dim=8, L=5, N=4, G=2)
    inp.update(delta_softplus=False)
    inp.update(over)
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    t = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
    with pytest.raises(ValueError, match=match):
        selective_scan(t["u"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], z=t["z"], delta_bias=t["delta_bias"],
                       delta_softplus=t["delta_softplus"], backend=backend)


@pytest.mark.skipif(not scan_kernel.HAS_TRITON, reason="triton is not installed")
def test_triton_refuses_shapes_whose_offsets_overflow_int32():
    """The kernels compute offsets in int32. A shape whose largest offset reaches 2^31 is refused
    with the limit named, before anything is allocated (checked here on the launch planner alone)."""
    batch, dim, L, N, G = 256, 1536, 5600, 16, 4            # batch·D·L = 2.2e9 > 2^31
    assert scan_kernel.triton_largest_offset(batch, dim, L, N, G) == batch * dim * L >= 2 ** 31
    with pytest.raises(ValueError, match=r"int32.*2\^31.*backend='torch'"):
        scan_kernel._launch_meta(None, None, None, True, dim, L, N, G, batch)
    # the checkpoint buffer is the largest at N = 64: (batch, D, n_chunks, N) with chunks of 16 steps
    batch, dim, L, N, G = 2048, 1536, 197, 64, 4
    n_chunks = -(-L // 16)
    assert scan_kernel.triton_largest_offset(batch, dim, L, N, G) == batch * dim * n_chunks * N >= 2 ** 31
    with pytest.raises(ValueError, match="2\\^31"):
        scan_kernel._launch_meta(None, None, None, True, dim, L, N, G, batch)
    grid, n_chunks, flags = scan_kernel._launch_meta(None, None, None, True, 1536, 197, 16, 4, 128)  # Vim-T: fits
    assert flags["CHUNK"] == 16 and n_chunks == 13


@pytest.mark.parametrize("backend", ["torch", "cpu", pytest.param("triton", marks=needs_triton)])
def test_double_backward_raises_and_ref_supports_it(backend):
    """The hand-written backwards are once-differentiable: a second derivative raises instead of
    coming out silently wrong (torch) or silently absent (triton); the ref loop has one."""
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    inp = {k: v.to(dev).requires_grad_() for k, v in scan_inputs(batch=1, dim=4, L=6, N=3, G=2).items()}
    call = lambda be: selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], D=inp["D"], z=inp["z"],
                                     delta_bias=inp["delta_bias"], delta_softplus=True, backend=be)
    (g,) = torch.autograd.grad(call(backend).square().sum(), inp["u"], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()
    if dev == "cpu":
        (g,) = torch.autograd.grad(call("ref").square().sum(), inp["u"], create_graph=True)
        g.sum().backward()
        assert inp["u"].grad is not None and torch.isfinite(inp["u"].grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_mixed_dtypes_compute_in_fp32(backend):
    """Under autocast a model can hand the scan bf16 u but fp32 delta (a dt_rank-1 projection is
    not autocast to bf16): every input is cast to fp32 inside, the output comes in u's dtype, and
    each gradient in its input's dtype (the official LocalVMamba casts its scan inputs the same)."""
    inp = scan_inputs(batch=2, dim=8, L=9, N=4, G=2, seed=15)
    inp["u"], inp["z"], inp["B"] = inp["u"].bfloat16(), inp["z"].bfloat16(), inp["B"].bfloat16()
    flags = (True, True, True, True)
    dout = torch.randn(2, 8, 9, generator=torch.Generator().manual_seed(16)).bfloat16()
    got = run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend=backend)
    want = run_scan(loop_float64, {k: v.double() for k, v in inp.items()}, flags, dout)
    assert got[0].dtype == torch.bfloat16 and got[2]["delta"].dtype == torch.float32
    assert got[2]["u"].dtype == got[2]["B"].dtype == torch.bfloat16
    # each result at its own dtype's precision: bf16 rounding for out, du, dz, dB; fp32 for the rest
    # (the bf16 inputs are exact in the float64 loop, so an fp32 gradient has only fp32 rounding)
    tol = lambda a: 2 * 2 ** -8 if a.dtype == torch.bfloat16 else 2e-5
    assert_scan_close(got, want, tol, f"{backend} mixed dtypes")


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_cpu_scan_takes_float64_only_on_the_torch_path(backend):
    """One float64 input among float32 ones (B here) does not reach the C++ kernels, which compute
    in fp32: backend 'cpu' refuses it with the fix, and the compiled torch path runs it eagerly."""
    inp = scan_inputs(batch=1, dim=8, L=7, N=4, G=2, seed=17)
    inp["B"] = inp["B"].double()
    if backend == "cpu":
        with pytest.raises(ValueError, match=r"backend 'cpu' takes .*float64.*backend='torch'"):
            selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], backend="cpu")
        return
    calls = []
    real = scan_kernel._SelectiveScanCPU.apply
    scan_kernel._SelectiveScanCPU.apply = lambda *a: calls.append(1) or real(*a)
    try:
        out = scan_kernel.selective_scan_torch(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], compile=True)
    finally:
        scan_kernel._SelectiveScanCPU.apply = real
    assert calls == [] and out.dtype == torch.float32


def test_cpu_scan_ignores_the_default_dtype():
    """torch.set_default_dtype(torch.float64) changes what torch.empty allocates; the C++ kernels'
    buffers are fp32 whatever it is, so an fp32 call gives the same result as under the default."""
    inp = scan_inputs(batch=2, dim=16, L=21, N=4, G=2, seed=18)
    dout = torch.randn(2, 16, 21, generator=torch.Generator().manual_seed(19))
    flags = (True, True, True, True)
    want = run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend="cpu")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend="cpu")
    finally:
        torch.set_default_dtype(old)
    assert got[0].dtype == torch.float32 and torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert all(torch.equal(got[2][k], want[2][k]) for k in want[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_positive_a_is_said(backend):
    """A > 0: a state that grows without bound; computed as asked, with one warning saying why it
    explodes (the models' A = -exp(A_log) never is)."""
    inp = scan_inputs(batch=1, dim=4, L=5, N=2, G=1, seed=22)
    inp["A"] = inp["A"].abs()
    with pytest.warns(UserWarning, match=r"A has positive entries .* without bound"):
        out = selective_scan(*(inp[k].to(TRITON_DEVICE if backend == "triton" else "cpu")
                               for k in ("u", "delta", "A", "B", "C")), backend=backend)
    assert out.shape == (1, 4, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                  # A < 0: no word
        selective_scan(*(scan_inputs(batch=1, dim=4, L=5, N=2, G=1)[k] for k in ("u", "delta", "A", "B", "C")),
                       backend="ref")


@pytest.mark.parametrize("backend", BACKENDS)
def test_scan_with_a_large_step_stays_finite(backend):
    """Δ·|A| far past what exp can resolve (Δ ≈ 25 with A down to -16, as a model's A starts): exp(ΔA)
    underflows to 0 and the state keeps only the newest input. The C++ kernels' exp2 clamps its
    argument to [-126, 126] before building 2^x from the exponent bits (AVX2; AVX-512 scales by 2^x in
    one instruction, which underflows to 0 itself); without either this gives NaN."""
    inp = scan_inputs(batch=1, dim=8, L=24, N=16, G=1, seed=20)
    inp["A"] = -torch.arange(1, 17, dtype=torch.float32).repeat(8, 1)              # A = -(1..16), the init
    inp["delta"] = 25 + inp["delta"].abs()                                           # Δ ≈ 25..27, softplus ≈ Δ
    dout = torch.randn(1, 8, 24, generator=torch.Generator().manual_seed(21))
    flags = (True, True, True, True)
    got = run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend=backend)
    want = run_scan(loop_float64, {k: v.double() for k, v in inp.items()}, flags, dout)
    if backend == "triton":   # its backward forms exp(ΔA) x_{l-1} as x_l - ΔB_l u_l: where exp(ΔA) is below fp32's
        # resolution of ΔBu that difference cancels, so dA's (tiny) share from such steps is lost (docs/scan.md)
        assert torch.isfinite(got[2].pop("A")).all()
        want[2].pop("A")
    assert_scan_close(got, want, 1e-5, f"{backend}, Δ·|A| up to {27 * 16 * 1.4427:.0f} in log2")


@pytest.mark.parametrize("backend", BACKENDS)
def test_softplus_and_the_gate_hold_over_their_whole_range(backend):
    """Δ before softplus from -40 to 40 (softplus's tail, where it is exp(Δ), its middle, and past torch's
    threshold 20, where it is Δ) and the gate z from -40 to 40: the C++ kernels compute softplus, sigmoid
    and SiLU inline (exp by exp2v, log1p by its atanh series), held here to the float64 loop."""
    inp = scan_inputs(batch=1, dim=8, L=40, N=4, G=1, seed=22)
    steps = torch.randperm(40, generator=torch.Generator().manual_seed(23))          # large and small Δ mixed
    inp["delta"] = torch.linspace(-40, 40, 8 * 40).view(1, 8, 40)[..., steps]
    inp["z"] = torch.linspace(40, -40, 8 * 40).view(1, 8, 40)
    inp["delta_bias"] = torch.zeros(8)
    dout = torch.randn(1, 8, 40, generator=torch.Generator().manual_seed(24))
    flags = (True, True, True, True)
    got = run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend=backend)
    want = run_scan(loop_float64, {k: v.double() for k, v in inp.items()}, flags, dout)
    assert_scan_close(got, want, 1e-5, f"{backend}, Δ and z over [-40, 40]")


@pytest.mark.parametrize("flags", [(False, False, False, False), (True, True, True, True), (True, False, True, True)])
@pytest.mark.parametrize("grouped", [True, False])
def test_export_backend_matches_the_float64_loop(flags, grouped):
    """backend "export" (the loop as torch's `scan` op, what exporters keep): out and last state."""
    inp = scan_inputs(L=37, grouped=grouped, seed=21)
    use_D, use_z, use_bias, softplus = flags
    args = dict(D=inp["D"] if use_D else None, z=inp["z"] if use_z else None,
                delta_bias=inp["delta_bias"] if use_bias else None, delta_softplus=softplus)
    out, last = selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], **args,
                               return_last_state=True, backend="export")
    out_w, last_w = loop_float64(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], **args)
    assert rel_err(out, out_w) < 1e-5 and rel_err(last, last_w) < 1e-5


def test_auto_picks_the_export_backend_while_exporting():
    """Under torch.export, "auto" runs the recurrence as ONE `scan` node (not a chunk loop unrolled
    into thousands of nodes), the program takes another batch size, and matches eager."""
    class Scan(torch.nn.Module):
        def forward(self, u, delta, A, B, C):
            return selective_scan(u, delta, A, B, C, delta_softplus=True)
    inp = scan_inputs(L=40, seed=22)
    args = (inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"])
    b = torch.export.Dim("batch", min=1, max=64)
    ep = torch.export.export(Scan(), args, dynamic_shapes=({0: b}, {0: b}, None, {0: b}, {0: b}))
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("scan" in str(n.target) for n in nodes) == 1 and len(nodes) < 60, [str(n.target) for n in nodes]
    more = scan_inputs(batch=5, L=40, seed=23)
    args5 = (more["u"], more["delta"], more["A"], more["B"], more["C"])
    assert rel_err(ep.module()(*args5), loop_float64(*args5, delta_softplus=True)[0]) < 1e-5


# =============================================================================
# 2. shared: the one tiny-run preset, the trainer in a subprocess, a finished tiny run

HERE = Path(__file__).resolve().parent
FASHION = Path(localmamba_data.FASHION_DIR)
needs_fashion = pytest.mark.skipif(not (FASHION / "t10k-images-idx3-ubyte.gz").exists(),
                                   reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
NANO_DEPTH = lm.MODELS["local_vim_nano"][1]["depth"]
# The tiny-run preset: a few images per class of Fashion-MNIST (the default data and model), a
# batch of 10, no progress lines. An ImageNet-layout run adds IMAGENET (the jpeg_tree fixture).
TINY = ["--train-per-class", "3", "--val-per-class", "2", "--test-per-class", "2", "--batch-size", "10",
        "--print-every", "0"]
IMAGENET = ["--data", "imagenet", "--model", "local_vim_nano", "--img-size", "28", "--batch-size", "6",
            "--workers", "0", "--print-every", "0"]


def run_cli(*args, env=None, timeout=600, script="train_mini.py"):
    """python SCRIPT ARGS in a subprocess: (returncode, stdout, stderr)."""
    e = dict(os.environ, **(env or {}))
    e.pop("TRITON_INTERPRET", None)
    p = subprocess.run([sys.executable, str(HERE / script), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=e, cwd=HERE)
    return p.returncode, p.stdout, p.stderr


def read_log(out, split=None):
    """(config, evaluation records), the records of one split if given."""
    lines = [json.loads(l) for l in (Path(out) / "log.jsonl").read_text().splitlines()]
    return lines[0], [r for r in lines[1:] if "split" in r and split in (None, r["split"])]   # (a resume adds a config)


def eval_lines(stdout):
    """--eval prints one JSON line per split: {split: record}."""
    recs = [json.loads(l) for l in stdout.splitlines() if l.startswith("{")]
    return {r["split"]: r for r in recs}


def _assert_clean_failure(rc, se, *needles):
    assert rc == 2, se
    assert "Traceback" not in se
    assert se.startswith("error: ") or "\nerror: " in se, se
    for n in needles:
        assert n in se, se


@pytest.fixture(scope="module")
def finished_tiny_run(tmp_path_factory):
    """One finished tiny run (TINY, 2 epochs of 3 steps, stopped by --max-steps 2: checkpoint.pt,
    best.pt and log.jsonl), made once; `finished_run` gives each test its own copy to change."""
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")
    out = tmp_path_factory.mktemp("finished") / "run"
    rc, _, se = run_cli(*TINY, "--epochs", "2", "--max-steps", "2", "--out", out)
    assert rc == 0, se
    return out


@pytest.fixture
def finished_run(finished_tiny_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_tiny_run, out)
    return out


# =============================================================================
# 3. Scan orders, SCAttn, the search relaxation (localmamba.py against the paper)



P = -1


def test_scan_orders_on_a_4x4_example():
    """The orders of paper Fig. 2 / official local_scan.py on a 4×4 grid, written out by hand."""
    assert scan_order("h", 4, 4).tolist() == list(range(16))
    assert scan_order("h_flip", 4, 4).tolist() == list(range(15, -1, -1))
    assert scan_order("v", 4, 4).tolist()[:8] == [0, 4, 8, 12, 1, 5, 9, 13]
    assert scan_order("w2", 4, 4).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    assert scan_order("w2_flip", 4, 4).tolist() == [15, 14, 11, 10, 13, 12, 9, 8, 7, 6, 3, 2, 5, 4, 1, 0]
    w7 = scan_order("w7", 4, 4).tolist()
    assert len(w7) == 49 and w7[:14] == [0, 1, 2, 3, P, P, P, 4, 5, 6, 7, P, P, P]
    assert sorted(x for x in w7 if x >= 0) == list(range(16)) and w7.count(P) == 33


def brute_force_order(direction, H, W):
    """The official orders as formulas, one token at a time: token (i, j) is i*W + j; `v` visits
    it at step j*H + i; `wK` pads the grid to multiples of K and visits it at step
    ((i//K)*(Wp/K) + j//K)*K² + (i%K)*K + j%K; `_flip` reverses the whole padded sequence."""
    kind, k, flip = lm.parse_direction(direction)
    if kind == "h":
        seq = [i * W + j for i in range(H) for j in range(W)]
    elif kind == "v":
        seq = [None] * (H * W)
        for i in range(H):
            for j in range(W):
                seq[j * H + i] = i * W + j
    else:
        Hp, Wp = math.ceil(H / k) * k, math.ceil(W / k) * k
        seq = [P] * (Hp * Wp)
        for i in range(Hp):
            for j in range(Wp):
                s = ((i // k) * (Wp // k) + j // k) * k * k + (i % k) * k + j % k
                seq[s] = i * W + j if (i < H and j < W) else P
    return seq[::-1] if flip else seq


GRIDS = [(4, 4), (3, 5), (5, 3), (14, 14), (7, 7), (6, 9), (1, 4), (2, 1)]


@pytest.mark.parametrize("H,W", GRIDS)
def test_scan_orders_match_the_formulas(H, W):
    for d in lm.DIRECTIONS + ("w3", "w3_flip", "w1", "w5_flip"):
        assert scan_order(d, H, W).tolist() == brute_force_order(d, H, W), (d, H, W)


@pytest.mark.parametrize("H,W", GRIDS)
def test_scan_unscan_round_trip(H, W):
    x = torch.randn(2, 3, H * W)
    for d in lm.DIRECTIONS + ("w3_flip",):
        order = scan_order(d, H, W)
        s = lm.scan_tokens(x, order)
        assert s.shape[-1] == len(order)
        assert torch.equal(s[..., order < 0], torch.zeros_like(s[..., order < 0]))   # padding is zeros
        assert torch.equal(lm.unscan_tokens(s, lm.inverse_order(order, H * W)), x), (d, H, W)


def test_official_v_unscan_is_wrong_for_non_square_grids_and_ours_is_not():
    H, W = 3, 5
    x = torch.arange(H * W).view(1, 1, -1)
    s = lm.scan_tokens(x, scan_order("v", H, W))
    official = s.view(1, 1, H, W).transpose(-1, -2).reshape(1, 1, -1)   # rearrange 'b d (h w) -> b d (w h)'
    assert not torch.equal(official, x)
    assert torch.equal(lm.unscan_tokens(s, lm.inverse_order(scan_order("v", H, W), H * W)), x)


@pytest.mark.parametrize("name", ["x", "w0", "w", "hflip", "h_flip_flip", "d2", 3])
def test_unknown_direction_raises(name):
    with pytest.raises(ValueError, match="unknown scan direction"):
        scan_order(name, 4, 4)


def test_scan_order_pictures(tmp_path):
    text = lm.draw_scan_orders(4, 4)                       # the text picture: step of every token
    assert "w2_flip" in text and " 15   14   11   10" not in text
    assert text.splitlines()[1].split() == ["0", "1", "2", "3"]                          # h: row 0 first
    assert text.split("w2  ")[1].splitlines()[1].split() == ["0", "1", "4", "5"]          # w2: a 2×2 window first
    if importlib.util.find_spec("matplotlib") is None:
        pytest.skip("matplotlib is not installed")
    png = tmp_path / "orders.png"
    lm.main(["--draw-orders", str(png), "--grid", "5", "6"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_scattn_gates_channels():
    torch.manual_seed(0)
    a = lm.SCAttn(16)
    assert sorted(n for n, _ in a.named_parameters()) == sorted(
        ["norm.weight", "norm.bias", "global_reduce.weight", "global_reduce.bias", "channel_select.weight", "channel_select.bias"])
    assert a.global_reduce.out_features == 2
    x = torch.randn(3, 10, 16)
    y = a(x)
    gate = y / x                                                   # (B, L, C): one gate per (b, c)
    assert y.shape == x.shape
    assert torch.allclose(gate, gate[:, :1].expand_as(gate), atol=1e-5)
    assert (gate > 0).all() and (gate < 1).all()
    want = torch.sigmoid(a.channel_select(F.gelu(a.global_reduce(F.layer_norm(x, (16,), a.norm.weight, a.norm.bias).mean(1, keepdim=True)))))
    assert torch.allclose(y, x * want, atol=1e-6)


def test_scattn_spatial_branch_gates_tokens():
    torch.manual_seed(0)
    a = lm.SCAttn(16, spatial=True)
    assert {"local_reduce.weight", "spatial_select.weight"} <= {n for n, _ in a.named_parameters()}
    x = torch.randn(2, 10, 16)
    gate = a(x) / x
    assert not torch.allclose(gate, gate[:, :1].expand_as(gate), atol=1e-4)  # differs per token now


def test_derive_directions_picks_the_largest_logits_in_canonical_order():
    m = create_model("local_vim_nano_search", in_chans=1, depth=4)
    logits = [[0, 5, 1, 4, 2, 3, 9, 8], [9, 8, 7, 6, 5, 4, 3, 2], [1, 1, 1, 9, 9, 9, 9, 1], [3, 0, 0, 0, 2, 0, 5, 4]]
    with torch.no_grad():
        for ms, row in zip(m.multi_scans(), logits):
            ms.weights.copy_(torch.tensor(row, dtype=torch.float).view(8, 1, 1, 1))
    assert derive_directions(m, k=4) == [["h_flip", "v_flip", "w7", "w7_flip"], ["h", "h_flip", "v", "v_flip"],
                                         ["v_flip", "w2", "w2_flip", "w7"], ["h", "w2", "w7", "w7_flip"]]
    assert derive_directions(m, k=2)[0] == ["w7", "w7_flip"]
    p = lm.search_probabilities(m)
    assert p.shape == (4, 8) and torch.allclose(p.sum(1), torch.ones(4))
    with pytest.raises(ValueError, match="not a search layer"):
        derive_directions(create_model("local_vim_nano", in_chans=1, depth=2, directions=[["h"]] * 2))


def test_search_logits_init():
    torch.manual_seed(0)
    m = create_model("local_vim_tiny_search", img_size=32, depth=2)
    w = torch.cat([ms.weights.view(-1) for ms in m.multi_scans()])
    assert w.shape == (16,) and 0 < w.abs().max().item() < 1e-2


# =============================================================================
# 4. The models against the official code: mixers, parameters, init, forward, MACs



@pytest.fixture(params=["readable", "fused"])
def mixer_path(request, monkeypatch):
    """Runs a model test on both mixer paths: "readable" (the library's default: scan_tokens -> conv
    -> selective_scan -> unscan_tokens) and "fused" (the C++ scan switched on, so the mixers run the
    ordered kernels); the fused run fails if no mixer took the fused path."""
    if request.param == "fused":
        calls, real = [], lm.x_proj_scan
        monkeypatch.setattr(scan_kernel, "COMPILE_TORCH_PATH", True)
        monkeypatch.delenv("LOCALMAMBA_FUSED", raising=False)
        monkeypatch.setattr(lm, "x_proj_scan", lambda *a: calls.append(1) or real(*a))
    yield request.param
    if request.param == "fused":
        assert calls, "no mixer took the fused path"


def _perturbed(model, seed=1):
    """The model moved off its symmetric init (equal directions, zero biases), so that a mix-up of
    directions, a dropped bias or a wrong padding shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def _out_and_grads(model, x, fused, weight):
    """model(x), and the gradients of (model(x) * weight).sum() for x and every parameter, on one path."""
    lm.set_fused(model, fused)
    x = x.clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    out = model(x)
    (out * weight.to(out.dtype)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"output": out.detach(), "input grad": x.grad, **grads}


VIM3 = dict(depth=3, directions=lm.SEARCHED_DIRECTIONS["local_vim_tiny"][:3])   # LocalVim-T's first 3 layers
FUSED_CASES = [   # (model, create_model kwargs, input (C, H, W), batch)
    ("local_vim_nano", dict(in_chans=1), (1, 28, 28), 2),
    ("local_vim_nano_p1", dict(in_chans=1, img_size=12), (1, 12, 12), 2),
    ("local_vim_nano_search", dict(in_chans=1), (1, 28, 28), 1),                  # supernet, batch 1
    ("local_vim_tiny", dict(img_size=80, **VIM3), (3, 80, 80), 1),                # 5×5: w2 and w7 pad the grid
    ("local_vim_tiny", dict(dynamic_img_size=True, **VIM3), (3, 48, 80), 2),      # a non-square 3×5 grid
    ("local_vim_tiny_middle_cls_token", dict(img_size=96, **VIM3), (3, 96, 96), 2),
    ("local_vim_tiny_search", dict(img_size=64, depth=2), (3, 64, 64), 2),
    ("local_vmamba_tiny", dict(depths=(1, 1, 2, 1), directions=lm.SEARCHED_DIRECTIONS["local_vmamba_tiny"][1:6]),
     (3, 75, 75), 1),                                                              # odd: 19, 10, 5, 3 grids
    ("local_vmamba_tiny_search", dict(depths=(1, 1, 2, 1)), (3, 52, 70), 2),      # non-square, supernet
] + [pytest.param(name, {}, None, 1, marks=pytest.mark.slow) for name in                 # the published models
     ("local_vim_tiny", "local_vim_tiny_middle_cls_token", "local_vim_small", "local_vmamba_tiny", "local_vmamba_small")]


@pytest.mark.parametrize("name,kw,shape,batch", FUSED_CASES)
def test_fused_mixer_path_matches_the_readable_path(name, kw, shape, batch, monkeypatch):
    """The fused path (ordered kernels) against the readable one on the same model: the output, the
    input's gradient and every parameter's gradient. Both in fp32 are held to the float64 readable
    path, and the fused one may not be more than a few times further from it than the readable one
    is (both are fp32 sums in other orders: a gradient that sums terms which cancel, such as the
    search logits', is far from float64 on either path; a wrong index is nowhere near it)."""
    monkeypatch.setattr(scan_kernel, "COMPILE_TORCH_PATH", True)
    monkeypatch.delenv("LOCALMAMBA_FUSED", raising=False)
    torch.manual_seed(0)
    model = _perturbed(create_model(name, drop_path_rate=0.0, **kw))
    c, h, w = shape or model.pretrained_cfg["input_size"]
    x = torch.randn(batch, c, h, w, generator=torch.Generator().manual_seed(2))
    weight = torch.randn(batch, model.num_classes, generator=torch.Generator().manual_seed(3))
    calls, real = [], lm.x_proj_scan
    monkeypatch.setattr(lm, "x_proj_scan", lambda *a: calls.append(1) or real(*a))
    fused = _out_and_grads(model, x, True, weight)
    assert len(calls) == len(model.directions)                            # every mixer took the fused path
    readable = _out_and_grads(model, x, False, weight)
    assert len(calls) == len(model.directions)                            # and none on the readable one
    truth = _out_and_grads(copy.deepcopy(model).double(), x.double(), False, weight.double())
    assert fused.keys() == readable.keys() == truth.keys()
    for key in truth:
        assert rel_err(fused[key], truth[key]) <= 10 * rel_err(readable[key], truth[key]) + 1e-6, key


def test_drop_path_drops_whole_samples_and_scales_the_kept_ones():
    """DropPath (stochastic depth): in training each sample's branch is either zero or x / (1 - p),
    whole (one draw per sample), both happen at p = 0.5 over 64 samples; p = 0 and eval mode return x."""
    x = torch.randn(64, 5, 7, generator=torch.Generator().manual_seed(0)) + 3.0   # no zero entries
    drop = lm.DropPath(0.5).train()
    torch.manual_seed(1)
    out = drop(x)
    kept = out.flatten(1).ne(0).all(1)
    assert torch.equal(out.flatten(1).ne(0).any(1), kept)                  # a sample is dropped whole or not at all
    assert 0 < int(kept.sum()) < 64
    assert torch.allclose(out[kept], x[kept] / 0.5, rtol=1e-6, atol=0)
    assert lm.DropPath(0.5).eval()(x) is x and lm.DropPath(0.0).train()(x) is x


def test_fused_path_in_training_mode_draws_the_same_drop_path(monkeypatch):
    """A LocalVim training step with DropPath on: the fused path (its block's rope_rms_norm takes the
    DropPath-scaled hidden state) gives the readable path's output and gradients from the same random
    draws, within fp32 rounding."""
    monkeypatch.setattr(scan_kernel, "COMPILE_TORCH_PATH", True)
    monkeypatch.delenv("LOCALMAMBA_FUSED", raising=False)
    model = _perturbed(create_model("local_vim_nano", in_chans=1, drop_path_rate=0.5)).train()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    weight = torch.randn(4, model.num_classes, generator=torch.Generator().manual_seed(3))
    runs = []
    for fused in (True, False):
        torch.manual_seed(9)
        runs.append(_out_and_grads(model, x, fused, weight))
    torch.manual_seed(10)
    other = _out_and_grads(model, x, False, weight)                      # other draws: the masks matter here
    assert rel_err(other["output"], runs[1]["output"]) > 1e-3
    for key in runs[1]:
        assert rel_err(runs[0][key], runs[1][key]) < 1e-4, key


def test_fused_mixer_path_under_bf16_autocast(monkeypatch):
    """CPU bf16 autocast (the trainer's --amp bf16): the fused path's bf16 model is as close to the
    float64 model as the readable path's bf16 model is (the same casts: the kernels compute in fp32
    and return the activations' dtype)."""
    monkeypatch.setattr(scan_kernel, "COMPILE_TORCH_PATH", True)
    torch.manual_seed(0)
    model = _perturbed(create_model("local_vim_nano", in_chans=1, drop_path_rate=0.0))
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    weight = torch.randn(2, model.num_classes, generator=torch.Generator().manual_seed(3))
    truth = _out_and_grads(copy.deepcopy(model).double(), x.double(), False, weight.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, readable = (_out_and_grads(model, x, f, weight) for f in (True, False))
    for key in ("output", "input grad", "layers.0.mixer.in_proj.weight", "layers.1.mixer.A_log_2"):
        assert rel_err(fused[key], truth[key]) <= 2 * rel_err(readable[key], truth[key]) + 1e-3, key


@pytest.mark.slow
def test_torch_compile_runs_the_fused_model_as_one_graph(monkeypatch):
    """torch.compile traces the fused mixer's ops as ops (their fake implementations, their registered
    backwards): a whole model compiles without a graph break, and its output and gradients are the
    eager model's."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setattr(scan_kernel, "COMPILE_TORCH_PATH", True)
    torch.manual_seed(0)
    model = _perturbed(create_model("local_vim_nano", in_chans=1, drop_path_rate=0.0))
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    weight = torch.randn(2, model.num_classes, generator=torch.Generator().manual_seed(3))
    eager = _out_and_grads(model, x, True, weight)
    torch._dynamo.reset()
    counters.clear()
    with torch._inductor.config.patch(force_disable_caches=True):
        compiled = _out_and_grads(torch.compile(model), x, True, weight)
    assert dict(counters["graph_break"]) == {}
    assert {k.replace("_orig_mod.", "") for k in compiled} == set(eager)
    for key, value in compiled.items():
        assert rel_err(value, eager[key.replace("_orig_mod.", "")]) < 1e-5, key

def test_the_fused_path_is_switched_per_model_and_by_environment(monkeypatch):
    """The fused path runs where its kernels do (the C++ scan on, a CPU tensor, not fp64, not while
    exporting); set_fused(model, False) and LOCALMAMBA_FUSED=0 force the readable path; any other
    value of the variable is one message, in the trainer before any setup."""
    calls, real = [], lm.x_proj_scan
    monkeypatch.setattr(lm, "x_proj_scan", lambda *a: calls.append(1) or real(*a))
    m = create_model("local_vmamba_tiny_search", depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 64, 64)
    fused_calls = lambda model, inp: (calls.clear(), model(inp), len(calls))[2]
    monkeypatch.setattr(scan_kernel, "COMPILE_TORCH_PATH", False)
    assert fused_calls(m, x) == 0                                        # the library's default: eager scan
    monkeypatch.setattr(scan_kernel, "COMPILE_TORCH_PATH", True)
    assert fused_calls(m, x) == 4
    assert fused_calls(copy.deepcopy(m).double(), x.double()) == 0      # fp64: the readable path
    assert fused_calls(lm.set_fused(m, False), x) == 0
    lm.set_fused(m, True)
    monkeypatch.setenv("LOCALMAMBA_FUSED", "0")
    assert fused_calls(m, x) == 0
    monkeypatch.setenv("LOCALMAMBA_FUSED", "yes")
    with pytest.raises(lm.BadInput, match=r"LOCALMAMBA_FUSED='yes': set it to 0 .* or 1"):
        m(x)
    with pytest.raises(train_mini.UserError, match=r"^LOCALMAMBA_FUSED='yes'"):   # the trainer: before any setup
        train_mini.resolve_settings(train_mini.parse_args([]), None, torch.device("cpu"))


def _official_scan(x, d, H, W):
    """(B, C, L) -> (B, C, Ls): official MultiScan.scan semantics (multi_mamba.py, local_scan.py), by reshapes."""
    kind, k, flip = lm.parse_direction(d)
    B, C, L = x.shape
    if kind == "h":
        s = x
    elif kind == "v":
        s = x.view(B, C, H, W).transpose(2, 3).reshape(B, C, L)
    else:
        g = F.pad(x.view(B, C, H, W), (0, -W % k, 0, -H % k))
        Hp, Wp = g.shape[2:]
        s = g.view(B, C, Hp // k, k, Wp // k, k).permute(0, 1, 2, 4, 3, 5).reshape(B, C, -1)
    return s.flip(-1) if flip else s


def _official_unscan(y, d, H, W):
    kind, k, flip = lm.parse_direction(d)
    y = y.flip(-1) if flip else y
    B, C, _ = y.shape
    if kind == "h":
        return y
    if kind == "v":
        return y.view(B, C, W, H).transpose(2, 3).reshape(B, C, H * W)   # the true inverse
    Hp, Wp = math.ceil(H / k) * k, math.ceil(W / k) * k
    g = y.view(B, C, Hp // k, Wp // k, k, k).permute(0, 1, 2, 4, 3, 5).reshape(B, C, Hp, Wp)
    return g[:, :, :H, :W].reshape(B, C, H * W)


def official_vim_mixer(m, h, H, W, cls_pos=None):
    """MultiMamba.forward with mamba_inner_fn_no_out_proj, one selective scan per direction."""
    xz = m.in_proj(h).transpose(1, 2)                                    # (B, 2E, L_in)
    if cls_pos is not None:
        cls = xz[:, :, cls_pos:cls_pos + 1]
        xz = torch.cat([xz[:, :, :cls_pos], xz[:, :, cls_pos + 1:]], 2)
    outs = []
    for k, d in enumerate(m.multi_scan.directions):
        s = _official_scan(xz, d, H, W)
        if cls_pos is not None:
            s = torch.cat([s[:, :, :cls_pos], cls, s[:, :, cls_pos:]], 2)
        x, z = s.chunk(2, 1)
        Ls = x.shape[-1]
        conv = getattr(m, f"conv1d_{k}")
        x = F.silu(F.conv1d(x, conv.weight, conv.bias, padding=m.d_conv - 1, groups=m.d_inner)[..., :Ls])
        x_dbl = getattr(m, f"x_proj_{k}")(x.transpose(1, 2))             # (B, Ls, R+2N)
        dt, Bm, Cm = x_dbl.split([m.dt_rank, m.d_state, m.d_state], -1)
        dt = (dt @ getattr(m, f"dt_proj_{k}").weight.t()).transpose(1, 2)
        y = selective_scan_ref(x, dt, -torch.exp(getattr(m, f"A_log_{k}")), Bm.transpose(1, 2), Cm.transpose(1, 2),
                               D=getattr(m, f"D_{k}"), z=z, delta_bias=getattr(m, f"dt_proj_{k}").bias,
                               delta_softplus=True)
        if cls_pos is not None:
            c_out = y[:, :, cls_pos:cls_pos + 1]
            y = torch.cat([y[:, :, :cls_pos], y[:, :, cls_pos + 1:]], 2)
        y = _official_unscan(y, d, H, W)
        if cls_pos is not None:
            y = torch.cat([y[:, :, :cls_pos], c_out, y[:, :, cls_pos:]], 2)
        outs.append(m.attn(y.transpose(1, 2)))
    if m.multi_scan.search:
        w = m.multi_scan.weights.softmax(0)
        out = (torch.stack([F.layer_norm(o, o.shape[-1:]) for o in outs]) * w).sum(0)
    else:
        out = torch.stack(outs).sum(0)
    return m.out_proj(out)


@pytest.mark.parametrize("H,W,dirs,cls", [
    (6, 6, ["h", "v_flip", "w7", "w7_flip"], False),      # w7 pads 6×6 to 7×7: unequal lengths
    (4, 6, ["v", "v_flip", "w2", "h_flip"], False),      # non-square
    (6, 6, ["h", "h_flip", "v", "w2_flip"], True),        # middle cls token
    (4, 4, None, False),                                  # supernet, all 8 with the softmax mix
])
def test_vim_mixer_one_grouped_call_equals_k_separate_calls(H, W, dirs, cls, mixer_path):
    torch.manual_seed(0)
    cls_pos = (H * W) // 2 if cls else None
    m = lm.LocalVimMixer(16, dirs or list(lm.DIRECTIONS), (H, W), cls_pos, search=dirs is None)
    with torch.no_grad():   # move off the symmetric init so that a mix-up of directions would show
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    h = torch.randn(2, H * W + cls, 16)
    got = m(h)
    want = official_vim_mixer(m, h, H, W, cls_pos)
    assert rel_err(got, want) < 1e-5


def official_ss2d(op, x):
    """SS2D.forward with MultiScanVSSM, one selective scan per direction."""
    B, H, W, _ = x.shape
    E, N, R = op.d_inner, op.d_state, op.dt_rank
    xin, z = op.in_proj(x).chunk(2, -1)
    xin = F.silu(op.conv2d(xin.permute(0, 3, 1, 2))).flatten(2)          # (B, E, L)
    outs = []
    for k, d in enumerate(op.multi_scan.directions):
        s = _official_scan(xin, d, H, W)
        x_dbl = torch.einsum("bel,ce->bcl", s, op.x_proj_weight[k])
        dt, Bm, Cm = x_dbl.split([R, N, N], 1)
        dt = torch.einsum("brl,er->bel", dt, op.dt_projs_weight[k])
        y = selective_scan_ref(s, dt, -torch.exp(op.A_logs[k * E:(k + 1) * E]), Bm, Cm, D=op.Ds[k * E:(k + 1) * E],
                               delta_bias=op.dt_projs_bias[k], delta_softplus=True)
        outs.append(op.multi_scan.attn(_official_unscan(y, d, H, W).transpose(1, 2)))
    if op.multi_scan.search:
        w = op.multi_scan.weights.softmax(0)
        y = (torch.stack([F.layer_norm(o, o.shape[-1:]) for o in outs]) * w).sum(0)
    else:
        y = torch.stack(outs).sum(0)
    return op.out_proj(op.out_norm(y).view(B, H, W, E) * F.silu(z))


@pytest.mark.parametrize("H,W,dirs", [(7, 7, ["h", "v_flip", "w2", "w7_flip"]), (5, 6, ["h_flip", "v", "w2_flip", "w7"]), (4, 4, None)])
def test_ss2d_one_grouped_call_equals_k_separate_calls(H, W, dirs, mixer_path):
    torch.manual_seed(0)
    op = lm.SS2D(8, dirs or list(lm.DIRECTIONS), search=dirs is None)
    with torch.no_grad():
        for p in op.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, H, W, 8)
    assert rel_err(op(x), official_ss2d(op, x)) < 1e-5


def expected_vim_state(D, depth, dirs, cls=False, rope=True, L=196, classes=1000, N=16):
    """Official VisionMamba's state_dict shapes (local_vim.py + multi_mamba.py), enumerated here (not
    from localmamba): patch embed, pos embed, RoPE buffers, per layer a shared in_proj/out_proj/SCAttn
    and per direction conv1d_k, x_proj_k, dt_proj_k, A_log_k, D_k; RMSNorm; head."""
    E, R, r = 2 * D, math.ceil(D / 16), int(2 * D * 0.125)
    s = {"patch_embed.proj.weight": (D, 3, 16, 16), "patch_embed.proj.bias": (D,), "pos_embed": (1, L + cls, D),
         "norm_f.weight": (D,), "head.weight": (classes, D), "head.bias": (classes,)}
    if cls:
        s["cls_token"] = (1, 1, D)
    if rope:
        s["rope.freqs_cos"] = s["rope.freqs_sin"] = (L, D)
    for i in range(depth):
        p = f"layers.{i}."
        s[p + "norm.weight"] = (D,)
        s[p + "mixer.in_proj.weight"] = (2 * E, D)
        s[p + "mixer.out_proj.weight"] = (D, E)
        for a, shape in [("norm.weight", (E,)), ("norm.bias", (E,)), ("global_reduce.weight", (r, E)),
                         ("global_reduce.bias", (r,)), ("channel_select.weight", (E, r)), ("channel_select.bias", (E,))]:
            s[p + "mixer.attn." + a] = shape
        K = len(dirs[i]) if dirs else 8
        if not dirs:
            s[p + "mixer.multi_scan.weights"] = (8, 1, 1, 1)
        for k in range(K):
            s.update({p + f"mixer.conv1d_{k}.weight": (E, 1, 4), p + f"mixer.conv1d_{k}.bias": (E,),
                      p + f"mixer.x_proj_{k}.weight": (R + 2 * N, E), p + f"mixer.dt_proj_{k}.weight": (E, R),
                      p + f"mixer.dt_proj_{k}.bias": (E,), p + f"mixer.A_log_{k}": (E, N), p + f"mixer.D_{k}": (E,)})
    return s


def expected_vmamba_state(dims, depths, dirs, classes=1000, N=16):
    """Official VSSM's state_dict shapes (local_vmamba.py), enumerated here: stem conv + LayerNorm,
    per block SS2D with stacked per-direction x_proj/dt_projs/A_logs/Ds and SCAttn under
    op.multi_scan.attn, patch merging between stages, classifier norm + head."""
    s = {"patch_embed.0.weight": (dims[0], 3, 4, 4), "patch_embed.0.bias": (dims[0],),
         "patch_embed.2.weight": (dims[0],), "patch_embed.2.bias": (dims[0],),
         "classifier.norm.weight": (dims[-1],), "classifier.norm.bias": (dims[-1],),
         "classifier.head.weight": (classes, dims[-1]), "classifier.head.bias": (classes,)}
    b = 0
    for st, (C, depth) in enumerate(zip(dims, depths)):
        E, R, r = 2 * C, math.ceil(C / 16), int(2 * C * 0.125)
        for j in range(depth):
            K = len(dirs[b]) if dirs else 8
            b += 1
            p = f"layers.{st}.blocks.{j}."
            s.update({p + "norm.weight": (C,), p + "norm.bias": (C,), p + "op.in_proj.weight": (2 * E, C),
                      p + "op.conv2d.weight": (E, 1, 3, 3), p + "op.conv2d.bias": (E,),
                      p + "op.x_proj_weight": (K, R + 2 * N, E), p + "op.dt_projs_weight": (K, E, R),
                      p + "op.dt_projs_bias": (K, E), p + "op.A_logs": (K * E, N), p + "op.Ds": (K * E,),
                      p + "op.out_norm.weight": (E,), p + "op.out_norm.bias": (E,), p + "op.out_proj.weight": (C, E),
                      p + "op.multi_scan.attn.norm.weight": (E,), p + "op.multi_scan.attn.norm.bias": (E,),
                      p + "op.multi_scan.attn.global_reduce.weight": (r, E), p + "op.multi_scan.attn.global_reduce.bias": (r,),
                      p + "op.multi_scan.attn.channel_select.weight": (E, r), p + "op.multi_scan.attn.channel_select.bias": (E,)})
            if not dirs:
                s[p + "op.multi_scan.weights"] = (8, 1, 1, 1)
        if st < len(dims) - 1:
            s[f"layers.{st}.downsample.norm.weight"] = s[f"layers.{st}.downsample.norm.bias"] = (4 * C,)
            s[f"layers.{st}.downsample.reduction.weight"] = (dims[st + 1], 4 * C)
    return s


# The published per-layer directions, transcribed from the official local_vim.py / local_vmamba.py
# (hunto/LocalMamba at commit 75e5d1f) one layer per line, independently of localmamba.py.
# local_vim_small: the official file defines it twice; the second definition, which runs, uses
# h h_flip w2 w2_flip in all 20 layers.
OFFICIAL_LISTS = {
    "local_vim_tiny": """
        h v_flip w7 w7_flip
        h_flip w2_flip w7 w7_flip
        h h_flip v w7
        h h_flip v v_flip
        h h_flip v v_flip
        h h_flip v v_flip
        h_flip v v_flip w7
        h_flip v v_flip w2_flip
        h h_flip v v_flip
        h h_flip v v_flip
        h v v_flip w2
        h v v_flip w2_flip
        h h_flip v_flip w7
        h_flip v v_flip w2
        h h_flip v v_flip
        h v w2 w2_flip
        v v_flip w2 w7
        h h_flip v w2
        h h_flip w2_flip w7
        v v_flip w2 w2_flip
    """,
    "local_vmamba_tiny": """
        h h_flip w7 w7_flip
        h_flip v_flip w2 w2_flip
        h_flip v_flip w2_flip w7
        h_flip v v_flip w2
        h h_flip v_flip w2_flip
        h_flip v_flip w2 w2_flip
        h w2_flip w7 w7_flip
        h h_flip v v_flip
        h v_flip w7 w7_flip
        h_flip v w2 w7_flip
        v v_flip w2 w7_flip
        h h_flip v_flip w2_flip
        v_flip w2_flip w7 w7_flip
        h_flip v_flip w2_flip w7_flip
        h_flip v w7 w7_flip
    """,
    "local_vmamba_small": """
        h v v_flip w7_flip
        h h_flip v w7
        h_flip v v_flip w7
        h_flip v w2_flip w7
        h_flip v w2_flip w7
        h_flip v_flip w2 w7_flip
        h_flip v v_flip w7
        h v v_flip w7
        h v v_flip w7
        h v v_flip w7_flip
        h h_flip v v_flip
        h v v_flip w2
        v v_flip w2_flip w7
        h h_flip v w2
        h_flip v v_flip w7_flip
        h h_flip v v_flip
        h v v_flip w7_flip
        h v v_flip w7_flip
        h h_flip v_flip w7
        h_flip v_flip w2_flip w7
        h_flip v v_flip w7_flip
        v v_flip w7 w7_flip
        h v v_flip w7_flip
        h_flip v v_flip w2
        h v v_flip w2_flip
        h h_flip v w7
        h h_flip w7 w7_flip
        h v_flip w2 w2_flip
        h v_flip w2 w7
        h v v_flip w7_flip
        h_flip v w2_flip w7
        h_flip v_flip w7 w7_flip
        h v w7 w7_flip
    """,
}


PUBLISHED = {name: [line.split() for line in text.strip().splitlines()] for name, text in OFFICIAL_LISTS.items()}


PUBLISHED["local_vim_small"] = [["h", "h_flip", "w2", "w2_flip"]] * 20


EXPECTED = {
    "local_vim_tiny": lambda d: expected_vim_state(192, 20, d["local_vim_tiny"]),
    "local_vim_tiny_middle_cls_token": lambda d: expected_vim_state(192, 20, d["local_vim_tiny"], cls=True, rope=False),
    "local_vim_small": lambda d: expected_vim_state(384, 20, d["local_vim_small"]),
    "local_vim_tiny_search": lambda d: expected_vim_state(128, 20, None),
    "local_vmamba_tiny": lambda d: expected_vmamba_state((96, 192, 384, 768), (2, 2, 9, 2), d["local_vmamba_tiny"]),
    "local_vmamba_small": lambda d: expected_vmamba_state((96, 192, 384, 768), (2, 2, 27, 2), d["local_vmamba_small"]),
    "local_vmamba_tiny_search": lambda d: expected_vmamba_state((32, 64, 128, 256), (2, 2, 9, 2), None),
    "local_vmamba_small_search": lambda d: expected_vmamba_state((32, 64, 128, 256), (2, 2, 27, 2), None),
}


# parameter counts of the official models (the paper rounds them: 8M, 28M, 26M, 50M)
OFFICIAL_PARAMS = {"local_vim_tiny": 7_994_152, "local_vim_small": 27_783_784,
                   "local_vmamba_tiny": 25_527_160, "local_vmamba_small": 49_748_536}


@pytest.fixture(scope="module")
def published():
    return PUBLISHED


def test_published_directions_equal_the_official_lists():
    assert set(lm.SEARCHED_DIRECTIONS) == set(PUBLISHED)
    assert [len(PUBLISHED[n]) for n in ("local_vim_tiny", "local_vmamba_tiny", "local_vmamba_small")] == [20, 15, 33]
    for name, dirs in lm.SEARCHED_DIRECTIONS.items():
        assert dirs == PUBLISHED[name], name
        assert all(d == sorted(d, key=lm.DIRECTIONS.index) for d in dirs), f"{name}: lists are in canonical order"
    for name in ("local_vim_tiny", "local_vim_small", "local_vmamba_tiny", "local_vmamba_small"):
        assert create_model(name, img_size=64 if "vmamba" in name else 32).directions == PUBLISHED[name], name


@pytest.mark.parametrize("name", list(EXPECTED))
def test_published_models_have_the_official_state_dict(name, published):
    model = create_model(name)
    want = EXPECTED[name](published)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(want)) == [] and sorted(set(want) - set(got)) == []
    assert got == want
    n_params = sum(p.numel() for p in model.parameters())
    buffers = sum(math.prod(v) for k, v in want.items() if k.startswith("rope."))
    assert n_params == sum(math.prod(v) for v in want.values()) - buffers
    if name in OFFICIAL_PARAMS:
        assert n_params == OFFICIAL_PARAMS[name]
    if name in lm.PAPER:
        assert round(n_params / 1e6) == lm.PAPER[name][1]


def test_a_log_tensors_are_independent():
    """OFFICIAL BUG fixed: the K A_log_k of a layer are separate tensors."""
    m = create_model("local_vim_tiny", img_size=32, depth=2, directions=[["h", "v", "w2", "w7"]] * 2)
    mixer = m.layers[0].mixer
    ptrs = {getattr(mixer, f"A_log_{k}").data_ptr() for k in range(4)}
    assert len(ptrs) == 4
    with torch.no_grad():
        mixer.A_log_0.add_(1.0)
    assert not torch.equal(mixer.A_log_0, mixer.A_log_1)


def test_init_as_the_official_code_executes_it():
    torch.manual_seed(0)
    m = create_model("local_vim_tiny", img_size=32, depth=4, directions=[["h", "v", "w2", "w7"]] * 4)
    mix = m.layers[0].mixer
    assert torch.equal(mix.A_log_2, torch.log(torch.arange(1, 17.0)).repeat(mix.d_inner, 1))
    assert torch.equal(mix.D_1, torch.ones(mix.d_inner))
    assert torch.equal(mix.dt_proj_0.bias, torch.zeros(mix.d_inner))          # the trunc-normal init overwrote Mamba's
    assert mix.dt_proj_0.weight.std().item() < 0.03
    bound = 1 / math.sqrt(mix.d_inner) / math.sqrt(4)                          # kaiming_uniform(a=√5) / √depth
    assert mix.out_proj.weight.abs().max().item() <= bound + 1e-6
    assert mix.out_proj.weight.abs().max().item() > 0.8 * bound
    v = create_model("local_vmamba_tiny", img_size=64, num_classes=10).layers[0].blocks[0].op
    dt = F.softplus(v.dt_projs_bias)
    assert dt.min().item() >= 1e-4 - 1e-7 and dt.max().item() <= 0.1 + 1e-6
    R = v.dt_rank
    assert v.dt_projs_weight.abs().max().item() <= R ** -0.5


SMALL = {  # every named model at a small image size
    "local_vim_tiny": dict(img_size=32),
    "local_vim_tiny_middle_cls_token": dict(img_size=32),
    "local_vim_small": dict(img_size=32, depth=2, directions=[["h", "h_flip", "w2", "w2_flip"]] * 2),
    "local_vim_tiny_search": dict(img_size=32, depth=3),
    "local_vmamba_tiny": dict(img_size=64),
    "local_vmamba_small": dict(img_size=64, depths=(1, 1, 2, 1), directions=lm.SEARCHED_DIRECTIONS["local_vmamba_small"][:5]),
    "local_vmamba_tiny_search": dict(img_size=64),
    "local_vmamba_small_search": dict(img_size=64, depths=(1, 1, 2, 1)),
    "local_vim_nano": dict(in_chans=1),
    "local_vim_nano_p1": dict(in_chans=1, img_size=12),
    "local_vim_nano_search": dict(in_chans=1),
}


@pytest.mark.parametrize("name", list(SMALL))
def test_every_model_forward_backward(name, mixer_path):
    torch.manual_seed(0)
    m = create_model(name, num_classes=7, drop_path_rate=0.1, **SMALL[name])
    assert name in lm.MODELS
    x = torch.randn(2, m.cfg.in_chans, m.cfg.img_size, m.cfg.img_size)
    y = m(x)
    assert y.shape == (2, 7) and torch.isfinite(y).all()
    y.square().mean().backward()
    no_grad = [n for n, p in m.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert len(m.directions) == (m.cfg.depth if isinstance(m, lm.LocalVim) else sum(m.cfg.depths))
    m.eval()
    with torch.no_grad():      # the head pools as the official models do: tokens (or the cls token), or H×W
        feats = m.forward_features(x)
        if isinstance(m, lm.LocalVim):
            pooled = feats[:, m.cls_pos] if m.cls_pos is not None else feats.mean(1)     # (B, L, D) -> (B, D)
            head = m.head
        else:
            pooled = feats.mean((1, 2))                                                 # (B, h, w, C) -> (B, C)
            head = m.classifier.head
        assert pooled.shape == (2, m.num_features)
        assert torch.allclose(m.forward_head(feats, pre_logits=True), pooled, atol=1e-6)
        assert torch.allclose(m(x), pooled @ head.weight.t() + head.bias, atol=1e-5)
        assert torch.equal(m(x), m(x))                                                  # eval: no drop path


def official_vim_features(m, x):
    """Official local_vim.py VisionMamba.forward_features with Vim's Block (fused_add_norm=False,
    residual_in_fp32), transcribed here; RoPE from Vim's rope.py VisionRotaryEmbeddingFast, built
    here from its formula, not taken from the model. Mixers are the model's own (tested apart)."""
    H, W = m.cfg.grid
    D = m.embed_dim
    half = D // 2                                                       # RoPE(dim=D/2) per axis
    freqs = 1.0 / (10000 ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    ang_r = torch.einsum("i,f->if", torch.arange(H) / H * 14, freqs).repeat_interleave(2, -1)   # (H, D/2)
    ang_c = torch.einsum("j,f->jf", torch.arange(W) / W * 14, freqs).repeat_interleave(2, -1)   # (W, D/2)
    ang = torch.cat([ang_r[:, None].expand(H, W, half), ang_c[None].expand(H, W, half)], -1).reshape(H * W, D)

    def rope(t):                                                        # t * cos + rotate_half(t) * sin
        t1, t2 = t.view(*t.shape[:-1], D // 2, 2).unbind(-1)
        return t * ang.cos() + torch.stack((-t2, t1), -1).flatten(-2) * ang.sin()

    hidden = m.patch_embed.proj(x).flatten(2).transpose(1, 2) + m.pos_embed
    residual = None
    for layer in m.layers:
        hidden = rope(hidden)
        if residual is not None:                                        # if_rope_residual
            residual = rope(residual)
        residual = hidden if residual is None else residual + hidden    # Block: add (drop path off in eval)
        hidden = layer.mixer(layer.norm(residual))                      # RMSNorm, then the mixer
        residual = residual.float()
    return m.norm_f(residual + hidden)


def test_local_vim_follows_the_official_block_flow_with_rope(mixer_path):
    """RoPE before every layer on the hidden states AND the residual stream, the residual add, the
    final add + norm: the model against a transcription of the official forward."""
    torch.manual_seed(0)
    m = create_model("local_vim_tiny", img_size=64, depth=3, embed_dim=32, num_classes=5,
                     directions=[["h", "v_flip", "w2", "w7"]] * 3).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        x = torch.randn(2, 3, 64, 64)
        want = official_vim_features(m, x)
        assert rel_err(m.forward_features(x), want) < 1e-5
        # the test can see each part: RoPE on the residual, and RoPE at all, change the result
        no_rope = create_model("local_vim_tiny", img_size=64, depth=3, embed_dim=32, num_classes=5, rope=False,
                               directions=[["h", "v_flip", "w2", "w7"]] * 3).eval()
        no_rope.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("rope.")})
        assert rel_err(no_rope.forward_features(x), want) > 1e-2


def test_dt_rank_one_model_runs_under_autocast():
    """D = 16 gives dt_rank 1: under CPU autocast its Δ projection stays fp32 while u is bf16.
    The scan takes that, computes in fp32, and the bf16 result stays near the fp32 one."""
    torch.manual_seed(0)
    m = create_model("local_vim_nano", in_chans=1, embed_dim=16, num_classes=4)
    assert m.layers[0].mixer.dt_rank == 1
    x = torch.randn(2, 1, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y.float().square().mean().backward()
    assert torch.isfinite(y).all() and all(torch.isfinite(p.grad).all() for p in m.parameters())
    assert rel_err(y.float(), m(x)) < 5e-2
    v = create_model("local_vmamba_tiny_search", img_size=64, dims=(16, 32, 64, 128), depths=(1, 1, 1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(v(torch.randn(1, 3, 64, 64)).float()).all()


def test_middle_cls_token_is_read_from_the_middle():
    torch.manual_seed(0)
    m = create_model("local_vim_tiny_middle_cls_token", img_size=32, num_classes=4).eval()
    assert m.cls_pos == 2 and not hasattr(m, "rope")          # 2×2 grid: cls at index 4 // 2
    feats = m.forward_features(torch.randn(1, 3, 32, 32))
    assert feats.shape == (1, 5, 192)
    assert torch.equal(m.forward_head(feats, pre_logits=True), feats[:, 2])


@pytest.mark.parametrize("kwargs, match", [
    (dict(img_size=30), "not divisible by patch_size 16"),
    (dict(directions=[["h", "v"]] * 3), "20 lists, got 3"),
    (dict(directions=[["h", "diagonal"]] * 20), "unknown scan direction 'diagonal'"),
    (dict(directions="h"), "got a string"),
    (dict(depth_multiplier=2), "unknown option"),
    (dict(img_size="224"), "img_size must be an integer >= 1, got '224'"),
    (dict(img_size=-224), "img_size must be an integer >= 1"),
    (dict(img_size=224.0), "img_size must be an integer >= 1, got 224.0"),
    (dict(embed_dim=0), "embed_dim must be an integer >= 1"),
    (dict(depth=0), "depth must be an integer >= 1"),
    (dict(in_chans=0), "in_chans must be an integer >= 1"),
    (dict(num_classes=-1), "num_classes must be an integer >= 0"),
    (dict(drop_path_rate=2), r"drop_path_rate must be a number in \[0, 1\)"),
    (dict(drop_rate=float("nan")), r"drop_rate must be a number in \[0, 1\)"),
    (dict(spatial_attn="no"), "spatial_attn must be True or False, got 'no'"),
    (dict(directions=[["h", "h", "w2", "w2_flip"]] * 20), r"directions\[0\] = \['h', 'h', 'w2', 'w2_flip'\] lists a "
                                                           "direction twice"),
])
def test_bad_model_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("local_vim_tiny", **kwargs)


def test_bad_model_name_and_image_shape():
    with pytest.raises(ValueError, match="unknown model 'local_vim_huge'"):
        create_model("local_vim_huge")
    for kw, match in ((dict(dims=(96, 0, 384, 768)), "dims must be a non-empty list of integers >= 1"),
                      (dict(depths=()), "depths must be a non-empty list"), (dict(ssm_ratio=0), "ssm_ratio must be"),
                      (dict(scattn=1), "scattn must be True or False")):
        with pytest.raises(ValueError, match=match):
            create_model("local_vmamba_tiny_search", **kw)
    with pytest.raises(ValueError, match="must be at least the patch size 4"):
        create_model("local_vmamba_tiny", img_size=2)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 3, H, W\) with H, W >= 4"):
        create_model("local_vmamba_tiny", img_size=64)(torch.randn(1, 3, 2, 64))
    m = create_model("local_vim_nano", in_chans=1)
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 28, 28\)"):
        m(torch.randn(2, 3, 28, 28))


@pytest.mark.parametrize("name, kw", [
    ("local_vim_nano", dict(in_chans=1, num_classes=10)),
    ("local_vim_tiny_middle_cls_token", dict(img_size=64, depth=2, directions=[["h", "v_flip", "w2", "w7"]] * 2)),
    ("local_vmamba_tiny", dict(img_size=64, depths=(1, 1, 1, 1), directions=[["h", "v", "w2", "w7_flip"]] * 4)),
])
def test_count_macs_against_pytorchs_flop_counter(name, kw):
    """FlopCounterMode counts 2 per multiply-add over the matmuls and convs as they run (grouped,
    at the padded length Lmax; LocalVim's causal conv1d at Lmax + 3 outputs) and cannot see the
    scan. So its count / 2 + the scan's term (9·L·E·N + L·E per direction) = count_macs + what the
    padding adds."""
    from torch.utils.flop_counter import FlopCounterMode
    m = create_model(name, **kw).eval()
    x = torch.randn(1, m.cfg.in_chans, m.cfg.img_size, m.cfg.img_size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        m(x)
    vim, scan, padding = isinstance(m, lm.LocalVim), 0, 0
    side = m.cfg.img_size // m.cfg.patch_size
    blocks = [(layer.mixer, layer.mixer.grid) for layer in m.layers] if vim else \
        [(b.op, (-(-side // 2 ** s),) * 2) for s, st in enumerate(m.layers) for b in st.blocks]
    for mix, grid in blocks:
        lengths = mix.multi_scan.index(*grid, getattr(mix, "cls_pos", None))[2]
        E, N, R, Lmax = mix.d_inner, mix.d_state, mix.dt_rank, max(lengths)
        scan += sum(9 * Lk * E * N + Lk * E for Lk in lengths)
        per_token = E * (R + 2 * N) + R * E + (E * mix.d_conv if vim else 0)      # x_proj, dt_proj, conv1d
        padding += sum((Lmax - Lk) * per_token for Lk in lengths)
        padding += len(lengths) * E * mix.d_conv * (mix.d_conv - 1) if vim else 0  # the conv1d's 3 extra outputs
    assert fc.get_total_flops() / 2 + scan == lm.count_macs(m) + padding


@pytest.mark.slow
@pytest.mark.skipif(not importlib.util.find_spec("fvcore"), reason="fvcore is not installed")
def test_count_flops_fvcore_reproduces_the_official_figure():
    """fvcore's count with the official handles (local_vmamba.py VSSM.flops) of our LocalVMamba-T:
    the paper's 5.7 GFLOPs (Table 2). It is our MACs plus fvcore's LayerNorm term plus the scan
    counted at the grouped call's padded length, so it sits a little above count_macs."""
    m = create_model("local_vmamba_tiny")
    g = lm.count_flops_fvcore(m) / 1e9
    assert round(g, 1) == lm.PAPER["local_vmamba_tiny"][2] == 5.7
    assert lm.count_macs(m) / 1e9 < g < lm.count_macs(m) / 1e9 + 0.2


def test_count_macs_convention():
    """Independent count for LocalVim-nano at 28 px (14×14 grid, K=4, w2 needs no padding)."""
    m = create_model("local_vim_nano", in_chans=1, num_classes=10, depth=4, directions=[["h", "h_flip", "w2", "w2_flip"]] * 4)
    D, E, N, R, L, K, depth = 32, 64, 16, 2, 196, 4, 4
    per_dir = L * E * 4 + L * E * (R + 2 * N) + L * R * E + 9 * L * E * N + L * E + 2 * E * (E // 8)
    want = L * D * 1 * 4 + depth * (L * D * 2 * E + L * E * D + K * per_dir) + D * 10
    assert lm.count_macs(m) == want
    assert lm.count_macs(create_model("local_vmamba_tiny")) / 1e9 == pytest.approx(5.7, rel=0.05)
    assert lm.count_macs(m, img_size=56) > 3.9 * lm.count_macs(m)      # 4x the tokens
    m.reset_classifier(1000)                                           # the head counted is the model's own
    assert lm.count_macs(m) == want + D * 990 and lm.count_macs(m, img_size=28) == want + D * 990


COPY_SET = ("localmamba.py", "localmamba_helpers.py", "scan_kernel.py", "scan_kernel_cpu.py")   # README's copy set
COPY_SCRIPT = """
import sys
sys.modules["timm"] = None                                   # no timm: `import timm` fails here
sys.modules["numpy"] = None                                  # nor numpy: the models need torch alone
import torch, localmamba
assert localmamba.__file__.startswith(sys.argv[1]), localmamba.__file__
for name, kw in [("local_vim_tiny", dict(img_size=32)), ("local_vim_tiny_middle_cls_token", dict(img_size=32)),
                 ("local_vim_small", dict(img_size=32)), ("local_vmamba_tiny", dict(img_size=64)),
                 ("local_vmamba_small", dict(img_size=64)), ("local_vim_nano", dict(in_chans=1))]:
    m = localmamba.create_model(name, num_classes=5, **kw)
    x = torch.randn(2, m.cfg.in_chans, m.cfg.img_size, m.cfg.img_size)
    m(x).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters()), name
for name in ("local_vim_tiny", "local_vmamba_tiny"):          # official-layout files, weights only, strictly
    localmamba.load_checkpoint(localmamba.create_model(name), sys.argv[1] + f"/{name}.pth")
import scan_kernel                                           # the C++ scan: there with its source file, else one message
u = torch.randn(1, 8, 5)
try:
    scan_kernel.selective_scan(u, u, -torch.ones(8, 2), torch.randn(1, 2, 5), torch.randn(1, 2, 5), backend="cpu")
    print("cpu scan: built")
except RuntimeError as e:
    assert "needs scan_kernel_cpu.py" in str(e), e
    print("cpu scan: absent")
print("copy set ok")
"""


@pytest.mark.slow
def test_pip_install_into_a_fresh_venv_imports_from_any_folder(tmp_path):
    """`pip install <clone>` (pyproject.toml) into a fresh venv: `import localmamba` works from
    another folder, prints __version__, builds a model, and the trainer's console script exists.
    The venv sees this machine's torch (--system-site-packages): nothing is downloaded."""
    import venv
    src = tmp_path / "clone"
    src.mkdir()
    for f in ("pyproject.toml", "README.md", "localmamba.py", "localmamba_helpers.py", "localmamba_data.py",
              "localmamba_run.py", "scan_kernel.py", "scan_kernel_cpu.py", "train_mini.py"):
        (src / f).write_bytes((HERE / f).read_bytes())
    venv.create(tmp_path / "venv", system_site_packages=True, with_pip=False)   # the system pip, setuptools
    py = tmp_path / "venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    p = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(src)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    code = ("import localmamba, scan_kernel; print(localmamba.__version__, localmamba.__file__); "
            "m = localmamba.create_model('local_vim_nano', in_chans=1); print(type(m).__name__)")
    p = subprocess.run([str(py), "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    version, where, cls = p.stdout.split()
    assert version == lm.__version__ and "site-packages" in where and cls == "LocalVim"
    assert (tmp_path / "venv" / "bin" / "localmamba-train").exists()


def test_the_benchmarks_peak_memory_is_what_a_step_allocates():
    """benchmark.cpu_peak_mb against a known allocation: a step that makes and frees 200 MB (50 Mi
    floats) reports about 200 MB, not the process's whole resident memory (torch alone holds more),
    in a process set up as benchmark.py sets up its memory pass."""
    code = ("import torch, benchmark; big = torch.ones(1 << 20) * 0\n"
            "print(benchmark.cpu_peak_mb(lambda: torch.ones(50 << 20).add_(1).sum()), benchmark.rss_mb())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=300,
                       env=dict(env, MALLOC_MMAP_THRESHOLD_="65536"))
    assert p.returncode == 0, p.stderr[-2000:]
    peak, resident = map(float, p.stdout.split())
    assert 180 < peak < 260 and resident > 260, (peak, resident)


def test_the_traffic_count_is_the_bytes_each_op_reads_and_writes():
    """benchmark.count_traffic against a hand count: Linear(4 -> 3) on a (2, 4) batch is one addmm
    reading the bias (3), x (2×4) and W^T (a view of W, 3×4) and writing (2, 3): 29 floats, 116 bytes;
    the transpose is a view (free). On a LocalMamba model the fused mixer's custom ops are counted as
    ops (their tensor inputs and outputs), and on the readable path the C++ scan kernel is counted too."""
    import benchmark
    lin = nn.Linear(4, 3)
    assert dict(benchmark.count_traffic(lin, torch.randn(2, 4))) == {"addmm": 116}
    scan_kernel.use_compiled_torch_path(True)
    try:
        m = create_model("local_vim_nano", in_chans=1).eval()
        fused = benchmark.count_traffic(m, torch.randn(2, 1, 28, 28))
        readable = benchmark.count_traffic(lm.set_fused(m, False), torch.randn(2, 1, 28, 28))
    finally:
        scan_kernel.use_compiled_torch_path(False)
    assert fused["ordered_scan"] > 0 and fused["ordered_conv"] > 0
    assert not [k for k in fused if k.startswith("scan kernel")]          # each custom op's kernel counted once
    assert readable["scan kernel (fwd)"] > 0 and "ordered_scan" not in readable
    E, L, K, N, batch, R = 2 * m.embed_dim, 196, 4, 16, 2, m.layers[0].mixer.dt_rank
    # one layer's ordered_scan by hand: u, out (batch, K, L, E); Δ's low-rank input (batch, K, L, R); B, C
    # (batch, K, L, N); z (batch, 1, L, E); A (K·E, N); D, Δ's bias (K·E); dt_proj (K, E, R); the orders (K, L)
    # int64; the chunk starts (none: inference)
    floats = (batch * K * L * E * 2 + batch * K * L * R + batch * K * L * N * 2 + batch * L * E + K * E * N
              + 2 * K * E + K * E * R)
    assert fused["ordered_scan"] == len(m.layers) * (4 * floats + 8 * K * L)
    # and its gated_sum: y (batch, K, L, E), the gate (batch, K, E), out (batch, L, E)
    assert fused["gated_sum"] == len(m.layers) * 4 * (batch * K * L * E + batch * K * E + batch * L * E)
    assert readable["addmm"] + readable.get("mm", 0) + readable.get("bmm", 0) > 0


@pytest.mark.slow
def test_the_export_script_refuses_an_out_that_cannot_be_a_folder(tmp_path):
    """experiments/export_onnx.py --out A_FILE: one line before any export, not a traceback after one."""
    pytest.importorskip("onnxruntime")
    (tmp_path / "a_file").write_text("x")
    rc, so, se = run_cli("--out", tmp_path / "a_file", script="experiments/export_onnx.py")
    assert rc != 0 and "--out" in se and "cannot be a folder" in se and "Traceback" not in se, se
    assert "| model |" not in so


@pytest.mark.slow
def test_the_model_benchmark_prints_its_table(tmp_path):
    """benchmark.py (a measurement, not a test of speed): one row per model with img/s and peak
    memory for inference and training, and the JSON beside; an unknown model is one message."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, str(HERE / "benchmark.py"), "--models", "local_vim_nano", "--reps", "1",
                        "--paths", "fused", "readable", "--json", str(tmp_path / "b.json")], capture_output=True,
                       text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = [l for l in p.stdout.splitlines() if l.startswith("| local_vim_nano")]
    assert [r.split("|")[5].strip() for r in rows] == ["fused", "readable"], rows
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "28" and cells[3] == "C++ kernels" and all(float(c) > 0 for c in cells[5:9:2]), row
    recs = json.loads((tmp_path / "b.json").read_text())
    assert [r["mixer"] for r in recs] == ["fused", "readable"]
    assert recs[0]["infer"]["img_s"] > 0 and recs[0]["train"]["peak_mb"] is not None
    for argv, needle in ((["--models", "resnet50"], "unknown --models resnet50"),
                         (["--batch", "0"], "--batch and --reps must be at least 1, got --batch 0"),
                         (["--json", str(tmp_path / "b.json" / "x.json")], "cannot be written")):   # b.json: a file
        p = subprocess.run([sys.executable, str(HERE / "benchmark.py"), *argv], capture_output=True, text=True,
                           env=env, timeout=600)
        assert p.returncode != 0 and needle in p.stderr and "Traceback" not in p.stderr, p.stderr
        assert "| model |" not in p.stdout                      # refused before any timing


@pytest.mark.slow
@pytest.mark.parametrize("with_cpu_kernels", [False, True])
def test_the_copy_set_builds_trains_and_loads_alone(tmp_path, published, with_cpu_kernels):
    """README's copy set, in an empty folder, without timm, numpy or the trainer: every published model
    builds, runs forward and backward, and an official-layout checkpoint loads strictly; the three
    files alone, and with scan_kernel_cpu.py beside them the C++ scan builds."""
    copy_set = COPY_SET if with_cpu_kernels else COPY_SET[:3]
    for f in copy_set:
        (tmp_path / f).write_bytes((HERE / f).read_bytes())
    for name in ("local_vim_tiny", "local_vmamba_tiny"):      # the official key names and shapes, enumerated here
        sd = {k: torch.randn(shape) for k, shape in EXPECTED[name](published).items()}
        torch.save({"state_dict": sd, "epoch": 299}, tmp_path / f"{name}.pth")   # official CheckpointManager layout
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    p = subprocess.run([sys.executable, "-E", "-s", "-c", COPY_SCRIPT, str(tmp_path)], capture_output=True,
                       text=True, cwd=tmp_path, env=env, timeout=600)
    assert p.returncode == 0 and "copy set ok" in p.stdout, p.stderr[-3000:]
    assert ("cpu scan: built" if with_cpu_kernels else "cpu scan: absent") in p.stdout
    assert sorted(f.name for f in tmp_path.glob("*.py")) == sorted(copy_set)


# =============================================================================
# 5. The timm and backbone interface



def test_classifier_interface():
    m = create_model("local_vim_nano", in_chans=1, num_classes=10)
    assert m.get_classifier().out_features == 10
    m.reset_classifier(3)
    assert m(torch.randn(1, 1, 28, 28)).shape == (1, 3)
    assert "pos_embed" in m.no_weight_decay()
    v = create_model("local_vmamba_tiny", img_size=64, num_classes=5)
    v.reset_classifier(2)
    assert v(torch.randn(1, 3, 64, 64)).shape == (1, 2)
    # reset_classifier(n, global_pool) pools as timm's would: 'token' = the middle cls token, 'avg' = the mean
    c = create_model("local_vim_tiny_middle_cls_token", img_size=32, depth=2,
                     directions=lm.SEARCHED_DIRECTIONS["local_vim_tiny"][:2]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = c.forward_features(x)                                 # (2, 5, 192): 4 grid tokens + cls at 2
        c.reset_classifier(0, global_pool="avg")
        assert torch.allclose(c(x), torch.cat([tokens[:, :2], tokens[:, 3:]], 1).mean(1)) and c.num_classes == 0
        c.reset_classifier(0, global_pool="token")
        assert torch.equal(c(x), tokens[:, 2])
    with pytest.raises(ValueError, match="global_pool 'token'"):
        create_model("local_vim_nano").reset_classifier(0, global_pool="token")   # no cls token to read


def test_timm_registration():
    timm = pytest.importorskip("timm")
    m = timm.create_model("local_vim_nano", in_chans=1, num_classes=4)
    assert isinstance(m, lm.LocalVim) and m(torch.randn(1, 1, 28, 28)).shape == (1, 4)
    assert "local_vmamba_tiny" in timm.list_models("local_*") and "local_vssm_tiny" in timm.list_models("local_*")


@pytest.mark.parametrize("name", list(SMALL) + list(lm.ALIASES))
def test_timm_and_deit_trainers_build_every_model(name):
    """Exactly the keywords timm's train.py (None ones are dropped by timm.create_model) and DeiT's /
    Vim's main.py pass; drop_rate is the dropout before the head."""
    timm = pytest.importorskip("timm")
    small = SMALL.get(name, SMALL.get(lm.ALIASES.get(name), {}))
    size = small.get("img_size", 28 if "nano" in name else 64)
    timm_kw = dict(pretrained=False, num_classes=10, drop_rate=0.0, drop_path_rate=0.1, drop_block_rate=None,
                   global_pool=None, bn_momentum=None, bn_eps=None, scriptable=False, checkpoint_path=None)
    m = timm.create_model(name, **timm_kw, **small)
    deit = timm.create_model(name, pretrained=False, num_classes=10, drop_rate=0.3, drop_path_rate=0.1,
                             drop_block_rate=None, img_size=size, **{k: v for k, v in small.items() if k != "img_size"})
    assert deit.head_drop.p == 0.3 and m.head_drop.p == 0.0
    x = torch.randn(2, m.cfg.in_chans, size, size)
    assert m(x).shape == deit(x).shape == (2, 10)
    deit.train()
    torch.manual_seed(0)                                                   # the dropout draw (flaky unseeded)
    f = deit.forward_head(deit.forward_features(x).detach(), pre_logits=True)
    assert (f == 0).float().mean() > 0.2                                   # the head dropout acts in training
    cfg = timm.data.resolve_data_config(model=m)
    assert cfg["input_size"] == (m.cfg.in_chans, m.cfg.img_size, m.cfg.img_size) and cfg["interpolation"] == "bicubic"
    with pytest.raises(ValueError, match="unknown option.*options are .*drop_rate"):
        timm.create_model(name, depth_multiplier=2)


@pytest.mark.parametrize("name, kw", [("local_vim_tiny", dict(img_size=32, depth=3, drop_path_rate=0.3)),
                                      ("local_vmamba_tiny", dict(img_size=64, depths=(1, 1, 2, 1),
                                                                 drop_path_rate=0.3))])
def test_grad_checkpointing_gives_the_same_loss_and_grads(name, kw):
    if "depths" in kw:
        kw["directions"] = lm.SEARCHED_DIRECTIONS["local_vmamba_tiny"][:5]
    else:
        kw["directions"] = lm.SEARCHED_DIRECTIONS["local_vim_tiny"][:3]
    torch.manual_seed(0)
    m = create_model(name, num_classes=5, **kw)
    x = torch.randn(2, 3, kw["img_size"], kw["img_size"])
    calls = []
    block = m.layers[1] if isinstance(m, lm.LocalVim) else m.layers[2].blocks[0]
    block.register_forward_pre_hook(lambda *a: calls.append(1))   # (pre: recompute may stop early)

    def loss_and_grads(checkpointing):
        m.set_grad_checkpointing(checkpointing)
        m.zero_grad()
        torch.manual_seed(1)                                   # the same drop-path draws
        loss = m(x).square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}
    plain, n_plain = loss_and_grads(False), len(calls)
    ckpt, n_ckpt = loss_and_grads(True), len(calls) - n_plain
    assert (n_plain, n_ckpt) == (1, 2)                        # recomputed in backward: it did checkpoint
    assert torch.equal(plain[0], ckpt[0])
    for n in plain[1]:
        assert torch.allclose(plain[1][n], ckpt[1][n], rtol=1e-5, atol=1e-7), n


def test_group_matcher_gives_timm_layer_decay():
    pytest.importorskip("timm")
    from timm.optim import create_optimizer_v2
    for m, n_groups in ((create_model("local_vim_nano", in_chans=1, num_classes=10), 3 + 2),
                        (create_model("local_vmamba_tiny_search", img_size=64, depths=(1, 1, 2, 1)), 5 + 2)):
        opt = create_optimizer_v2(m, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.5)
        scales = sorted({g["lr_scale"] for g in opt.param_groups})
        assert len(scales) == n_groups and scales[-1] == 1.0 and scales[0] == 0.5 ** (n_groups - 1)
        stem = {id(p) for n, p in m.named_parameters() if n.startswith("patch_embed")}
        assert all(g["lr_scale"] == scales[0] for g in opt.param_groups if {id(p) for p in g["params"]} & stem)


def test_features_only_gives_the_documented_strides_and_channels():
    x = torch.randn(1, 3, 224, 224)
    f = create_model("local_vmamba_tiny", features_only=True)
    maps = f(x)
    assert f.feature_info.channels() == [96, 192, 384, 768] and f.feature_info.reduction() == [4, 8, 16, 32]
    assert [tuple(t.shape) for t in maps] == [(1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]
    v = create_model("local_vim_tiny", features_only=True)
    assert v.out_indices == [4, 9, 14, 19] and v.feature_info.channels() == [192] * 4
    assert v.feature_info.reduction() == [16] * 4 and [tuple(t.shape) for t in v(x)] == [(1, 192, 14, 14)] * 4
    # the API behind it: the final features equal forward_features; the last block's map, normed, is them
    m = create_model("local_vim_tiny_middle_cls_token", img_size=64, depth=2,
                     directions=lm.SEARCHED_DIRECTIONS["local_vim_tiny"][:2]).eval()
    final, (last,) = m.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[-1], norm=True)
    with torch.no_grad():
        tokens = m.forward_features(torch.randn(1, 3, 64, 64))
    assert final.shape == tokens.shape == (1, 17, 192) and last.shape == (1, 192, 4, 4)
    assert torch.equal(last.flatten(2).transpose(1, 2), torch.cat([final[:, :8], final[:, 9:]], 1))
    with pytest.raises(ValueError, match="do not fit 2 feature levels"):
        m.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[5])


@pytest.mark.parametrize("name, out_indices", [("local_vmamba_tiny", (0, 1)), ("local_vmamba_tiny", (1,)),
                                               ("local_vmamba_tiny", 2), ("local_vim_nano", (0, 1))])
def test_features_only_ending_early_leaves_no_unused_parameter(name, out_indices):
    """A backbone whose maps stop before the last stage keeps nothing after its last map (LocalVMamba:
    not the patch merging after it): every parameter gets a gradient, as DDP without
    find_unused_parameters needs."""
    m = create_model(name, features_only=True, out_indices=out_indices,
                     **({"img_size": 64} if "vmamba" in name else {}))
    x = torch.randn(1, m.model.cfg.in_chans, *(m.model.cfg.img_size,) * 2)
    sum(f.square().mean() for f in m(x)).backward()
    unused = [n for n, p in m.named_parameters() if p.grad is None]
    assert not unused, unused


def test_features_only_maps_follow_a_non_square_input_and_timm_indices():
    """(H, W) of every map from the input's strides on a 64×96 image; out_indices=k is the last k
    levels (timm's meaning); what the maps do not use is dropped and still loads from a checkpoint."""
    x = torch.randn(2, 3, 64, 96)
    f = create_model("local_vmamba_tiny_search", img_size=64, depths=(1, 1, 2, 1), features_only=True)
    assert [tuple(t.shape[2:]) for t in f(x)] == [(64 // r, 96 // r) for r in f.feature_info.reduction()]
    assert f.feature_info.reduction() == [4, 8, 16, 32]
    v = create_model("local_vim_nano", img_size=32, patch_size=4, depth=4, directions=[["h", "v", "w2", "w2_flip"]] * 4,
                     features_only=True)
    assert create_model("local_vim_nano", features_only=True, out_indices=2).out_indices == [1, 2]   # the last 2
    two = create_model("local_vmamba_tiny_search", img_size=64, depths=(1, 1, 2, 1), features_only=True,
                       out_indices=2)
    assert two.out_indices == [2, 3] and two.feature_info.channels() == [128, 256]
    with pytest.raises(ValueError, match="do not fit 4 feature levels"):
        create_model("local_vmamba_tiny_search", img_size=64, features_only=True, out_indices=5)
    assert {tuple(m.shape) for m in v(torch.randn(1, 3, 32, 48))} == {(1, 32, 8, 12)}   # a backbone: any size
    # every parameter left in a backbone gets a gradient (DDP needs no find_unused_parameters) ...
    for backbone, inp in ((two, x), (create_model("local_vim_nano", features_only=True, out_indices=[0]),
                                     torch.randn(2, 3, 28, 28))):
        sum(t.square().mean() for t in backbone(inp)).backward()
        assert [n for n, p in backbone.named_parameters() if p.grad is None] == []
    # ... and a classification checkpoint still loads into it strictly (the dropped keys skipped)
    full = create_model("local_vmamba_tiny_search", img_size=64, depths=(1, 1, 2, 1))
    lm.load_state_dict_strict(two, full.state_dict())
    assert torch.equal(two.model.layers[2].blocks[0].op.A_logs, full.layers[2].blocks[0].op.A_logs)
    assert {k.split(".")[0] for k in two.model.pruned_keys} == {"classifier"}


def test_local_vim_intermediates_are_the_residual_stream():
    """forward_intermediates returns, after block i, the stream block i+1 reads (residual + the block's
    output), reshaped to the grid: checked against running the blocks by hand."""
    torch.manual_seed(0)
    m = create_model("local_vim_nano", img_size=16, depth=3, directions=[["h", "w2"]] * 3).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        maps = m.forward_intermediates(x, indices=[0, 1, 2], intermediates_only=True)
        hidden, residual, grid = m._embed(x)
        want = []
        for layer in m.layers:
            hidden, residual = m._layer(layer, hidden, residual, grid)
            want.append((residual + hidden).transpose(1, 2).reshape(2, 32, 8, 8))
    for got, w in zip(maps, want):
        assert torch.equal(got, w)


def test_layer_decay_gives_every_block_its_scale():
    """timm's param_groups_layer_decay over group_matcher: with >= 10 LocalVim blocks every block has
    its own scale, in depth order (a one-digit block id would merge 1 and 10-19); LocalVMamba's
    downsample decays no more than the blocks before it (it runs after them)."""
    pytest.importorskip("timm")
    from timm.optim import param_groups_layer_decay
    m = create_model("local_vim_nano", depth=12, directions=[["h", "w2"]] * 12)
    scale = {}
    for g in param_groups_layer_decay(m, weight_decay=0.05, layer_decay=0.9):
        for p in g["params"]:
            scale[p] = g["lr_scale"]
    per_block = [scale[m.layers[i].mixer.in_proj.weight] for i in range(12)]
    assert per_block == sorted(set(per_block)) and len(set(per_block)) == 12
    assert scale[m.patch_embed.proj.weight] < per_block[0] and scale[m.head.weight] == 1.0
    v = create_model("local_vmamba_tiny_search", img_size=64, depths=(2, 2, 3, 2))
    vs = {}
    for g in param_groups_layer_decay(v, weight_decay=0.05, layer_decay=0.5):
        for p in g["params"]:
            vs[p] = g["lr_scale"]
    for st in range(3):
        down, blocks = v.layers[st].downsample.reduction.weight, v.layers[st].blocks
        assert vs[down] >= vs[blocks[-1].op.in_proj.weight] and vs[down] <= vs[v.layers[st + 1].blocks[0].op.in_proj.weight]


def test_a_short_loop_built_only_from_timm_pieces_trains():
    """timm's create_model, create_transform (rand-m9-mstd0.5-inc1, random erasing), Mixup,
    create_optimizer_v2 with layer decay and ModelEmaV3 train a preset for a few steps."""
    timm = pytest.importorskip("timm")
    from PIL import Image
    from timm.data import Mixup, create_transform
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3
    torch.manual_seed(0)
    model = timm.create_model("local_vim_nano", num_classes=4, img_size=32, drop_rate=0.1, drop_path_rate=0.1)
    tf = create_transform(32, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                          interpolation="bicubic")
    images = [Image.fromarray((torch.rand(40, 40, 3) * 255).byte().numpy()) for _ in range(8)]
    x, y = torch.stack([tf(im) for im in images]), torch.arange(8) % 4
    mix = Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1, num_classes=4)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    ema = ModelEmaV3(model, decay=0.9)
    before = [p.detach().clone() for p in ema.module.parameters()]
    for _ in range(3):
        xm, ym = mix(x, y)
        loss = SoftTargetCrossEntropy()(model(xm), ym)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(model)
        assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, ema.module.parameters()))


# ----- 4b. Export, tracing, meta construction, detection

SMALL_VIM = dict(in_chans=1, depth=2, embed_dim=32, directions=[["h", "v_flip", "w2", "w7_flip"]] * 2)
SMALL_VMAMBA = dict(img_size=32, dims=(16, 32, 32, 64), depths=(1, 1, 1, 1),
                    directions=[["h", "v_flip", "w2", "w7_flip"]] * 4)
EXPORTED = [("local_vim_nano", SMALL_VIM, (1, 28, 28)), ("local_vmamba_tiny", SMALL_VMAMBA, (3, 40, 48))]
needs_onnx = pytest.mark.skipif(not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "onnxscript")),
                                reason="onnx, onnxruntime and onnxscript are not installed")


def _small(name, kw, seed=0):
    torch.manual_seed(seed)
    return create_model(name, num_classes=7, **kw).eval()


def test_rms_norm_is_torchs_and_mambas():
    """The written-out RMSNorm (every exporter reads it) computes nn.RMSNorm's result with its state_dict."""
    torch.manual_seed(0)
    ours, theirs = lm.RMSNorm(24, eps=1e-5), torch.nn.RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        ours.weight.normal_()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(3, 5, 24) * 1e-3                                     # small: eps matters
    assert torch.allclose(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,kw,shape", EXPORTED)
def test_a_model_built_on_the_meta_device_loads_real_weights(name, kw, shape):
    """`with torch.device("meta")`: no memory, no init; to_empty + load_state_dict gives the model."""
    real = _small(name, kw)
    with torch.device("meta"):
        ghost = create_model(name, num_classes=7, **kw)
    assert all(p.is_meta for p in ghost.parameters())
    ghost = ghost.to_empty(device="cpu").eval()
    ghost.load_state_dict(real.state_dict())
    x = torch.randn(2, *shape)
    with torch.no_grad():
        assert torch.equal(ghost(x), real(x))        # nothing computed at init lives outside the state_dict


@pytest.mark.parametrize("name,kw,shape", [EXPORTED[0], pytest.param(*EXPORTED[1], marks=pytest.mark.slow)])
def test_torch_export_takes_a_dynamic_batch_and_jit_trace_works(name, kw, shape):
    m = _small(name, kw)
    x, x5 = torch.randn(2, *shape), torch.randn(5, *shape)
    ep = torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=256)},))
    with torch.no_grad():
        want5 = m(x5)
        assert (ep.module()(x5) - want5).abs().max() < 1e-5
        traced = torch.jit.trace(m, (x,), check_trace=False)     # (LocalVMamba once added a bool to a traced size)
        assert (traced(x) - m(x)).abs().max() < 1e-5


@pytest.mark.slow
@needs_onnx
@pytest.mark.parametrize("dynamo", [True, False])
@pytest.mark.parametrize("name,kw,shape", EXPORTED)
def test_onnx_export_runs_in_onnxruntime_to_the_pytorch_outputs(tmp_path, name, kw, shape, dynamo):
    """torch.onnx.export (dynamo: the recommended path, the scan one ONNX Scan node, a dynamic
    batch; legacy: the TorchScript exporter, which once died on aten::rms_norm), run by
    onnxruntime, within 1e-4 of PyTorch."""
    import onnx
    import onnxruntime as ort
    m, path = _small(name, kw), tmp_path / "m.onnx"
    x = torch.randn(2, *shape)
    if dynamo:
        torch.onnx.export(m, (x,), path, dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
        assert sum(n.op_type == "Scan" for n in onnx.load(path).graph.node) >= 1
        assert len(onnx.load(path).graph.node) < 2000                         # not the chunk loop unrolled
    else:
        torch.onnx.export(m, (x,), path, dynamo=False, opset_version=17)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for xb in (x, torch.randn(3, *shape)) if dynamo else (x,):
        got = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})[0]
        with torch.no_grad():
            assert np.abs(got - m(xb).numpy()).max() < 1e-4


@pytest.mark.parametrize("name,kw", [("local_vmamba_tiny", SMALL_VMAMBA),
                                     ("local_vim_tiny", dict(img_size=64, depth=2, embed_dim=32,
                                                             directions=[["h", "v", "w2", "w7"]] * 2))])
def test_detection_backbone_gives_torchvision_its_pyramid(name, kw):
    """DetectionBackbone: torchvision's contract (out_channels, an ordered mapping "0".."3", "pool")
    at strides 4, 8, 16, 32, 64 of a non-square input: LocalVMamba through an FPN, LocalVim (one
    stride, 16) through ViTDet's simple feature pyramid."""
    torch.manual_seed(0)
    H, W = (64, 64) if "vim" in name else (64, 128)
    bb = lm.DetectionBackbone(create_model(name, features_only=True, **kw), out_channels=24)
    out = bb(torch.randn(2, 3, H, W))
    assert list(out) == ["0", "1", "2", "3", "pool"] and bb.out_channels == 24
    assert [tuple(v.shape) for v in out.values()] == [(2, 24, H // s, W // s) for s in (4, 8, 16, 32, 64)]
    sum(v.float().mean() for v in out.values()).backward()
    assert all(p.grad is not None for p in bb.parameters())                  # no unused parameter (DDP)
    with pytest.raises(lm.BadInput, match=r"out_channels must be an integer >= 1 .* got 0"):
        lm.DetectionBackbone(create_model(name, features_only=True, **kw), out_channels=0)
    with pytest.raises(lm.BadInput, match=r"takes a features_only model, got (LocalVim|LocalVMamba); .*features_only=True"):
        lm.DetectionBackbone(create_model(name, **kw))                       # a classifier: refused when built


@pytest.mark.slow
def test_faster_rcnn_on_local_vmamba_tiny_trains_a_step():
    """torchvision's FasterRCNN built on features_only LocalVMamba-T (the published config) at 64 px:
    one training step gives finite losses and moves the backbone."""
    from torchvision.models.detection import FasterRCNN
    torch.manual_seed(0)
    det = FasterRCNN(lm.DetectionBackbone(create_model("local_vmamba_tiny", features_only=True), 64), num_classes=3,
                     min_size=64, max_size=64).train()
    w = det.backbone.body.model.patch_embed[0].weight
    before = w.detach().clone()
    opt = torch.optim.SGD(det.parameters(), lr=0.01)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    targets = [dict(boxes=torch.tensor([[4.0, 6.0, 40.0, 50.0]]), labels=torch.tensor([1])) for _ in range(2)]
    losses = det(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    sum(losses.values()).backward()
    opt.step()
    assert all(torch.isfinite(v) for v in losses.values()) and not torch.equal(w, before)



@pytest.mark.slow
def test_faster_rcnn_on_local_vim_tiny_trains_at_two_input_sizes():
    """LocalVim-T as a detector's backbone (README's line, with a small min/max size to keep it quick):
    a detector resizes and pads each batch to its own size, and the features_only model takes any
    size (dynamic_img_size: the pos embed resampled, the scan orders and RoPE for the input's grid).
    Two training steps at two sizes in one process; every backbone parameter gets a gradient."""
    from torchvision.models.detection import FasterRCNN
    torch.manual_seed(0)
    backbone = lm.DetectionBackbone(create_model("local_vim_tiny", features_only=True), out_channels=32)
    det = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=128).train()
    for size in ((64, 64), (64, 112)):
        det.zero_grad()
        images = [torch.rand(3, *size) for _ in range(2)]
        targets = [dict(boxes=torch.tensor([[4.0, 6.0, 40.0, 50.0]]), labels=torch.tensor([1])) for _ in range(2)]
        losses = det(images, targets)
        sum(losses.values()).backward()
        assert all(torch.isfinite(v) for v in losses.values())
        unused = [n for n, p in det.backbone.named_parameters() if p.grad is None]
        assert not unused, (size, unused[:5])


def test_local_vim_runs_at_any_size_as_a_backbone_and_on_request_as_a_classifier():
    """features_only LocalVim takes any image size (maps follow the input's grid); a classifier keeps
    its fixed-size contract and outputs unless built with dynamic_img_size=True, which at its own size
    computes exactly what the fixed model does; the middle-cls variant refuses it."""
    torch.manual_seed(0)
    fm = create_model("local_vim_nano", features_only=True, in_chans=1)
    for H, W in ((28, 28), (36, 20), (60, 44)):
        maps = fm(torch.randn(1, 1, H, W))
        assert maps and all(tuple(m.shape) == (1, 32, H // 2, W // 2) for m in maps)
    fixed = create_model("local_vim_nano", in_chans=1).eval()
    dyn = create_model("local_vim_nano", in_chans=1, dynamic_img_size=True).eval()
    dyn.load_state_dict(fixed.state_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(dyn(x), fixed(x)) and dyn(torch.randn(2, 1, 40, 32)).shape == (2, 1000)
    with pytest.raises(lm.BadInput, match="or any size with dynamic_img_size=True"):
        fixed(torch.randn(1, 1, 40, 32))
    with pytest.raises(lm.BadInput, match="dynamic_img_size is not offered for the middle-cls-token variant"):
        create_model("local_vim_tiny_middle_cls_token", dynamic_img_size=True)


SEGMENTATION = """
import torch.nn as nn, torch.nn.functional as F
from torchvision.models.segmentation.fcn import FCNHead

class Segmenter(nn.Module):                  # a features_only backbone + torchvision's FCN head on its last map
    def __init__(self, backbone, num_classes):
        super().__init__()
        self.backbone, self.head = backbone, FCNHead(backbone.feature_info.channels()[-1], num_classes)

    def forward(self, x):                    # (B, 3, H, W) -> per-pixel logits (B, num_classes, H, W)
        return F.interpolate(self.head(self.backbone(x)[-1]), size=x.shape[-2:], mode="bilinear")
"""


@pytest.mark.slow
@pytest.mark.parametrize("name", ["local_vim_tiny", "local_vmamba_tiny"])
def test_a_segmentation_step_on_both_families_at_a_non_square_size(name):
    """docs/interop.md's segmentation example, as written there: torchvision's FCN head on the last
    feature map, upsampled to the image; one training step at 64×96 (a non-square size), every
    parameter gets a gradient."""
    ns = {}
    exec(SEGMENTATION, ns)
    torch.manual_seed(0)
    out_indices = (3,) if "vmamba" in name else (19,)
    seg = ns["Segmenter"](create_model(name, features_only=True, out_indices=out_indices), num_classes=5).train()
    x, y = torch.randn(2, 3, 64, 96), torch.randint(0, 5, (2, 64, 96))
    logits = seg(x)
    assert logits.shape == (2, 5, 64, 96)
    F.cross_entropy(logits, y).backward()
    assert all(p.grad is not None for p in seg.parameters())
    assert SEGMENTATION.strip() in (HERE / "docs" / "interop.md").read_text()


# =============================================================================
# 6. Checkpoints: layouts, weights-only loading, checksums, other sizes


@pytest.fixture
def release(tmp_path, monkeypatch):
    """A stand-in for the official release: LocalVim-T weights saved in the official layout
    ({"state_dict": ...}) under the released file name, served over HTTP on the loopback (a thread of
    http.server, stopped at the end) and as a file:// URL; torch's hub cache in tmp_path."""
    import http.server
    import threading
    src = tmp_path / "release"
    src.mkdir()
    torch.manual_seed(3)
    model = create_model("local_vim_tiny")
    torch.save({"state_dict": model.state_dict(), "epoch": 299}, src / "local_vim_tiny.ckpt")
    wrong = {k: v for k, v in model.state_dict().items() if k != "layers.0.mixer.A_log_0"}   # one key short,
    torch.save({"state_dict": {**wrong, "layers.0.mixer.A_log_9": torch.zeros(384, 16)}}, src / "wrong.ckpt")  # one over
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(src))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    try:
        yield SimpleNamespace(http=f"http://127.0.0.1:{server.server_address[1]}/", file=src.as_uri() + "/",
                              model=model, src=src, cache=tmp_path / "hub" / "checkpoints")
    finally:
        server.shutdown()
        server.server_close()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pretrained_downloads_the_release_once_and_loads_it_strictly(release, monkeypatch):
    """pretrained=True: the released file is downloaded into torch's hub cache (once: the second
    model reads the cached file), read weights-only and loaded strictly; pretrained_cfg carries the
    official URL; another class count keeps its fresh head; a pinned sha256 is checked."""
    monkeypatch.setattr(localmamba_helpers, "RELEASE_URL", release.http)
    m = create_model("local_vim_tiny", pretrained=True)
    assert _same_weights(m, release.model) and (release.cache / "local_vim_tiny.ckpt").exists()
    assert not [p for p in release.cache.iterdir() if p.name != "local_vim_tiny.ckpt"]   # no temporary file left
    (release.src / "local_vim_tiny.ckpt").unlink()                      # the server has it no more: the cache serves
    assert _same_weights(create_model("local_vim_tiny", pretrained=True), release.model)
    assert create_model("local_vim_tiny").pretrained_cfg["url"] == release.http + "local_vim_tiny.ckpt"
    assert lm.create_model("local_vmamba_tiny").pretrained_cfg["url"] == ""             # never released
    ten = create_model("local_vim_tiny", pretrained=True, num_classes=10)
    assert ten.head.weight.shape == (10, 192)
    assert torch.equal(ten.state_dict()["layers.3.mixer.A_log_1"], release.model.state_dict()["layers.3.mixer.A_log_1"])
    digest = hashlib.sha256((release.cache / "local_vim_tiny.ckpt").read_bytes()).hexdigest()
    create_model("local_vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(sha256=digest))
    with pytest.raises(lm.BadInput, match=r"has sha256 [0-9a-f]{64}, not the pinned 00ab"):
        create_model("local_vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(sha256="00ab"))
    fm = create_model("local_vim_tiny", features_only=True, pretrained=True)             # a backbone, loaded first
    assert torch.equal(fm.model.patch_embed.proj.weight, release.model.patch_embed.proj.weight)


def test_pretrained_failures_are_one_message_and_leave_no_file(release, monkeypatch):
    """A model without released weights, a download that fails (404, nothing listening), a file that
    does not fit: one BadInput each, naming the way out; nothing half-written in the cache."""
    with pytest.raises(lm.BadInput, match=r"local_vmamba_tiny has no released weights .* local_vim_tiny, "
                                          r"local_vim_tiny_middle_cls_token, local_vmamba_small.*file=PATH"):
        create_model("local_vmamba_tiny", pretrained=True)
    with pytest.raises(lm.BadInput, match=r"cannot download the weights of local_vim_tiny from http://127.*/nope.ckpt "
                                          r"\(HTTP 404: .*\).*by hand"):
        create_model("local_vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(url=release.http + "nope.ckpt"))
    with pytest.raises(lm.BadInput, match=r"cannot download .*http://127.0.0.1:9/x.ckpt"):
        create_model("local_vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(url="http://127.0.0.1:9/x.ckpt"))
    assert not release.cache.exists() or not list(release.cache.iterdir())
    with pytest.raises(lm.BadInput, match=r"wrong.ckpt \['state_dict'\] does not fit this model \(1 missing: "
                                          r"layers.0.mixer.A_log_0; 1 unexpected: layers.0.mixer.A_log_9\)"):
        create_model("local_vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(url=release.file + "wrong.ckpt"))
    with pytest.raises(lm.BadInput, match="unknown key.*hf_hub_id"):
        create_model("local_vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(hf_hub_id="x"))
    m = create_model("local_vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=release.src / "local_vim_tiny.ckpt"))
    assert _same_weights(m, release.model)


@pytest.mark.slow
def test_the_trainer_starts_from_the_released_weights(release, jpeg_tree, tmp_path):
    """train_mini.py --pretrained (timm's train.py spelling): the released file from torch's hub cache
    (here put there beforehand: no network), then what --finetune does with it (a 3-class head, the
    pos_embed resampled to 32 px); with --finetune too, refused."""
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    shutil.copy(release.src / "local_vim_tiny.ckpt", hub / "local_vim_tiny.ckpt")
    env = {"TORCH_HOME": str(tmp_path / "torch_home")}
    rc, so, se = run_cli(*IMAGENET, "--data-dir", jpeg_tree, "--model", "local_vim_tiny", "--img-size", "32",
                         "--pretrained", "--max-steps", "1", "--out", tmp_path / "r", env=env)
    assert rc == 0, se
    assert read_log(tmp_path / "r")[0]["finetune"] == str(hub / "local_vim_tiny.ckpt")
    rc, so, se = run_cli(*TINY, "--pretrained", "--finetune", hub / "local_vim_tiny.ckpt", env=env)
    _assert_clean_failure(rc, se, "--pretrained starts from the released weights, --finetune from another file")
    rc, so, se = run_cli(*IMAGENET, "--data-dir", jpeg_tree, "--model", "local_vim_tiny", "--img-size", "32",
                         "--pretrained", "--eval", env=env)            # evaluated as they are: 1000 classes, not 3
    _assert_clean_failure(rc, se, "does not fit this model", "head.weight")


def test_pretrained_takes_the_ema_weights_where_the_file_has_them(release, tmp_path):
    """The same one answer per file as load_checkpoint: timm's state_dict_ema where present, else the raw ones."""
    ema = create_model("local_vim_tiny")
    torch.save({"state_dict": release.model.state_dict(), "state_dict_ema": ema.state_dict()}, tmp_path / "both.ckpt")
    m = create_model("local_vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=tmp_path / "both.ckpt"))
    assert _same_weights(m, ema) and not _same_weights(m, release.model)


def test_an_unforeseen_io_error_in_the_trainer_or_the_study_is_one_line(capsys):
    """exit_with_message (the trainer's, the study's, the receptive field's): an OSError that no earlier
    check names (a disk that fills mid-study) is one line with the path and exit code 2."""
    with pytest.raises(SystemExit) as e:
        train_mini.exit_with_message(lambda: open("/nonexistent-folder/x.json", "w"), "")
    _assert_clean_failure(e.value.code, capsys.readouterr().err, "cannot read or write /nonexistent-folder/x.json",
                          "No such file or directory")


def test_timm_create_model_takes_pretrained(release):
    """timm.create_model(name, pretrained=True), with timm's pretrained_cfg_overlay spelling for the URL."""
    timm = pytest.importorskip("timm")
    m = timm.create_model("local_vim_tiny", pretrained=True, pretrained_cfg_overlay=dict(url=release.file +
                                                                                        "local_vim_tiny.ckpt"))
    assert _same_weights(m, release.model)



def test_state_dict_round_trip_and_load_checkpoint(tmp_path):
    torch.manual_seed(0)
    dirs = [["h", "v", "w2", "w7_flip"]] * NANO_DEPTH
    m = create_model("local_vim_nano", in_chans=1, num_classes=10, directions=dirs)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))     # every A_log_k different: the official bug would show here
    m.eval()
    x = torch.randn(3, 1, 28, 28)
    want = m(x)
    for i, layout in enumerate([lambda sd: {"model": sd}, lambda sd: {"state_dict": sd}, lambda sd: sd,
                                lambda sd: {"model": {"module." + k: v for k, v in sd.items()}}]):
        path = tmp_path / f"ck{i}.pt"
        torch.save(layout(m.state_dict()), path)
        fresh = create_model("local_vim_nano", in_chans=1, num_classes=10, directions=dirs).eval()
        load_checkpoint(fresh, path)
        assert torch.equal(fresh(x), want)
    other = create_model("local_vim_nano", in_chans=1, num_classes=5)
    with pytest.raises(ValueError, match=r"2 with other shapes: head.bias: checkpoint \(10,\) vs model \(5,\)"):
        load_checkpoint(other, tmp_path / "ck0.pt")
    sd = m.state_dict()
    sd.pop("layers.0.mixer.A_log_1")
    sd["extra.weight"] = torch.zeros(1)
    torch.save({"model": sd}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"1 missing: layers.0.mixer.A_log_1; 1 unexpected: extra.weight"):
        load_checkpoint(m, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="no file"):
        load_checkpoint(m, tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint") as e:
        load_checkpoint(m, tmp_path / "junk.pt")
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)   # torch's advice to load unsafely: not passed on


def _raw_and_ema(name="local_vim_nano", **kw):
    """A model's state_dict and a perturbed copy of it (the 'EMA'), and a fresh model to load into."""
    torch.manual_seed(0)
    m = create_model(name, **kw)
    raw = m.state_dict()
    ema = {k: v + 0.5 if v.is_floating_point() else v for k, v in raw.items()}
    return raw, ema, create_model(name, **kw)


def test_load_checkpoint_chooses_raw_or_ema_weights_in_every_layout(tmp_path):
    """use_ema picks the EMA weights (default True, as timm's load_checkpoint) or the raw ones, in
    ours, timm's (state_dict / state_dict_ema) and the official (model / model_ema) layout; a file
    without EMA weights gives the raw ones; the result names what was read."""
    raw, ema, fresh = _raw_and_ema(in_chans=1)
    key = "layers.0.mixer.A_log_0"
    layouts = {"ours": {"model": raw, "model_ema": ema, "config": {"model": "local_vim_nano"}, "step": 3},
               "timm": {"state_dict": raw, "state_dict_ema": ema, "epoch": 2},
               "official": {"model": raw, "model_ema": ema, "epoch": 2, "args": argparse.Namespace(lr=1e-3)}}
    for name, ckpt in layouts.items():
        torch.save(ckpt, tmp_path / f"{name}.pt")
        ema_key, raw_key = ("state_dict_ema", "state_dict") if name == "timm" else ("model_ema", "model")
        for use_ema, want, where in ((True, ema, ema_key), (False, raw, raw_key), (None, ema, ema_key)):
            res = load_checkpoint(fresh, tmp_path / f"{name}.pt", **({} if use_ema is None else {"use_ema": use_ema}))
            assert torch.equal(fresh.state_dict()[key], want[key]), (name, use_ema)
            assert res == (where, [], []), (name, use_ema, res)
    torch.save({"model": raw, "model_ema": None}, tmp_path / "no_ema.pt")        # ours, a run without EMA
    assert load_checkpoint(fresh, tmp_path / "no_ema.pt", use_ema=True).weights == "model"
    assert torch.equal(fresh.state_dict()[key], raw[key])
    if importlib.util.find_spec("timm"):                                          # the same choice as timm's loader
        from timm.models import load_checkpoint as timm_load
        for name in ("timm", "official"):
            for use_ema, want in ((True, ema), (False, raw)):
                timm_load(fresh, str(tmp_path / f"{name}.pt"), use_ema=use_ema)
                assert torch.equal(fresh.state_dict()[key], want[key]), (name, use_ema)


def test_load_checkpoint_strict_false_reports_what_it_could_not_load(tmp_path):
    raw, _, fresh = _raw_and_ema(in_chans=1)
    sd = dict(raw, **{"extra.weight": torch.zeros(1)})
    sd.pop("head.bias")
    torch.save(sd, tmp_path / "partial.pt")
    with pytest.raises(ValueError, match="1 missing: head.bias; 1 unexpected: extra.weight"):
        load_checkpoint(fresh, tmp_path / "partial.pt")
    res = load_checkpoint(fresh, tmp_path / "partial.pt", strict=False)
    assert res == (None, ["head.bias"], ["extra.weight"])
    assert torch.equal(fresh.head.weight, raw["head.weight"])


@pytest.mark.parametrize("name,first", [("local_vim_nano", "patch_embed.proj.weight"),
                                        ("local_vmamba_tiny", "patch_embed.0.weight")])
def test_a_3_channel_checkpoint_adapts_its_first_conv_as_timm(tmp_path, capsys, name, first):
    """A 3-channel checkpoint into a 1- (or 2-) channel model: the first conv summed over RGB (or RGB
    repeated and scaled by 3/in_chans), as timm's adapt_input_conv, said in one line."""
    torch.manual_seed(0)
    rgb = create_model(name, num_classes=4)
    torch.save({"model": rgb.state_dict()}, tmp_path / "rgb.pt")
    w = rgb.state_dict()[first]
    for in_chans, want in ((1, w.sum(1, keepdim=True)), (2, torch.cat([w[:, :2]], 1) * 1.5)):
        m = create_model(name, num_classes=4, in_chans=in_chans)
        load_checkpoint(m, tmp_path / "rgb.pt")
        assert torch.allclose(m.state_dict()[first], want)
        out = capsys.readouterr().out
        assert out.count("\n") == 1 and f"adapted from 3 input channels to {in_chans}" in out
        if importlib.util.find_spec("timm"):
            from timm.models import adapt_input_conv
            assert torch.allclose(m.state_dict()[first], adapt_input_conv(in_chans, w.clone()))
        rest = [k for k in m.state_dict() if k != first]
        assert all(torch.equal(m.state_dict()[k], rgb.state_dict()[k]) for k in rest)


def test_other_input_sizes_load_224_checkpoints(tmp_path, capsys):
    """LocalVMamba has no size-dependent parameter: a 224 checkpoint loads strictly at 256 and it runs
    on any image; LocalVim's pos_embed is resampled (bicubic) on load, the cls entry moved, in one line."""
    torch.manual_seed(0)
    for name in ("local_vmamba_tiny", "local_vim_tiny", "local_vim_tiny_middle_cls_token"):
        small = create_model(name, num_classes=3)
        torch.save({"model": small.state_dict()}, tmp_path / f"{name}.pt")
        big = create_model(name, num_classes=3, img_size=256)
        load_checkpoint(big, tmp_path / f"{name}.pt")
        out = capsys.readouterr().out
        if name == "local_vmamba_tiny":
            assert out == "" and torch.equal(big.layers[2].blocks[0].op.A_logs, small.layers[2].blocks[0].op.A_logs)
            assert big.eval()(torch.randn(1, 3, 200, 300)).shape == (1, 3)
            continue
        assert out.count("pos_embed resampled from 14×14 to 16×16 tokens (bicubic)") == 1
        grid = small.pos_embed if small.cls_pos is None else torch.cat(
            [small.pos_embed[:, :98], small.pos_embed[:, 99:]], 1)
        want = F.interpolate(grid.reshape(1, 14, 14, -1).permute(0, 3, 1, 2), size=(16, 16), mode="bicubic",
                             align_corners=False).permute(0, 2, 3, 1).reshape(1, 256, -1)
        got = big.pos_embed if big.cls_pos is None else torch.cat([big.pos_embed[:, :128], big.pos_embed[:, 129:]], 1)
        assert torch.allclose(got, want, atol=1e-6)
        if big.cls_pos is not None:
            assert torch.equal(big.pos_embed[0, 128], small.pos_embed[0, 98])
        assert big.eval()(torch.randn(1, 3, 256, 256)).shape == (1, 3)


class _Hostile:
    """A pickle that, unpickled, creates a folder: what a booby-trapped checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.slow
def test_hostile_checkpoint_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    m = create_model("local_vim_nano", in_chans=1, num_classes=10)
    torch.save({"model": m.state_dict(), "config": {"model": "local_vim_nano"}, "x": _Hostile(str(marker))},
               tmp_path / "evil.pt")
    with pytest.raises(lm.BadInput, match="could run code.*unsafe=True"):
        load_checkpoint(m, tmp_path / "evil.pt")
    for flags in (["--resume", tmp_path / "evil.pt", "--out", tmp_path / "o"], ["--eval", "--resume", tmp_path / "evil.pt"]):
        rc, _, se = run_cli(*flags)
        _assert_clean_failure(rc, se, "evil.pt", "could run code")
        assert len(se.strip().splitlines()) == 1
    # the one class let through (argparse.Namespace) still holds only plain data
    torch.save({"state_dict": m.state_dict(), "args": argparse.Namespace(lr=_Hostile(str(marker)))},
               tmp_path / "evil_args.pth.tar")
    with pytest.raises(lm.BadInput, match="could run code"):
        load_checkpoint(m, tmp_path / "evil_args.pth.tar")
    # an older pickle protocol builds the object with other opcodes: the same one line, no advice to load unsafely
    torch.save({"model": m.state_dict(), "x": _Hostile(str(marker))}, tmp_path / "evil0.pt", pickle_protocol=0)
    with pytest.raises(lm.BadInput) as e:
        load_checkpoint(m, tmp_path / "evil0.pt")
    assert "could run code" in str(e.value) and "unsafe=True" in str(e.value) and "\n" not in str(e.value)
    assert "weights_only=False" not in str(e.value) and "will likely succeed" not in str(e.value)
    rc, _, se = run_cli("--finetune", tmp_path / "evil0.pt", "--out", tmp_path / "f0")
    _assert_clean_failure(rc, se, "evil0.pt", "could run code")
    assert len(se.strip().splitlines()) == 1 and "likely succeed" not in se
    assert not marker.exists()
    load_checkpoint(m, tmp_path / "evil.pt", unsafe=True)       # the escape hatch, typed on purpose, runs it
    assert marker.exists()


@pytest.mark.slow
def test_corrupted_checkpoint_is_refused(finished_run):
    ck = torch.load(finished_run / "checkpoint.pt")
    assert ck["checksum_covers"] == "everything" and ck["checksum"] == lm.tensor_checksum(ck, everything=True)
    ck["model"]["head.bias"][0] += 1e-3                       # bits changed after the checksum was taken
    torch.save(ck, finished_run / "checkpoint.pt")
    rc, _, se = run_cli(*TINY, "--resume", finished_run / "checkpoint.pt")
    _assert_clean_failure(rc, se, "is corrupted", "checksum")
    with pytest.raises(lm.BadInput, match="corrupted"):
        load_checkpoint(create_model("local_vim_nano", in_chans=1, num_classes=10), finished_run / "checkpoint.pt")
    # the checksum covers the step and the config too; a file without one is checked field by field
    ck = torch.load(finished_run / "best.pt")
    ck["step"], ck["config"]["lr"] = 1, 1.0
    ck["checksum"] = lm.tensor_checksum({k: v for k, v in ck.items() if k != "checksum"}, everything=False)
    torch.save(ck, finished_run / "edited.pt")
    with pytest.raises(lm.BadInput, match="is corrupted"):
        train_mini.read_run_checkpoint(finished_run / "edited.pt")
    del ck["checksum"], ck["step"]
    ck["rng"] = "x"
    torch.save(ck, finished_run / "edited.pt")
    with pytest.raises(train_mini.UserError, match=r"is incomplete or edited \(step, rng missing or of the wrong type\)"):
        train_mini.read_run_checkpoint(finished_run / "edited.pt")


@pytest.mark.slow
@needs_fashion
def test_finetune_from_official_and_timm_layouts(tmp_path):
    """--finetune takes weights only, from an official-layout (a DDP prefix, 1000 classes), a
    timm-layout or a DeiT/Vim-layout checkpoint; the head for 10 classes starts fresh, every other
    weight is loaded. timm's train.py (utils.CheckpointSaver) and DeiT's / Vim's main.py save their
    argparse `args` beside the weights: that one class is let through the weights-only load."""
    torch.manual_seed(0)
    src = create_model("local_vim_nano", in_chans=1, num_classes=1000)
    sd = src.state_dict()
    opt = torch.optim.AdamW(src.parameters()).state_dict()
    args = argparse.Namespace(model="local_vim_nano", lr=5e-4, aa="rand-m9-mstd0.5-inc1", input_size=None)
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 299}, tmp_path / "official.pth")
    torch.save({"epoch": 3, "arch": "local_vim_nano", "optimizer": opt, "version": 2, "args": args,
                "state_dict": sd, "state_dict_ema": sd, "metric": 12.5,
                "saver": {"epoch": 3, "metric": 12.5}}, tmp_path / "timm.pth.tar")
    torch.save({"model": sd, "optimizer": opt, "lr_scheduler": {"t_initial": 300}, "epoch": 3,
                "model_ema": sd, "scaler": {"scale": 65536.0}, "args": args}, tmp_path / "deit.pth")
    for name in ("official.pth", "timm.pth.tar", "deit.pth"):
        rc, so, se = run_cli(*TINY, "--max-steps", "1", "--lr", "1e-12", "--finetune", tmp_path / name,
                             "--out", tmp_path / name.split(".")[0])
        assert rc == 0 and "weights loaded, the model's directions (the file does not name any); the head " \
                           "re-initialised for 10 classes" in so, se
        got = torch.load(tmp_path / name.split(".")[0] / "checkpoint.pt")["model"]
        assert got["head.weight"].shape == (10, 32)
        for k, v in sd.items():
            if not k.startswith("head."):
                assert torch.allclose(got[k], v, atol=1e-6), k
    # a run of this trainer brings its scan directions along; other --directions are refused
    dirs = [["h", "v"], ["w2", "w2_flip"], ["h_flip", "v_flip"]]
    ours = create_model("local_vim_nano", in_chans=1, num_classes=10, directions=dirs)
    torch.save({"model": ours.state_dict(), "config": {"directions": dirs, "search": False}}, tmp_path / "ours.pt")
    rc, so, se = run_cli(*TINY, "--max-steps", "1", "--finetune", tmp_path / "ours.pt", "--out", tmp_path / "o")
    assert rc == 0 and "weights loaded, its own directions" in so, se
    assert read_log(tmp_path / "o")[0]["directions"] == dirs
    (tmp_path / "d.json").write_text(json.dumps([["h", "v"]] * 3))
    _assert_clean_failure(*run_cli(*TINY, "--finetune", tmp_path / "ours.pt", "--directions", tmp_path / "d.json",
                                   "--out", tmp_path / "o2")[::2], "other scan directions than --directions")
    # LocalVMamba's head is classifier.head: re-initialised for 10 classes, every other weight loaded
    src = create_model("local_vmamba_tiny_search", img_size=64, depths=(1, 1, 2, 1))
    torch.save({"state_dict": src.state_dict()}, tmp_path / "vm.pth")
    dst = create_model("local_vmamba_tiny_search", img_size=64, depths=(1, 1, 2, 1), num_classes=10)
    msgs = []
    train_mini.load_finetune(dst, lm.read_checkpoint(tmp_path / "vm.pth"), "vm.pth", msgs.append, "its directions")
    assert "the head re-initialised for 10 classes" in msgs[0] and dst.classifier.head.weight.shape == (10, 256)
    assert all(torch.equal(v, src.state_dict()[k]) for k, v in dst.state_dict().items() if "head" not in k)
    _assert_clean_failure(*run_cli(*TINY, "--finetune", tmp_path / "timm.pth.tar", "--resume",
                                   tmp_path / "official" / "checkpoint.pt")[::2], "pass one of them")
    _assert_clean_failure(*run_cli(*TINY, "--resume", tmp_path / "timm.pth.tar", "--out", tmp_path / "x")[::2],
                          "not a checkpoint of this trainer", "--finetune")     # the way to use it is named


FULL_DISK = """
import resource, signal, sys, torch
from localmamba_helpers import BadInput
from localmamba_run import save_atomic
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)               # a write past the limit fails (EFBIG), as a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
try:
    save_atomic({"w": torch.zeros(1 << 20)}, sys.argv[1])  # 4 MB: torch.save's zip writer raises RuntimeError
except BadInput as e:
    print("BadInput:", e)
"""


def test_a_real_short_write_is_one_line_and_leaves_no_temporary_file(tmp_path):
    """A write the file system refuses partway (a 1 MB file-size limit: what a full disk does to
    torch.save, a RuntimeError, not an OSError) is one BadInput; the temporary file is removed and
    the previous checkpoint kept."""
    path = tmp_path / "checkpoint.pt"
    train_mini.save_atomic({"v": torch.ones(2)}, path)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True, cwd=HERE,
                       env=env, timeout=300)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert p.stdout.startswith("BadInput: cannot write") and "is the disk full?" in p.stdout, p.stdout
    assert len(p.stdout.strip().splitlines()) == 1
    assert [f.name for f in tmp_path.iterdir()] == ["checkpoint.pt"] and torch.equal(torch.load(path)["v"], torch.ones(2))


def test_a_failed_save_is_one_line_and_keeps_the_previous_file(tmp_path):
    path = tmp_path / "checkpoint.pt"
    train_mini.save_atomic({"v": torch.ones(2)}, path)

    def full_disk(obj, p):
        Path(p).write_bytes(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(train_mini.UserError, match=r"cannot write .*checkpoint.pt \(No space left on device\); the "
                                                    r"previous checkpoint.pt, if any, is kept"):
        train_mini.save_atomic({"v": torch.zeros(2)}, path, write=full_disk)
    assert torch.equal(torch.load(path)["v"], torch.ones(2)) and [p.name for p in tmp_path.iterdir()] == [path.name]


# =============================================================================
# 7. The recipe's pieces: weight-decay groups, the schedule, EMA, the data



def test_weight_decay_groups_follow_the_official_run():
    m = create_model("local_vim_nano_search", in_chans=1)
    names = lambda opt, g: {id(p) for p in opt.param_groups[g]["params"]}
    ids = {n: id(p) for n, p in m.named_parameters()}
    opt = lm.configure_optimizer(m, 1e-3, 0.04, exempt_ssm=False, log=lambda s: None)
    dec = names(opt, 0)
    assert ids["layers.0.mixer.A_log_0"] in dec and ids["layers.0.mixer.multi_scan.weights"] in dec
    assert ids["pos_embed"] not in dec and ids["layers.0.mixer.D_0"] not in dec and ids["head.bias"] not in dec
    opt = lm.configure_optimizer(m, 1e-3, 0.04, exempt_ssm=True, log=lambda s: None)
    dec = names(opt, 0)
    assert ids["layers.0.mixer.A_log_0"] not in dec and ids["layers.0.mixer.multi_scan.weights"] not in dec
    assert ids["layers.0.mixer.in_proj.weight"] in dec


def test_lr_schedule():
    lr, warm, total = 1e-3, 10, 100
    assert train_mini.get_lr(0, lr, warm, total) == pytest.approx(1e-7)
    assert train_mini.get_lr(10, lr, warm, total) == pytest.approx(1e-3)
    assert train_mini.get_lr(100, lr, warm, total) == pytest.approx(1e-6)
    assert train_mini.get_lr(55, lr, warm, total) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))


def test_ema_update_follows_the_formula():
    """ema <- decay * ema + (1 - decay) * weights, from the first step on (decay 0.9: asymmetric)."""
    torch.manual_seed(0)
    m = torch.nn.Linear(3, 2)
    w0 = m.weight.detach().clone()
    _, ema = train_mini.wrap_ddp_and_ema(m, argparse.Namespace(ema_decay=0.9), 1, torch.device("cpu"))
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update_parameters(m)
    e1 = 0.9 * w0 + 0.1 * (w0 + 1)
    assert torch.allclose(ema.module.weight, e1, atol=1e-6)
    with torch.no_grad():
        m.weight.mul_(-2.0)
    ema.update_parameters(m)
    assert torch.allclose(ema.module.weight, 0.9 * e1 + 0.1 * (-2 * (w0 + 1)), atol=1e-6)
    assert not any(p.requires_grad for p in ema.parameters())


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.2, 1.0)])
def test_label_smoothing_applies_to_mixed_targets_as_timms_mixup(mixup, cutmix):
    """The recipe trains with label smoothing 0.1 AND mixup/cutmix. timm's Mixup(label_smoothing=ε)
    mixes smoothed one-hots: λ·smooth(y_a) + (1-λ)·smooth(y_b) = (1-ε)·mixed + ε/C. train_step's loss
    must be the soft-target cross-entropy against exactly that (smoothing neither dropped nor doubled)."""
    C, eps = 5, 0.1
    s = argparse.Namespace(mixup=mixup, cutmix=cutmix, label_smoothing=eps, clip_grad=None)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, C))
    r = train_mini.Run(s=s, rank=0, world=1, device=torch.device("cpu"), log=print, amp_dtype=None, model=model,
                       ddp=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
                       scaler=torch.amp.GradScaler("cpu", enabled=False), mix=train_mini.make_mix(s, C))
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    with torch.no_grad():
        torch.manual_seed(1)
        xm, mixed = r.mix(x, y)                                   # the draw train_step will make
        assert mixed.shape == (6, C) and not torch.equal(mixed, F.one_hot(y, C).float())
        target = (1 - eps) * mixed + eps / C
        want = -(target * F.log_softmax(model(xm), -1)).sum(-1).mean()
    torch.manual_seed(1)
    got = train_mini.train_step(r, x, y, 0.0, (0, 0))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    plain = -(mixed * F.log_softmax(model(xm), -1)).sum(-1).mean()
    assert abs(got.item() - plain.item()) > 1e-3                  # the smoothing is visible at this size


def test_ddp_ranks_see_disjoint_shards_that_cover_the_epoch():
    n, world = 103, 2
    shards = [list(localmamba_data.EpochOrder(n, seed=3, rank=r, world=world, shuffle=True)) for r in range(world)]
    assert len(shards[0]) == len(shards[1]) == n // world                     # equal shards: DDP steps in lockstep
    assert not set(shards[0]) & set(shards[1])
    assert len(set(shards[0]) | set(shards[1])) == world * (n // world)        # the whole epoch but the remainder
    whole = list(localmamba_data.EpochOrder(n, seed=3, rank=0, world=1, shuffle=True))
    assert set(shards[0]) | set(shards[1]) == set(whole[:world * (n // world)])
    evals = [list(localmamba_data.EpochOrder(n, seed=3, rank=r, world=world, shuffle=False)) for r in range(world)]
    assert sorted(evals[0] + evals[1]) == list(range(n))                       # evaluation: every sample once
    order = localmamba_data.EpochOrder(n, seed=3, rank=1, world=world, shuffle=True)
    order.set_epoch(0, skip=10)
    assert list(order) == shards[1][10:]                                       # resume skips what was done


@needs_fashion
def test_fashion_validation_split_is_held_out_of_training():
    """The validation images are the last 500 of each class of the training file, and no training
    run draws from them, whatever --train-per-class asks for."""
    labels = localmamba_data.read_idx(FASHION / "train-labels-idx1-ubyte.gz")
    s = argparse.Namespace(data_dir=str(FASHION), classes=None, train_per_class=None, val_per_class=None,
                           test_per_class=None)
    train, val, test, classes, chans = localmamba_data.fashion_splits(s)
    assert (len(train), len(val), len(test), classes, chans) == (55_000, 5_000, 10_000, 10, 1)
    train_idx = localmamba_data.subset_indices(labels, 10, None, skip_last=localmamba_data.FASHION_HOLDOUT)
    val_idx = localmamba_data.subset_indices(labels, 10, None, only_last=localmamba_data.FASHION_HOLDOUT)
    assert not set(train_idx) & set(val_idx) and len(set(train_idx) | set(val_idx)) == 60_000
    for c in range(10):
        last = [i for i, y in enumerate(labels.tolist()) if y == c][-500:]
        assert sorted(i for i in val_idx if labels[i] == c) == last
    assert torch.equal(val.tensors[0], torch.from_numpy(localmamba_data.read_idx(FASHION / "train-images-idx3-ubyte.gz")
                                                        [val_idx]))


def _image_tree(root, images):
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for name, save in images.items():
                save(d / name)


def test_16_bit_and_float_images_are_scaled_and_loops_not_followed(tmp_path, capsys):
    from PIL import Image
    import numpy as np
    png16 = tmp_path / "g16.png"
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(png16)     # 32896 / 257 = 128
    assert Image.open(png16).mode.startswith("I")
    assert localmamba_data.load_image(png16).getpixel((0, 0)) == (128, 128, 128)  # PIL's convert gives white
    tif = tmp_path / "f.tif"
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)).save(tif)
    assert localmamba_data.load_image(tif).getpixel((0, 0)) == (128, 128, 128)   # (PIL's convert gives 0)
    bad = tmp_path / "bad.tif"
    Image.fromarray(np.full((8, 8), 7.0, dtype=np.float32)).save(bad)
    with pytest.raises(train_mini.UserError, match=r"bad.tif: a F image with values in \[7, 7\], outside \[0, 1\]"):
        localmamba_data.load_image(bad)
    root = tmp_path / "tree"
    _image_tree(root, {"x.png": lambda p: Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(p),
                       "notes.txt": lambda p: p.write_text("not an image")})
    os.symlink(root / "train" / "a", root / "train" / "a" / "loop")           # a folder that contains itself
    ds = localmamba_data.ImageFolderSubset(root / "train", None, None, lambda im: im)
    assert len(ds) == 2 and [y for _, y in ds.samples] == [0, 1]              # each file once
    err = capsys.readouterr().err
    assert err.count("skipped 2 files that are not images (.txt: 2)") == 1


@pytest.mark.parametrize("use_timm", [False, pytest.param(True, marks=pytest.mark.skipif(
    not importlib.util.find_spec("timm"), reason="timm is not installed"))])
def test_imagenet_augmentation_has_the_papers_strength(use_timm):
    """rand-m9-mstd0.5-inc1 as the official code ran it (timm's scale: level 9 of 10): rotate up to
    27°, bicubic; torchvision's default RandAugment(magnitude=9) of 31 bins rotates 9°."""
    from PIL import Image
    from torchvision.transforms import v2
    tf = localmamba_data.imagenet_transforms(224, True, "rand-m9-mstd0.5-inc1", 0.25, use_timm=use_timm)
    if use_timm:
        from timm.data.auto_augment import RandAugment
        ra = next(t for t in tf.transforms if isinstance(t, RandAugment))
        rot = next(o for o in ra.ops if o.name == "Rotate")
        assert rot.kwargs["fillcolor"] == (124, 116, 104)          # the ImageNet mean × 255, as timm fills
        assert (rot.magnitude, rot.magnitude_std) == (9, 0.5) and abs(rot.level_fn(9, rot.hparams)[0]) == 27.0
        assert rot.kwargs["resample"] == Image.Resampling.BICUBIC
        erase = next(t for t in tf.transforms if type(t).__name__ == "RandomErasing")
        assert erase.probability == 0.25 and erase.mode == "pixel"
    else:
        ra = next(t for t in tf.transforms if isinstance(t, v2.RandAugment))
        assert ra.magnitude == 9 and ra.interpolation == v2.InterpolationMode.BICUBIC
        assert ra.fill == [124, 116, 104]        # the mean × 255 (timm's fill), not black, not the 0-1 mean
        img = Image.fromarray(np.full((64, 64, 3), 255, np.uint8))     # rotated white: the corners are the fill
        rot = v2.RandomRotation((45, 45), interpolation=ra.interpolation, fill=ra.fill)
        assert tuple(np.asarray(rot(img))[0, 0]) == (124, 116, 104)
        assert ra._AUGMENTATION_SPACE["Rotate"][0](ra.num_magnitude_bins, 224, 224)[9].item() == pytest.approx(27.0)
        assert next(t for t in tf.transforms if isinstance(t, v2.RandomErasing)).p == 0.25
    off = localmamba_data.imagenet_transforms(224, True, "none", 0.0, use_timm=False)
    assert not any(isinstance(t, v2.RandAugment) for t in off.transforms)


@pytest.mark.skipif(not importlib.util.find_spec("timm"), reason="timm is not installed")
def test_timm_randaugment_posterize_at_level_10_does_not_stop_the_run():
    """timm's magnitude noise (mstd0.5 around 9) is clipped to level 10 in ~2% of draws, where
    PosterizeIncreasing keeps 0 bits; Pillow 13 raises on that (Pillow < 13 made the image black),
    which stopped ImageNet runs in their first epoch. The trainer's transform gives the black image."""
    import random
    import numpy as np
    from PIL import Image
    from timm.data.auto_augment import RandAugment
    tf = localmamba_data.imagenet_transforms(32, True, "rand-m9-mstd0.5-inc1", 0.0, use_timm=True)
    ra = next(t for t in tf.transforms if isinstance(t, RandAugment))
    post = next(o for o in ra.ops if o.name == "PosterizeIncreasing")
    post.prob, post.magnitude, post.magnitude_std = 1.0, 10, 0.0       # the level the noise reaches
    img = Image.fromarray(np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8))
    out = post(img)
    assert out.size == img.size and out.mode == "RGB" and not np.asarray(out).any()
    assert np.array_equal(np.asarray(localmamba_data.posterize_any_bits(img, 2)), np.asarray(img) & 0xC0)
    ra.ops, ra.num_layers, ra.choice_weights = [post], 1, None          # the whole pipeline through it
    random.seed(0)
    assert tf(img).shape == (3, 32, 32)


@needs_fashion
def test_fashion_mnist_is_downloaded_where_debians_package_is_missing(tmp_path, monkeypatch, capsys):
    """No Debian package and no --data-dir: torchvision's downloader fills a cache folder (faked
    here, offline, by copying the real files), once; offline, one message names both ways."""
    import shutil
    import torchvision.datasets
    calls = []

    class FakeDownload:                        # torchvision.datasets.FashionMNIST(root, train, download=True)
        def __init__(self, root, train, download):
            calls.append(train)
            raw = Path(root) / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            for f in localmamba_data.FASHION_FILES["train" if train else "test"]:
                shutil.copy(FASHION / f, raw / f)
    monkeypatch.setattr(localmamba_data, "FASHION_DIR", str(tmp_path / "no-debian"))
    monkeypatch.setattr(localmamba_data, "FASHION_CACHE", tmp_path / "cache")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeDownload)
    s = argparse.Namespace(data_dir=str(tmp_path / "no-debian"), classes=None, train_per_class=10, val_per_class=2,
                           test_per_class=2)
    train, val, test, classes, _ = localmamba_data.fashion_splits(s)
    assert (len(train), len(val), len(test), classes) == (100, 20, 20, 10) and calls == [True, False]
    assert "downloading it with torchvision into" in capsys.readouterr().out
    localmamba_data.fashion_splits(s)
    assert calls == [True, False]                                     # the cache is used the second time

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    monkeypatch.setattr(localmamba_data, "FASHION_CACHE", tmp_path / "empty-cache")
    with pytest.raises(train_mini.UserError, match="could not be downloaded .*no network.*apt-get install "
                                                   "dataset-fashion-mnist, or .* --data-dir"):
        localmamba_data.fashion_splits(s)


def write_idx(path, array):
    """An IDX file (unsigned bytes) as Fashion-MNIST ships them, gzipped."""
    import gzip
    import struct
    a = np.asarray(array, dtype=np.uint8)
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(">" + "I" * a.ndim, *a.shape) + a.tobytes())


def fashion_dir(root, n_train=30, n_test=20, **override):
    """A Fashion-MNIST folder of small random IDX files; override={file name: array} swaps one in."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    files = {"train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
             "train-labels-idx1-ubyte.gz": np.arange(n_train) % 10,
             "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
             "t10k-labels-idx1-ubyte.gz": np.arange(n_test) % 10}
    for name, a in {**files, **override}.items():
        write_idx(root / name, a)
    return root


@pytest.mark.parametrize("override, needles", [
    ({"train-labels-idx1-ubyte.gz": np.arange(20) % 10},                  # the test labels beside the training images
     ["train-images-idx3-ubyte.gz has 30 images but", "train-labels-idx1-ubyte.gz has 20 labels"]),
    ({"t10k-images-idx3-ubyte.gz": np.zeros((30, 28, 28))}, ["t10k-images-idx3-ubyte.gz has 30 images but",
                                                            "t10k-labels-idx1-ubyte.gz has 20 labels"]),
    ({"train-images-idx3-ubyte.gz": np.zeros((30, 14, 14))}, ["train-images-idx3-ubyte.gz holds arrays of shape (14, 14)",
                                                             "train-labels-idx1-ubyte.gz"]),
    ({"train-labels-idx1-ubyte.gz": np.full(30, 200)}, ["train-labels-idx1-ubyte.gz holds label 200, outside",
                                                       "train-images-idx3-ubyte.gz"]),
    ({"train-images-idx3-ubyte.gz": np.zeros((30, 28, 14))}, ["holds arrays of shape (28, 14)"]),   # one side right
    ({"t10k-labels-idx1-ubyte.gz": np.arange(20) % 11}, ["t10k-labels-idx1-ubyte.gz holds label 10, outside"]),
    ({"t10k-labels-idx1-ubyte.gz": np.zeros((20, 2))}, ["t10k-labels-idx1-ubyte.gz holds arrays of shape (2,), not labels",
                                                       "t10k-images-idx3-ubyte.gz"]),
])
def test_fashion_idx_files_must_be_pairs(tmp_path, override, needles):
    """A mixed-up download pairs images with the wrong labels without a word: each pair must agree in
    count, images be 28×28, labels 0-9; one message naming both files."""
    s = train_mini.resolve_settings(train_mini.parse_args(["--data-dir", str(fashion_dir(tmp_path / "ok"))]), None,
                                    torch.device("cpu"))
    s.train_per_class = s.val_per_class = s.test_per_class = 2
    assert localmamba_data.fashion_splits(s)[3] == 10                       # the good folder reads
    s.data_dir = str(fashion_dir(tmp_path / "bad", **override))
    with pytest.raises(train_mini.UserError) as e:
        localmamba_data.fashion_splits(s)
    assert all(n in str(e.value) for n in needles) and "\n" not in str(e.value), str(e.value)
    s.data_dir = str(tmp_path / "bad" / "train-images-idx3-ubyte.gz")
    with pytest.raises(train_mini.UserError, match="is a file, not a folder"):
        localmamba_data.fashion_splits(s)


def test_directions_files_and_settings_are_checked_before_setup(tmp_path):
    """A directions file with one scan twice in a layer is refused naming the layer; a window larger
    than the token grid is allowed by create_model and the trainer alike (one rule: scan_order pads,
    as the official code does); --model-ema with --model-ema-decay 0 is no EMA; a model trains at
    its own image size unless --img-size says otherwise."""
    resolve = lambda *a: train_mini.resolve_settings(train_mini.parse_args(list(a)), None, torch.device("cpu"))
    f = tmp_path / "d.json"
    f.write_text(json.dumps([["h", "w2"], ["h", "h"], ["v", "w7"]]))
    with pytest.raises(ValueError, match=r"directions\[1\] = \['h', 'h'\] lists a direction twice"):
        create_model("local_vim_nano", directions=lm.load_directions(f))
    big = [["h", "w2"], ["h", "w20"], ["v", "w7"]]                   # w20 on the 14×14 grid: one padded window
    f.write_text(json.dumps(big))
    assert resolve("--directions", str(f)).layer_directions == big
    m = create_model("local_vim_nano", directions=lm.load_directions(f))
    assert m.directions == big and m(torch.randn(1, 3, 28, 28)).isfinite().all()
    assert len(lm.scan_order("w20", 14, 14)) == 400 and (lm.scan_order("w20", 14, 14) >= 0).sum() == 196
    assert resolve("--model-ema", "--model-ema-decay", "0").ema_decay == 0.0
    assert resolve("--model-ema").ema_decay == 0.9998 and resolve().ema_decay == 0.0
    assert resolve("--data", "imagenet", "--data-dir", "x", "--model", "local_vim_nano").img_size == 28
    assert resolve("--data", "imagenet", "--data-dir", "x").img_size == 224
    assert resolve("--data", "imagenet", "--data-dir", "x", "--model", "local_vim_nano", "--img-size", "56").img_size == 56


def test_evaluation_runs_at_a_large_batch():
    """Training at --batch-size, evaluation (no gradients) at the larger of it and 256."""
    s = argparse.Namespace(batch_size=4, workers=0)
    ds = torch.utils.data.TensorDataset(torch.arange(1000))
    train = train_mini.make_loader(ds, s, localmamba_data.EpochOrder(1000, 0, 0, 1, True), torch.device("cpu"))
    evals = train_mini.make_loader(ds, s, localmamba_data.EpochOrder(1000, 0, 0, 1, False), torch.device("cpu"))
    assert train.batch_size == 4 and evals.batch_size == 256 and sum(len(b[0]) for b in evals) == 1000
    s.batch_size = 512
    assert train_mini.make_loader(ds, s, localmamba_data.EpochOrder(1000, 0, 0, 1, False),
                                  torch.device("cpu")).batch_size == 512


def test_timm_and_deit_flag_spellings_are_accepted():
    a = train_mini.parse_args(["-b", "8", "--smoothing", "0.2", "--output", "x", "--model-ema-decay", "0.99",
                               "--aa", "none", "--reprob", "0.5", "--lr", "0.003"])
    assert (a.batch_size, a.label_smoothing, a.out, a.ema_decay, a.aa, a.reprob, a.lr) == (8, 0.2, "x", 0.99, "none",
                                                                                          0.5, 0.003)
    s = train_mini.resolve_settings(train_mini.parse_args(["--model-ema"]), None, torch.device("cpu"))
    assert s.ema_decay == 0.9998 and s.blr == 0.128                           # --lr: the rule unless given
    assert s.lr == 0.128 * 64 / 1024 and s.lr_rule == "= --blr 0.128 × 64 / 1024"
    s = train_mini.resolve_settings(train_mini.parse_args(["-b", "32"]), None, torch.device("cpu"), world=8)
    assert s.lr == 0.128 * 32 * 8 / 1024                                       # the global batch: × processes
    s = train_mini.resolve_settings(train_mini.parse_args(["--lr", "0.003", "-b", "32"]), None, torch.device("cpu"), 8)
    assert s.lr == 0.003 and s.lr_rule == "--lr"                               # absolute: never scaled
    with pytest.raises(train_mini.UserError, match="--aa rand9: expected timm's RandAugment spelling"):
        train_mini.resolve_settings(train_mini.parse_args(["--aa", "rand9"]), None, torch.device("cpu"))
    vm = train_mini.resolve_settings(train_mini.parse_args(["--model", "local_vmamba_tiny", "--data", "imagenet",
                                                            "--data-dir", "x"]), None, torch.device("cuda"))
    vim = train_mini.resolve_settings(train_mini.parse_args(["--data", "imagenet", "--data-dir", "x"]), None,
                                      torch.device("cuda"))
    assert (vm.amp, vim.amp) == ("bf16", "off")             # the official recipe: LocalVMamba AMP, LocalVim fp32
    alias = train_mini.resolve_settings(train_mini.parse_args(["--model", "local_vssm_tiny", "--data", "imagenet",
                                                               "--data-dir", "x"]), None, torch.device("cpu"))
    assert alias.model == "local_vmamba_tiny"                # the official name, as create_model takes it


@pytest.mark.parametrize("flag, value, needle", [
    ("--clip-grad", "-1", "--clip-grad must be a finite number > 0, got -1.0"),
    ("--weight-decay", "-1", "--weight-decay must be a finite number between 0 and inf"),
    ("--lr", "nan", "--lr must be a finite number > 0, got nan"),
    ("--seed", "-1", "--seed must be a finite number between 0"),
    ("--workers", "-1", "--workers must be"),
    ("--epochs", "inf", "--epochs must be a finite number > 0, got inf"),
    ("--label-smoothing", "2", "--label-smoothing must be a finite number between 0 and 0.999"),
    ("--drop-path", "1", "--drop-path must be"),
    ("--ema-decay", "1.5", "--ema-decay must be"),
    ("--batch-size", "0", "--batch-size must be a finite number > 0"),
    ("--mixup", "-0.5", "--mixup must be"),
    ("--checkpoint-every", "-3", "--checkpoint-every must be"),
    ("--classes", "1", "--classes must be a finite number between 2 and inf"),     # one class: loss 0
    ("--img-size", "30", "Fashion-MNIST's images are 28×28; pass --img-size 28"),  # the flag, not the Python API
    ("--aa", "rand-m9-mstd0.5.5", "--aa rand-m9-mstd0.5.5: expected timm's RandAugment spelling rand-m<0-10>"),
    ("--aa", "rand-m99", "--aa rand-m99: expected"),                                # timm would clamp it silently
    ("--aa", "rand-m9-x1", "--aa rand-m9-x1: expected"),
    ("--blr", "1e300", "the peak lr would be"),                                     # AdamW overflows
    ("--aa", "rand-m9-mstd0.5-inc1", "--aa sets the ImageNet augmentation and does nothing on Fashion-MNIST"),
    ("--reprob", "0.25", "--reprob sets the ImageNet augmentation and does nothing on Fashion-MNIST"),
])
def test_every_bad_flag_is_refused_before_any_setup(flag, value, needle, monkeypatch, capsys, tmp_path):
    def no_setup(*a, **k):
        raise AssertionError("data or model set up despite a bad flag")
    monkeypatch.setattr(train_mini, "fashion_splits", no_setup)
    monkeypatch.setattr(train_mini, "claim_run_dir", no_setup)
    with pytest.raises(SystemExit) as e:
        train_mini.main([flag, value, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_finetune_takes_the_raw_weights_or_with_finetune_ema_the_ema(tmp_path, monkeypatch, capsys):
    """--finetune reads the raw weights (DeiT's --finetune), --finetune-ema the EMA ones, in every
    layout; --finetune-ema from a file without EMA weights, or without --finetune, is refused
    before any setup."""
    raw, ema, dst = _raw_and_ema(in_chans=1, num_classes=10)
    key = "layers.1.mixer.in_proj.weight"
    for ckpt in ({"model": raw, "model_ema": ema}, {"state_dict": raw, "state_dict_ema": ema}):
        for use_ema, want in ((False, raw), (True, ema)):
            msgs = []
            train_mini.load_finetune(dst, ckpt, "f.pt", msgs.append, "its directions", use_ema)
            assert torch.equal(dst.state_dict()[key], want[key])
            assert ("EMA weights" if use_ema else "raw weights") in msgs[0]
    torch.save({"model": raw, "model_ema": None}, tmp_path / "no_ema.pt")
    monkeypatch.setattr(train_mini, "fashion_splits", lambda *a, **k: pytest.fail("set up despite bad flags"))
    for argv, needle in ((["--finetune", str(tmp_path / "no_ema.pt"), "--finetune-ema"], "holds no EMA weights"),
                         (["--finetune-ema"], "pass --finetune too")):
        with pytest.raises(SystemExit) as e:
            train_mini.main(argv + ["--out", str(tmp_path / "o")])
        _assert_clean_failure(e.value.code, capsys.readouterr().err, needle)
        assert not (tmp_path / "o").exists()


def test_plot_draws_a_runs_curves_or_says_why_not(tmp_path, capsys, monkeypatch):
    """--plot RUN_DIR reads log.jsonl (training records carry train_loss and lr) and writes
    curves.png; a folder without a log, or no matplotlib, is one message."""
    run = tmp_path / "run"
    run.mkdir()
    recs = [{"total_steps": 4}] + [{"epoch": s / 4, "step": s, "train_loss": 2.3 - s / 10, "lr": 1e-3} for s in (1, 2)] \
        + [{"split": "val", "step": 4, "top1": 30.0, "train_loss": 2.0, "lr": 1e-4}, {"split": "test", "step": 4, "top1": 29.0}]
    (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    if importlib.util.find_spec("matplotlib"):
        train_mini.main(["--plot", str(run)])
        assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "curves.png" in capsys.readouterr().out
        # a record missing its step or top1 is left out; a last line cut by a killed writer is left out, said
        odd = [{"split": "val", "top1": 31.0}, {"step": 5, "train_loss": "x"}, {"split": "val", "step": 6}]
        (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs + odd) + '\n{"split": "val", "st')
        (run / "curves.png").unlink()
        train_mini.main(["--plot", str(run)])
        out = capsys.readouterr().out
        assert "the last line of" in out and "is cut off; drawing the 8 records before it" in out
        assert (run / "curves.png").exists()
        (run / "log.jsonl").write_text('{"step": 1, "train_loss": 2.0}\nnot json\n{"step": 2, "train_loss": 1.0}\n')
        with pytest.raises(SystemExit) as e:                                   # damage inside: refused, named
            train_mini.main(["--plot", str(run)])
        _assert_clean_failure(e.value.code, capsys.readouterr().err, "line 2 of", "is not JSON")
        (run / "log.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        (run / "curves.png").unlink()
        (run / "curves.png").mkdir()                                           # unwritable: one line
        with pytest.raises(SystemExit) as e:
            train_mini.main(["--plot", str(run)])
        _assert_clean_failure(e.value.code, capsys.readouterr().err, "cannot write", "curves.png")
        (run / "curves.png").rmdir()
    with pytest.raises(SystemExit) as e:
        train_mini.main(["--plot", str(tmp_path / "empty")])
    _assert_clean_failure(e.value.code, capsys.readouterr().err, "no log.jsonl there")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as e:
        train_mini.main(["--plot", str(run)])
    _assert_clean_failure(e.value.code, capsys.readouterr().err, "needs matplotlib: pip install matplotlib")


# =============================================================================
# 8. train_mini.py end to end (subprocesses on the CPU, tiny data)


@pytest.mark.slow
@needs_fashion
def test_the_trainer_says_which_scan_it_runs_and_honours_localmamba_compile(finished_tiny_run, tmp_path):
    """On the CPU the trainer runs the C++ scan kernels unless --no-compile or LOCALMAMBA_COMPILE=0 (the
    way out its build-failure message offers, for a machine without a C++ compiler), and with them the
    fused mixer; the first lines and the config say which. A warm-up longer than the run is said too."""
    cfg, _ = read_log(finished_tiny_run)
    assert cfg["scan"] == "cpu (C++ kernels)" and cfg["mixer"] == "fused"
    rc, so, se = run_cli(*TINY, "--max-steps", "1", "--warmup-epochs", "5", "--out", tmp_path / "r",
                         env={"LOCALMAMBA_COMPILE": "0"})
    assert rc == 0, se
    assert "scan: torch (eager); mixer: readable" in so and read_log(tmp_path / "r")[0]["scan"] == "torch (eager)"
    assert "note: the warm-up (5 epochs, --warmup-epochs) is longer than the run (1 epochs)" in so   # said, not refused
    rc, so, se = run_cli("--train-per-class", "3", "--test-per-class", "2", "--batch-size", "10", "--print-every",
                         "0", "--max-steps", "1", "--out", tmp_path / "smoke")
    assert rc == 0, se     # a smoke run is told how to cut the validation split it evaluates at its stop
    assert "note: the --max-steps 1 stop evaluates all 5,000 validation images; --val-per-class N" in so


HELP_WITHOUT_TORCH = """
import runpy, sys
sys.argv = ["train_mini.py", *sys.argv[1:]]
try:
    runpy.run_path("train_mini.py", run_name="__main__")
except SystemExit as e:
    print("exit", e.code, "torch loaded:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["--bogus"], 2), (["--data", "mnist"], 2)])
def test_help_and_a_refused_flag_answer_before_torch_loads(argv, code):
    """--help, and a flag argparse refuses, are answered before the heavy libraries load (a second,
    not the 7 s that importing torch takes on a small machine)."""
    p = subprocess.run([sys.executable, "-c", HELP_WITHOUT_TORCH, *argv], capture_output=True, text=True, cwd=HERE,
                       timeout=300)
    assert f"exit {code} torch loaded: False" in p.stdout, (p.stdout[-500:], p.stderr[-500:])


@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize("after", [0.3, 2.0, 6.0])
def test_ctrl_c_at_any_moment_exits_130_without_a_traceback(after, tmp_path):
    """Ctrl-C while the libraries load, while the data and model are set up, or while training: exit
    130 and one line, never a KeyboardInterrupt traceback."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.Popen([sys.executable, str(HERE / "train_mini.py"), *TINY, "--train-per-class", "400",
                          "--out", str(tmp_path / "r")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env, cwd=HERE)
    time.sleep(after)
    p.send_signal(signal.SIGINT)
    so, se = p.communicate(timeout=300)
    assert p.returncode == 130 and "Traceback" not in se and "interrupted" in se, (p.returncode, se[-2000:])


def _small_disk():
    """In the child: files may grow to 500 bytes (a write past it fails with EFBIG, as on a full disk)."""
    import resource
    import signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (500, 500))


@pytest.mark.slow
@needs_fashion
def test_a_full_disk_before_the_first_checkpoint_is_one_line(tmp_path):
    """The run's log is written before any checkpoint (its first line, the config, is ~2 KB): a disk
    that cannot take it stops the run with one line naming the file, exit 2, no traceback."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, str(HERE / "train_mini.py"), *TINY, "--max-steps", "1", "--no-compile",
                        "--out", str(tmp_path / "r")], capture_output=True, text=True, env=env, timeout=600, cwd=HERE,
                       preexec_fn=_small_disk)             # (--no-compile: the C++ build writes files too)
    _assert_clean_failure(p.returncode, p.stderr, "cannot write", "log.jsonl", "is the disk full?")
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    """A tiny ImageNet-layout tree of real JPEGs of varied sizes: Fashion-MNIST images, 3 classes."""
    if not (FASHION / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")
    from PIL import Image
    images = localmamba_data.read_idx(FASHION / "t10k-images-idx3-ubyte.gz")
    labels = localmamba_data.read_idx(FASHION / "t10k-labels-idx1-ubyte.gz")
    root = tmp_path_factory.mktemp("imagenet")
    names = ["n01_tshirt", "n02_trouser", "n03_pullover"]
    count = {}
    sizes = [(28, 28), (40, 36), (64, 48), (33, 57)]
    for i, (img, y) in enumerate(zip(images, labels)):
        if y >= 3 or count.get(y, 0) >= 16:
            continue
        k = count[y] = count.get(y, 0) + 1
        split = "train" if k <= 12 else "val"
        d = root / split / names[y]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).convert("RGB").resize(sizes[i % 4]).save(d / f"img_{i}.JPEG", quality=90)
    return root


@pytest.mark.slow
def test_what_the_trainer_writes_at_a_small_image_size_it_reads_back(jpeg_tree, tmp_path):
    """LocalVim-T at 64 px (a 4×4 token grid, where its w7 layers scan one padded 7×7 window, as the
    official model would): its checkpoint evaluates (the same validation top-1 as the run logged),
    resumes and fine-tunes; a --search at 64 px writes directions.json, which --directions reads."""
    tiny64 = [*IMAGENET, "--data-dir", jpeg_tree, "--img-size", "64", "--train-per-class", "4"]
    run = tmp_path / "run"
    rc, so, se = run_cli(*tiny64, "--model", "local_vim_tiny", "--epochs", "1", "--max-steps", "1", "--out", run)
    assert rc == 0, se
    cfg, val = read_log(run, "val")
    assert cfg["img_size"] == 64 and any("w7" in layer for layer in cfg["directions"])
    again = ["--data", "imagenet", "--data-dir", jpeg_tree, "--workers", "0", "--print-every", "0"]   # as typed
    rc, so, se = run_cli(*again, "--eval", "--resume", run / "checkpoint.pt")
    assert rc == 0, se
    assert eval_lines(so)["val"]["top1"] == val[-1]["top1"]
    rc, so, se = run_cli(*again, "--model", "local_vim_tiny", "--img-size", "64", "--eval", "--finetune",
                         run / "checkpoint.pt")                        # its weights as a file: the same figure
    assert rc == 0 and eval_lines(so)["val"]["top1"] == val[-1]["top1"], se
    rc, so, se = run_cli(*again, "--resume", run / "checkpoint.pt")
    assert rc == 0, se                                       # continues to the run's end
    rc, so, se = run_cli(*tiny64, "--model", "local_vim_tiny", "--finetune", run / "checkpoint.pt", "--max-steps", "1",
                         "--out", tmp_path / "fine")
    assert rc == 0, se
    search = tmp_path / "search"
    rc, so, se = run_cli(*tiny64, "--model", "local_vim_tiny_search", "--search", "--max-steps", "1", "--test-at-stop",
                         "--out", search)
    assert rc == 0 and (search / "directions.json").exists(), se
    rc, so, se = run_cli(*tiny64, "--model", "local_vim_tiny", "--directions", search / "directions.json",
                         "--max-steps", "1", "--out", tmp_path / "found")
    assert rc == 0, se
    assert read_log(tmp_path / "found")[0]["directions"] == json.loads((search / "directions.json").read_text())[
        "directions"]


@pytest.mark.slow
def test_imagenet_layout_train_checkpoint_resume_eval(jpeg_tree, tmp_path):
    out = tmp_path / "run"
    rc, so, se = run_cli(*IMAGENET, "--data-dir", jpeg_tree, "--epochs", "2", "--max-steps", "7",
                         "--warmup-epochs", "1", "--out", out)
    assert rc == 0, se
    cfg, evals = read_log(out)
    assert cfg["world_size"] == 1 and cfg["num_classes"] == 3 and cfg["train_images"] == 36 and cfg["val_images"] == 12
    assert (cfg["steps_per_epoch"], cfg["warmup_steps"], cfg["total_steps"]) == (6, 6, 12)    # 36 images of 6
    assert cfg["directions"] == [["h", "h_flip", "w2", "w2_flip"]] * NANO_DEPTH
    assert [e["step"] for e in evals] == [6, 7] and all(0 <= e["top1"] <= 100 for e in evals)
    assert {"epoch", "step", "top1", "top5", "loss"} <= set(evals[-1])
    assert not (out / "checkpoint.pt.tmp").exists()
    # resume continues to the end of epoch 2 (12 steps), then --eval reproduces the logged accuracy
    rc, so, se = run_cli(*IMAGENET, "--data-dir", jpeg_tree, "--epochs", "2", "--warmup-epochs", "1",
                         "--out", out, "--resume", out / "checkpoint.pt")
    assert rc == 0, se
    # exactly the run that did not stop (timm's transforms, where timm is installed, draw from Python's
    # `random`: seeded per rank and saved in the checkpoint)
    rc, _, se = run_cli(*IMAGENET, "--data-dir", jpeg_tree, "--epochs", "2", "--warmup-epochs", "1",
                        "--out", tmp_path / "straight")
    assert rc == 0, se
    a, b = torch.load(out / "checkpoint.pt"), torch.load(tmp_path / "straight" / "checkpoint.pt")
    assert a["step"] == b["step"] == 12 and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert "resumed from" in so
    _, evals = read_log(out)
    assert evals[-1]["step"] == 12 and evals[-1]["epoch"] == 2
    rc, so, se = run_cli(*IMAGENET, "--data-dir", jpeg_tree, "--eval", "--resume", out / "checkpoint.pt")
    assert rc == 0, se
    res = eval_lines(so)
    assert set(res) == {"val"}                                  # ImageNet has no test split of its own
    assert res["val"]["top1"] == pytest.approx(evals[-1]["top1"]) and res["val"]["n"] == 12
    # --eval reads only val/: a root without train/ evaluates the same
    (tmp_path / "val_only").mkdir()
    os.symlink(jpeg_tree / "val", tmp_path / "val_only" / "val")
    rc, so, se = run_cli(*IMAGENET, "--data-dir", tmp_path / "val_only", "--eval",
                         "--resume", out / "checkpoint.pt")
    assert rc == 0, se
    assert eval_lines(so) == res


@pytest.mark.slow
@needs_fashion
def test_resume_continues_exactly(tmp_path):
    common = [*TINY, "--epochs", "2"]
    rc, _, se = run_cli(*common, "--out", tmp_path / "straight")
    assert rc == 0, se
    rc, _, se = run_cli(*common, "--max-steps", "4", "--out", tmp_path / "split")
    assert rc == 0, se
    rc, _, se = run_cli(*common, "--out", tmp_path / "split", "--resume", tmp_path / "split" / "checkpoint.pt")
    assert rc == 0, se
    a = torch.load(tmp_path / "straight" / "checkpoint.pt")           # PyTorch's default: weights only
    b = torch.load(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.slow
@needs_fashion
def test_default_fashion_mnist_path_runs(tmp_path):
    rc, so, se = run_cli("--max-steps", "2", "--train-per-class", "20", "--val-per-class", "10", "--test-per-class", "5",
                         "--out", tmp_path / "f")
    assert rc == 0, se
    cfg, evals = read_log(tmp_path / "f")
    assert cfg["model"] == "local_vim_nano" and cfg["in_chans"] == 1 and cfg["amp"] == "off"
    assert (cfg["train_images"], cfg["val_images"], cfg["test_images"]) == (200, 100, 50)
    assert cfg["total_steps"] > 2                                    # so the --max-steps stop is a pause:
    assert [(e["split"], e["step"]) for e in evals] == [("val", 2)]  # the test split is read at a run's end only
    assert "stopped by --max-steps at step 2" in so and "--test-at-stop" in so
    assert "training in all: ~" in so                                                  # the first progress line
    rc, so, se = run_cli("--max-steps", "2", "--train-per-class", "20", "--val-per-class", "10", "--test-per-class", "5",
                         "--test-at-stop", "--out", tmp_path / "g")       # a smoke run whose stop is its end
    assert rc == 0, se
    assert [(e["split"], e["step"]) for e in read_log(tmp_path / "g")[1]] == [("val", 2), ("test", 2)]


def run_torchrun(script, *args, port=29533):
    """python -m torch.distributed.run --nproc_per_node=2 SCRIPT ARGS on the CPU (gloo)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(script), *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=HERE)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
@needs_fashion
def test_torchrun_two_processes_on_cpu_resume_exactly(tmp_path):
    """Two processes: rank-0 logs only; and 2N steps straight equal N steps + --resume for N more,
    bitwise, which needs every rank to resume from its own RNG state (augmentation draws differ
    per rank) and the data order to continue."""
    common = ["--train-per-class", "4", "--val-per-class", "3", "--test-per-class", "2", "--batch-size", "5",
              "--epochs", "2", "--print-every", "0"]
    so = run_torchrun(HERE / "train_mini.py", *common, "--out", tmp_path / "straight")
    cfg, evals = read_log(tmp_path / "straight", "val")
    assert cfg["world_size"] == 2 and cfg["global_batch"] == 10 and cfg["total_steps"] == 8
    assert evals[-1]["step"] == 8
    assert so.count("optimizer: AdamW") == 1          # logs from rank 0 only
    run_torchrun(HERE / "train_mini.py", *common, "--max-steps", "3", "--out", tmp_path / "split", port=29534)
    run_torchrun(HERE / "train_mini.py", *common, "--out", tmp_path / "split", "--resume",
                 tmp_path / "split" / "checkpoint.pt", port=29535)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt") for d in ("straight", "split"))
    assert a["step"] == b["step"] == 8 and len(a["rng"]) == 2
    assert not torch.equal(a["rng"][0]["torch"], a["rng"][1]["torch"])   # each rank's own state is kept
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


DDP_EMA_SCRIPT = """
import sys, argparse, torch, torch.distributed as dist
sys.path.insert(0, {here!r})
import localmamba, train_mini
rank, world, device = train_mini.setup_distributed()
torch.manual_seed(rank)                                    # as train() seeds: a different init per rank
model = localmamba.create_model("local_vim_nano", in_chans=1, num_classes=10)
s = argparse.Namespace(ema_decay=0.9)
ddp, ema = train_mini.wrap_ddp_and_ema(model, s, world, device)
flat = torch.cat([p.detach().flatten() for p in ema.module.parameters()])
both = [torch.zeros_like(flat) for _ in range(world)]
dist.all_gather(both, flat)
if rank == 0:
    print("EMA_EQUAL", torch.equal(both[0], both[1]))
del ddp, ema                                  # DDP before its process group, or gloo aborts at exit
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_ddp_ema_starts_from_the_same_weights_on_every_rank(tmp_path):
    script = tmp_path / "ddp_ema.py"
    script.write_text(DDP_EMA_SCRIPT.format(here=str(HERE)))
    assert "EMA_EQUAL True" in run_torchrun(script, port=29536)


@pytest.mark.slow
@needs_fashion
def test_search_writes_directions_that_train_accepts(tmp_path):
    rc, so, se = run_cli("--search", "--max-steps", "2", "--train-per-class", "5", "--val-per-class", "2",
                         "--test-per-class", "2", "--batch-size", "10", "--out", tmp_path / "s")
    assert rc == 0, se
    found = json.loads((tmp_path / "s" / "directions.json").read_text())
    assert len(found["directions"]) == NANO_DEPTH and all(len(d) == 4 for d in found["directions"])
    for d in found["directions"]:
        assert d == sorted(d, key=lm.DIRECTIONS.index) and set(d) <= set(lm.DIRECTIONS)
    probs = torch.tensor(found["probabilities"])
    assert probs.shape == (NANO_DEPTH, 8) and torch.allclose(probs.sum(1), torch.ones(NANO_DEPTH), atol=1e-4)
    assert "layer" in so and "chosen directions" in so                      # the text heat map
    _, evals = read_log(tmp_path / "s", "val")
    assert len(evals[-1]["search_probs"]) == NANO_DEPTH
    small = ["--train-per-class", "5", "--val-per-class", "2", "--test-per-class", "2", "--batch-size", "10"]
    rc, so, se = run_cli("--directions", tmp_path / "s" / "directions.json", "--max-steps", "1", *small,
                         "--ema-decay", "0.5", "--test-at-stop", "--out", tmp_path / "t")
    assert rc == 0, se
    cfg, evals = read_log(tmp_path / "t", "val")
    assert cfg["directions"] == found["directions"]
    # --eval rebuilds the model the checkpoint was trained as (its directions, without --directions)
    # and reproduces the logged figures exactly; --eval-ema evaluates the EMA weights
    ckpt = tmp_path / "t" / "checkpoint.pt"
    rc, so, se = run_cli("--eval", "--resume", ckpt, *small)
    assert rc == 0, se
    res = eval_lines(so)
    assert res["val"]["weights"] == "model" and res["val"]["loss"] == pytest.approx(evals[-1]["loss"], rel=1e-5)
    assert res["test"]["loss"] == pytest.approx(read_log(tmp_path / "t", "test")[1][-1]["loss"], rel=1e-5)
    rc, so, se = run_cli("--eval", "--eval-ema", "--resume", ckpt, *small)
    assert rc == 0, se
    assert eval_lines(so)["val"]["top1"] == pytest.approx(evals[-1]["top1_ema"])
    saved = torch.load(ckpt)                                   # plain torch.load: weights only
    if importlib.util.find_spec("timm"):                       # timm's loader finds the EMA under its own key
        from timm.models import load_checkpoint as timm_load
        for use_ema, key in ((True, "model_ema"), (False, "model")):
            m = create_model("local_vim_nano", in_chans=1, num_classes=10, directions=found["directions"])
            timm_load(m, str(ckpt), use_ema=use_ema)
            assert all(torch.equal(v, saved[key][k]) for k, v in m.state_dict().items()), key
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"directions": [["h", "h_flip"]] * NANO_DEPTH}))
    _assert_clean_failure(*run_cli("--eval", "--resume", ckpt, "--directions", other, *small)[::2],
                          "differs from the directions")
    _assert_clean_failure(*run_cli("--eval", "--resume", ckpt, "--img-size", "32", *small)[::2], "--img-size 28")
    _assert_clean_failure(*run_cli("--eval", "--eval-ema", "--resume", tmp_path / "s" / "checkpoint.pt", *small)[::2],
                          "holds no EMA weights")


@pytest.mark.slow
def test_bad_inputs_get_one_message(tmp_path, jpeg_tree):
    rc, _, se = run_cli("--data", "imagenet", "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "o1")
    _assert_clean_failure(rc, se, "nowhere", "does not exist")
    rc, _, se = run_cli("--data", "imagenet", "--out", tmp_path / "o0")
    _assert_clean_failure(rc, se, "--data-dir")
    (tmp_path / "empty").mkdir()
    rc, _, se = run_cli("--data", "imagenet", "--data-dir", tmp_path / "empty", "--out", tmp_path / "o2")
    _assert_clean_failure(rc, se, f"{tmp_path / 'empty' / 'val'}", "No such file", "Expected ImageNet layout")
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    (tmp_path / "half" / "val").mkdir(parents=True)
    rc, _, se = run_cli("--data", "imagenet", "--data-dir", tmp_path / "half", "--out", tmp_path / "o3")
    _assert_clean_failure(rc, se, "Couldn't find any class folder", f"{tmp_path / 'half' / 'val'}")
    rc, _, se = run_cli("--data", "imagenet", "--data-dir", jpeg_tree, "--classes", "50", "--out", tmp_path / "o4")
    _assert_clean_failure(rc, se, "--classes 50 is larger than the 3 classes")
    rc, _, se = run_cli("--model", "local_vim_giant", "--out", tmp_path / "o5")
    _assert_clean_failure(rc, se, "local_vim_giant", "local_vim_tiny")
    (tmp_path / "d.json").write_text(json.dumps({"directions": [["h", "v"]] * (NANO_DEPTH + 2)}))
    rc, _, se = run_cli("--directions", tmp_path / "d.json", "--out", tmp_path / "o6", "--data-dir", FASHION)
    if FASHION.exists():
        _assert_clean_failure(rc, se, f"{NANO_DEPTH} lists, got {NANO_DEPTH + 2}")
    (tmp_path / "bad.json").write_text("{not json")
    rc, _, se = run_cli("--directions", tmp_path / "bad.json", "--out", tmp_path / "o7")
    if FASHION.exists():
        _assert_clean_failure(rc, se, "not valid JSON")
    rc, _, se = run_cli("--data-dir", tmp_path / "empty", "--out", tmp_path / "o8")
    _assert_clean_failure(rc, se, "is missing")
    rc, _, se = run_cli("--classes", "11", "--data-dir", FASHION, "--out", tmp_path / "o9")
    if FASHION.exists():
        _assert_clean_failure(rc, se, "--classes 11 is larger than the 10 classes")
    rc, _, se = run_cli("--search", "--model", "local_vim_nano", "--out", tmp_path / "o10")
    _assert_clean_failure(rc, se, "*_search model")


@pytest.mark.slow
def test_corrupt_image_is_named_and_skipped_or_stops(jpeg_tree, tmp_path):
    import shutil
    root = tmp_path / "tree"
    shutil.copytree(jpeg_tree, root)
    victim = sorted((root / "train" / "n02_trouser").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:200])                            # truncated JPEG
    args = [*IMAGENET, "--data-dir", root, "--max-steps", "6"]
    rc, so, se = run_cli(*args, "--out", tmp_path / "skip")
    assert rc == 0, se
    assert f"warning: skipping unreadable image {victim}" in se
    rc, so, se = run_cli(*args, "--bad-images", "stop", "--out", tmp_path / "stop")
    _assert_clean_failure(rc, se, f"cannot read image {victim}")
    rc, so, se = run_cli(*args, "--bad-images", "stop", "--workers", "1", "--out", tmp_path / "stop1")  # in a worker
    _assert_clean_failure(rc, se, f"cannot read image {victim}")


@pytest.mark.slow
@needs_fashion
def test_existing_run_is_not_overwritten_and_nan_keeps_the_checkpoint(tmp_path):
    common = [*TINY, "--epochs", "1"]
    out = tmp_path / "run"
    rc, _, se = run_cli(*common, "--out", out)
    assert rc == 0, se
    before_log, before_ck = (out / "log.jsonl").read_bytes(), (out / "checkpoint.pt").read_bytes()
    rc, _, se = run_cli(*common, "--out", out)
    _assert_clean_failure(rc, se, "already holds a run")
    assert (out / "log.jsonl").read_bytes() == before_log
    assert (out / "checkpoint.pt").read_bytes() == before_ck
    # a loss that becomes NaN (lr 1e5: the second step) stops the run; the checkpoint of step 1 is kept
    rc, _, se = run_cli(*TINY, "--epochs", "2", "--lr", "1e5", "--checkpoint-every", "1", "--out", tmp_path / "n")
    assert rc == 3 and "Traceback" not in se and "the loss became nan" in se and "lower --lr" in se, se
    assert "checkpoint.pt is from before it" in se
    assert train_mini.read_run_checkpoint(tmp_path / "n" / "checkpoint.pt")["step"] == 1


@pytest.mark.slow
@needs_fashion
def test_two_trainers_on_one_out_one_runs(tmp_path):
    """The second trainer on a folder in use exits 2 at once and touches nothing of the first's."""
    out = tmp_path / "run"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    first = subprocess.Popen([sys.executable, str(HERE / "train_mini.py"), *TINY[:-2], "--epochs", "20",
                              "--print-every", "0", "--out", str(out)], cwd=HERE, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() and time.time() < deadline and first.poll() is None:
        time.sleep(0.2)
    before = sorted(p.name for p in out.iterdir())
    rc, _, se = run_cli(*TINY, "--out", out)                   # while the first runs
    _assert_clean_failure(rc, se, "in use by another run")
    so, se1 = first.communicate(timeout=600)
    assert first.returncode == 0, se1
    config, evals = read_log(out)
    assert sum("total_steps" in json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()) == 1
    assert not list(out.glob("*.tmp*")) and set(before) <= {p.name for p in out.iterdir()}
    assert evals[-1]["split"] == "test"


def test_default_out_cannot_collide():
    args = train_mini.parse_args([])
    s = train_mini.resolve_settings(args, None, torch.device("cpu"))
    assert s.out.endswith(f"-{os.getpid()}") and s.out.startswith("runs/local_vim_nano-")


@pytest.mark.slow
@pytest.mark.slow
def test_every_log_record_carries_the_training_loss_and_lr(finished_tiny_run):
    """Progress records (every --print-every seconds; TINY prints every step after the first) and
    evaluation records carry the mean training loss since the previous record (where steps ran
    since) and the lr."""
    lines = [json.loads(l) for l in (finished_tiny_run / "log.jsonl").read_text().splitlines()]
    cfg, train, val = lines[0], [r for r in lines if "split" not in r][1:], [r for r in lines if r.get("split") == "val"]
    assert [r["step"] for r in train] == [2] and val and "train_loss" not in val[-1]   # the step-2 record took it
    lr = train_mini.get_lr(1, cfg["lr_used"], cfg["warmup_steps"], cfg["total_steps"])
    assert train[0]["lr"] == pytest.approx(lr) and 0 < train[0]["train_loss"] < 10


@pytest.mark.slow
def test_resume_never_writes_into_another_runs_folder(finished_tiny_run, tmp_path):
    for name in ("a", "b"):
        shutil.copytree(finished_tiny_run, tmp_path / name)
    snapshot = lambda d: {p.name: p.read_bytes() for p in (tmp_path / d).iterdir()}
    a, b = snapshot("a"), snapshot("b")
    rc, _, se = run_cli(*TINY, "--resume", tmp_path / "a" / "checkpoint.pt", "--out", tmp_path / "b")
    _assert_clean_failure(rc, se, "holds another run")
    assert snapshot("a") == a and snapshot("b") == b
    rc, _, se = run_cli(*TINY, "--resume", tmp_path / "a" / "checkpoint.pt", "--out", tmp_path / "c")
    assert rc == 0, se                                          # a new empty folder is fine
    assert snapshot("a") == a and (tmp_path / "c" / "checkpoint.pt").exists()
    rc, _, se = run_cli(*TINY, "--resume", tmp_path / "a" / "checkpoint.pt")
    assert rc == 0, se                                          # without --out: its own folder
    assert torch.load(tmp_path / "a" / "checkpoint.pt")["step"] == 6      # to the end: 2 epochs of 3 steps


@pytest.mark.slow
@needs_fashion
def test_a_folder_with_only_a_checkpoint_is_kept_and_one_with_only_a_log_restarts(tmp_path):
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "checkpoint.pt").write_bytes(b"precious")
    rc, _, se = run_cli(*TINY, "--max-steps", "1", "--out", tmp_path / "ck")
    _assert_clean_failure(rc, se, "already holds a run")
    assert (tmp_path / "ck" / "checkpoint.pt").read_bytes() == b"precious"
    (tmp_path / "lg").mkdir()
    (tmp_path / "lg" / "log.jsonl").write_text('{"old": 1}\n')
    rc, so, se = run_cli(*TINY, "--max-steps", "1", "--out", tmp_path / "lg")
    assert rc == 0 and "stopped before its first checkpoint" in so, se
    kept = list((tmp_path / "lg").glob("log.stopped-*.jsonl"))
    assert len(kept) == 1 and kept[0].read_text() == '{"old": 1}\n'


@pytest.mark.slow
@needs_fashion
def test_a_killed_run_resumes_from_its_last_step_checkpoint(tmp_path):
    """--checkpoint-every: SIGKILL mid-epoch leaves a whole, weights-only, checksummed checkpoint at
    a multiple of the interval, and --resume finishes the run as if it had not stopped."""
    out = tmp_path / "run"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    flags = ["--train-per-class", "100", "--val-per-class", "2", "--test-per-class", "2", "--batch-size", "10",
             "--checkpoint-every", "3", "--print-every", "0", "--out", str(out)]
    p = subprocess.Popen([sys.executable, str(HERE / "train_mini.py"), *flags], cwd=HERE, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    p.kill()
    p.wait()
    ck = lm.read_checkpoint(out / "checkpoint.pt")               # whole, and its checksum holds
    assert ck["step"] % 3 == 0 and 0 < ck["step"] < 100 and ck["batch_in_epoch"] == ck["step"]
    rc, _, se = run_cli(*flags, "--resume", out / "checkpoint.pt")
    assert rc == 0, se
    straight = tmp_path / "straight"
    rc, _, se = run_cli(*[f if f != str(out) else str(straight) for f in flags])
    assert rc == 0, se
    a, b = torch.load(out / "checkpoint.pt"), torch.load(straight / "checkpoint.pt")
    assert a["step"] == b["step"] == 100
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


@pytest.mark.slow
@needs_fashion
def test_zero_steps_and_unwritable_out_are_refused(tmp_path):
    rc, _, se = run_cli(*TINY, "--epochs", "0.01", "--out", tmp_path / "z")   # 3 steps an epoch: 0.03 steps
    _assert_clean_failure(rc, se, "is not one step")
    (tmp_path / "file").write_text("x")
    rc, _, se = run_cli(*TINY, "--out", tmp_path / "file")
    _assert_clean_failure(rc, se, "cannot be created or written")
    rc, _, se = run_cli(*TINY, "--out", "/proc/localmamba-run")
    _assert_clean_failure(rc, se, "cannot be created or written")


@pytest.mark.slow
def test_resume_alone_continues_the_run_as_configured(tmp_path, finished_run, capsys):
    """--resume and nothing else (what Ctrl-C's message suggests) continues the run exactly as it was
    configured: its lr, length and EMA; a flag given again that differs is refused; best.pt does not
    replace the folder's checkpoint.pt; a temporary file a dead writer left is removed."""
    run = [*TINY, "--epochs", "3", "--lr", "0.002", "--ema-decay", "0.9", "--seed", "4"]
    rc, _, se = run_cli(*run, "--out", tmp_path / "straight")
    assert rc == 0, se
    rc, _, se = run_cli(*run, "--max-steps", "4", "--out", tmp_path / "split")
    assert rc == 0, se
    ck = tmp_path / "split" / "checkpoint.pt"
    for flags, needle in ((["--seed", "1"], "--seed 4, not 1"), (["--train-per-class", "4"], "--train-per-class 3, not 4"),
                          (["--epochs", "1"], "--epochs 3.0, not 1.0"), (["--blr", "0.1"], "--blr"),
                          (["--warmup-epochs", "1"], "--warmup-epochs 0.05, not 1.0"),     # (the default's)
                          (["--no-scattn"], "--no-scattn False, not True"),             # on/off flags too
                          (["--wd-exempt-ssm"], "--wd-exempt-ssm False, not True")):
        with pytest.raises(SystemExit) as e:                      # refused before any setup: in this process
            train_mini.main(["--resume", str(ck), *flags])
        _assert_clean_failure(e.value.code, capsys.readouterr().err, needle)
    (tmp_path / "split" / f"checkpoint.pt.tmp-{2 ** 22 + 1}").write_bytes(b"half")     # a writer that died
    rc, so, se = run_cli("--resume", ck, "--print-every", "0")
    assert rc == 0 and "lr 0.002 (--lr)" in so, se
    a, b = torch.load(tmp_path / "straight" / "checkpoint.pt"), torch.load(ck)
    assert a["step"] == b["step"] == 9 and b["config"]["ema_decay"] == 0.9
    for key in ("model", "model_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert not list((tmp_path / "split").glob("*.tmp-*"))
    rc, _, se = run_cli("--resume", finished_run / "best.pt")
    _assert_clean_failure(rc, se, "would continue in", "replace its checkpoint.pt", "--out NEW_FOLDER")


@pytest.mark.slow
def test_resume_with_another_batch_size_needs_consent(finished_run):
    other = [a if a != "10" else "5" for a in TINY]           # --batch-size 5
    rc, _, se = run_cli(*other, "--resume", finished_run / "checkpoint.pt")
    _assert_clean_failure(rc, se, "--batch-size 10", "--allow-changed-batch")
    rc, so, se = run_cli(*other, "--resume", finished_run / "checkpoint.pt", "--allow-changed-batch")
    assert rc == 0 and "batch 10 x 1 -> 5 x 1" in so, se
    ck = torch.load(finished_run / "checkpoint.pt")
    assert ck["step"] == 12 and ck["config"]["batch_size"] == 5    # 6 steps of 5 an epoch; resumed at 20 images = 4


@pytest.mark.slow
@needs_fashion
def test_best_checkpoint_and_absolute_lr(tmp_path):
    rc, so, se = run_cli(*TINY, "--epochs", "2", "--lr", "0.002", "--out", tmp_path / "r")
    assert rc == 0 and "lr 0.002 (--lr)" in so, se
    config, evals = read_log(tmp_path / "r", "val")
    best = torch.load(tmp_path / "r" / "best.pt")
    assert config["lr_used"] == 0.002 and best["best_top1"] == max(e["top1"] for e in evals)
    assert best["epoch"] == max(evals, key=lambda e: e["top1"])["epoch"]
    rc, so, se = run_cli(*TINY, "--max-steps", "1", "--out", tmp_path / "d")
    assert rc == 0 and "lr 0.00125 (= --blr 0.128 × 10 / 1024)" in so, se


# =============================================================================
# 9. The small-scale study (experiments/study_scans.py)



def _load_experiment(name):
    """experiments/NAME.py as a module (a script in a folder, not a package)."""
    spec = importlib.util.spec_from_file_location(name, HERE / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


study_scans = _load_experiment("study_scans")


STUDY = ["--seeds", "1", "--max-steps", "2", "--val-per-class", "2", "--test-per-class", "2", "--batch-size", "10"]


@pytest.mark.parametrize("argv, needle", [
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--batch-size", "0"], "--batch-size must be a finite number > 0"),
    (["--max-steps", "0"], "--max-steps must be a finite number > 0"),      # (0 trained every run to its end)
    (["--out", "FILE"], "cannot be created"),
])
def test_the_study_checks_the_trainers_flags_first(argv, needle, tmp_path, capsys, monkeypatch):
    (tmp_path / "FILE").write_text("a file")
    monkeypatch.setattr(study_scans, "run_arms", lambda *a: pytest.fail("a run started despite a bad flag"))
    with pytest.raises(SystemExit) as e:
        study_scans.main([a.replace("FILE", str(tmp_path / "FILE")) for a in argv] + ["--seeds", "1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and needle in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(study_scans, "run_study", lambda args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit) as e:
        study_scans.main(["--seeds", "1"])
    assert e.value.code == 130 and "run the same command again" in capsys.readouterr().err


@pytest.mark.slow
def test_study_help_runs():
    rc, so, se = run_cli("--help", script="experiments/study_scans.py")
    assert rc == 0 and "--seeds" in so and "--train-per-class" in so, se


def test_study_compares_found_lists_with_the_published_ones():
    pub = lm.SEARCHED_DIRECTIONS["local_vim_tiny"]
    same = study_scans.compare_with_published(pub)
    assert same["layers_agreeing"] == 20 and all(r["mean_overlap_of_4"] == 4 for r in same["per_layer"])
    assert same["dominant_ours"] == same["dominant_published"] and same["chance_overlap"] == 2.0
    # 3 layers against 20: layer i stands for the published layers at the same relative depth
    three = study_scans.compare_with_published([pub[0], ["h", "h_flip", "w2", "w2_flip"], pub[19]])
    assert [r["published_layers"] for r in three["per_layer"]] == [list(range(0, 7)), list(range(7, 14)),
                                                                     list(range(14, 20))]
    assert [r["same_set_as"] > 0 for r in three["per_layer"]] == [True, False, True]
    assert three["layers_agreeing"] == 2


@pytest.mark.slow
@needs_fashion
def test_study_runs_end_to_end_on_a_tiny_budget(tmp_path):
    rc, so, se = run_cli(*STUDY, "--train-per-class", "4", "--search-seeds", "2", "--out", tmp_path / "study",
                         timeout=900, script="experiments/study_scans.py")
    assert rc == 0, se
    res = json.loads((tmp_path / "study" / "results.json").read_text())
    assert [f["seed"] for f in res["searches"]] == [0, 1] and len(res["search"]["same_per_layer"]) == NANO_DEPTH
    seed1 = json.loads((tmp_path / "study" / "search-seed1" / "directions.json").read_text())
    assert res["searches"][1]["directions"] == seed1["directions"] != []
    assert res["search"]["same_per_layer"] == [set(a) == set(b) for a, b in zip(res["searches"][0]["directions"],
                                                                                 seed1["directions"])]
    assert res["search"]["shared_per_layer"] == [len(set(a) & set(b)) for a, b in zip(
        res["searches"][0]["directions"], seed1["directions"])]
    assert len(res["search"]["decided_per_layer"]) == len(res["search"]["seed_spread_per_layer"]) == NANO_DEPTH
    assert (tmp_path / "study" / "search_margins.png").exists() == (study_scans._pyplot() is not None)
    arm_e, _ = read_log(tmp_path / "study" / "e_searched-seed0")      # arm (e) trains with seed 0's choice
    assert arm_e["directions"] == res["searches"][0]["directions"]
    assert set(res["arms"]) == set(study_scans.ARMS)
    for arm, r in res["arms"].items():     # each run's test top-1 (its log's test record), not a validation figure
        _, test = read_log(tmp_path / "study" / f"{arm}-seed0", "test")
        assert r["top1"] == [test[-1]["top1"]] and 0 <= r["mean"] <= 100
    assert len(res["search"]["directions"]) == NANO_DEPTH
    assert len(res["compare_with_local_vim_tiny"]["per_layer"]) == NANO_DEPTH
    table = (tmp_path / "study" / "results.md").read_text()
    assert table.count("\n") == 2 + len(study_scans.ARMS)
    assert (tmp_path / "study" / "search_heat_map_seed1.txt").exists()
    cfg, _ = read_log(tmp_path / "study" / "d_local_no_scattn-seed0")
    assert cfg["no_scattn"] is True
    if (tmp_path / "study" / "results.png").exists() or res["results_png"]:
        assert res["results_png"] and (tmp_path / "study" / "results.png").stat().st_size > 0

    # the same command again: every finished run is read back, nothing retrained or rewritten
    study = tmp_path / "study"
    logs = {p: p.read_bytes() for p in study.glob("*/log.jsonl")}
    assert len(logs) == 2 + len(study_scans.ARMS)     # two searches + one seed per arm
    # ...except two runs "killed" midway: one after its checkpoint (resumed from it), one before
    # its first checkpoint (moved aside, never deleted, and trained again)
    for name in ("b_global_hv-seed0", "c_local-seed0"):
        (study / name / "log.jsonl").write_text((study / name / "log.jsonl").read_text().splitlines()[0] + "\n")
    (study / "c_local-seed0" / "checkpoint.pt").unlink()
    rc, so, se = run_cli(*STUDY, "--train-per-class", "4", "--search-seeds", "2", "--out", study, timeout=900,
                         script="experiments/study_scans.py")
    assert rc == 0, se
    again = json.loads((study / "results.json").read_text())
    assert again["reused_runs"] == len(logs) - 2
    assert "resumed from" in so
    for p, before in logs.items():
        if p.parent.name not in ("b_global_hv-seed0", "c_local-seed0"):
            assert p.read_bytes() == before, p
    aside = list(study.glob("c_local-seed0.incomplete-*"))
    assert len(aside) == 1 and (aside[0] / "log.jsonl").exists()
    for arm in ("b_global_hv", "c_local"):
        _, recs = read_log(study / f"{arm}-seed0", "test")
        assert recs and recs[-1]["step"] == 2
    assert again["arms"]["a_global_h"]["top1"] == res["arms"]["a_global_h"]["top1"]
    # a study folder holds one setup: other settings are refused, nothing is touched
    rc, so, se = run_cli(*STUDY, "--train-per-class", "5", "--out", study, timeout=900,
                         script="experiments/study_scans.py")
    assert rc == 2 and "train_per_class=4" in se and "another --out" in se, se
    assert (study / "results.json").read_text() == json.dumps(again, indent=1)
    other = tmp_path / "fashion-elsewhere"          # ...and so is other data: its runs are not reused
    other.mkdir()
    for f in FASHION.glob("*.gz"):
        (other / f.name).symlink_to(f)
    rc, so, se = run_cli(*STUDY, "--train-per-class", "4", "--search-seeds", "2", "--data-dir", other, "--out",
                         study, timeout=900, script="experiments/study_scans.py")
    assert rc == 2 and "was trained on the data in" in se and str(other) in se, se
    assert (study / "results.json").read_text() == json.dumps(again, indent=1)


@pytest.mark.parametrize("argv, needle", [
    (["--arms", "z_nothing"], "--arms z_nothing: the 14×14 study's arms are a_global_h"),
    (["--grid", "28", "--arms", "a_global_h"], "--arms a_global_h: the 28×28 study's arms are b_global_hv"),
    (["--arms", ","], "--arms (none)"), (["--search-seeds", "0"], "--search-seeds must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1"), (["--search-epochs", "nan"], "--search-epochs must be a"),
    (["--grid", "21"], "argument --grid: invalid choice"),
])
def test_the_study_refuses_bad_flags_of_its_own(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        study_scans.parse_args(argv)
    assert e.value.code == 2 and needle in capsys.readouterr().err


def test_the_studys_arms_differ_only_in_their_directions():
    for grid, (model, arms) in study_scans.GRIDS.items():
        assert create_model(model, in_chans=1).cfg.grid == (grid, grid)
        fixed = {a: d for a, (_, d, scattn) in arms.items() if d != "search"}
        assert all(len(d) == 1 and len(d[0]) == 4 for a, d in fixed.items() if a != "a_global_h")
    assert study_scans.ARMS_28["c_local_w2"][1] == [["h", "h_flip", "w2", "w2_flip"]]
    assert study_scans.ARMS_28["f_local_w7"][1] == [["h", "h_flip", "w7", "w7_flip"]]
    assert study_scans.ARMS_28["b_global_hv"][1] == [["h", "h_flip", "v", "v_flip"]]


def test_a_search_summary_says_how_decided_it_is(tmp_path):
    probs = [[0.3, 0.2, 0.15, 0.12, 0.1, 0.06, 0.04, 0.03], [0.125] * 8]
    early = [[0.16, 0.14, 0.1, 0.09, 0.2, 0.18, 0.08, 0.05], [0.125] * 8]
    (tmp_path / "directions.json").write_text(json.dumps({"directions": [["h", "h_flip", "v", "v_flip"]] * 2,
                                                          "probabilities": probs}))
    recs = [{"total_steps": 4}, {"split": "val", "epoch": 1, "search_probs": early},
            {"split": "val", "epoch": 2, "search_probs": probs}, {"split": "test", "epoch": 2, "search_probs": probs}]
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    found = study_scans.search_summary(tmp_path)
    assert found["margin_4th_5th"] == [0.02, 0.0]
    assert [h["epoch"] for h in found["top4_per_eval"]] == [1, 2]          # the validation records, not the test
    assert found["top4_per_eval"][0]["top4"][0] == ["h", "h_flip", "w2", "w2_flip"]      # canonical order
    assert found["top4_per_eval"][1]["top4"][0] == ["h", "h_flip", "v", "v_flip"]
    assert [h["margins"] for h in found["top4_per_eval"]] == [[0.04, 0.0], [0.02, 0.0]]   # 4th − 5th per eval


def test_a_layer_counts_as_decided_only_when_every_seed_clears_the_spread_and_holds_its_top4():
    A, B, C = ["h", "h_flip", "v", "v_flip"], ["h", "h_flip", "v", "w2"], ["w2", "w2_flip", "w7", "w7_flip"]
    seed0 = [[0.30, 0.20, 0.15, 0.12, 0.06, 0.06, 0.06, 0.05],     # layer 0: margin 0.06, clear of the spread
             [0.20, 0.20, 0.20, 0.15, 0.05, 0.05, 0.05, 0.10],     # layer 1: seed 0 clears, seed 1 does not
             [0.25, 0.25, 0.20, 0.20, 0.03, 0.03, 0.02, 0.02]]     # layer 2: clear, but its top 4 moved late
    seed1 = [[0.29, 0.21, 0.14, 0.13, 0.06, 0.05, 0.06, 0.06],
             [0.20, 0.20, 0.20, 0.10, 0.09, 0.05, 0.06, 0.10],
             [0.25, 0.25, 0.20, 0.20, 0.03, 0.03, 0.02, 0.02]]
    history = [[C, A, A]] + [[A, A, A]] * 3 + [[A, A, B], [A, A, A]]   # 6 epoch ends: the last third is 2
    searches = [{"probabilities": p, "margin_4th_5th": m, "top4_per_eval": [{"top4": t} for t in history]}
                for p, m in ((seed0, [0.06, 0.10, 0.17]), (seed1, [0.07, 0.01, 0.17]))]
    decided, spread = study_scans.decided_per_layer(searches)
    assert spread == pytest.approx([0.01, 0.05, 0.0])
    assert decided == [True, False, False]   # layer 0's early change (epoch 1) is outside the last third
    for f in searches:                       # a two-evaluation history: "at least the last two" are both of them
        f["top4_per_eval"] = [{"top4": t} for t in ([A, A, B], [A, A, A])]
    assert study_scans.decided_per_layer(searches)[0] == [True, False, False]   # layer 2 moved between the two


receptive_field = _load_experiment("receptive_field")


class _ConvTokens(nn.Module):
    """A stand-in with LocalVim's interface whose tokens see exactly a 3×3 neighbourhood of pixels
    (with weights of both signs: a signed gradient would cancel over images)."""

    def __init__(self, grid, patch):
        super().__init__()
        self.cfg = SimpleNamespace(grid=(grid, grid), patch_size=patch)
        self.conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(4, 1, 3, 3))
        self.patch = patch

    def forward_features(self, x):
        t = self.conv(x)
        t = F.avg_pool2d(t, self.patch) if self.patch > 1 else t
        return t.flatten(2).transpose(1, 2)                # (B, L, D)


def test_the_receptive_field_of_a_model_that_sees_3x3():
    torch.manual_seed(0)
    m = _ConvTokens(9, 1)
    x = torch.randn(40, 1, 9, 9)
    erf = receptive_field.effective_receptive_field(m, x, batch_size=7)
    want = torch.zeros(9, 9)
    for img in x:                                          # one image at a time, by hand
        xi = img[None].clone().requires_grad_(True)
        m.forward_features(xi)[:, 4 * 9 + 4].relu().sum().backward()
        want += xi.grad.abs()[0, 0]
    torch.testing.assert_close(erf, want / len(x))
    outside = erf.clone()
    outside[3:6, 3:6] = 0
    assert (erf[3:6, 3:6] > 0).all() and (outside == 0).all()
    shares = receptive_field.field_shares(erf)
    assert shares["in_3x3"] == 1.0 and shares["in_7x7"] == 1.0 and shares["half_in_square_of_side"] == 3
    assert shares["own"] == round(float(erf[4, 4] / erf.sum()), 4)
    # patch 2: the pixels of a token are added up, one value per token
    m2 = _ConvTokens(4, 2)
    x2 = torch.randn(6, 1, 8, 8)
    erf2 = receptive_field.effective_receptive_field(m2, x2)
    assert erf2.shape == (4, 4)
    full = torch.zeros(8, 8)
    for img in x2:
        xi = img[None].clone().requires_grad_(True)
        m2.forward_features(xi)[:, 2 * 4 + 2].relu().sum().backward()
        full += xi.grad.abs()[0, 0]
    torch.testing.assert_close(erf2, (full / len(x2)).view(4, 2, 4, 2).sum((1, 3)))


def test_field_shares_count_the_centre_apart():
    erf = torch.zeros(9, 9)
    erf[4, 4], erf[4, 8], erf[1, 4], erf[5, 5], erf[0, 0] = 10.0, 1.0, 1.0, 1.0, 1.0   # row, column, diagonal
    s = receptive_field.field_shares(erf)             # the 7×7 square holds (1, 4) and (5, 5): half of the rest
    assert s == {"own": 0.7143, "in_3x3": 0.25, "in_7x7": 0.5, "in_row_and_column": 0.5,
                 "half_in_square_of_side": 7}
    assert "@" in receptive_field.draw_text(erf, "x").splitlines()[1 + 4 // 1]


def test_keep_freed_memory_applies_under_glibc():
    import platform
    applied = localmamba_run.keep_freed_memory()
    assert applied is (platform.libc_ver()[0] == "glibc")


@pytest.mark.slow
@needs_fashion
def test_the_28_grid_study_and_its_receptive_field_end_to_end(tmp_path):
    study = tmp_path / "s28"
    rc, so, se = run_cli(*STUDY, "--grid", "28", "--train-per-class", "2", "--out", study, timeout=900,
                         script="experiments/study_scans.py")
    assert rc == 0, se
    res = json.loads((study / "results.json").read_text())
    assert res["grid"] == 28 and list(res["arms"]) == list(study_scans.ARMS_28) and "searches" not in res
    for arm, r in res["arms"].items():
        cfg, test = read_log(study / f"{arm}-seed0", "test")
        assert cfg["model"] == "local_vim_nano_p1" and r["top1"] == [test[-1]["top1"]]
        assert cfg["directions"] == study_scans.ARMS_28[arm][1] * NANO_DEPTH
        assert ("minus_reference" in r) == (arm != "b_global_hv")
    # the same folder asked for the 14×14 study: its runs are of another model, refused
    rc, so, se = run_cli(*STUDY, "--train-per-class", "2", "--arms", "b_global_hv", "--out", study,
                         script="experiments/study_scans.py")
    assert rc == 2 and "model='local_vim_nano_p1'" in se and "another --out" in se, se
    out = tmp_path / "rf" / "field.png"
    rc, so, se = run_cli(study, "--images", "3", "--out", out, script="experiments/receptive_field.py")
    assert rc == 0, se
    rf = json.loads(out.with_suffix(".json").read_text())
    assert list(rf["arms"]) == sorted(study_scans.ARMS_28) and rf["images"] == 3
    assert all(len(rf["field"][a]) == 28 and rf["arms"][a]["models"] == 1 for a in rf["arms"])
    assert out.with_suffix(".txt").read_text().count("in_3x3") == 3
    assert rf["png"] == out.exists()
    rc, so, se = run_cli(tmp_path / "nothing", script="experiments/receptive_field.py")
    assert rc == 2 and se.startswith("error: ") and "is not a folder" in se
