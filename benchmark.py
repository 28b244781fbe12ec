"""
benchmark.py: how fast, and how much memory, the models are, beside the transformers the paper
compares with (a measurement, not a test; README "Model benchmark").

For each model, at its own image size (its pretrained_cfg) and one stated batch: images per
second and peak memory for inference (no grad) and for a training step (forward, backward and
an AdamW step). Beside the published LocalMamba models and the nano preset, when timm is
installed, DeiT-Ti and DeiT-S (timm's deit_tiny/small_patch16_224: the paper's same-size
transformers), and a Vim-style LocalVim-T (every layer scans h, h_flip only), so the cost of
LocalMamba's 4 directions is visible.

    python benchmark.py                              # CPU: every model, batch 4, ~5-10 minutes
    python benchmark.py --device cuda --batch 64     # GPU: the Triton scan; also the PyTorch scan on the GPU
    python benchmark.py --models local_vim_tiny deit_tiny --reps 5

Each row runs in a fresh subprocess, so that its memory is its own. Peak memory: on CUDA
torch.cuda.max_memory_allocated over the timed steps (weights, AdamW's moments and all); on the
CPU the resident memory sampled every millisecond during the timed steps, minus the resident
memory before them: what a step needs on top of the built model, its inputs and (training)
AdamW's moments, which are resident before it. Times are the median of --reps steps after one warm-up step (which also
compiles the CPU scan: the CPU rows use the compiled PyTorch scan, as train_mini.py does).
Measure on a quiet machine: another heavy process on the same cores slows PyTorch many times.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
VIM_STYLE = "vim_style_tiny"      # LocalVim-T with every layer scanning h, h_flip (Vim's bidirectional)
TIMM_MODELS = {"deit_tiny": "deit_tiny_patch16_224", "deit_small": "deit_small_patch16_224"}
MODELS = ["local_vim_nano", "local_vim_tiny", VIM_STYLE, "local_vim_tiny_middle_cls_token", "local_vim_small",
          "local_vmamba_tiny", "local_vmamba_small", "deit_tiny", "deit_small"]


def build(name):
    """(model, image size, in_chans) of a row's name."""
    sys.path.insert(0, str(HERE))
    import localmamba
    if name in TIMM_MODELS:
        import timm
        model = timm.create_model(TIMM_MODELS[name])
    elif name == VIM_STYLE:
        model = localmamba.create_model("local_vim_tiny", directions=[["h", "h_flip"]] * 20)
    else:
        model = localmamba.create_model(name)
    c, h, _ = model.pretrained_cfg["input_size"]
    return model, h, c


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def measure(name, mode, batch, reps, device, scan):
    """One row, in this process: {img_s, ms, peak_mb, params}."""
    import scan_kernel
    if device == "cpu":
        scan_kernel.use_compiled_torch_path(True)
    torch.manual_seed(0)
    model, size, chans = build(name)
    model.to(device).train(mode == "train")
    x = torch.randn(batch, chans, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if mode == "train" else None
    backend = {"triton": "auto", "torch": "torch"}[scan]
    orig = scan_kernel.selective_scan

    def scan_with(*a, **k):                     # the row's scan backend for every call of the model
        return orig(*a, **{**k, "backend": backend})
    import localmamba
    localmamba.selective_scan = scan_with

    def step():
        if mode == "train":
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        else:
            with torch.no_grad():
                model(x)
        if device == "cuda":
            torch.cuda.synchronize()

    step()                                      # warm-up (and the CPU scan's compile)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before, sampled, done = rss_mb(), [0.0], threading.Event()

    def sample():                               # the CPU's peak: resident memory sampled every ms
        while not done.is_set():
            sampled[0] = max(sampled[0], rss_mb())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    done.set()
    sampler.join()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2 ** 20
    else:
        peak = max(0.0, sampled[0] - before)
    ms = statistics.median(times) * 1000
    return dict(img_s=batch / (ms / 1000), ms=ms, peak_mb=peak, params=sum(p.numel() for p in model.parameters()),
                img_size=size)


def run_row(name, mode, batch, reps, device, scan):
    """measure() in a fresh subprocess (its own peak memory); None with the reason if it failed."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    p = subprocess.run([sys.executable, __file__, "--_row", json.dumps([name, mode, batch, reps, device, scan])],
                       capture_output=True, text=True, env=env, cwd=HERE)
    if p.returncode != 0:
        return None, (p.stderr.strip().splitlines() or ["failed"])[-1][:200]
    return json.loads(p.stdout.strip().splitlines()[-1]), None


def main(argv=None):
    p = argparse.ArgumentParser(description="Model-level benchmark: img/s and peak memory, inference and training.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 4 on CPU, 64 on CUDA)")
    p.add_argument("--reps", type=int, default=3, help="timed steps per row (median), after one warm-up step")
    p.add_argument("--models", nargs="+", default=None, help=f"rows (default: all of {', '.join(MODELS)})")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._row:
        print(json.dumps(measure(*json.loads(args._row))))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no GPU")
    batch = args.batch or (64 if args.device == "cuda" else 4)
    if batch < 1 or args.reps < 1:
        sys.exit("error: --batch and --reps must be at least 1")
    have_timm = True
    try:
        import timm  # noqa: F401
    except ImportError:
        have_timm = False
    models = args.models or [m for m in MODELS if have_timm or m not in TIMM_MODELS]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"error: unknown --models {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    scans = ["triton", "torch"] if args.device == "cuda" else ["torch"]
    name_of = {"cpu": f"CPU ({os.cpu_count()} cores)", "cuda": torch.cuda.get_device_name() if args.device == "cuda"
               else ""}
    print(f"torch {torch.__version__}, {name_of[args.device]}, batch {batch}, median of {args.reps} steps\n")
    print("| model | img px | params | scan | inference img/s | inference peak MB | train img/s | train peak MB |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    for name in models:
        for scan in (["-"] if name in TIMM_MODELS else scans):
            res = {}
            for mode in ("infer", "train"):
                r, why = run_row(name, mode, batch, args.reps, args.device, "torch" if scan == "-" else scan)
                res[mode] = r if r is not None else {"error": why}
            first = next((r for r in res.values() if "params" in r), None)
            cell = lambda r, k, f: f.format(r[k]) if k in r else "failed"
            scan_name = {"triton": "Triton", "torch": "PyTorch" + (" (compiled)" if args.device == "cpu" else ""),
                         "-": "(none)"}[scan]
            print(f"| {name} | {first['img_size'] if first else '?'} | "
                  f"{first['params'] / 1e6:.1f} M | {scan_name} | " if first else f"| {name} | ? | ? | {scan_name} | ",
                  end="")
            print(" | ".join(cell(res[m], k, f) for m in ("infer", "train") for k, f in (("img_s", "{:.1f}"),
                                                                                      ("peak_mb", "{:.0f}"))) + " |",
                  flush=True)
            for mode, why in ((m, r.get("error")) for m, r in res.items()):
                if why:
                    print(f"  ({name} {mode}: {why})", flush=True)
            rows.append(dict(model=name, scan=scan, batch=batch, device=args.device, **res))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
