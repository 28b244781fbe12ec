"""Time whole-model steps of this checkout against an earlier commit: each measurement a fresh
process, the old code and this checkout in turn, round after round, so that both see the same
machine. A measurement, never a test; its figures are in docs/benchmark.md.

    python experiments/bench_model_vs_commit.py --base 784278e                 # the four cases, 3 rounds
    python experiments/bench_model_vs_commit.py --base 784278e --cases default --busy 2   # beside 2 busy processes
    python experiments/bench_model_vs_commit.py --base 784278e --rounds 1 --profile       # + where the time goes

The cases (`--cases`): LocalVim-T inference at batch 8 and its training step at batch 4, the
LocalVMamba-T training step at batch 2 (224 px), and the default run's training step
(`python train_mini.py`'s model and batch: local_vim_nano, 64 Fashion-MNIST-sized images). Each
process builds the model with seed 0, switches the C++ scan on (as train_mini.py and benchmark.py
do on the CPU), sets glibc to keep freed memory as train_mini.py does (`--malloc default` leaves
glibc's thresholds), takes two warm-up steps and prints the median of --reps timed steps. The base
commit's files come from `git archive` into a temporary folder. `--busy N` starts N processes that
spin (`while True: pass`) for the whole measurement, the contention of a shared machine.
"""
import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CASES = {   # name: (what it is, model, create_model kwargs, batch, "infer" or "train")
    "vim_infer": ("LocalVim-T inference, batch 8", "local_vim_tiny", {}, 8, "infer"),
    "vim_train": ("LocalVim-T training step, batch 4", "local_vim_tiny", {}, 4, "train"),
    "vmamba_train": ("LocalVMamba-T training step, batch 2", "local_vmamba_tiny", {}, 2, "train"),
    "default": ("default run's training step (local_vim_nano, batch 64)", "local_vim_nano",
                dict(in_chans=1, num_classes=10), 64, "train"),
}

# One measurement, a script of its own: it runs in the base commit's folder too, so it imports nothing of this
# checkout's benchmark.py (whose measure() it resembles) and uses only what both codes have.
STEP = r"""
import json, statistics, sys, time
import torch
import torch.nn.functional as F
sys.path.insert(0, ".")
import scan_kernel, localmamba
scan_kernel.use_compiled_torch_path(True)          # the C++ scan, as train_mini.py runs the CPU
name, kwargs, batch, mode, reps = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
profile, malloc = sys.argv[6] == "1", sys.argv[7]
if malloc == "trainer":                            # glibc keeps freed blocks, as train_mini.py sets it
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-3, 1 << 30) and libc.mallopt(-1, (1 << 31) - 1)
torch.manual_seed(0)
model = localmamba.create_model(name, **kwargs).train(mode == "train")
c, h, w = model.pretrained_cfg["input_size"]
x, y = torch.randn(batch, c, h, w), torch.randint(0, model.num_classes, (batch,))
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

def step():
    if mode == "train":
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    else:
        with torch.no_grad():
            model(x)

step(); step()                                     # warm-up: builds (or loads) the C++ kernels
times = []
for _ in range(reps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
shares = {}
if profile:                                        # one more step under the profiler: self time per kind of op
    from torch.profiler import profile as prof
    with prof() as p:
        t0 = time.perf_counter()
        step()
        wall = (time.perf_counter() - t0) * 1e6
    for e in p.key_averages():                     # the rest: the step's wall time less the two (Python's own
        name = e.key.lower()                       # time counts)
        kind = ("scan" if "selectivescan" in name.replace("_", "") or "ordered_scan" in name else
                "matmul+conv" if any(k in name for k in ("mm", "conv", "linear")) else None)
        if kind:
            shares[kind] = shares.get(kind, 0) + e.self_cpu_time_total
    shares["rest"] = max(0.0, wall - sum(shares.values()))
print(json.dumps(dict(ms=statistics.median(times) * 1000, profile=shares)))
"""


def step_ms(folder, case, reps, malloc, profile=False):
    """{ms: the median step of `case`, profile: {scan, matmul+conv, rest: self CPU µs of one more step}
    (with profile)}, in a fresh process running the code in `folder`."""
    _, name, kwargs, batch, mode = CASES[case]
    p = subprocess.run([sys.executable, "-c", STEP, name, json.dumps(kwargs), str(batch), mode, str(reps),
                        str(int(profile)), malloc], cwd=folder, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"bench_model_vs_commit: {case} failed in {folder}:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def export_commit(commit, folder):
    """The base commit's files, via git archive (no checkout, no worktree)."""
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        sys.exit(f"bench_model_vs_commit: git cannot archive {commit!r}: {archive.stderr.decode().strip()}")
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, check=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="the commit to compare with, e.g. 784278e")
    ap.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    ap.add_argument("--rounds", type=int, default=3, help="old/new pairs per case (default 3)")
    ap.add_argument("--reps", type=int, default=5, help="timed steps per process (default 5)")
    ap.add_argument("--busy", type=int, default=0, help="spinning processes beside the measurement (default 0)")
    ap.add_argument("--malloc", choices=("trainer", "default"), default="trainer",
                    help="trainer (default): glibc keeps freed blocks for reuse, as train_mini.py sets it; default: "
                         "glibc's own thresholds, which page-fault every large activation in again at each step")
    ap.add_argument("--profile", action="store_true", help="also a profile of one step per case, old and new: "
                    "the share of the step's time in the scan, in matmuls and convolutions (self CPU time), "
                    "and the rest")
    args = ap.parse_args()
    if args.rounds < 1 or args.reps < 1 or args.busy < 0:
        sys.exit("bench_model_vs_commit: --rounds and --reps must be at least 1, --busy at least 0")
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    rows, profiles = [], []
    try:
        with tempfile.TemporaryDirectory() as base:
            export_commit(args.base, base)
            for case in args.cases:
                old, new = [], []
                for _ in range(args.rounds):
                    old.append(step_ms(base, case, args.reps, args.malloc)["ms"])
                    new.append(step_ms(ROOT, case, args.reps, args.malloc)["ms"])
                if args.profile:
                    profiles.append((CASES[case][0], step_ms(base, case, 1, args.malloc, True)["profile"],
                                     step_ms(ROOT, case, 1, args.malloc, True)["profile"]))
                ratio = statistics.median(o / n for o, n in zip(old, new))
                batch = CASES[case][3]
                rows.append((CASES[case][0], statistics.median(old), statistics.median(new), batch, ratio))
                print(json.dumps(dict(case=case, old_ms=old, new_ms=new)), flush=True)
    finally:
        for p in busy:
            p.kill()
    print(f"\n{args.rounds} rounds, old and new alternately in fresh processes, median of {args.reps} steps each; "
          f"{args.busy} busy processes beside; malloc: {args.malloc}\n")
    print(f"| case | {args.base} ms (img/s) | this checkout ms (img/s) | speed-up (median of the pairs) |")
    print("|---|---|---|---|")
    for what, o, n, batch, ratio in rows:
        print(f"| {what} | {o:.0f} ({batch / o * 1000:.1f}) | {n:.0f} ({batch / n * 1000:.1f}) | {ratio:.2f}× |")
    if profiles:
        print(f"\n| case | {args.base}: scan / matmul+conv / rest | this checkout: scan / matmul+conv / rest |")
        print("|---|---|---|")
        share = lambda p: " / ".join(f"{100 * p.get(k, 0) / sum(p.values()):.0f}%"
                                     for k in ("scan", "matmul+conv", "rest"))
        for what, o, n in profiles:
            print(f"| {what} | {share(o)} | {share(n)} |")


if __name__ == "__main__":
    main()
