"""Time the CPU scan of this checkout against scan_kernel.py at an earlier commit, in one process.

    python experiments/bench_scan_vs_commit.py --base b9ba758 [--reps 7]

For both shapes of experiments/bench_scan.py (a Vim-T layer, one direction; the default run's training shape),
fwd+bwd with D, z, delta_bias and softplus: the base commit's compiled CPU path
(`selective_scan_torch(compile=True)` there: its chunk functions through torch.compile), this
checkout's (`compile=True` here: the C++ kernels), interleaved rep by rep so that both see the
same machine, and the arithmetic floor (`bench_scan.floor_ms`). Prints a markdown table.
A measurement, never a test.
"""
import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import scan_kernel  # noqa: E402
from bench_scan import _bench_inputs, floor_ms, print_table  # noqa: E402  (this folder's: the same instruments)

SHAPES = [("Vim-T layer, 1 direction", (2, 384, 16, 197, 1)), ("train_mini default", (64, 256, 16, 196, 4))]


def _git_show(commit, name):
    p = subprocess.run(["git", "show", f"{commit}:{name}"], cwd=ROOT, capture_output=True, text=True)
    return p.stdout if p.returncode == 0 else None


def _module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_base(commit, folder):
    """scan_kernel.py as it was at `commit`, imported under the name scan_kernel_base; from the commits
    where the C++ source lives in scan_kernel_cpu.py, that file of the same commit comes with it."""
    src = _git_show(commit, "scan_kernel.py")
    if src is None:
        sys.exit(f"bench_scan_vs_commit: git cannot show scan_kernel.py at {commit!r}")
    (Path(folder) / "scan_kernel_base.py").write_text(src)
    cpu_src = _git_show(commit, "scan_kernel_cpu.py")
    if cpu_src is None:
        return _module("scan_kernel_base", Path(folder) / "scan_kernel_base.py")
    (Path(folder) / "scan_kernel_cpu_base.py").write_text(cpu_src)
    ours = sys.modules.get("scan_kernel_cpu")
    sys.modules["scan_kernel_cpu"] = _module("scan_kernel_cpu_base", Path(folder) / "scan_kernel_cpu_base.py")
    try:                                       # the base's `import scan_kernel_cpu` takes its own commit's
        return _module("scan_kernel_base", Path(folder) / "scan_kernel_base.py")
    finally:
        sys.modules["scan_kernel_cpu"] = ours


def fwd_bwd(mod, x, dout):
    out = mod.selective_scan_torch(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                                   delta_bias=x["delta_bias"], delta_softplus=True, compile=True)
    out.backward(dout)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the commit to compare with, e.g. b9ba758")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base = load_base(args.base, tmp)
        for name, shape in SHAPES:
            x = _bench_inputs(*shape, torch.float32, "cpu")
            dout = torch.randn_like(x["u"])
            mods = {f"{args.base} compiled": base, "this checkout, compiled": scan_kernel}
            for m in mods.values():
                fwd_bwd(m, x, dout)                                           # warm-up: compiles
            ts = {k: [] for k in mods}
            for _ in range(args.reps):
                for k, m in mods.items():
                    t0 = time.perf_counter()
                    fwd_bwd(m, x, dout)
                    ts[k].append((time.perf_counter() - t0) * 1e3)
            old, new = (statistics.median(v) for v in ts.values())
            floor = floor_ms(shape)
            rows.append((f"{name} {shape[:4]}, G={shape[4]}", f"{old:.1f}", f"{new:.1f}", f"{old / new:.2f}x",
                         f"{floor:.1f}", f"{new / floor:.2f}x"))
            print(" | ".join(rows[-1]), flush=True)
    print(f"\nfwd+bwd ms, median of {args.reps} interleaved reps; CPU, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}\n")
    print_table(("shape", f"{args.base} compiled", "this checkout, compiled", "speed-up", "floor",
                 "this checkout / floor"), rows)


if __name__ == "__main__":
    main()
