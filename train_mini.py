"""
train_mini.py: train LocalMamba models, run the direction search, reproduce the paper's setup.

Reading guide. Paper: LocalMamba, arXiv 2403.09338, §3.4 (search) and §4.1 (ImageNet recipe).
The official training stack (hunto/LocalMamba classification/tools/train.py + lib/) is a
framework; this is one file with the same recipe: AdamW (lr 1e-3 at the paper's global batch of
1024, eps 1e-8, weight decay 0.04), 20 warmup epochs from 1e-7, cosine to 1e-6, label smoothing
0.1, mixup 0.2 / cutmix 1.0 (switch 0.5), RandAugment m9, random erasing 0.25, RandomResizedCrop +
flip; eval resize img/0.875 (bicubic) + center crop; 300 epochs (supernet 100); drop path 0.1;
LocalVim in fp32, LocalVMamba with AMP (--amp overrides). On purpose different: warmup and cosine
are per step (the official GradualWarmupScheduler is a per-epoch staircase). The learning rate:
`--blr` is the rate at a global batch of 1024 and is scaled to blr × batch_size × processes / 1024
(the default); `--lr` is the peak rate itself, used as given. Both are printed at start.

    python train_mini.py                                   # Fashion-MNIST, CPU, ~10-20 minutes
    python train_mini.py --search --out runs/search        # search directions on Fashion-MNIST
    python train_mini.py --directions runs/search/directions.json --out runs/searched
    python train_mini.py --data imagenet --data-dir /data/imagenet --model local_vim_tiny     # one GPU
    torchrun --nproc_per_node=8 train_mini.py --data imagenet --data-dir /data/imagenet \\
        --model local_vmamba_tiny --batch-size 128        # the paper's 8 × 128
    python train_mini.py --data imagenet --data-dir /data/imagenet --eval --resume runs/x/checkpoint.pt
    python experiments/study_scans.py                      # the small-scale study (docs/results.md)
    python train_mini.py --plot runs/x                     # its loss and top-1 curves -> runs/x/curves.png

Reading order: the recipe table -> the command line and its one resolution into settings -> the
run's state (`Run`) and its pieces (processes, checkpoints, evaluation, the step) -> train(), a
table of contents -> main(). The data (Fashion-MNIST's IDX files, the ImageNet layout, the
sampler) is in localmamba_data.py; the weight-decay groups are localmamba.configure_optimizer;
the run's files (the run folder's claim: one writer, nothing overwritten; atomic writes; the RNG
states a resume restores; the curves of --plot) are in localmamba_run.py.

Fashion-MNIST protocol: the last 500 images of each class of its training file are the
validation split (every logged evaluation, and whatever chooses settings); training draws from
the rest; the 10k test set is evaluated once, at the run's end (not at a --max-steps stop, unless
--test-at-stop). Outputs in --out: log.jsonl (line 1: the resolved config, then one line per
evaluation and one per progress line; each carries the mean training loss since the previous
line and the lr), checkpoint.pt (written to a temporary file,
then renamed: a crash never destroys the last good one), best.pt (the checkpoint of the best
validation top-1 so far), directions.json after --search.
Exit codes: 0 done, 2 bad input (one message, no traceback), 3 the loss became non-finite,
130 interrupted (Ctrl-C; the message says how to continue).
"""
import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

# -----------------------------------------------------------------------------
# the recipe: defaults per --data (their one home; --help prints them), the paper's ImageNet recipe
# and a CPU one. drop_path 0.1 for every model, LocalVMamba too: the official config.yaml's
# drop_path_rate, which the official builder passes to every model it trains (LocalVMamba's own
# constructor default, 0.2, is what create_model keeps for a model built outside the recipe).

DEFAULTS = {
    "imagenet": dict(model="local_vim_tiny", search_model="local_vim_tiny_search", epochs=300,
                     search_epochs=100, batch_size=128, blr=1e-3, weight_decay=0.04, warmup_epochs=20,
                     drop_path=0.1, workers=8, label_smoothing=0.1, mixup=0.2, cutmix=1.0,
                     train_per_class=None, checkpoint_every=1000),
    # Fashion-MNIST: 28×28, patch 2 -> a 14×14 token grid, the grid of ImageNet-224 with patch 16.
    # One pass over the first 4000 images of each class (40k of the 55k not held out) fits ~10-20
    # minutes on 2 CPU cores. --blr 0.128 at a global batch of 1024 is lr 8e-3 at the default batch of 64.
    "fashion-mnist": dict(model="local_vim_nano", search_model="local_vim_nano_search", epochs=1,
                          search_epochs=1, batch_size=64, blr=0.128, weight_decay=0.04, warmup_epochs=0.05,
                          drop_path=0.0, workers=0, label_smoothing=0.1, mixup=0.0, cutmix=0.0,
                          train_per_class=4000, checkpoint_every=200),   # steps: a few minutes of work
}
FIXED = dict(data="fashion-mnist", bad_images="skip", ema_decay=0.0, seed=0, print_every=10.0,  # not per --data
             aa="rand-m9-mstd0.5-inc1", reprob=0.25)
MODEL_EMA_DECAY = 0.9998          # --model-ema (timm's spelling) means an EMA at timm's default decay
WARMUP_LR, MIN_LR = 1e-7, 1e-6    # the official warmup_lr and min_lr


# -----------------------------------------------------------------------------
# settings: the command line, then one resolution into a new namespace
FLAGS = [  # (flag, type, help); a default of None is filled in by resolve_settings, per --data from DEFAULTS
    ("--data", str, "fashion-mnist or imagenet"), ("--data-dir", str, "ImageNet root with train/ and val/; "
     "Fashion-MNIST: the folder of its 4 IDX .gz files (default: Debian's dataset-fashion-mnist, "
     "/usr/share/datasets/fashion-mnist, else a download into ~/.cache/localmamba)"),
    ("--model", str, "a localmamba.create_model name; with --search the supernet"),
    ("--img-size", int, "pixels (default: the model's own, its pretrained_cfg: 224 published, 28 nano)"),
    ("--epochs", float, "(with --search: search_epochs)"), ("--max-steps", int, "stop after N steps (smoke runs; "
     "the test split is read only at a run's end: add --test-at-stop to read it at this stop)"),
    ("--batch-size/-b", int, "per process"), ("--blr", float, "base lr: scaled to blr × global batch / 1024"),
    ("--lr", float, "the peak lr itself (default: --blr × global batch / 1024, the paper's rule)"),
    ("--weight-decay", float, "AdamW"), ("--warmup-epochs", float, "linear from 1e-7"), ("--drop-path", float, ""),
    ("--label-smoothing/--smoothing", float, ""), ("--mixup", float, "alpha, 0 = off"),
    ("--cutmix", float, "alpha, 0 = off"), ("--aa", str, "ImageNet RandAugment, timm's spelling; none = off"),
    ("--reprob", float, "ImageNet random erasing probability"),
    ("--clip-grad", float, "max grad norm (off by default, as the paper)"), ("--workers", int, "per process"),
    ("--ema-decay/--model-ema-decay", float, f"e.g. {MODEL_EMA_DECAY}; 0 = no EMA (the paper's default)"),
    ("--model-ema", bool, f"EMA with decay {MODEL_EMA_DECAY} (timm's spelling)"), ("--classes", int, "the first N"),
    ("--train-per-class", int, "first N"), ("--val-per-class", int, "first N"), ("--test-per-class", int, "first N"),
    ("--bad-images", str, "skip or stop at an unreadable image"),
    ("--out/--output", str, "default: runs/<model>-<time>-<pid>"),
    ("--finetune", str, "start from these weights (ours, official or timm layout; a head of another size is "
     "re-initialised, pos_embed resampled)"),
    ("--pretrained", bool, "start from the official release's weights of --model (downloaded once into torch's hub "
     "cache; as timm's train.py --pretrained): local_vim_tiny, local_vim_tiny_middle_cls_token, local_vmamba_small"),
    ("--finetune-ema", bool, "--finetune from the file's EMA weights (timm's state_dict_ema, model_ema), not its "
     "raw ones (the default, as DeiT's --finetune)"),
    ("--resume", str, "checkpoint.pt to continue from (or to evaluate with --eval)"),
    ("--checkpoint-every", int, "steps between checkpoints besides each epoch's end, 0 = only there"),
    ("--allow-changed-batch", bool, "--resume with another --batch-size or process count (changes the data order)"),
    ("--directions", str, "directions.json from --search: per-layer directions"),
    ("--amp", str, "bf16, fp16 or off (default: off for LocalVim and on CPU, bf16 for LocalVMamba on CUDA, as the "
     "official recipe trained them)"), ("--seed", int, ""), ("--print-every", float, "seconds between progress lines"),
    ("--wd-exempt-ssm", bool, "no weight decay on A_log, D and the search logits α"),
    ("--test-at-stop", bool, "a --max-steps stop is the run's end: evaluate the test split there (smoke runs, "
     "the study's step budget)"),
    ("--eval", bool, "only evaluate --resume CKPT (validation and test splits)"), ("--eval-ema", bool, "the EMA's"),
    ("--search", bool, "train a *_search supernet and write directions.json"),
    ("--plot", str, "RUN_DIR: draw its training loss and top-1 against steps to RUN_DIR/curves.png, and exit"),
    ("--no-scattn", bool, "ablation: no SCAttn"), ("--no-compile", bool, "CPU: run the scan eagerly, not compiled"),
]
CHOICES = {"data": ("fashion-mnist", "imagenet"), "bad_images": ("skip", "stop"), "amp": ("bf16", "fp16", "off")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train LocalMamba models (see the module docstring for commands).")
    for flags, typ, help in FLAGS:
        flags = flags.split("/")                            # the name, then the spellings timm / DeiT users type
        key = flags[0][2:].replace("-", "_")
        if typ is bool:
            p.add_argument(*flags, action="store_true", help=help)
            continue
        per_data = "default: " + ", ".join(f"{data} {DEFAULTS[data].get(key)}" for data in DEFAULTS)
        default = per_data if key in DEFAULTS["imagenet"] else f"default {FIXED[key]}" if key in FIXED else None
        p.add_argument(*flags, type=typ, default=None, choices=CHOICES.get(key), dest=key,   # None: not given
                       help=f"{help} ({default})" if default else help)
    return p.parse_args(argv)


# Run as a script, the command line is read before torch loads: --help and a flag argparse refuses
# answer at once, and Ctrl-C while the libraries load exits 130 without a traceback.
_EARLY_ARGS = None
if __name__ == "__main__":
    import signal
    signal.signal(signal.SIGINT, lambda *_: (print("interrupted: nothing was started", file=sys.stderr), os._exit(130)))
    _EARLY_ARGS = parse_args()
    # OpenMP's idle threads spin 300,000 rounds before they sleep (GNU libgomp, with as many threads as
    # cores): on a shared machine they burn the share of the core that their slower partner needs, so
    # a step beside two busy processes took 3.1× its time alone, where its CPU share gives 2×. A short
    # spin keeps the speed alone and takes it to 2.2× (docs/benchmark.md, "Fair under contention").
    # Read when libgomp loads, so set before torch; a value the user set stays.
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms import v2
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import localmamba
import scan_kernel
from localmamba_data import FASHION_DIR, EpochOrder, fashion_splits, imagenet_splits, parse_aa, seed_worker
from localmamba_helpers import EMA_KEYS, pretrained_file
import localmamba_run
from localmamba_run import claim_run_dir, rng_state, save_atomic, seed_everything, set_rng_state

UserError = localmamba.BadInput   # bad input from the user: printed as one message, exit code 2


class NonFiniteLoss(Exception):
    """The loss became NaN/inf: printed with what to try, exit code 3."""


POSITIVE = ("blr", "lr", "epochs", "batch_size", "max_steps", "train_per_class", "val_per_class",
            "test_per_class", "img_size", "clip_grad")
RANGES = {"classes": (2, math.inf), "weight_decay": (0, math.inf), "warmup_epochs": (0, math.inf),
          "mixup": (0, math.inf),
          "cutmix": (0, math.inf), "reprob": (0, 1), "drop_path": (0, 0.999), "label_smoothing": (0, 0.999),
          "ema_decay": (0, 0.999999), "seed": (0, 2 ** 31 - 1), "print_every": (0, math.inf), "workers": (0, 256),
          "checkpoint_every": (0, math.inf)}   # inclusive


def check_flags(args):
    """Every number on the command line, in one place, before any setup: finite and in range.
    One UserError naming the flag, what it must be, and what it got."""
    for key, value in vars(args).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        lo, hi = (1e-300, math.inf) if key in POSITIVE else RANGES.get(key, (-math.inf, math.inf))
        if not (math.isfinite(value) and lo <= value <= hi):
            need = "> 0" if key in POSITIVE else f"between {lo:g} and {hi:g}"
            raise UserError(f"--{key.replace('_', '-')} must be a finite number {need}, got {value}")


# what a --resume continues as it was: each one not on the command line is taken from the
# checkpoint's config; one given again must agree (the batch size: restore(), with consent).
# --max-steps is a stop, not part of the run; MOVABLE ones may change; --eval takes only EVAL_KEYS.
RESUMED = ("data", "model", "img_size", "epochs", "blr", "weight_decay", "warmup_epochs", "drop_path",
           "label_smoothing", "mixup", "cutmix", "aa", "reprob", "clip_grad", "ema_decay", "classes",
           "train_per_class", "val_per_class", "test_per_class", "seed", "amp", "search", "no_scattn",
           "wd_exempt_ssm", "model_ema")
EVAL_KEYS = ("data", "model", "img_size", "classes", "no_scattn")
MOVABLE = ("data_dir", "checkpoint_every", "batch_size", "workers")   # taken when not given; may change


def adopt_checkpoint_settings(s, saved):
    """--resume continues the run as it was configured (RESUMED; the lr too when the run gave --lr);
    --eval builds the model the checkpoint was trained as (EVAL_KEYS, directions). A value given
    again that differs is refused: the same shapes with other scan directions would load without
    error and compute something else, another seed or subset would change the data order mid-run."""
    explicit_lr = saved.get("lr_rule", "--lr" if saved.get("lr") is not None else "") == "--lr"
    keys = EVAL_KEYS if s.eval else RESUMED + (("lr",) if explicit_lr else ())
    for key in keys + MOVABLE:
        mine, theirs = getattr(s, key), saved.get(key)
        if mine is None or mine is False:
            setattr(s, key, theirs if theirs is not None else mine)
        elif key in keys and theirs is not None and mine != theirs and not (key == "model" and
                                                                            localmamba.ALIASES.get(mine) == theirs):
            flag = "--" + key.replace("_", "-")
            raise UserError(f"--resume {s.resume} was trained with {flag} {theirs}, not {mine}; drop {flag} "
                            f"(a resumed run keeps its settings) or pass the run's own value")
    if not s.eval and s.lr is not None and not explicit_lr:
        raise UserError(f"--resume {s.resume} takes its lr from --blr {saved.get('blr')} (× the global batch / "
                        f"1024); drop --lr")
    saved_dirs = None if saved.get("search") or saved.get("directions") is None else saved["directions"]
    if saved_dirs is not None and s.layer_directions is not None and s.layer_directions != saved_dirs:
        raise UserError(f"--directions {s.directions} differs from the directions {s.resume} was trained "
                        f"with; drop --directions (they are read from the checkpoint)")
    s.layer_directions = s.layer_directions or saved_dirs


def check_flag_pairs(s):
    """Flags that do not go together, or need another; LOCALMAMBA_COMPILE, read strictly into
    s.compile_env (1 True, 0 False, unset None), and LOCALMAMBA_FUSED (0, 1 or unset). One UserError each."""
    try:
        s.compile_env = scan_kernel.compile_env()
        localmamba.fused_env()
    except ValueError as e:
        raise UserError(str(e)) from None
    if s.search and s.directions:
        raise UserError("--search and --directions do not go together: search first, then train with --directions")
    if s.eval and not (s.resume or s.pretrained or s.finetune):
        raise UserError("--eval needs the weights to evaluate: --resume CKPT (a run of this trainer), --pretrained "
                        "(the released ones), or --finetune FILE (official, timm or DeiT layout)")
    if s.finetune and s.resume:
        raise UserError("--finetune starts a new run from weights, --resume continues one: pass one of them")
    if s.pretrained and (s.finetune or s.resume):
        other = "--finetune" if s.finetune else "--resume"
        raise UserError(f"--pretrained starts from the released weights, {other} from another file: pass one of them")
    if s.finetune_ema and not s.finetune:
        raise UserError("--finetune-ema chooses the weights of --finetune CKPT: pass --finetune too")


def resolve_settings(args, saved, device, world=1):
    """A new namespace: the command line; for --resume/--eval the run's model settings from its
    checkpoint config `saved`; then the defaults of --data for everything still unset; then the
    peak learning rate s.lr: --lr as given, else --blr × global batch / 1024 (the paper's rule)."""
    s = argparse.Namespace(**vars(args))
    check_flag_pairs(s)
    s.layer_directions = localmamba.load_directions(s.directions) if s.directions else None
    if saved is not None:
        adopt_checkpoint_settings(s, saved)
    if s.ema_decay is None and s.model_ema:   # --model-ema: timm's decay, unless --model-ema-decay says otherwise
        s.ema_decay = MODEL_EMA_DECAY
    for key, value in FIXED.items():
        setattr(s, key, value if getattr(s, key) is None else getattr(s, key))
    parse_aa(s.aa)                                  # checked here, used by the ImageNet transforms
    typed = [f for f, v in (("--aa", args.aa), ("--reprob", args.reprob)) if v is not None]
    if s.data == "fashion-mnist" and typed:   # the ImageNet pipeline's; Fashion-MNIST's own is a shift and a flip
        one = len(typed) == 1
        raise UserError(f"{' and '.join(typed)} set{'s' * one} the ImageNet augmentation and do{'es' * one} nothing "
                        f"on Fashion-MNIST; drop {'it' if one else 'them'}, or train with --data imagenet")
    d = DEFAULTS[s.data]
    s.model = localmamba.ALIASES.get(s.model, s.model) or (d["search_model"] if s.search else d["model"])
    s.epochs = s.epochs or (d["search_epochs"] if s.search else d["epochs"])
    for key, value in d.items():
        if key in vars(s) and getattr(s, key) is None and not (key == "train_per_class" and s.eval):
            setattr(s, key, value)
    if s.data_dir is None and s.data == "imagenet":
        raise UserError("--data imagenet needs --data-dir PATH (the folder that holds train/ and val/)")
    s.data_dir = str(s.data_dir or FASHION_DIR)
    if s.model not in localmamba.MODELS:
        raise UserError(f"--model {s.model} is not a model; choose one of: {', '.join(localmamba.MODELS)}")
    if s.search and not s.model.endswith("_search"):
        raise UserError(f"--search trains a supernet: pick a *_search model, not {s.model}")
    cfg_cls, preset = localmamba.MODELS[s.model]
    s.img_size = s.img_size or preset.get("img_size", cfg_cls.img_size)      # the model's own size unless given
    if s.data == "fashion-mnist" and s.img_size != 28:
        raise UserError(f"--img-size {s.img_size}: Fashion-MNIST's images are 28×28; pass --img-size 28, or leave it "
                        f"out with a model built for 28 px (local_vim_nano)")
    is_vim = localmamba.MODELS[s.model][0] is localmamba.LocalVimConfig
    s.amp = s.amp or ("bf16" if device.type == "cuda" and not is_vim else "off")
    default_out = Path(s.resume).parent if s.resume else f"runs/{s.model}-{time.strftime('%Y%m%d-%H%M%S')}-" \
                                                         f"{os.getpid()}"
    s.out = str(s.out or default_out)    # a resumed run continues in its own folder
    s.lr_rule = "--lr" if s.lr else f"= --blr {s.blr:g} × {s.batch_size * world} / 1024"
    s.lr = s.lr or s.blr * s.batch_size * world / 1024
    if not s.lr <= 1e6:
        raise UserError(f"the peak lr would be {s.lr:g} ({s.lr_rule}); AdamW diverges far below that: give a --blr "
                        f"or --lr of at most 1e6 (the paper's is --blr 1e-3)")
    return s


# -----------------------------------------------------------------------------
# the run's state, then its pieces: processes (the run folder: localmamba_run.claim_run_dir)

@dataclass
class Run:
    """Everything a run holds, in one place: set by train() in the order of its table of contents,
    read by the pieces below."""
    s: argparse.Namespace             # the resolved settings (resolve_settings)
    rank: int
    world: int                        # processes (torchrun's WORLD_SIZE)
    device: torch.device
    log: Any                          # print on rank 0, nothing elsewhere
    amp_dtype: Optional[torch.dtype]  # autocast dtype, None = fp32
    out: Optional[Path] = None        # the run folder (claim_run_dir), and its lock
    lock: Any = None
    model: Optional[nn.Module] = None
    eval_loaders: dict = field(default_factory=dict)    # "val" and "test" (where the data has one)
    steps_per_epoch: int = 0
    total_steps: int = 0
    warmup_steps: int = 0
    optimizer: Optional[torch.optim.Optimizer] = None
    scaler: Optional[torch.amp.GradScaler] = None
    ddp: Optional[nn.Module] = None   # the model as training calls it (DDP-wrapped when world > 1)
    ema: Optional[nn.Module] = None   # AveragedModel, or None (--ema-decay 0)
    mix: Any = None                   # mixup / cutmix, or None
    best_top1: float = -1.0           # the best validation top-1 so far (best.pt)
    loss_sum: Any = 0.0               # training loss summed since the last log record (a tensor: no sync)
    loss_n: int = 0
    lr_now: float = 0.0
    config: dict = field(default_factory=dict)          # line 1 of log.jsonl, saved in every checkpoint
    clock: dict = field(default_factory=dict)           # progress timing

    @property
    def is_main(self):
        return self.rank == 0


def setup_distributed():
    """(rank, world, device) from torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = 0, 0
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


EVAL_BATCH = 256     # evaluation runs without gradients: at least this many images a batch


def make_loader(ds, s, sampler, device, gen=None):
    """A loader with its own generator: an epoch's start draws nothing from the global RNG. Training
    at --batch-size; evaluation (an unshuffled sampler) at the larger of that and EVAL_BATCH."""
    batch = s.batch_size if sampler.shuffle else max(EVAL_BATCH, s.batch_size)
    return torch.utils.data.DataLoader(ds, batch, sampler=sampler, drop_last=sampler.shuffle, pin_memory=
                                       device.type == "cuda", generator=gen or torch.Generator(), num_workers=s.workers,
                                       worker_init_fn=seed_worker)


# -----------------------------------------------------------------------------
# weights in and out: --finetune, checkpoints, --resume

def adopt_finetune_directions(s, ckpt):
    """--finetune from a run of this trainer: its scan directions come along (the same shapes with other
    directions would load without a word and compute something else); other --directions are refused.
    Other layouts do not say which directions they were trained with: the model's are used, and said.
    --finetune-ema from a file without EMA weights is refused here, before any setup."""
    if s.finetune_ema and localmamba.weights_of(ckpt, use_ema=True)[0] not in EMA_KEYS:
        raise UserError(f"--finetune-ema: {s.finetune} holds no EMA weights (looked for "
                        f"{', '.join(map(repr, EMA_KEYS))}); drop --finetune-ema to take its raw weights")
    cfg = ckpt.get("config") if isinstance(ckpt, dict) else None
    theirs = cfg.get("directions") if isinstance(cfg, dict) and not cfg.get("search") else None
    if theirs is not None and s.layer_directions is not None and s.layer_directions != theirs:
        raise UserError(f"--finetune {s.finetune} was trained with other scan directions than --directions "
                        f"{s.directions}; drop --directions to keep the checkpoint's")
    s.layer_directions = s.layer_directions or theirs
    return "its own directions" if theirs else "the model's directions (the file does not name any)"


def load_finetune(model, ckpt, path, log, directions, use_ema=False):
    """--finetune: weights only (the raw ones, or the EMA with --finetune-ema), from our, the official
    or timm's checkpoint layout (a DDP prefix dropped); a head for another number of classes keeps
    its fresh init; pos_embed is resampled, a 3-channel first conv adapted to 1 channel."""
    key, sd = localmamba.weights_of(ckpt, use_ema)
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    own = model.state_dict()
    head = {n for n, _ in model.named_parameters() if n.startswith(("head.", "classifier.head."))}
    fresh = [k for k in head if k in sd and sd[k].shape != own[k].shape]
    localmamba.load_state_dict_strict(model, {**sd, **{k: own[k] for k in fresh}}, path)
    kind = "" if key is None else f"; its {'EMA' if key in EMA_KEYS else 'raw'} weights ({key!r})"
    log(f"--finetune {path}: weights loaded, {directions}" + (
        f"; the head re-initialised for {model.num_classes} classes" if fresh else "") + kind)


def rng_states(world):
    """Every rank's RNG states (localmamba_run.rng_state), in rank order: all the trainer draws from."""
    state = rng_state()
    states = [state] * world
    if world > 1:
        dist.all_gather_object(states, state)
    return states


CHECKPOINT_FIELDS = dict(model=dict, config=dict, optimizer=dict, scaler=dict, epoch=int, step=int, batch_in_epoch=int,
                         rng=list)


def read_run_checkpoint(path):
    """A checkpoint this trainer wrote (weights-only load: a file cannot run code), whole: every
    field it writes there with its type, so that an edited file is one message, not a KeyError."""
    ckpt = localmamba.read_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"--resume {path} is not a checkpoint of this trainer (no 'model' and 'config'); "
                        f"to start a new run from its weights (official, timm or DeiT layout), pass it as --finetune")
    bad = [k for k, t in CHECKPOINT_FIELDS.items() if not isinstance(ckpt.get(k), t) or isinstance(ckpt.get(k), bool)]
    if bad:
        raise UserError(f"--resume {path} is incomplete or edited ({', '.join(bad)} missing or of the wrong type); "
                        f"use an earlier copy of it")
    return ckpt


def save_checkpoint(r, epoch, step, batch_in_epoch, rec=None):
    """checkpoint.pt; and best.pt too when rec, a validation record, is the best top-1 so far."""
    states = rng_states(r.world)           # every rank takes part; rank 0 writes
    best = rec is not None and rec["top1"] > r.best_top1
    r.best_top1 = rec["top1"] if best else r.best_top1
    if r.is_main:
        ckpt = {"model": r.model.state_dict(), "optimizer": r.optimizer.state_dict(), "scaler": r.scaler.state_dict(),
                "model_ema": r.ema.module.state_dict() if r.ema else None, "epoch": epoch, "step": step,
                "batch_in_epoch": batch_in_epoch, "config": r.config, "rng": states, "best_top1": r.best_top1}
        ckpt["checksum_covers"] = "everything"                 # the tensors, the step, the config
        ckpt["checksum"] = localmamba.tensor_checksum(ckpt, everything=True)
        for name in ("checkpoint.pt", "best.pt") if best else ("checkpoint.pt",):
            save_atomic(ckpt, r.out / name)


def restore(ckpt, r, steps_per_epoch):
    """Continue a run exactly (weights, optimizer, scaler, this rank's RNG): (epoch, step, batch_in_epoch).
    Another batch size or process count changes the data order and the lr: refused unless
    --allow-changed-batch, which keeps the images seen in the epoch and reseeds the RNG."""
    epoch, batch_in_epoch, c = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["config"]
    before, now = (c["batch_size"], c["world_size"]), (r.s.batch_size, r.world)
    if before != now and not r.s.allow_changed_batch:
        raise UserError(f"--resume {r.s.resume} was trained at --batch-size {before[0]} on {before[1]} process(es), "
                        f"this run has {now[0]} on {now[1]}: the data order from here and the lr would change; "
                        f"resume as it was, or pass --allow-changed-batch to accept that")
    localmamba.load_state_dict_strict(r.model, ckpt["model"], r.s.resume)
    r.optimizer.load_state_dict(ckpt["optimizer"])
    r.scaler.load_state_dict(ckpt["scaler"])
    if before == now:
        set_rng_state(ckpt["rng"][r.rank])
    else:
        batch_in_epoch = batch_in_epoch * before[0] * before[1] // (now[0] * now[1])    # images seen, in new batches
        seed_everything(r.s.seed + 1000 * ckpt["step"] + r.rank)
        r.log(f"--allow-changed-batch: batch {before[0]} x {before[1]} -> {now[0]} x {now[1]}: the epoch continues "
              f"after the same number of images, in another order; the lr follows the new global batch; RNG reseeded")
    step = ckpt["step"] if before == now else epoch * steps_per_epoch + batch_in_epoch
    r.log(f"resumed from {r.s.resume} at epoch {epoch}, step {step}")
    return epoch, step, batch_in_epoch


# -----------------------------------------------------------------------------
# evaluation and the log

@torch.no_grad()
def evaluate(model, loader, device, amp_dtype, world):
    """top-1, top-5 (percent) and mean loss over the whole split, summed over all ranks."""
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)   # n, correct1, correct5, loss sum
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        stats += torch.stack([torch.tensor(float(len(y)), device=device), (top[:, 0] == y).sum(),  # no sync per batch
                              (top == y[:, None]).any(1).sum(), F.cross_entropy(logits, y, reduction="sum")]).double()
    if world > 1:
        dist.all_reduce(stats)
    n = stats[0].item()
    model.train()
    return dict(top1=100 * stats[1].item() / n, top5=100 * stats[2].item() / n, loss=stats[3].item() / n, n=int(n))


def evaluate_checkpoint(r, ckpt):
    """--eval: the checkpoint's weights (or its EMA) on the validation and test splits, a JSON line each."""
    weights = "model_ema" if r.s.eval_ema else "model"
    if r.s.eval_ema and ckpt.get("model_ema") is None:
        raise UserError(f"--eval-ema: {r.s.resume} holds no EMA weights (its run had --ema-decay 0)")
    localmamba.load_state_dict_strict(r.model, ckpt[weights], r.s.resume)
    results = {split: evaluate(r.model, ld, r.device, r.amp_dtype, r.world) for split, ld in r.eval_loaders.items()}
    for split, res in results.items():
        r.log(json.dumps({"eval": r.s.resume, "weights": weights, "split": split, **res}))
    return results


def log_json(r, rec):
    if r.is_main:                              # rank 0 appends one line to the run's log
        try:
            with open(r.out / "log.jsonl", "a") as f:
                f.write(json.dumps(rec, default=str) + "\n")
        except OSError as e:                   # a full disk, a folder gone: one line, not a traceback
            raise UserError(f"cannot write {r.out / 'log.jsonl'} ({e.strerror or e}); is the disk full? Free space "
                            f"and --resume the run's checkpoint.pt if it wrote one, or choose another --out") from None


def eval_and_log(r, epoch, step, split="val"):
    res = evaluate(r.model, r.eval_loaders[split], r.device, r.amp_dtype, r.world)
    rec = {"split": split, "epoch": epoch, "step": step, "top1": res["top1"], "top5": res["top5"],
           "loss": res["loss"], "time_s": round(time.time() - r.clock["t0"], 1), **since_last_record(r)}
    if r.ema is not None:
        rec["top1_ema"] = evaluate(r.ema.module, r.eval_loaders[split], r.device, r.amp_dtype, r.world)["top1"]
    if r.s.search:
        rec["search_probs"] = [[round(p, 5) for p in row] for row in localmamba.search_probabilities(r.model).tolist()]
    log_json(r, rec)
    r.log(f"{split} epoch {epoch:.4g} step {step}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  "
          f"loss {res['loss']:.4f}")
    return rec


# -----------------------------------------------------------------------------
# the step: DDP and EMA, mixup, the schedule, one optimizer step, progress

def wrap_ddp_and_ema(model, s, world, device):
    """(the model to call in training, DDP-wrapped when world > 1; the EMA or None). The EMA (off by
    default, as in the paper) is PyTorch's own: ema <- decay * ema + (1 - decay) * weights after every
    step. Made after the wrap, which has copied rank 0's weights to every rank: one model averaged."""
    ddp = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    if s.ema_decay <= 0:
        return ddp, None
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(s.ema_decay), use_buffers=True)
    ema.n_averaged += 1         # it starts as a copy of the model: the formula applies from the first step
    return ddp, ema.eval().requires_grad_(False)


def make_mix(s, num_classes):
    """mixup 0.2 / cutmix 1.0, one of them per batch (switch prob 0.5), on soft targets."""
    ops = ([v2.MixUp(alpha=s.mixup, num_classes=num_classes)] if s.mixup > 0 else []) + \
          ([v2.CutMix(alpha=s.cutmix, num_classes=num_classes)] if s.cutmix > 0 else [])
    return v2.RandomChoice(ops) if len(ops) > 1 else (ops[0] if ops else None)


def get_lr(step, lr, warmup_steps, total_steps):
    """Linear warmup from 1e-7, then cosine to 1e-6, per step."""
    if step < warmup_steps:
        return WARMUP_LR + (lr - WARMUP_LR) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return MIN_LR + 0.5 * (lr - MIN_LR) * (1 + math.cos(math.pi * min(1.0, t)))


def train_step(r, x, y, lr, where):
    """One optimizer step at learning rate lr; returns the loss."""
    x, y = x.to(r.device, non_blocking=True), y.to(r.device, non_blocking=True)
    if r.mix is not None:
        x, y = r.mix(x, y)
    for g in r.optimizer.param_groups:
        g["lr"] = lr
    with torch.autocast(r.device.type, dtype=r.amp_dtype, enabled=r.amp_dtype is not None):
        logits = r.ddp(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=r.s.label_smoothing)   # hard or mixed targets
    if not torch.isfinite(loss):
        saved = f"{r.out / 'checkpoint.pt'} is from before it" if (r.out / "checkpoint.pt").exists() else \
            "no checkpoint was written"
        raise NonFiniteLoss(f"the loss became {loss.item()} at epoch {where[0]}, step {where[1]} (lr {lr:.3g}); "
                            f"{saved}. Try a lower --lr, --clip-grad 1.0, or --amp bf16/off")
    r.optimizer.zero_grad(set_to_none=True)
    r.scaler.scale(loss).backward()
    if r.s.clip_grad:
        r.scaler.unscale_(r.optimizer)
        nn.utils.clip_grad_norm_(r.model.parameters(), r.s.clip_grad)
    r.scaler.step(r.optimizer)
    r.scaler.update()
    if r.ema is not None:
        r.ema.update_parameters(r.model)
    return loss


def since_last_record(r):
    """What every log record carries about training: the mean loss (rank 0's) of the steps since the
    previous record, and the lr of the last step."""
    rec = dict(train_loss=round((r.loss_sum / r.loss_n).item(), 5), lr=r.lr_now) if r.loss_n else {}
    r.loss_sum, r.loss_n = 0.0, 0
    return rec


def progress(r, loss, step, stop_at, epoch, n_images):
    """A progress line (and a log record of the training loss) every --print-every seconds; the
    first one also estimates the whole run."""
    clock, now = r.clock, time.time()
    if "t1" not in clock:                 # the first step compiles and warms up: rates count from its end
        return clock.update(t1=now, last_print=now)
    clock["seen"] += n_images
    if not r.is_main or (now - clock["last_print"] <= r.s.print_every and step != stop_at):
        return
    clock["last_print"] = now
    rate = clock["seen"] / max(now - clock["t1"], 1e-9)
    left = (stop_at - step) * n_images / max(rate, 1e-9)
    first = f"  (training in all: ~{(now - clock['t0'] + left) / 60:.1f} min)" if clock.pop("first", False) else ""
    log_json(r, dict(epoch=round(step / r.steps_per_epoch, 4), step=step, **since_last_record(r),
                     img_per_s=round(rate, 1)))
    print(f"epoch {epoch} step {step}/{stop_at}  loss {loss.item():.4f}  {rate:.1f} img/s  "
          f"{left / 60:.1f} min left{first}", flush=True)


# -----------------------------------------------------------------------------
# the run: a table of contents, then the loop

def log_run_config(r, sets, num_classes, in_chans, amp_flag, val_flag):
    """Line 1 of log.jsonl (the resolved config, what --resume and --eval rebuild the run from) and
    the run's one-line summary."""
    s, world, (train_set, val_set, test_set) = r.s, r.world, sets
    n_params = sum(p.numel() for p in r.model.parameters())
    r.config = dict(vars(s), world_size=world, global_batch=s.batch_size * world, lr_used=s.lr,
                    num_classes=num_classes, in_chans=in_chans, params=n_params, steps_per_epoch=r.steps_per_epoch,
                    total_steps=r.total_steps, warmup_steps=r.warmup_steps, train_images=len(train_set),
                    val_images=len(val_set), test_images=len(test_set) if test_set else 0,
                    directions=r.model.directions, device=str(r.device), torch=str(torch.__version__),
                    scan=scan_choice(r.device), mixer=mixer_choice(r.device))
    log_json(r, r.config)
    test = f"{len(test_set):,} test images (once, at the end; --test-per-class N cuts them)" if test_set else \
        "no test split"
    r.log(f"{s.model}: {n_params:,} params; {len(train_set):,} train / {len(val_set):,} val images, {test}; "
          f"{num_classes} classes; {world} process(es) × batch {s.batch_size}; lr {s.lr:.3g} ({s.lr_rule}); "
          f"{s.epochs} epochs = {r.total_steps} steps; amp {s.amp} ({'--amp' if amp_flag else 'default'}); {r.device}; "
          f"scan: {r.config['scan']}; mixer: {r.config['mixer']}")
    if s.max_steps and s.max_steps < r.total_steps and val_flag is None:   # a smoke run: said
        r.log(f"note: the --max-steps {s.max_steps} stop evaluates all {len(val_set):,} validation images; "
              f"--val-per-class N evaluates N per class (a smoke run: 2)")


def scan_choice(device):
    """Which selective scan this process runs: Triton on CUDA, the C++ kernels or the eager PyTorch path on the CPU."""
    if device.type == "cuda":
        return "triton" if scan_kernel.HAS_TRITON else "torch"
    return "cpu (C++ kernels)" if scan_kernel.COMPILE_TORCH_PATH and scan_kernel.scan_kernel_cpu else "torch (eager)"


def mixer_choice(device):
    """Which mixer path the model runs: "fused" (the ordered kernels, where they run) or "readable"."""
    probe = torch.empty(0, device=device)
    return "fused" if scan_kernel.ordered_kernels_take(probe) and localmamba.fused_env() else "readable"


def train_loop(r, sampler, train_loader, loader_gen, epoch, step, batch_in_epoch):
    """Steps to the end (or --max-steps): evaluate on the validation split and checkpoint at the end
    of every epoch, and every --checkpoint-every steps between. Returns where it stopped."""
    s, per_epoch = r.s, r.steps_per_epoch
    stop_at = min(r.total_steps, s.max_steps) if s.max_steps else r.total_steps
    r.clock = dict(t0=time.time(), seen=0, last_print=0.0, first=True)
    r.model.train()
    while step < stop_at:
        sampler.set_epoch(epoch, skip=batch_in_epoch * s.batch_size)
        loader_gen.manual_seed(s.seed * 1000 + r.rank * 100 + epoch)
        for x, y in train_loader:
            r.lr_now = get_lr(step, s.lr, r.warmup_steps, r.total_steps)
            loss = train_step(r, x, y, r.lr_now, (epoch, step))
            r.loss_sum, r.loss_n = r.loss_sum + loss.detach(), r.loss_n + 1
            step, batch_in_epoch = step + 1, batch_in_epoch + 1
            progress(r, loss, step, stop_at, epoch, len(x) * r.world)
            if step >= stop_at:
                break
            if s.checkpoint_every and step % s.checkpoint_every == 0 and batch_in_epoch < per_epoch:
                save_checkpoint(r, epoch, step, batch_in_epoch)     # a crash costs minutes, not the epoch
        if batch_in_epoch >= per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
            save_checkpoint(r, epoch, step, 0, eval_and_log(r, epoch, step))
    if batch_in_epoch:          # stopped inside an epoch (--max-steps)
        save_checkpoint(r, epoch, step, batch_in_epoch, eval_and_log(r, epoch + batch_in_epoch / per_epoch, step))
    return epoch + batch_in_epoch / per_epoch, step


def finish(r, has_test, epoch, step):
    """The test split once, at the run's end (a --max-steps stop is a pause, unless --test-at-stop),
    the search's choice, and the process group closed."""
    at_end = step >= r.total_steps or r.s.test_at_stop
    result = eval_and_log(r, epoch, step, "test") if has_test and at_end else None
    if has_test and not at_end:
        r.log(f"stopped by --max-steps at step {step} of {r.total_steps}: the test split is read once, at the "
              f"run's end (--resume {r.out / 'checkpoint.pt'} to finish; --test-at-stop reads it at a stop)")
    if r.s.search and r.is_main:
        chosen, probs = localmamba.save_directions(r.model, r.out / "directions.json")
        print("\nsearch: softmax(α) per layer\n" + localmamba.draw_search_probabilities(
            probs, localmamba.DIRECTIONS))
        print(f"\nchosen directions (top-4 per layer) written to {r.out / 'directions.json'}:")
        print("\n".join(f"  layer {i:2d}: {d}" for i, d in enumerate(chosen)))
    r.log(f"done in {(time.time() - r.clock['t0']) / 60:.1f} min; outputs in {r.out}")
    if r.world > 1:
        r.ddp = None                  # DDP before its process group: gloo can abort at exit otherwise
        dist.barrier()
        dist.destroy_process_group()
    return result


def prepare_process(s, device, log):
    """On the CPU: freed memory reused, and the scan as the C++ kernels unless --no-compile or
    LOCALMAMBA_COMPILE=0. A warm-up longer than the run is said."""
    if device.type == "cpu":
        localmamba_run.keep_freed_memory()          # freed activations reused, not re-faulted (2× at 784 tokens)
        if not s.no_compile and s.compile_env is not False:
            scan_kernel.use_compiled_torch_path(True)   # the CPU scan as C++ kernels (docs/scan.md)
    if s.warmup_epochs > s.epochs and not s.eval:
        log(f"note: the warm-up ({s.warmup_epochs:g} epochs, --warmup-epochs) is longer than the run ({s.epochs:g} "
            f"epochs): every step is in warm-up, the lr never reaches {s.lr:.3g}")


def train(args):
    rank, world, device = setup_distributed()
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    ckpt = read_run_checkpoint(args.resume) if args.resume else None
    s = resolve_settings(args, None if ckpt is None else ckpt["config"], device, world)
    if s.pretrained:      # the released file, downloaded once, then exactly what --finetune does with it
        s.finetune = str(pretrained_file(s.model))
    fine = localmamba.read_checkpoint(s.finetune) if s.finetune else None
    fine_dirs = adopt_finetune_directions(s, fine) if s.finetune else None
    prepare_process(s, device, log)
    seed_everything(s.seed + rank)                   # torch, Python's random and numpy (timm's transforms)
    r = Run(s=s, rank=rank, world=world, device=device, log=log,
            amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[s.amp])
    if not s.eval:           # the run folder is this run's before anything else is set up
        r.out, r.lock = claim_run_dir(s, r.is_main)
        world > 1 and dist.barrier()     # rank 0 has claimed --out before any rank sets up

    # 1. data, steps, model
    train_set, val_set, test_set, num_classes, in_chans = (imagenet_splits if s.data == "imagenet" else
                                                           fashion_splits)(s, with_train=not s.eval)
    if not s.eval:
        sampler = EpochOrder(len(train_set), s.seed, rank, world, shuffle=True)
        r.steps_per_epoch = len(sampler) // s.batch_size
        r.total_steps, r.warmup_steps = int(s.epochs * r.steps_per_epoch), int(s.warmup_epochs * r.steps_per_epoch)
        if r.total_steps == 0:
            raise UserError(f"{s.epochs} epoch(s) of {len(sampler)} images per process at --batch-size {s.batch_size} "
                            f"is not one step; lower --batch-size, or raise --epochs or the data")
        # re-seeded every epoch: --resume continues exactly (with --workers > 0 the augmentation draws differ)
        train_loader = make_loader(train_set, s, sampler, device, loader_gen := torch.Generator())
    r.model = localmamba.create_model(s.model, num_classes=num_classes, img_size=s.img_size, in_chans=in_chans,
                                      drop_path_rate=s.drop_path, **({"scattn": False} if s.no_scattn else {}),
                                      **({"directions": s.layer_directions} if s.layer_directions else {}))
    if s.finetune and not s.eval:
        load_finetune(r.model, fine, s.finetune, log, fine_dirs, s.finetune_ema)
    r.model.to(device)
    r.eval_loaders = {split: make_loader(ds, s, EpochOrder(len(ds), s.seed, rank, world, False), device)
                      for split, ds in (("val", val_set), ("test", test_set)) if ds is not None}
    if s.eval:               # only the evaluation splits are read: no scan of a 1.28M-image train/
        if ckpt is None:     # --pretrained / --finetune FILE: those weights as they are, strictly
            ckpt, s.resume = {"model": localmamba.weights_of(fine, s.finetune_ema)[1]}, s.finetune
        return evaluate_checkpoint(r, ckpt)

    # 2. optimizer, restore, DDP, EMA
    r.optimizer = localmamba.configure_optimizer(r.model, s.lr, s.weight_decay, s.wd_exempt_ssm, log)
    r.scaler = torch.amp.GradScaler(device.type, enabled=s.amp == "fp16")
    epoch, step, batch_in_epoch = restore(ckpt, r, r.steps_per_epoch) if ckpt is not None else (0, 0, 0)
    r.best_top1 = -1.0 if ckpt is None else ckpt.get("best_top1", -1.0)
    r.ddp, r.ema = wrap_ddp_and_ema(r.model, s, world, device)
    if r.ema is not None and ckpt is not None and ckpt.get("model_ema") is not None:   # (timm's key for it)
        r.ema.module.load_state_dict(ckpt["model_ema"])   # (a run that had none starts at the resumed weights)
    log_run_config(r, (train_set, val_set, test_set), num_classes, in_chans, args.amp, args.val_per_class)

    # 3. the loop, 4. the test split once and the search's choice
    r.mix = make_mix(s, num_classes)
    epoch, step = train_loop(r, sampler, train_loader, loader_gen, epoch, step, batch_in_epoch)
    return finish(r, bool(test_set), epoch, step)


def exit_with_message(run, interrupted):
    """run(); each expected failure as one line on stderr and its exit code: 2 bad input, 3 a
    non-finite loss, 130 Ctrl-C (with `interrupted`: how to continue). Also the study's."""
    try:
        return run()
    except (UserError, scan_kernel.TorchCompileError) as e:
        msg = str(e)
        if "Original Traceback" in msg:   # raised in a DataLoader worker: keep the message, not the trace
            msg = msg.strip().splitlines()[-1].split("BadInput: ", 1)[-1]
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print(f"interrupted: {interrupted}", file=sys.stderr)
        sys.exit(130)
    except OSError as e:         # a write or read the checks above did not foresee (a full disk mid-study): one line
        where = f" {e.filename}" if e.filename else ""
        print(f"error: cannot read or write{where} ({e.strerror or e}); is the disk full, or the path gone?",
              file=sys.stderr)
        sys.exit(2)


def main(argv=None):
    args = _EARLY_ARGS if argv is None and _EARLY_ARGS is not None else parse_args(argv)
    if __name__ == "__main__":
        import signal
        signal.signal(signal.SIGINT, signal.default_int_handler)   # from here Ctrl-C is KeyboardInterrupt: exit 130
    if args.plot:
        return exit_with_message(lambda: print(f"wrote {localmamba_run.draw_run_curves(args.plot)}"), "")
    exit_with_message(lambda: (check_flags(args), train(args)), "to continue, --resume the run's checkpoint.pt if it "
                      "wrote one (every --checkpoint-every steps); otherwise run the same command again")


if __name__ == "__main__":
    main()
