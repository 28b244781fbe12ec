"""
benchmark.py: how fast, and how much memory, the models are, beside the transformers the paper
compares with (a measurement, not a test; the table is in docs/benchmark.md).

For each model, at its own image size (its pretrained_cfg) and one stated batch: images per
second and peak memory for inference (no grad) and for a training step (forward, backward and
an AdamW step). Beside the published LocalMamba models and the nano preset, when timm is
installed, DeiT-Ti and DeiT-S (timm's deit_tiny/small_patch16_224: the paper's same-size
transformers), and a Vim-style LocalVim-T (every layer scans h, h_flip only), so the cost of
LocalMamba's 4 directions is visible.

    python benchmark.py                              # CPU: every model, batch 2, ~5 minutes on 2 cores
    python benchmark.py --device cuda --batch 64     # GPU: Triton, fused and readable mixer; the PyTorch scan
    python benchmark.py --paths fused readable       # CPU: the fused mixer (default) and the readable one
    python benchmark.py --models local_vim_tiny deit_tiny --reps 5
    python benchmark.py --traffic --models local_vim_tiny local_vmamba_tiny   # MB moved per image, fp32 inference

Each model runs in fresh subprocesses: a timing pass (times are the median of --reps steps after
one warm-up step, which also builds the CPU scan: the CPU rows use the scan's C++ kernels and
glibc keeps freed memory for reuse, as train_mini.py does), then a memory pass (one warm-up
step, then the measured one). Peak memory:
on CUDA torch.cuda.max_memory_allocated (weights, AdamW's moments and all); on the CPU what the
step allocates at its peak on top of what is resident before it (the built model, its inputs
and, training, AdamW's moments), see cpu_peak_mb.
The mixer column: "fused", the mixers' ordered kernels (C++ on the CPU, Triton on CUDA), or
"readable", scan_tokens -> conv -> selective_scan -> unscan_tokens (localmamba.set_fused).
Measure on a quiet machine: another heavy process on the same cores slows PyTorch many times.
"""
import argparse
import importlib.util
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


def cpu_peak_mb(step):
    """What one step allocates at its peak on the CPU, in MB: the resident memory sampled every
    millisecond during the step, minus the resident memory before it. Run in a process started
    with MALLOC_MMAP_THRESHOLD_=65536 (run_row does), so that glibc maps every block of 64 KB or
    more on its own and unmaps it when freed: the resident memory then follows the live tensors."""
    before, peak, done = rss_mb(), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.001)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    step()
    done.set()
    sampler.join()
    return max(0.0, peak[0] - before)


def measure(name, batch, reps, device, scan, memory=False, path="fused"):
    """One model, in this process: for inference and then a training step, {img_s, ms} (the timing
    pass) or {peak_mb} (the memory pass); and the model's params and image size. path: the mixers'
    fused path (where its kernels run) or the readable one."""
    import scan_kernel
    import localmamba
    if device == "cpu":
        scan_kernel.use_compiled_torch_path(True)
        if not memory:                          # freed activations reused, as train_mini.py sets glibc
            import localmamba_run
            localmamba_run.keep_freed_memory()
    torch.manual_seed(0)
    model, size, chans = build(name)
    localmamba.set_fused(model, path == "fused")
    model.to(device)
    x = torch.randn(batch, chans, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    orig, backend = scan_kernel.selective_scan, {"triton": "auto", "torch": "torch"}[scan]

    def scan_with(*a, **k):                     # the row's scan backend for every call of the model
        return orig(*a, **{**k, "backend": backend})
    localmamba.selective_scan = scan_with

    def step(mode):
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

    out = dict(params=sum(p.numel() for p in model.parameters()), img_size=size)
    for mode in ("infer", "train"):
        model.train(mode == "train")
        step(mode)                              # warm-up (and the CPU scan's compile)
        if memory and device == "cuda":         # the memory pass: one more step
            torch.cuda.reset_peak_memory_stats()
            step(mode)
            out[mode] = dict(peak_mb=torch.cuda.max_memory_allocated() / 2 ** 20)
        elif memory:
            out[mode] = dict(peak_mb=cpu_peak_mb(lambda: step(mode)))
        else:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                step(mode)
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times) * 1000
            out[mode] = dict(img_s=batch / (ms / 1000), ms=ms)
    return out


def count_traffic(model, x):
    """Bytes read + written by model(x) under no_grad, per op (a measurement of memory traffic, the
    GPU's bottleneck for all but the matmuls): every aten op as the bytes of its tensor inputs and
    outputs, views (and _unsafe_view, a reshape's) and allocations (empty*) free, the fused mixer's
    custom ops (ordered_scan, ordered_conv, token_norm_mean, gated_sum) included; each call of
    selective_scan's C++ kernels (the readable path's) as its tensor arguments (inputs and outputs:
    it is no aten op, so the dispatcher does not see it).
    Returns a Counter {op name: bytes}."""
    import collections
    import scan_kernel
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    counts = collections.Counter()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if isinstance(t, torch.Tensor))

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if not func.is_view and name != "_unsafe_view" and not name.startswith("empty"):   # (a reshape's view)
                counts[name] += nbytes(tree_flatten((args, kwargs, out))[0])
            return out

    real = scan_kernel._cpu_kernel

    def counted(kind, N, T):                    # selective_scan's C++ kernels: counted as their tensor arguments
        kernel = real(kind, N, T)                 # (the fused mixer's kernels run inside custom ops: counted above)
        if kind not in ("fwd", "bwd"):
            return kernel
        return lambda *a: counts.update({f"scan kernel ({kind})": nbytes(a)}) or kernel(*a)
    scan_kernel._cpu_kernel = counted
    try:
        with torch.no_grad(), Count():
            model(x)
    finally:
        scan_kernel._cpu_kernel = real
    return counts


def traffic(name, batch=2):
    """MB per image that an fp32 inference forward of model `name` moves on the CPU (count_traffic),
    with the C++ scan kernels; (total, {op: MB per image})."""
    import scan_kernel
    scan_kernel.use_compiled_torch_path(True)
    torch.manual_seed(0)
    model, size, chans = build(name)
    model.eval()
    x = torch.randn(batch, chans, size, size)
    with torch.no_grad():
        model(x)                                # warm-up: builds the scan kernels
    per = {k: v / batch / 1e6 for k, v in count_traffic(model, x).items()}
    return sum(per.values()), per


def print_traffic(models):
    """benchmark.py --traffic: one table row per model, its MB per image and its largest ops."""
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"error: unknown --models {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    print("| model | MB per image | largest ops (MB per image) |\n|---|---|---|")
    for name in models:
        total, per = traffic(name)
        top = ", ".join(f"{k} {v:.0f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])[:8])
        print(f"| {name} | {total:.0f} | {top} |", flush=True)


def run_row(name, batch, reps, device, scan, path):
    """measure() in fresh subprocesses: the timing pass, then the memory pass (on the CPU with
    glibc told to map big blocks on their own, see cpu_peak_mb). ({...}, None) or (None, why)."""
    res = {"infer": {}, "train": {}}
    for memory in (False, True):
        env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if memory and device == "cpu" else {}))
        p = subprocess.run([sys.executable, __file__, "--_row", json.dumps([name, batch, reps, device, scan, memory,
                                                                           path])],
                           capture_output=True, text=True, env=env, cwd=HERE)
        if p.returncode != 0:
            return None, (p.stderr.strip().splitlines() or ["failed"])[-1][:200]
        got = json.loads(p.stdout.strip().splitlines()[-1])
        for mode in ("infer", "train"):
            res[mode].update(got.pop(mode))
        res.update(got)
    return res, None


def print_rows(models, scans, batch, reps, device):
    """The table: one row per model and (scan backend, mixer path), each measured by run_row as it is
    printed. Returns the rows as dicts (for --json)."""
    print("| model | img px | params | scan | mixer | inference img/s | inference peak MB | train img/s | "
          "train peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in models:
        for scan, path in ([("-", "-")] if name in TIMM_MODELS else scans):
            res, why = run_row(name, batch, reps, device, "torch" if scan == "-" else scan,
                               "readable" if path == "-" else path)
            scan_name = {"triton": "Triton", "torch": "C++ kernels" if device == "cpu" else "PyTorch",
                         "-": "(none)"}[scan]
            if res is None:
                print(f"| {name} | | | {scan_name} | {path} | failed: {why} | | | |", flush=True)
                continue
            f = lambda v, fmt: "n/a" if v is None else fmt.format(v)
            print(f"| {name} | {res['img_size']} | {res['params'] / 1e6:.1f} M | {scan_name} | {path} | "
                  + " | ".join(f(res[m][k], fmt) for m in ("infer", "train") for k, fmt in (("img_s", "{:.1f}"),
                                                                                          ("peak_mb", "{:.0f}")))
                  + " |", flush=True)
            rows.append(dict(model=name, scan=scan, mixer=path, batch=batch, device=device, **res))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description="Model-level benchmark: img/s and peak memory, inference and training.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch", type=int, default=None, help="images per step (default: 2 on CPU, 64 on CUDA)")
    p.add_argument("--reps", type=int, default=3, help="timed steps per row (median), after one warm-up step")
    p.add_argument("--models", nargs="+", default=None, help=f"rows (default: all of {', '.join(MODELS)})")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--traffic", action="store_true", help="instead: MB per image an fp32 inference forward moves "
                   "(bytes read + written by every op, views free; the scan kernel as its tensor arguments), CPU")
    p.add_argument("--paths", nargs="+", choices=("fused", "readable"), default=None,
                   help="the mixers' paths to run: the fused one (the ordered kernels) and/or the readable one "
                        "(default: fused on the CPU, both on CUDA)")
    p.add_argument("--_row", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._row:
        print(json.dumps(measure(*json.loads(args._row))))
        return
    if args.traffic:
        return print_traffic(args.models or [m for m in MODELS if m not in TIMM_MODELS])
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda, but torch sees no GPU")
    batch = args.batch if args.batch is not None else 64 if args.device == "cuda" else 2
    if batch < 1 or args.reps < 1:
        sys.exit(f"error: --batch and --reps must be at least 1, got --batch {batch} --reps {args.reps}")
    if args.json:                       # before minutes of timing: a path that cannot be written is one line now
        try:
            Path(args.json).write_text("[]")
        except OSError as e:
            sys.exit(f"error: --json {args.json} cannot be written ({e.strerror or e}); choose another path")
    have_timm = importlib.util.find_spec("timm") is not None
    models = args.models or [m for m in MODELS if have_timm or m not in TIMM_MODELS]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        sys.exit(f"error: unknown --models {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    paths = args.paths or (["fused", "readable"] if args.device == "cuda" else ["fused"])
    # (scan backend, mixer path) per row: on CUDA the Triton scan on each path, and the PyTorch scan (readable)
    scans = [("triton", p) for p in paths] + [("torch", "readable")] if args.device == "cuda" else \
        [("torch", p) for p in paths]
    name_of = {"cpu": f"CPU ({os.cpu_count()} cores)", "cuda": torch.cuda.get_device_name() if args.device == "cuda"
               else ""}
    print(f"torch {torch.__version__}, {name_of[args.device]}, batch {batch}, median of {args.reps} steps\n")
    rows = print_rows(models, scans, batch, args.reps, args.device)
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(rows, indent=1))
        except OSError as e:            # (a disk that filled during the run)
            sys.exit(f"error: --json {args.json} cannot be written ({e.strerror or e}); the table above has the rows")


if __name__ == "__main__":
    main()
