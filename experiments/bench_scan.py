"""
experiments/bench_scan.py: the selective scan's timing table (a measurement, never a test).

    python experiments/bench_scan.py [--reps 5]

Times the backends of scan_kernel.py available here, forward and forward+backward with z, D,
delta_bias and softplus, at two shapes (a Vim-T layer, one direction; the default run's training
call, 4 directions grouped); with a GPU also the LocalVim-T layer at batch 128, Triton (and
mamba_ssm where it is installed) with the GB/s reached against the bytes a call must move. On the
CPU, beside them, the arithmetic floor (`floor_ms`): the scan's vector arithmetic alone, at the
rate this machine runs it. docs/scan.md holds the figures. experiments/bench_scan_vs_commit.py
reuses the inputs and the floor.
"""
import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import scan_kernel  # noqa: E402
import scan_kernel_cpu  # noqa: E402


def _bench_inputs(batch, dim, N, L, G, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)
    t = dict(u=r(batch, dim, L).to(dtype), delta=(0.5 * r(batch, dim, L)).to(dtype), A=-torch.exp(0.5 * r(dim, N)),
             B=r(batch, G, N, L).to(dtype), C=r(batch, G, N, L).to(dtype), D=r(dim), z=r(batch, dim, L).to(dtype),
             delta_bias=0.3 * r(dim))
    return {k: v.to(device).requires_grad_() for k, v in t.items()}


def _min_bytes_fwd(batch, dim, N, L, G, dtype):
    """Bytes a fused forward must move at least: u, delta, z, B, C read once, out written once."""
    e = torch.finfo(dtype).bits // 8
    return 4 * batch * dim * L * e + 2 * batch * G * N * L * e


def _time_cpu(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _bench_call(be, x):
    """The scan call of one benchmark row, on inputs x: a backend of this file, or mamba_ssm's."""
    if be == "mamba_ssm":
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        return lambda: selective_scan_fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"],
                                         x["delta_bias"], True)
    fn = scan_kernel._BACKENDS[be]
    opt = dict(compile=False) if be == "torch" else {}
    return lambda: fn(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"], delta_bias=x["delta_bias"],
                      delta_softplus=True, **opt)


def _bench_row(be, dev, dtype, shape, reps):
    """(forward ms, forward+backward ms) of one backend at one shape: do_bench on CUDA, the median
    of reps on the CPU (2 for the slow loop at the large shape), after a warm-up that compiles."""
    batch, dim, N, L, G = shape
    x = _bench_inputs(batch, dim, N, L, G, dtype, dev)
    call = _bench_call(be, x)
    dout = torch.randn_like(x["u"])
    fwd_bwd = lambda: call().backward(dout)
    if dev == "cuda":
        from triton.testing import do_bench
        with torch.no_grad():
            t_f = do_bench(call, return_mode="median")
        return t_f, do_bench(fwd_bwd, return_mode="median")
    n = 2 if (be == "ref" and batch * dim > 20000) else reps
    call(), fwd_bwd()  # warm-up (and compile)
    with torch.no_grad():
        t_f = _time_cpu(call, n)
    return t_f, _time_cpu(fwd_bwd, n)


_FLOOR = scan_kernel_cpu.COMMON + r'''
#include <omp.h>
// The arithmetic the scan needs, on values kept in registers, with the kernels' own exp2v,
// softplus and sigmoid; no loads, no stores, no reductions. part 0, per (VL channels x 1 state x
// 1 step): forward exp2(Δ A) and 3 multiply(-add)s; backward the same recomputed, then 10
// multiply(-add)s of the reverse scan and the gradients. part 1, per (VL channels x 1 step): Δ =
// softplus (forward, and again in backward), the gate silu(z) and its derivative, softplus's
// derivative sigmoid, and the multiply-adds around them.
extern "C" void kernel(float* out, int64_t iters, int64_t part) {
    #pragma omp parallel
    {
        const int id = omp_get_thread_num();
        Vec a(-0.31f - 0.01f * id), ab(-0.29f), dt(0.01f), step(1e-9f), B(0.5f), C(0.25f), g(0.1f);
        Vec x(0.f), y(0.f), xb(0.f), dh(0.f), wA(0.f), dA(0.f), hB(0.f), yb(0.f), dB(0.f), dC(0.f);
        for (int64_t i = 0; i < iters && part == 0; i++) {                   // one vector-step each
            dt = dt + step;
            const Vec dtu = dt * B;
            const Vec e = exp2v(a * dt);                                      // forward
            x = at::vec::fmadd(e, x, dtu); y = at::vec::fmadd(x, C, y);
            const Vec eb = exp2v(ab * dt), xp = xb;                           // backward: the recompute
            xb = at::vec::fmadd(eb, xb, dtu);
            dh = at::vec::fmadd(g, C, dh);                                    // the reverse scan, the gradients
            const Vec w = dh * eb * xp;
            wA = at::vec::fmadd(w, ab, wA); dA = at::vec::fmadd(w, dt, dA); hB = at::vec::fmadd(dh, B, hB);
            yb = at::vec::fmadd(xb, C, yb); dB = at::vec::fmadd(dh, dtu, dB); dC = at::vec::fmadd(xb, g, dC);
            dh = dh * eb;
        }
        for (int64_t i = 0; i < iters && part == 1; i++) {                   // one vector of channel-steps each
            dt = dt + step;
            const Vec raw = dt - a, z = dt + g;
            x = x + softplus(raw) * B;                                        // forward: Δ, the gate
            const Vec sz = sigmoid(z);
            y = at::vec::fmadd(x, z * sz, y);
            xb = xb + softplus(raw + C);                                      // backward: Δ again, the gate's and
            const Vec sb = sigmoid(z + C), sr = sigmoid(raw);                 // softplus's derivatives
            dh = at::vec::fmadd(wA * sb, Vec(1.f) + z * (Vec(1.f) - sb), dh);
            wA = at::vec::fmadd(hB, sr, wA); hB = at::vec::fmadd(dt, g, hB);
        }
        out[id] = hsum(x + y + xb + dh + wA + dA + hB + yb + dB + dC);
    }
    out[255] = VL;
}
'''


def floor_ms(shape, iters=1 << 21):
    """The CPU floor of one fwd+bwd at shape (batch, D, N, L, G), in ms: the scan's vector
    arithmetic (`_FLOOR`) timed on all threads, at the rate this machine's vector units run it:
    batch·D·L·N state-steps of part 0 plus batch·D·L channel-steps of part 1, each divided by
    the vector width. No memory traffic, no reductions: a lower bound. Each part: best of 5."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache
    k = CppPythonBindingsCodeCache.load_pybinding(["float*", "int64_t", "int64_t"], _FLOOR % dict(N=1, T=1))
    out = torch.zeros(256)
    per_step = []
    for part in (0, 1):
        k(out, 1 << 16, part)                                                 # warm-up
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            k(out, iters, part)
            best = min(best, time.perf_counter() - t0)
        per_step.append(best / (iters * torch.get_num_threads()))           # s per vector-step on one thread
    batch, dim, N, L, G = shape
    vector_steps = batch * dim * L / out[255].item()                          # out[255]: the vector width
    return vector_steps * (N * per_step[0] + per_step[1]) * 1e3


def bench(reps=5):
    """Print one table: shape, backend, forward ms, forward+backward ms (median of reps),
    speed-up over the plain autograd loop timed in the same run, and on CUDA the GB/s reached
    against the bytes the call must move; on the CPU, the arithmetic floor of each shape."""
    rows = []
    cuda = torch.cuda.is_available()
    shapes = [  # (name, batch, D, N, L, G)
        ("Vim-T layer, 1 direction (2,384,16,197)", 2, 384, 16, 197, 1),
        ("train_mini default (64,256,16,196,G=4)", 64, 256, 16, 196, 4),
    ]
    if cuda:
        shapes.append(("Vim-T layer, K=4 grouped (128,1536,16,197,G=4)", 128, 1536, 16, 197, 4))
    has_mamba = importlib.util.find_spec("mamba_ssm") is not None      # compared with where it is installed
    for name, batch, dim, N, L, G in shapes:
        backends = [("ref", "cpu"), ("torch", "cpu"), ("cpu", "cpu")] if not cuda or batch * dim <= 20000 else []
        backends += [("torch", "cuda"), ("triton", "cuda")] + [("mamba_ssm", "cuda")] * has_mamba if cuda else []
        base = None
        for be, dev in backends:
            for dtype in ([torch.float32] if dev == "cpu" else [torch.float32, torch.bfloat16]):
                t_f, t_fb = _bench_row(be, dev, dtype, (batch, dim, N, L, G), reps)
                base = t_fb if be == "ref" and dtype == torch.float32 else base
                bf = _min_bytes_fwd(batch, dim, N, L, G, dtype)
                gbs = f"{bf / t_f / 1e6:.0f} GB/s fwd (floor {bf / 3.0e9 * 1e3:.3f} ms at 3 TB/s)" * (dev == "cuda")
                rows.append((name, f"{be} {dev} {str(dtype).replace('torch.', '')}", f"{t_f:.2f}", f"{t_fb:.2f}",
                             f"{base / t_fb:.1f}x" if base else "", gbs))
                print(" | ".join(rows[-1]), flush=True)
        if any(dev == "cpu" for _, dev in backends):
            rows.append((name, "floor (vector arithmetic only)", "", f"{floor_ms((batch, dim, N, L, G)):.2f}", "", ""))
            print(" | ".join(rows[-1]), flush=True)
    dev = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    tri = f", triton {scan_kernel.triton.__version__}" if scan_kernel.HAS_TRITON else ""
    print(f"\nselective scan, with z, D, delta_bias, softplus; {dev}; torch {torch.__version__}"
          f"{tri}; median of {reps} (CPU) or do_bench (CUDA)\n")
    print_table(("shape", "backend", "fwd ms", "fwd+bwd ms", "fwd+bwd vs ref loop", "bandwidth"), rows)


def print_table(header, rows):
    """A markdown table: the header, then one row per tuple of cells."""
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="time the selective scan's backends available here (a measurement)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per row, after a warm-up (median)")
    args = ap.parse_args()
    if args.reps < 1:
        sys.exit("error: --reps must be at least 1")
    bench(args.reps)
