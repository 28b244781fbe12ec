"""
experiments/receptive_field.py: what one token sees, per arm of a study, as a picture.

The effective receptive field (Luo et al., NeurIPS 2016; drawn the way RepLKNet's and VMamba's ERF
figures are): for one output token at the centre of the grid, the magnitude of the gradient of its
final features (after the final norm, ReLU'd and summed over channels, RepLKNet's convention) with
respect to every input pixel, averaged over test images and over the arm's trained models (one per
seed). A window scan should concentrate it around the centre; a global row/column scan can spread
it along the centre's row and column.

    python experiments/receptive_field.py runs/study28 --out docs/receptive_field_28.png

Reads each finished run's checkpoint.pt (weights-only: a file cannot run code) in the study folder,
draws the arms side by side (matplotlib; a text picture always, FILE.txt beside FILE.png), and
writes per arm (FILE.json) the share of the field on the token's own pixels and, of the rest, the
shares within the centre's 3×3 and 7×7 squares and in its row and column, and the side of the
smallest centred square that holds half of it.
"""
import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the project's top-level files
import localmamba  # noqa: E402
import localmamba_run  # noqa: E402
import scan_kernel  # noqa: E402
import train_mini  # noqa: E402
from localmamba_data import fashion_splits  # noqa: E402


def effective_receptive_field(model, images, batch_size=50):
    """The centre token's ERF: (H, W) of mean |d relu(features[centre]).sum() / d pixel| over images
    (B, C, H, W), summed over input channels. Each image's features depend on that image only, so
    one backward of the batch's sum gives every image's own gradient."""
    model.eval()
    H, W = model.cfg.grid
    p = model.cfg.patch_size
    centre = (H // 2) * W + W // 2                     # the token at row H//2, column W//2 (no cls token)
    total = torch.zeros(images.shape[-2:])
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].clone().requires_grad_(True)
        feats = model.forward_features(x)               # (B, L, D) after the final norm
        feats[:, centre].relu().sum().backward()
        total += x.grad.abs().sum((0, 1))               # (H·p, W·p)
    erf = total / len(images)
    return erf if p == 1 else erf.unflatten(0, (H, p)).unflatten(2, (W, p)).sum((1, 3))   # per token: (H, W)


def field_shares(erf):
    """Where the field lies. The token's own pixels reach it directly through the residual stream
    and hold most of it, so they are counted apart ("own"), and the rest is shared out over the
    others: the centre's 3×3 and 7×7 squares, its row and column, and the side of the smallest
    centred square that holds at least half of it."""
    H, W = erf.shape
    cy, cx = H // 2, W // 2
    own, others = erf[cy, cx], erf.clone()
    others[cy, cx] = 0
    total = others.sum()
    square = lambda r: others[max(cy - r, 0):cy + r + 1, max(cx - r, 0):cx + r + 1].sum() / total
    row_col = (others[cy].sum() + others[:, cx].sum()) / total
    half = next(2 * r + 1 for r in range(max(H, W)) if square(r) >= 0.5)
    return {"own": round(float(own / erf.sum()), 4), "in_3x3": round(float(square(1)), 4),
            "in_7x7": round(float(square(3)), 4), "in_row_and_column": round(float(row_col), 4),
            "half_in_square_of_side": half}


def off_centre(erf):
    """The field scaled to its largest value outside the centre token (which saturates the scale)."""
    others = erf.clone()
    others[erf.shape[0] // 2, erf.shape[1] // 2] = 0
    return (erf / others.max().clamp_min(1e-30)).clamp(1e-3, 1)


def draw_text(erf, name, width=28):
    """A text picture: log-scaled shading, ' ' (under 1/1000 of the largest value off the centre) to '@'."""
    ramp = " .:-=+*#%@"
    level = off_centre(erf).log10().add(3).div(3)    # 1e-3..1 of the largest value off the centre -> 0..1
    step = max(1, erf.shape[1] // width)
    rows = [name] + ["".join(ramp[min(int(v * len(ramp)), len(ramp) - 1)] * 2 for v in row[::step])
                     for row in level[::step]]
    return "\n".join(rows)


def draw_png(fields, path, title):
    """The arms side by side on one log colour scale, each scaled to its largest value off the centre
    token (the centre, marked +, saturates); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LogNorm
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(fields), figsize=(3.4 * len(fields) + 0.8, 3.9), squeeze=False)
    for ax, (arm, (erf, shares)) in zip(axes[0], fields.items()):
        im = ax.imshow(off_centre(erf), cmap="magma", norm=LogNorm(1e-3, 1))
        ax.plot(erf.shape[1] // 2, erf.shape[0] // 2, "c+", markersize=8)
        ax.set_title(f"{arm}\nof the field off the centre:\n3×3 {shares['in_3x3']:.0%}, 7×7 {shares['in_7x7']:.0%}, "
                     f"row+column {shares['in_row_and_column']:.0%}", fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
    fig.colorbar(im, ax=axes[0].tolist(), label="|gradient| / largest off the centre", shrink=0.8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def trained_models(study):
    """{arm: [(model, run config), ...]}: every finished run's final weights (its test record written),
    rebuilt from line 1 of its log.jsonl and read weights-only from its checkpoint.pt."""
    arms = {}
    for run in sorted(study.glob("*-seed*")):
        log, ckpt_path = run / "log.jsonl", run / "checkpoint.pt"
        if not (run.is_dir() and log.exists() and ckpt_path.exists()) or "incomplete" in run.name:
            continue
        lines = [json.loads(s) for s in log.read_text().splitlines() if s.strip()]
        if not any(r.get("split") == "test" for r in lines) or lines[0].get("search"):
            continue
        cfg, ckpt = lines[0], train_mini.read_run_checkpoint(ckpt_path)
        model = localmamba.create_model(cfg["model"], num_classes=cfg["num_classes"], in_chans=cfg["in_chans"],
                                        directions=cfg["directions"], **({"scattn": False} if cfg["no_scattn"] else {}))
        model.load_state_dict(ckpt["model"])
        arms.setdefault(run.name.rsplit("-seed", 1)[0], []).append((model, cfg))
    return arms


def main(argv=None):
    ap = argparse.ArgumentParser(description="The effective receptive field of the centre token, per arm of a study.")
    ap.add_argument("study", help="a study folder of experiments/study_scans.py (its finished runs are read)")
    ap.add_argument("--out", default=None, help="FILE.png (default STUDY/receptive_field.png); FILE.txt and "
                    "FILE.json beside it")
    ap.add_argument("--images", type=int, default=300, help="test images averaged over (default 300)")
    ap.add_argument("--data-dir", default=None, help=f"Fashion-MNIST's folder (default {train_mini.FASHION_DIR})")
    args = ap.parse_args(argv)
    if args.images < 1:
        ap.error(f"--images must be at least 1, got {args.images}")
    study = Path(args.study)
    out = Path(args.out) if args.out else study / "receptive_field.png"

    def run():
        if not study.is_dir():
            raise train_mini.UserError(f"{study} is not a folder; pass the --out folder of experiments/study_scans.py")
        localmamba_run.keep_freed_memory()      # as train_mini on the CPU: the scan in C++, memory reused
        scan_kernel.use_compiled_torch_path(True)
        arms = trained_models(study)
        if not arms:
            raise train_mini.UserError(f"{study} holds no finished run; run experiments/study_scans.py --out {study}")
        cfg = next(iter(arms.values()))[0][1]
        per_class = -(-args.images // cfg["num_classes"])
        data = SimpleNamespace(data_dir=args.data_dir or cfg["data_dir"], classes=cfg["num_classes"],
                               val_per_class=1, test_per_class=per_class)
        test = fashion_splits(data, with_train=False)[2]
        images = torch.stack([test[i][0] for i in range(min(args.images, len(test)))])
        fields, report = {}, {"images": len(images), "arms": {}}
        for arm, models in arms.items():
            erf = torch.stack([effective_receptive_field(m, images) for m, _ in models]).mean(0)
            fields[arm] = (erf, field_shares(erf))
            report["arms"][arm] = dict(fields[arm][1], models=len(models), directions=models[0][1]["directions"][0])
            print(f"{arm} ({len(models)} models): {fields[arm][1]}", flush=True)
        H, W = next(iter(fields.values()))[0].shape
        title = f"effective receptive field of the centre token, {H}×{W} grid, mean of {len(images)} test images"
        out.parent.mkdir(parents=True, exist_ok=True)
        text = "\n\n".join(draw_text(erf, f"{arm}: {shares}") for arm, (erf, shares) in fields.items())
        out.with_suffix(".txt").write_text(title + "\n\n" + text + "\n")
        report["png"] = draw_png(fields, out, title)
        report["field"] = {arm: [[round(float(v), 6) for v in row] for row in erf] for arm, (erf, _) in fields.items()}
        out.with_suffix(".json").write_text(json.dumps(report, indent=1))
        print(text + f"\n\nwrote {out.with_suffix('.txt')}, {out.with_suffix('.json')}" +
              (f" and {out}" if report["png"] else " (no PNG: pip install matplotlib)"))
        return report
    return train_mini.exit_with_message(run, "run the same command again")


if __name__ == "__main__":
    main()
