"""
test_localmamba.py: every fast path against the naive reference, the models against the facts
of the official code (../shared/SPEC.md), the trainer end to end.

Run: `python -m pytest -q test_localmamba.py` (README.md). The Triton kernels run on the CPU
under TRITON_INTERPRET=1, which must be set before triton is imported: this file sets it
first. Shapes are small on purpose: the interpreter runs the same kernel code, slowly.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import itertools

import pytest
import torch
import torch.nn.functional as F

import scan_kernel
from scan_kernel import selective_scan, selective_scan_ref

needs_triton = pytest.mark.skipif(not scan_kernel.HAS_TRITON, reason="triton is not installed")


# =============================================================================
# 1. the selective scan

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
    """An independent float64 loop, written here from SPEC.md §1 (not from scan_kernel):
    explicit group index per channel, softplus written out, the state as a python list."""
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
    t = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    args = dict(D=t["D"] if use_D else None, z=t["z"] if use_z else None,
                delta_bias=t["delta_bias"] if use_bias else None, delta_softplus=softplus)
    out, last = fn(t["u"], t["delta"], t["A"], t["B"], t["C"], **args, **kw)
    out.backward(dout.to(out.dtype))
    grads = {k: v.grad for k, v in t.items() if v.grad is not None}
    return out, last, grads


def rel_err(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_scan_close(got, want, tol, what):
    """Relative L2 error and max error relative to the largest element, both under tol."""
    out, last, grads = got
    out_w, last_w, grads_w = want
    pairs = [("out", out, out_w), ("last_state", last, last_w)] + [(f"d{k}", grads[k], grads_w[k]) for k in grads_w]
    assert set(grads) == set(grads_w), f"{what}: gradients for {sorted(grads)} but expected {sorted(grads_w)}"
    for name, a, b in pairs:
        assert torch.isfinite(a).all(), f"{what}: {name} has non-finite values"
        e = rel_err(a, b)
        m = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()
        assert e < tol and m < tol, f"{what}: {name} rel L2 error {e:.2e}, rel max error {m:.2e} (tol {tol:.0e})"


FLAGS = list(itertools.product([False, True], repeat=4))  # (D, z, delta_bias, softplus)


@pytest.mark.parametrize("backend", ["ref", "torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: "D{}z{}b{}sp{}".format(*map(int, f)))
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
]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{batch}d{dim}L{L}N{N}G{G}".format(**s) + ("" if s.get("grouped", True) else "_3d"))
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


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_half_precision(backend, dtype):
    """bf16/fp16 u, delta, z: fp32 state and arithmetic inside, output in u's dtype. Compared
    with the float64 loop on the same rounded inputs; the error is the output rounding
    (bf16 keeps 8 bits: 2^-8 = 4e-3) plus the gradients' rounding to the input dtype."""
    inp = scan_inputs(batch=2, dim=12, L=40, N=8, G=2, dtype=dtype, seed=6)
    flags = (True, True, True, True)
    dout = torch.randn(2, 12, 40, generator=torch.Generator().manual_seed(7))
    got = run_scan(selective_scan, inp, flags, dout, return_last_state=True, backend=backend)
    want = run_scan(loop_float64, {k: v.double() for k, v in inp.items()}, flags, dout.to(dtype))
    assert got[0].dtype == dtype and got[2]["u"].dtype == dtype and got[2]["A"].dtype == torch.float32
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert_scan_close(got, want, tol, f"{backend} {dtype}")


@pytest.mark.parametrize("backend", ["ref", "torch"])
def test_scan_gradcheck_float64(backend):
    inp = {k: v.double() for k, v in scan_inputs(batch=1, dim=4, L=6, N=3, G=2, seed=8).items()}
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    args = [inp[k].requires_grad_() for k in names]

    def f(u, delta, A, B, C, D, z, bias):
        return selective_scan(u, delta, A, B, C, D=D, z=z, delta_bias=bias, delta_softplus=True, backend=backend)

    assert torch.autograd.gradcheck(f, args, eps=1e-6, atol=1e-7, rtol=1e-6)


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


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_scan_saves_no_per_state_tensor_for_backward(backend):
    """What the fast paths keep for backward is O(batch·D·L) plus chunk checkpoints, never the
    (batch, D, L, N) states that the ref path (autograd through the loop) keeps."""
    batch, dim, L, N, G = 2, 8, 64, 16, 2
    inp = {k: v.requires_grad_() for k, v in scan_inputs(batch=batch, dim=dim, L=L, N=N, G=G).items()}
    call = lambda be: selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], D=inp["D"], z=inp["z"],
                                     delta_bias=inp["delta_bias"], delta_softplus=True, backend=be)
    sizes = _saved_numels(lambda: call(backend))
    full_states = batch * dim * L * N
    assert max(sizes) < full_states / 2, f"{backend} saved a tensor of {max(sizes)} elements"
    inputs = sum(t.numel() for t in inp.values())
    checkpoints = batch * dim * N * -(-L // 4)   # one state per chunk of >= 4 steps
    assert sum(sizes) <= inputs + checkpoints, f"{backend} saved {sum(sizes)} elements in all"
    assert sum(_saved_numels(lambda: call("ref"))) > full_states  # the test can see the difference


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
    (dict(delta=torch.randn(2, 8, 5, dtype=torch.float64)), r"delta must have u's dtype"),
    (dict(A=torch.randn(8, 4, device="meta")), r"all tensors must be on one device"),
])
def test_scan_bad_input_raises_value_error(over, match):
    with pytest.raises(ValueError, match=match):
        _bad_call(**over)()


def test_scan_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan(*[scan_inputs(batch=1, dim=2, L=2, N=2, G=1)[k] for k in ("u", "delta", "A", "B", "C")], backend="cuda")
