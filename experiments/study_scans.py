"""
experiments/study_scans.py: the paper's RQ1-RQ2 at small scale, on Fashion-MNIST.

Does the choice of scan directions matter, do local (windowed) scans help, does SCAttn help, and
what does the direction search (paper §3.4) choose? Five arms of `local_vim_nano` (14×14 tokens,
the grid of ImageNet-224 with patch 16), trained with the same data order, augmentation, width,
depth and step budget by train_mini.py, each for several seeds:

    (a) global h, h_flip (Vim-style)   (b) global h, h_flip, v, v_flip
    (c) local h, h_flip, w2, w2_flip   (d) (c) without SCAttn   (e) what --search finds on the same data

Protocol (train_mini.py's): settings are chosen on the validation split (the last 500 training
images of each class); each run's test top-1 (the 10k test set, evaluated once at the end of the
run) is what the table reports, mean ± std over seeds. The search's probabilities are drawn as a
heat map and its lists compared with the published LocalVim-T lists at the same relative depth.

    python experiments/study_scans.py --out runs/study             # ~2 hours on 2 CPU cores
    python experiments/study_scans.py --out runs/study --seeds 1 --train-per-class 500   # a quick look

Run the same command again after a crash or Ctrl-C: finished runs are read back from their logs,
an interrupted run resumes from its checkpoint (or, without one, is moved aside, never deleted,
and restarted), and a folder made with other settings is refused (exit 2). Writes results.md,
results.json, search_heat_map.txt and, with matplotlib installed, results.png and
search_heat_map.png into --out.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the project's top-level files
import localmamba  # noqa: E402
import train_mini  # noqa: E402

ARMS = {  # arm: (what it tests, per-layer directions or "search", SCAttn on)
    "a_global_h": ("global h, h_flip (Vim-style bidirectional)", [["h", "h_flip"]], True),
    "b_global_hv": ("global h, h_flip, v, v_flip", [["h", "h_flip", "v", "v_flip"]], True),
    "c_local": ("local h, h_flip, w2, w2_flip", [["h", "h_flip", "w2", "w2_flip"]], True),
    "d_local_no_scattn": ("(c) without SCAttn", [["h", "h_flip", "w2", "w2_flip"]], False),
    "e_searched": ("directions from --search on the same data", "search", True),
}
MODEL = "local_vim_nano"    # train_mini's Fashion-MNIST default (its supernet for the search)
PASSED_ON = ("data_dir", "train_per_class", "val_per_class", "test_per_class", "classes", "batch_size", "lr",
             "epochs", "max_steps")   # study flags handed to every run; compared when a run is read back


def compare_with_published(chosen, published=localmamba.SEARCHED_DIRECTIONS["local_vim_tiny"]):
    """Our n layers against LocalVim-T's 20: layer i of ours is compared with the published
    layers at the same relative depth; and which directions dominate early / middle / late."""
    n, m = len(chosen), len(published)
    rows = []
    for i, ours in enumerate(chosen):
        there = [j for j in range(m) if j * n // m == i]
        rows.append({"layer": i, "ours": ours, "published_layers": there,
                     "mean_overlap_of_4": round(sum(len(set(ours) & set(published[j])) for j in there) / len(there), 2),
                     "same_set_as": sum(set(ours) == set(published[j]) for j in there)})

    def dominant(lists):
        thirds = {}
        for name, lo, hi in (("early", 0, 1 / 3), ("middle", 1 / 3, 2 / 3), ("late", 2 / 3, 1.01)):
            sel = [d for k, ds in enumerate(lists) if lo <= k / len(lists) < hi for d in ds]
            counts = {d: sel.count(d) for d in localmamba.DIRECTIONS if sel.count(d)}
            thirds[name] = dict(sorted(counts.items(), key=lambda kv: -kv[1]))
        return thirds
    k = len(chosen[0]) if chosen else 0
    return {"per_layer": rows, "layers_agreeing": sum(r["same_set_as"] > 0 for r in rows),
            # two random k-of-8 choices share k·k/8 directions on average: the overlap of no agreement
            "chance_overlap": round(k * k / len(localmamba.DIRECTIONS), 2),
            "dominant_ours": dominant(chosen), "dominant_published": dominant(published)}


def _pyplot():
    """matplotlib.pyplot without a display, or None: plots are an optional extra."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_heat_map_png(probs, path, title):
    """The search probabilities as a PNG (matplotlib, optional); False if it is not installed."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(probs) + 1.5))
    im = ax.imshow(probs, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(localmamba.DIRECTIONS)), localmamba.DIRECTIONS)
    ax.set_yticks(range(len(probs)), [f"layer {i}" for i in range(len(probs))])
    for i, row in enumerate(probs):
        for j, p in enumerate(row):
            ax.text(j, i, f"{p:.3f}", ha="center", va="center", color="w", fontsize=8)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="softmax(α)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def save_results_png(results, path, title):
    """Test top-1 per arm as a PNG: each seed a dot, the mean a bar, ± std as an error bar."""
    plt = _pyplot()
    if plt is None:
        return False
    arms = list(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(range(len(arms)), [results[a]["mean"] for a in arms], yerr=[results[a]["std"] for a in arms],
           color="#9ecae1", capsize=6)
    for i, a in enumerate(arms):
        ax.plot([i] * len(results[a]["top1"]), results[a]["top1"], "k.", markersize=8)
    lo, hi = min(min(r["top1"]) for r in results.values()), max(max(r["top1"]) for r in results.values())
    pad = max(hi - lo, 0.5)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(range(len(arms)), arms, rotation=15)
    ax.set_ylabel("test top-1 %")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def finished_record(run_dir, run_args):
    """The final test record of a finished run in run_dir, or None if it has not finished. A run
    made with other settings is refused: a study never mixes runs of different setups."""
    log_path = run_dir / "log.jsonl"
    if not log_path.exists():
        return None
    lines = [json.loads(s) for s in log_path.read_text().splitlines() if s.strip()]
    configs = [r for r in lines if "total_steps" in r]
    if not configs:
        return None
    config = configs[-1]
    for key in PASSED_ON[1:] + ("seed", "search", "no_scattn"):
        want = getattr(run_args, key)
        if want is not None and config.get(key) != want:
            raise train_mini.UserError(f"{run_dir} was trained with {key}={config.get(key)!r}, but this study asks "
                                       f"for {want!r}; choose another --out for a study with other settings")
    stop = min(config["total_steps"], config["max_steps"]) if config["max_steps"] else config["total_steps"]
    done = [r for r in lines if r.get("split") == "test" and r["step"] >= stop]
    if not done or (run_args.search and not (run_dir / "directions.json").exists()):
        return None
    return done[-1]


def study_run(run_dir, argv):
    """One run, resumable: a finished run is read back from its log, not retrained; an unfinished
    one continues from its checkpoint; one that stopped before its first checkpoint is moved aside
    (never deleted) and started again. Returns (final test record, whether it was reused)."""
    run_args = train_mini.parse_args(argv + ["--out", str(run_dir)])
    rec = finished_record(run_dir, run_args)
    if rec is not None:
        print(f"study: {run_dir} has finished already (test top-1 {rec['top1']:.2f}%), reusing it", flush=True)
        return rec, True
    if (run_dir / "checkpoint.pt").exists():
        run_args.resume = str(run_dir / "checkpoint.pt")
    elif (run_dir / "log.jsonl").exists():
        aside = run_dir.with_name(f"{run_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"study: {run_dir} stopped before its first checkpoint; moved it to {aside}, starting again", flush=True)
    return train_mini.train(run_args), False


def run_arms(args, out, base):
    """The search, then every arm × seed. Returns (results per arm, search record, seconds, reused)."""
    search_dir = out / "search"
    search_rec, reused = study_run(search_dir, base + ["--search", "--seed", "0"])
    seconds, n_reused = search_rec["time_s"], int(reused)
    depth = localmamba.MODELS[MODEL][1]["depth"]
    results = {}
    for arm, (what, dirs, scattn) in ARMS.items():
        results[arm] = {"what": what, "top1": [], "time_s": []}
        dirs_file = search_dir / "directions.json" if dirs == "search" else out / f"{arm}_directions.json"
        if dirs != "search":
            dirs_file.write_text(json.dumps({"directions": dirs * depth}))
        for seed in range(args.seeds):
            run_dir = out / f"{arm}-seed{seed}"
            rec, reused = study_run(run_dir, base + ["--seed", str(seed), "--directions", str(dirs_file)] +
                                    ([] if scattn else ["--no-scattn"]))
            results[arm]["top1"].append(rec["top1"])
            results[arm]["time_s"].append(rec["time_s"])
            results[arm]["params"] = json.loads((run_dir / "log.jsonl").read_text().split("\n", 1)[0])["params"]
            seconds, n_reused = seconds + rec["time_s"], n_reused + int(reused)
            print(f"study: {arm} seed {seed}: test top-1 {rec['top1']:.2f}%", flush=True)
        v = results[arm]["top1"]
        results[arm].update(mean=statistics.mean(v), std=statistics.stdev(v) if len(v) > 1 else 0.0)
    return results, search_rec, seconds, n_reused


def report(results, found, comparison, seeds):
    """The results table (markdown) and the printed comparison with the published lists."""
    lines = [f"| arm | directions | params | test top-1 % (mean ± std over {seeds} seeds) | runs | min per run |",
             "|---|---|---|---|---|---|"]
    for arm, r in results.items():
        lines.append(f"| {arm} | {r['what']} | {r['params']:,} | {r['mean']:.2f} ± {r['std']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in r['top1'])} | {statistics.mean(r['time_s']) / 60:.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    probs = torch.tensor(found["probabilities"])
    print("\nsearch (softmax(α) per layer):\n" + localmamba.draw_search_probabilities(
        probs, localmamba.DIRECTIONS))
    for row in comparison["per_layer"]:
        print(f"  layer {row['layer']}: ours {row['ours']}, mean overlap with LocalVim-T layers "
              f"{row['published_layers']}: {row['mean_overlap_of_4']} of 4; the same 4 as {row['same_set_as']} of them")
    print(f"  {comparison['layers_agreeing']} of {len(comparison['per_layer'])} layers choose the same 4 directions "
          f"as a published layer at the same relative depth; random choices would overlap "
          f"{comparison['chance_overlap']} of 4 on average")
    for name in ("early", "middle", "late"):
        ours, theirs = comparison["dominant_ours"][name], comparison["dominant_published"][name]
        print(f"  {name}: ours {ours}; LocalVim-T {theirs}")
    return table


def run_study(args):
    out = Path(args.out or f"runs/study-{time.strftime('%Y%m%d-%H%M%S')}")
    base = ["--data", "fashion-mnist", "--print-every", str(args.print_every)]   # models: train_mini's defaults
    for k in PASSED_ON:
        base += [f"--{k.replace('_', '-')}", str(getattr(args, k))] if getattr(args, k) is not None else []
    base += ["--test-at-stop"] if args.max_steps else []     # a step budget: each run ends (and is tested) there
    train_mini.check_flags(train_mini.parse_args(base))        # the trainer's checks, before any run starts
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise train_mini.UserError(f"--out {out} cannot be created ({e.strerror or e}); choose another --out") from None
    t_start = time.time()
    print(f"study: {len(ARMS)} arms × {args.seeds} seeds (+ one search) into {out}", flush=True)
    results, search_rec, seconds, n_reused = run_arms(args, out, base)
    found = json.loads((out / "search" / "directions.json").read_text())
    png = save_heat_map_png(found["probabilities"], out / "search_heat_map.png",
                            "LocalVim-nano search on Fashion-MNIST: softmax(α)")
    heat = localmamba.draw_search_probabilities(torch.tensor(found["probabilities"]), localmamba.DIRECTIONS)
    (out / "search_heat_map.txt").write_text(heat + "\n")
    comparison = compare_with_published(found["directions"])
    table = report(results, found, comparison, args.seeds)
    bars = save_results_png(results, out / "results.png", f"LocalVim-nano on Fashion-MNIST, {args.seeds} seeds per arm")
    minutes = (time.time() - t_start) / 60
    summary = {"command": "python experiments/study_scans.py " + " ".join(sys.argv[1:]), "minutes": round(minutes, 1),
               "run_minutes": round(seconds / 60, 1), "reused_runs": n_reused, "seeds": list(range(args.seeds)),
               "protocol": "test top-1 of each run (test set once, at the end); settings on the validation split",
               "arms": results, "results_png": bool(bars), "compare_with_local_vim_tiny": comparison, "base_args": base,
               "search": {"directions": found["directions"], "probabilities": found["probabilities"],
                          "heat_map_png": bool(png), "time_s": search_rec["time_s"]}}
    train_mini.save_atomic(summary, out / "results.json", write=lambda obj, p: p.write_text(json.dumps(obj, indent=1)))
    (out / "results.md").write_text(table + "\n")
    print(f"\nstudy done in {minutes:.1f} min ({n_reused} finished runs reused; the runs' own training + evaluation "
          f"time: {seconds / 60:.1f} min); {out / 'results.json'}")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The small-scale study of scan directions (see the module docstring).")
    p.add_argument("--out", default=None, help="study folder (default runs/study-<date>-<time>); rerun to resume")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    p.add_argument("--data-dir", default=None, help=f"Fashion-MNIST's folder (default {train_mini.FASHION_DIR})")
    p.add_argument("--train-per-class", type=int, default=2500,
                   help="training images per class and run (default 2500: 16 runs fit ~2 hours on 2 CPU cores)")
    for flag, typ in (("--val-per-class", int), ("--test-per-class", int), ("--classes", int),
                      ("--batch-size", int), ("--lr", float), ("--epochs", float), ("--max-steps", int)):
        p.add_argument(flag, type=typ, default=None, help="passed on to train_mini.py (default: its own)")
    p.add_argument("--print-every", type=float, default=10.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be at least 1, got {args.seeds}")
    return args


def main(argv=None):
    train_mini.exit_with_message(lambda: run_study(parse_args(argv)), "run the same command again to continue "
                                 "(finished runs are reused, the interrupted one resumes from its checkpoint)")


if __name__ == "__main__":
    main()
