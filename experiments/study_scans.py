"""
experiments/study_scans.py: the paper's RQ1-RQ2 at small scale, on Fashion-MNIST.

Does the choice of scan directions matter, do local (windowed) scans help, does SCAttn help, and
what does the direction search (paper §3.4) choose? Arms of LocalVim-nano (D = 32, 3 layers),
trained with the same data order, augmentation, width, depth and step budget by train_mini.py,
each for several seeds, at one of two token grids (--grid):

  14×14 (`local_vim_nano`, patch 2: the grid of ImageNet-224 with patch 16)
    (a) global h, h_flip (Vim-style)   (b) global h, h_flip, v, v_flip
    (c) local h, h_flip, w2, w2_flip   (d) (c) without SCAttn   (e) what --search finds on the same data
  28×28 (`local_vim_nano_p1`, patch 1: 784 tokens; vertical neighbours 28 steps apart in a row scan)
    (b) global h, h_flip, v, v_flip    (c_local_w2) local h, h_flip, w2, w2_flip
    (f_local_w7) local h, h_flip, w7, w7_flip

Protocol (train_mini.py's): settings are chosen on the validation split (the last 500 training
images of each class); each run's test top-1 (the test set, evaluated once at the end of the
run) is what the table reports, mean ± std over seeds, and each arm's difference from (b) with
its standard error. Arm (e) first runs --search-seeds searches (seeds 0, 1, ...) and trains with
seed 0's choice; the report says how decided each search is (the margin between the 4th and the
5th probability of every layer, the top 4 at every epoch's end), whether it decided (the rule in
decided_per_layer), whether the seeds choose the same directions per layer, and how seed 0's lists
compare with the published LocalVim-T lists.

    python experiments/study_scans.py --out runs/study             # the 14×14 study, all five arms
    python experiments/study_scans.py --grid 28 --out runs/study28
    python experiments/study_scans.py --out runs/study --seeds 1 --train-per-class 500   # a quick look
    python experiments/receptive_field.py runs/study28             # what the centre token sees, per arm

Run the same command again after a crash or Ctrl-C: finished runs are read back from their logs,
an interrupted run resumes from its checkpoint (or, without one, is moved aside, never deleted,
and restarted), and a folder made with other settings is refused (exit 2). Runs go seed by seed
(every arm's seed 0 first): a study cut short has whole seeds, and `--seeds 2` reports them.
Writes results.md, results.json, search_heat_map_seed<k>.txt and, with matplotlib installed,
results.png, search_heat_map_seed<k>.png and (with 2 or more searches) search_margins.png into --out.
"""
import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the project's top-level files
import localmamba  # noqa: E402
import train_mini  # noqa: E402

ARMS = {  # arm: (what it tests, per-layer directions or "search", SCAttn on); the 14×14 study
    "a_global_h": ("global h, h_flip (Vim-style bidirectional)", [["h", "h_flip"]], True),
    "b_global_hv": ("global h, h_flip, v, v_flip", [["h", "h_flip", "v", "v_flip"]], True),
    "c_local": ("local h, h_flip, w2, w2_flip", [["h", "h_flip", "w2", "w2_flip"]], True),
    "d_local_no_scattn": ("(c) without SCAttn", [["h", "h_flip", "w2", "w2_flip"]], False),
    "e_searched": ("directions from --search on the same data (its seed 0)", "search", True),
}
ARMS_28 = {  # the 28×28 study: vertical neighbours 28 steps apart in a row scan; windows of 2 and of 7
    "b_global_hv": ARMS["b_global_hv"],
    "c_local_w2": ("local h, h_flip, w2, w2_flip", [["h", "h_flip", "w2", "w2_flip"]], True),
    "f_local_w7": ("local h, h_flip, w7, w7_flip", [["h", "h_flip", "w7", "w7_flip"]], True),
}
GRIDS = {  # token grid: (model, its arms). 14: patch 2 (ImageNet-224's grid); 28: patch 1, 784 tokens
    14: ("local_vim_nano", ARMS), 28: ("local_vim_nano_p1", ARMS_28)}
REFERENCE = "b_global_hv"   # every other arm's difference is stated against global h, h_flip, v, v_flip
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


def save_margins_png(searches, spread, path, title):
    """How the search separates: per layer, each seed's margin (4th − 5th probability) at every epoch's
    end, with the seeds' spread as a dashed line (the bar a margin must clear); False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    layers = len(searches[0]["probabilities"])
    fig, axes = plt.subplots(1, layers, figsize=(3.2 * layers, 3), sharey=True, squeeze=False)
    for i, ax in enumerate(axes[0]):
        for f in searches:
            ax.plot([h["epoch"] for h in f["top4_per_eval"]], [h["margins"][i] for h in f["top4_per_eval"]],
                    "o-", markersize=3, label=f"seed {f['seed']}")
        ax.axhline(spread[i], color="k", linestyle="--", linewidth=1, label="seeds' spread")
        ax.set_title(f"layer {i}")
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("4th − 5th softmax(α)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
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


def finished_record(run_dir, run_args, model):
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
    want_data = Path(run_args.data_dir or train_mini.FASHION_DIR).resolve()   # the data it reuses: the same folder
    if Path(config.get("data_dir", "")).resolve() != want_data:
        raise train_mini.UserError(f"{run_dir} was trained on the data in {config.get('data_dir')}, but this study "
                                   f"reads {want_data}; choose another --out for a study on other data")
    for key, want in [(k, getattr(run_args, k)) for k in PASSED_ON[1:] + ("seed", "search", "no_scattn")] + [
            ("model", model)]:
        if want is not None and config.get(key) != want:
            raise train_mini.UserError(f"{run_dir} was trained with {key}={config.get(key)!r}, but this study asks "
                                       f"for {want!r}; choose another --out for a study with other settings")
    stop = min(config["total_steps"], config["max_steps"]) if config["max_steps"] else config["total_steps"]
    done = [r for r in lines if r.get("split") == "test" and r["step"] >= stop]
    if not done or (run_args.search and not (run_dir / "directions.json").exists()):
        return None
    return done[-1]


def study_run(run_dir, argv, model):
    """One run, resumable: a finished run is read back from its log, not retrained; an unfinished
    one continues from its checkpoint; one that stopped before its first checkpoint is moved aside
    (never deleted) and started again. Returns (final test record, whether it was reused)."""
    run_args = train_mini.parse_args(argv + ["--out", str(run_dir)])
    rec = finished_record(run_dir, run_args, model)
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


def search_summary(run_dir):
    """One search run: its chosen lists and softmax(α), and how decided it is: per layer the margin
    between the 4th and the 5th probability (0 = a tie at the cut), and the top-4 set at every
    epoch-end evaluation (did the choice still change late in the search?)."""
    found = json.loads((run_dir / "directions.json").read_text())
    lines = [json.loads(s) for s in (run_dir / "log.jsonl").read_text().splitlines() if s.strip()]
    history = [r for r in lines if r.get("split") == "val" and "search_probs" in r]
    top4 = lambda probs: [sorted(sorted(range(len(row)), key=lambda j: -row[j])[:4]) for row in probs]
    margins = lambda probs: [round(sorted(row, reverse=True)[3] - sorted(row, reverse=True)[4], 5) for row in probs]
    return {"directions": found["directions"], "probabilities": found["probabilities"],
            "margin_4th_5th": margins(found["probabilities"]),
            "top4_per_eval": [{"epoch": r["epoch"], "margins": margins(r["search_probs"]),
                               "top4": [[localmamba.DIRECTIONS[j] for j in t] for t in top4(r["search_probs"])]}
                              for r in history]}


def seed_agreement(searches):
    """Per layer: do all the searches choose the same directions, and how many do they all share."""
    layers = [[set(f["directions"][i]) for f in searches] for i in range(len(searches[0]["directions"]))]
    return [all(s == sets[0] for s in sets) for sets in layers], [len(set.intersection(*sets)) for sets in layers]


def decided_per_layer(searches):
    """Per layer, the rule docs/results.md states for "the search decided": in every seed the final margin
    (4th − 5th probability) exceeds the seed-to-seed spread of that layer's probabilities (the largest
    max − min over seeds of one direction's probability), and the top 4 is the same at every epoch end
    of the search's last third (at least the last two). Returns (decided, spread) per layer; needs ≥ 2 seeds."""
    probs = torch.tensor([f["probabilities"] for f in searches])            # (seeds, layers, 8)
    spread = (probs.max(0).values - probs.min(0).values).max(-1).values.tolist()
    decided = []
    for i, s in enumerate(spread):
        tails = [[h["top4"][i] for h in f["top4_per_eval"][-max(2, len(f["top4_per_eval"]) // 3):]] for f in searches]
        decided.append(all(f["margin_4th_5th"][i] > s and all(t == tail[-1] for t in tail)
                           for f, tail in zip(searches, tails)))
    return decided, [round(s, 5) for s in spread]


def run_arms(args, out, base, model, arms):
    """The searches (if arm e is asked for), then every seed × arm, seeds outermost (a study cut
    short has whole seeds). Returns (results per arm, search summaries, seconds, reused)."""
    seconds, n_reused, searches = 0.0, 0, []
    for k in range(args.search_seeds if "e_searched" in arms else 0):
        search_dir = out / f"search-seed{k}"
        rec, reused = study_run(search_dir, base + ["--search", "--seed", str(k)] +
                                (["--epochs", str(args.search_epochs)] if args.search_epochs else []), None)
        searches.append(dict(search_summary(search_dir), seed=k, time_s=rec["time_s"]))
        seconds, n_reused = seconds + rec["time_s"], n_reused + int(reused)
    depth = localmamba.MODELS[model][1]["depth"]
    results = {arm: {"what": arms[arm][0], "top1": [], "time_s": []} for arm in arms}
    for seed in range(args.seeds):
        for arm, (what, dirs, scattn) in arms.items():
            dirs_file = out / "search-seed0" / "directions.json" if dirs == "search" else out / f"{arm}_directions.json"
            if dirs != "search":
                dirs_file.write_text(json.dumps({"directions": dirs * depth}))
            run_dir = out / f"{arm}-seed{seed}"
            rec, reused = study_run(run_dir, base + ["--seed", str(seed), "--directions", str(dirs_file)] +
                                    ([] if scattn else ["--no-scattn"]), model)
            results[arm]["top1"].append(rec["top1"])
            results[arm]["time_s"].append(rec["time_s"])
            results[arm]["params"] = json.loads((run_dir / "log.jsonl").read_text().split("\n", 1)[0])["params"]
            seconds, n_reused = seconds + rec["time_s"], n_reused + int(reused)
            print(f"study: {arm} seed {seed}: test top-1 {rec['top1']:.2f}%", flush=True)
    for arm, r in results.items():
        v = r["top1"]
        r.update(mean=statistics.mean(v), std=statistics.stdev(v) if len(v) > 1 else 0.0)
    ref = results.get(REFERENCE)
    for arm, r in results.items():   # the difference of two means and its standard error sqrt(s1²/n1 + s2²/n2)
        if ref is not None and arm != REFERENCE:
            r["minus_reference"] = round(r["mean"] - ref["mean"], 3)
            r["se_of_difference"] = round(math.sqrt(r["std"] ** 2 / len(r["top1"]) +
                                                    ref["std"] ** 2 / len(ref["top1"])), 3)
    return results, searches, seconds, n_reused


def report(results, searches, seeds):
    """The results table (markdown) and, after a search, its choices printed: per seed, whether the
    seeds agree per layer, and the comparison of seed 0's lists with the published ones."""
    lines = [f"| arm | directions | params | test top-1 % (mean ± std, {seeds} seeds) | − {REFERENCE} ± SE | "
             "runs | min per run |", "|---|---|---|---|---|---|---|"]
    for arm, r in results.items():
        diff = f"{r['minus_reference']:+.2f} ± {r['se_of_difference']:.2f}" if "minus_reference" in r else "—"
        lines.append(f"| {arm} | {r['what']} | {r['params']:,} | {r['mean']:.2f} ± {r['std']:.2f} | {diff} | "
                     f"{', '.join(f'{x:.2f}' for x in r['top1'])} | {statistics.mean(r['time_s']) / 60:.1f} |")
    table = "\n".join(lines)
    print("\n" + table)
    for found in searches:
        print(f"\nsearch seed {found['seed']} (softmax(α) per layer; margin = 4th − 5th probability):\n" +
              localmamba.draw_search_probabilities(torch.tensor(found["probabilities"]), localmamba.DIRECTIONS))
        print(f"  margins {found['margin_4th_5th']}; at each epoch's end, the margins and the top 4: " +
              "; ".join(f"epoch {h['epoch']:g} {h['margins']} {h['top4']}" for h in found["top4_per_eval"]))
    if len(searches) > 1:
        same, shared = seed_agreement(searches)
        print(f"  the {len(searches)} seeds choose the same 4 directions in {sum(same)} of {len(same)} layers; "
              f"per layer they share {shared} of 4 (two random choices share 2.0 on average)")
        decided, spread = decided_per_layer(searches)
        print(f"  decided (every seed's margin > the seeds' spread {spread}, top 4 stable over the last third): "
              f"{decided}")
    if searches:
        comparison = compare_with_published(searches[0]["directions"])
        for row in comparison["per_layer"]:
            print(f"  layer {row['layer']}: ours {row['ours']}, mean overlap with LocalVim-T layers "
                  f"{row['published_layers']}: {row['mean_overlap_of_4']} of 4; the same 4 as {row['same_set_as']}")
        print(f"  {comparison['layers_agreeing']} of {len(comparison['per_layer'])} layers choose the same 4 "
              f"directions as a published layer at the same relative depth; random choices would overlap "
              f"{comparison['chance_overlap']} of 4 on average")
        for name in ("early", "middle", "late"):
            print(f"  {name}: ours {comparison['dominant_ours'][name]}; LocalVim-T "
                  f"{comparison['dominant_published'][name]}")
    return table


def run_study(args):
    out = Path(args.out or f"runs/study{args.grid}-{time.strftime('%Y%m%d-%H%M%S')}")
    model, all_arms = GRIDS[args.grid]
    arms = {a: all_arms[a] for a in (args.arms or all_arms)}
    base = ["--data", "fashion-mnist", "--print-every", str(args.print_every)]   # 14: train_mini's models
    base += [] if args.grid == 14 else ["--model", model]      # (its supernet for the search, local_vim_nano)
    for k in PASSED_ON:
        base += [f"--{k.replace('_', '-')}", str(getattr(args, k))] if getattr(args, k) is not None else []
    base += ["--test-at-stop"] if args.max_steps else []     # a step budget: each run ends (and is tested) there
    train_mini.check_flags(train_mini.parse_args(base))        # the trainer's checks, before any run starts
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise train_mini.UserError(f"--out {out} cannot be created ({e.strerror or e}); choose another --out") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.time()
    n_search = args.search_seeds if "e_searched" in arms else 0
    print(f"study: {args.grid}×{args.grid} tokens, {len(arms)} arms × {args.seeds} seeds (+ {n_search} searches) "
          f"into {out}", flush=True)
    results, searches, seconds, n_reused = run_arms(args, out, base, model, arms)
    for found in searches:
        save_heat_map_png(found["probabilities"], out / f"search_heat_map_seed{found['seed']}.png",
                          f"LocalVim-nano search on Fashion-MNIST, seed {found['seed']}: softmax(α)")
        heat = localmamba.draw_search_probabilities(torch.tensor(found["probabilities"]), localmamba.DIRECTIONS)
        (out / f"search_heat_map_seed{found['seed']}.txt").write_text(heat + "\n")
    if len(searches) > 1:
        save_margins_png(searches, decided_per_layer(searches)[1], out / "search_margins.png",
                         "LocalVim-nano search on Fashion-MNIST: does the cut at 4 directions separate?")
    table = report(results, searches, args.seeds)
    title = f"LocalVim-nano, {args.grid}×{args.grid} tokens, Fashion-MNIST, {args.seeds} seeds per arm"
    bars = save_results_png(results, out / "results.png", title)
    minutes = (time.time() - t_start) / 60
    summary = {"command": "python experiments/study_scans.py " + " ".join(sys.argv[1:]), "minutes": round(minutes, 1),
               "grid": args.grid, "model": model, "run_minutes": round(seconds / 60, 1), "reused_runs": n_reused,
               "seeds": list(range(args.seeds)), "reference": REFERENCE, "arms": results, "results_png": bool(bars),
               "protocol": "test top-1 of each run (test set once, at the end); settings on the validation split",
               "base_args": base}
    if searches:
        summary["searches"] = searches
        same, shared = seed_agreement(searches)
        summary["search"] = {"directions": searches[0]["directions"], "probabilities": searches[0]["probabilities"],
                             "same_per_layer": same, "shared_per_layer": shared}
        if len(searches) > 1:
            summary["search"]["decided_per_layer"], summary["search"]["seed_spread_per_layer"] = \
                decided_per_layer(searches)
        summary["compare_with_local_vim_tiny"] = compare_with_published(searches[0]["directions"])
    train_mini.save_atomic(summary, out / "results.json", write=lambda obj, p: p.write_text(json.dumps(obj, indent=1)))
    (out / "results.md").write_text(table + "\n")
    print(f"\nstudy done in {minutes:.1f} min ({n_reused} finished runs reused; the runs' own training + evaluation "
          f"time: {seconds / 60:.1f} min); {out / 'results.json'}")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="The small-scale study of scan directions (see the module docstring).")
    p.add_argument("--out", default=None, help="study folder (default runs/study<grid>-<date>-<time>); rerun to resume")
    p.add_argument("--grid", type=int, default=14, choices=sorted(GRIDS), help="token grid: 14 (patch 2: arms a-e, "
                   "the search) or 28 (patch 1: arms b, c_local_w2, f_local_w7)")
    p.add_argument("--arms", default=None, help="comma-separated subset of the grid's arms (default: all)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    p.add_argument("--search-seeds", type=int, default=1, help="searches (seeds 0..N-1) for arm e, which trains with "
                   "seed 0's choice (default 1)")
    p.add_argument("--search-epochs", type=float, default=None, help="epochs of each search (default: train_mini's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--data-dir", default=None, help=f"Fashion-MNIST's folder (default {train_mini.FASHION_DIR})")
    p.add_argument("--train-per-class", type=int, default=2500,
                   help="training images per class and run (default 2500)")
    for flag, typ in (("--val-per-class", int), ("--test-per-class", int), ("--classes", int),
                      ("--batch-size", int), ("--lr", float), ("--epochs", float), ("--max-steps", int)):
        p.add_argument(flag, type=typ, default=None, help="passed on to train_mini.py (default: its own)")
    p.add_argument("--print-every", type=float, default=10.0, help="seconds between progress lines")
    args = p.parse_args(argv)
    for name in ("seeds", "search_seeds", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.search_epochs is not None and not (math.isfinite(args.search_epochs) and args.search_epochs > 0):
        p.error(f"--search-epochs must be a finite number > 0, got {args.search_epochs}")
    if args.arms is not None:
        args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
        bad = [a for a in args.arms if a not in GRIDS[args.grid][1]] or ([] if args.arms else ["(none)"])
        if bad:
            p.error(f"--arms {', '.join(bad)}: the {args.grid}×{args.grid} study's arms are "
                    f"{', '.join(GRIDS[args.grid][1])}")
    return args


def main(argv=None):
    train_mini.exit_with_message(lambda: run_study(parse_args(argv)), "run the same command again to continue "
                                 "(finished runs are reused, the interrupted one resumes from its checkpoint)")


if __name__ == "__main__":
    main()
