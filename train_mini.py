"""
train_mini.py: train LocalMamba models, run the direction search, reproduce the paper's setup.

Reading guide. Paper: LocalMamba, arXiv 2403.09338, §3.4 (search) and §4.1 (ImageNet recipe).
The official training stack (hunto/LocalMamba classification/tools/train.py + lib/) is a
framework; this is one file with the same recipe: AdamW (lr 1e-3 at a global batch of 1024, eps
1e-8, weight decay 0.04), 20 warmup epochs from 1e-7, cosine to 1e-6, label smoothing 0.1, mixup
0.2 / cutmix 1.0 (switch 0.5), RandAugment m9, random erasing 0.25, RandomResizedCrop + flip;
eval resize img/0.875 (bicubic) + center crop; 300 epochs (supernet 100); drop path 0.1; LocalVim
in fp32, LocalVMamba with AMP (--amp overrides). On purpose different: warmup and cosine are per
step (the official GradualWarmupScheduler is a per-epoch staircase); `--lr` is the rate at a
global batch of 1024, scaled to lr * batch_size * world_size / 1024 (printed at start).

    python train_mini.py                                   # Fashion-MNIST, CPU, ~10-20 minutes
    python train_mini.py --search --out runs/search        # search directions on Fashion-MNIST
    python train_mini.py --directions runs/search/directions.json --out runs/searched
    python train_mini.py --data imagenet --data-dir /data/imagenet --model local_vim_tiny     # one GPU
    torchrun --nproc_per_node=8 train_mini.py --data imagenet --data-dir /data/imagenet \\
        --model local_vmamba_tiny --batch-size 128        # the paper's 8 × 128
    python train_mini.py --data imagenet --data-dir /data/imagenet --eval --resume runs/x/checkpoint.pt
    python experiments/study_scans.py                      # the small-scale study (README "Results")

Fashion-MNIST protocol: the last 500 images of each class of its training file are the
validation split (every logged evaluation, and whatever chooses settings); training draws from
the rest; the 10k test set is evaluated once, at the end. Outputs in --out: log.jsonl (line 1:
the resolved config, then one line per evaluation), checkpoint.pt (written to a temporary file,
then renamed: a crash never destroys the last good one), directions.json after --search.
Exit codes: 0 done, 2 bad input (one message, no traceback), 3 the loss became non-finite.
"""
import argparse
import contextlib
import gzip
import importlib.util
import json
import math
import re
import os
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import localmamba
import scan_kernel

try:
    import fcntl          # POSIX: one writer per run folder (an flock the kernel drops when the process ends)
except ImportError:       # pragma: no cover - Windows: the folder checks hold, without the lock
    fcntl = None

# -----------------------------------------------------------------------------
# defaults per --data (their one home; --help prints them): the paper's ImageNet recipe, a CPU one

DEFAULTS = {
    "imagenet": dict(model="local_vim_tiny", search_model="local_vim_tiny_search", img_size=224, epochs=300,
                     search_epochs=100, batch_size=128, blr=1e-3, weight_decay=0.04, warmup_epochs=20,
                     drop_path=0.1, workers=8, label_smoothing=0.1, mixup=0.2, cutmix=1.0,
                     train_per_class=None, checkpoint_every=1000),
    # Fashion-MNIST: 28×28, patch 2 -> a 14×14 token grid, the grid of ImageNet-224 with patch 16.
    # One pass over the first 4000 images of each class (40k of the 55k not held out) fits ~10-20
    # minutes on 2 CPU cores. lr 0.128 at a global batch of 1024 is 8e-3 at the default batch of 64.
    "fashion-mnist": dict(model="local_vim_nano", search_model="local_vim_nano_search", img_size=28, epochs=1,
                          search_epochs=1, batch_size=64, blr=0.128, weight_decay=0.04, warmup_epochs=0.05,
                          drop_path=0.0, workers=0, label_smoothing=0.1, mixup=0.0, cutmix=0.0,
                          train_per_class=4000, checkpoint_every=200),   # steps: a few minutes of work
}
FASHION_DIR = "/usr/share/datasets/fashion-mnist"     # Debian's dataset-fashion-mnist
FASHION_CACHE = Path.home() / ".cache" / "localmamba"  # where torchvision downloads it when that is missing
FASHION_HOLDOUT = 500                                 # last images per class of the training file: validation
WARMUP_LR, MIN_LR = 1e-7, 1e-6
FASHION_MEAN, FASHION_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class UserError(Exception):
    """Bad input from the user: printed as one message, exit code 2."""


class NonFiniteLoss(Exception):
    """The loss became NaN/inf: printed with what to try, exit code 3."""


# -----------------------------------------------------------------------------
# data: Fashion-MNIST from its IDX files
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path):
    """An IDX file (gzip or plain) -> numpy array. Raises UserError naming the file if broken."""
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        if zero != 0 or dtype != 0x08 or len(data) != 4 + 4 * ndim + math.prod(shape):
            raise ValueError(f"not an unsigned-byte IDX file of the size its header says, {len(data)} bytes")
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise UserError(f"{path} is not a readable IDX file ({e}); re-download it or reinstall "
                        f"Debian's dataset-fashion-mnist") from None


def subset_indices(labels, classes, per_class, skip_last=0, only_last=None):
    """Per class c < classes, in file order: its examples but the last `skip_last`, or only its
    last `only_last`; then the first `per_class` of those."""
    labels = np.asarray(labels)                                    # once: ImageNet's train/ has 1.28M
    by_class = np.argsort(labels, kind="stable")                   # file order kept inside each class
    bounds = np.searchsorted(labels[by_class], np.arange(classes + 1))
    keep = []
    for c in range(classes):
        idx = by_class[bounds[c]:bounds[c + 1]]
        idx = idx[len(idx) - only_last:] if only_last is not None else idx[:len(idx) - skip_last]
        keep += idx[:per_class].tolist()
    return sorted(keep)


class FashionMNIST(torch.utils.data.TensorDataset):
    """Fashion-MNIST images as (1, 28, 28) float tensors, normalised; light augmentation when
    training (random crop from a 2-pixel zero pad, horizontal flip)."""

    def __init__(self, images, labels, idx, classes, train=False):
        super().__init__(torch.from_numpy(images[idx].copy()), torch.from_numpy(labels[idx].astype(np.int64)))
        self.classes, self.train = classes, train

    def __getitem__(self, i):
        x = (self.tensors[0][i].float() / 255 - FASHION_MEAN) / FASHION_STD      # (28, 28)
        if self.train:
            x = F.pad(x, (2, 2, 2, 2), value=-FASHION_MEAN / FASHION_STD)
            r, c = torch.randint(0, 5, (2,)).tolist()
            x = x[r:r + 28, c:c + 28]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x[None], self.tensors[1][i]


def download_fashion(cache):
    """Where Debian's package is missing: Fashion-MNIST through torchvision's downloader, once, into
    cache (its four IDX .gz files land in cache/FashionMNIST/raw). Offline: one message, both ways."""
    raw = Path(cache) / "FashionMNIST" / "raw"
    if not all((raw / f).exists() for f in sum(FASHION_FILES.values(), ())):
        print(f"Fashion-MNIST is not at {FASHION_DIR}: downloading it with torchvision into {cache}", flush=True)
        try:
            from torchvision.datasets import FashionMNIST as Download
            for train in (True, False):
                Download(str(cache), train=train, download=True)
        except Exception as e:
            raise UserError(f"Fashion-MNIST is not at {FASHION_DIR} and could not be downloaded ({type(e).__name__}: "
                            f"{e}); apt-get install dataset-fashion-mnist, or put its four IDX .gz files in a folder "
                            f"and pass --data-dir") from None
    return raw


def fashion_splits(s, with_train=True):
    """(train, val, test, classes, channels): train and val from the training file (val = the last
    FASHION_HOLDOUT images of each class, never trained on), test = the t10k file."""
    root = Path(s.data_dir)
    if not root.is_dir() and s.data_dir == FASHION_DIR:        # no --data-dir and no Debian package
        root = download_fashion(FASHION_CACHE)
    if not root.is_dir():
        raise UserError(f"--data-dir {root} does not exist; install Debian's dataset-fashion-mnist (apt-get install "
                        f"dataset-fashion-mnist) or point --data-dir at the folder of its four .gz files")
    arrays = {}
    for split, names in FASHION_FILES.items():
        for f in (root / n if (root / n).exists() else root / n[:-3] for n in names):   # .gz, or unpacked
            if not f.exists():
                raise UserError(f"{f}.gz is missing; --data-dir must hold Fashion-MNIST's four IDX .gz files")
            arrays.setdefault(split, []).append(read_idx(f))
    (images, labels), (t_images, t_labels) = arrays["train"], arrays["test"]
    classes = s.classes or int(labels.max()) + 1
    if classes > labels.max() + 1:
        raise UserError(f"--classes {classes} is larger than the {labels.max() + 1} classes of Fashion-MNIST")
    cut = lambda lab, n, **kw: subset_indices(lab, classes, n, **kw)
    train = FashionMNIST(images, labels, cut(labels, s.train_per_class, skip_last=FASHION_HOLDOUT), classes,
                         train=True) if with_train else None
    val = FashionMNIST(images, labels, cut(labels, s.val_per_class, only_last=FASHION_HOLDOUT), classes)
    return train, val, FashionMNIST(t_images, t_labels, cut(t_labels, s.test_per_class), classes), classes, 1


# -----------------------------------------------------------------------------
# data: ImageNet layout (root/train/<class>/*, root/val/<class>/*) with torchvision
def load_image(path):
    """An image file as 8-bit RGB. 16-bit and float images are scaled to 8 bits (PIL's own convert
    clips them: a 16-bit PNG would load white, a float TIFF black); a float image outside [0, 1]
    is refused, naming the file."""
    with Image.open(path) as img:
        img.load()
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            a = np.asarray(img, dtype=np.float64)
            lo, hi, scale = (0, 1, 255) if img.mode == "F" else (0, 65535, 1 / 257)
            if a.size and (a.min() < lo or a.max() > hi):
                raise UserError(f"{path}: a {img.mode} image with values in [{a.min():g}, {a.max():g}], outside "
                                f"[{lo}, {hi}]; convert it to 8-bit")
            img = Image.fromarray(np.round(a * scale).astype(np.uint8))
        return img.convert("RGB")


class ImageFolderSubset(ImageFolder):
    """torchvision's ImageFolder, cut to the first `classes` classes and the first `per_class`
    files of each (sorted, so deterministic). A corrupt or truncated image is named in a
    warning and replaced by the next good one (--bad-images skip), or stops the run (stop)."""

    def __init__(self, root, classes, per_class, transform, bad_images="skip"):
        try:
            super().__init__(root, transform, loader=load_image)
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"{root}: {e}. Expected ImageNet layout: {root}/<class>/<image>.JPEG") from None
        if classes is not None and classes > len(self.classes):
            raise UserError(f"--classes {classes} is larger than the {len(self.classes)} classes in {root}")
        self.classes = self.classes[:classes or len(self.classes)]          # samples: by class, then file name
        self.samples = [self.samples[i] for i in subset_indices(self.targets, len(self.classes), per_class)]
        self.targets = [y for _, y in self.samples]                         # kept in step with samples
        self.bad_images, self.warned = bad_images, set()

    @staticmethod
    def make_dataset(directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """ImageFolder's walk, but every real folder once (a symlink loop is not followed round and
        round), and the files it passes over counted in one warning."""
        samples, skipped, seen = [], Counter(), set()
        for name in sorted(class_to_idx):
            for root, dirs, files in os.walk(os.path.join(directory, name), followlinks=True):
                dirs.sort()
                if os.path.realpath(root) in seen:
                    dirs.clear()
                    continue
                seen.add(os.path.realpath(root))
                for f in sorted(files):
                    if has_file_allowed_extension(f, extensions or IMG_EXTENSIONS):
                        samples.append((os.path.join(root, f), class_to_idx[name]))
                    else:
                        skipped[os.path.splitext(f)[1].lower() or f] += 1
        if skipped:
            print(f"warning: {directory}: skipped {sum(skipped.values())} files that are not images "
                  f"({', '.join(f'{k}: {n}' for k, n in skipped.most_common())})", file=sys.stderr)
        found = {y for _, y in samples}
        empty = sorted(c for c, i in class_to_idx.items() if i not in found)
        if empty:
            raise FileNotFoundError(f"Found no valid file for the classes {', '.join(empty)}")
        return samples

    def __getitem__(self, i):
        for k in range(len(self.samples)):
            try:           # ImageFolder's loader opens the image with PIL and converts it: reads it all
                return super().__getitem__((i + k) % len(self.samples))
            except Exception as e:  # PIL raises many types for broken files
                path = self.samples[(i + k) % len(self.samples)][0]
                if self.bad_images == "stop":
                    raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace it, "
                                    f"or run with --bad-images skip") from None
                if path not in self.warned:
                    self.warned.add(path)
                    print(f"warning: skipping unreadable image {path} ({type(e).__name__}: {e})", file=sys.stderr)
        raise UserError("no readable image in the dataset")


def posterize_any_bits(img, bits_to_keep, **_):
    """timm's RandAugment posterize, also for 0 bits kept: a black image, as Pillow < 13 made it.
    timm's magnitude noise reaches level 10 (0 bits) in about 1 draw of 44 at m9 mstd0.5, and Pillow
    13 raises there, which stopped an ImageNet run within its first epoch (timm 1.0.31)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def imagenet_transforms(img_size, train, aa="rand-m9-mstd0.5-inc1", reprob=0.25, use_timm=None):
    """The paper's ImageNet pipeline. Training: RandomResizedCrop, flip, RandAugment `aa` (timm's
    spelling; "none" = off), random erasing `reprob` per pixel, bicubic. With timm installed, timm's
    own create_transform (what the official code ran); else torchvision configured to the same
    strength: timm's magnitude M of 10 levels is torchvision's M of 11 bins (m9: rotate 27°, not the
    9° of torchvision's default 31 bins), filled with the mean; only timm's magnitude noise (mstd) is
    missing there."""
    bicubic, norm = v2.InterpolationMode.BICUBIC, [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                                                   v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if not train:
        return v2.Compose([v2.Resize(int(img_size / 0.875), interpolation=bicubic), v2.CenterCrop(img_size)] + norm)
    if use_timm if use_timm is not None else importlib.util.find_spec("timm") is not None:
        from timm.data import create_transform
        t = create_transform(img_size, is_training=True, auto_augment=None if aa == "none" else aa, re_prob=reprob,
                             re_mode="pixel", interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD)
        for op in (op for step in t.transforms for op in getattr(step, "ops", ())):
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize_any_bits
        return t
    ra = [] if aa == "none" else [v2.RandAugment(2, int(aa.split("-")[1][1:]), 11, interpolation=bicubic,
                                                 fill=[round(255 * c) for c in IMAGENET_MEAN])]
    return v2.Compose([v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=bicubic),
                       v2.RandomHorizontalFlip()] + ra + norm + [v2.RandomErasing(p=reprob, value="random")])


def imagenet_splits(s, with_train=True):
    """(train, val, None): ImageNet's val/ is the split every paper reports; there is no other."""
    root = Path(s.data_dir)
    if not root.is_dir():
        raise UserError(f"--data-dir {root} does not exist; give the ImageNet root that holds train/ and val/")
    make = lambda split, per_class: ImageFolderSubset(root / split, s.classes, per_class, imagenet_transforms(
        s.img_size, split == "train", s.aa, s.reprob), s.bad_images)
    val = make("val", s.val_per_class)
    train = make("train", s.train_per_class) if with_train else None
    if train is not None and train.classes != val.classes:
        diff = next((a, b) for a, b in zip(train.classes + [None], val.classes + [None]) if a != b)
        raise UserError(f"{root}: train/ and val/ have different classes ({len(train.classes)} vs "
                        f"{len(val.classes)}; first difference: {diff})")
    return train, val, None, len(val.classes), 3     # (ImageFolder refuses a class folder without images)


class EpochOrder(torch.utils.data.Sampler):
    """Deterministic order: permutation seeded by (seed, epoch), this rank's shard, minus the
    batches already done (so --resume continues exactly where a checkpoint was written)."""

    def __init__(self, n, seed, rank, world, shuffle):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.skip = 0, 0
        self.per_rank = n // world if shuffle else len(range(rank, n, world))

    def set_epoch(self, epoch, skip=0):         # skip: samples of this rank's shard already trained on
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
            order = torch.randperm(self.n, generator=gen).tolist()
            order = order[:self.per_rank * self.world][self.rank::self.world]        # equal shards for DDP
        else:
            order = list(range(self.rank, self.n, self.world))                         # eval: every sample once
        return iter(order[self.skip:])

    def __len__(self):
        return self.per_rank - self.skip


# -----------------------------------------------------------------------------
# schedule, EMA, checkpoints (the weight-decay groups: localmamba.configure_optimizer)
def get_lr(step, lr, warmup_steps, total_steps):
    """Linear warmup from 1e-7, then cosine to 1e-6, per step."""
    if step < warmup_steps:
        return WARMUP_LR + (lr - WARMUP_LR) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return MIN_LR + 0.5 * (lr - MIN_LR) * (1 + math.cos(math.pi * min(1.0, t)))


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


def save_atomic(obj, path, write=torch.save):
    """Write to a temporary file of this process, fsync it, rename it over path (then fsync the
    folder): a crash, a full disk or another writer never leaves a half-written file at path, and
    the previous file stays whole until the new one is complete. A failed write is one UserError."""
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    try:
        write(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):       # a folder's fsync: POSIX only
            fd = os.open(Path(path).parent, os.O_RDONLY)
            os.fsync(fd), os.close(fd)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write {path} ({e.strerror or e}); the previous {Path(path).name}, if any, is "
                        f"kept") from None


def rng_states(world):
    """Every rank's torch RNG states, in rank order: all the trainer draws from (weights-only loadable)."""
    state = {"torch": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available()
                                                else {})}
    states = [state] * world
    if world > 1:
        dist.all_gather_object(states, state)
    return states


def read_run_checkpoint(path):
    """A checkpoint this trainer wrote (weights-only load: a file cannot run code)."""
    ckpt = localmamba.read_checkpoint(path)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"--resume {path} is not a checkpoint of this trainer (no 'model' and 'config'); "
                        f"to start a new run from its weights (official, timm or DeiT layout), pass it as --finetune")
    return ckpt


# -----------------------------------------------------------------------------
# settings: the command line, then one resolution into a new namespace
FLAGS = [  # (flag, type, help); a default of None is filled in by resolve_settings, per --data from DEFAULTS
    ("--data", str, "fashion-mnist or imagenet"), ("--data-dir", str, f"ImageNet root with train/ and val/; "
     f"Fashion-MNIST: the folder of its 4 IDX .gz files (default {FASHION_DIR})"),
    ("--model", str, "a localmamba.create_model name; with --search the supernet"), ("--img-size", int, "pixels"),
    ("--epochs", float, "(with --search: search_epochs)"), ("--max-steps", int, "stop after N steps (smoke runs)"),
    ("--batch-size/-b", int, "per process"), ("--blr", float, "base lr: the peak lr at a global batch of 1024"),
    ("--lr", float, "the peak lr itself (default: --blr × global batch / 1024, the paper's rule)"),
    ("--weight-decay", float, "AdamW"), ("--warmup-epochs", float, "linear from 1e-7"), ("--drop-path", float, ""),
    ("--label-smoothing/--smoothing", float, ""), ("--mixup", float, "alpha, 0 = off"),
    ("--cutmix", float, "alpha, 0 = off"), ("--aa", str, "ImageNet RandAugment, timm's spelling; none = off"),
    ("--reprob", float, "ImageNet random erasing probability"),
    ("--clip-grad", float, "max grad norm (off by default, as the paper)"), ("--workers", int, "per process"),
    ("--ema-decay/--model-ema-decay", float, "e.g. 0.9998; 0 = no EMA (the paper's default)"),
    ("--model-ema", bool, "EMA with decay 0.9998 (timm's spelling)"), ("--classes", int, "the first N"),
    ("--train-per-class", int, "first N"), ("--val-per-class", int, "first N"), ("--test-per-class", int, "first N"),
    ("--bad-images", str, "skip or stop at an unreadable image"),
    ("--out/--output", str, "default: runs/<model>-<time>-<pid>"),
    ("--finetune", str, "start from these weights (ours, official or timm layout; a head of another size is "
     "re-initialised, pos_embed resampled)"),
    ("--resume", str, "checkpoint.pt to continue from (or to evaluate with --eval)"),
    ("--checkpoint-every", int, "steps between checkpoints besides each epoch's end, 0 = only there"),
    ("--allow-changed-batch", bool, "--resume with another --batch-size or process count (changes the data order)"),
    ("--directions", str, "directions.json from --search: per-layer directions"),
    ("--amp", str, "bf16, fp16 or off (default: off for LocalVim and on CPU, bf16 for LocalVMamba on CUDA, as the "
     "official recipe trained them)"), ("--seed", int, ""), ("--print-every", float, "seconds between progress lines"),
    ("--wd-exempt-ssm", bool, "no weight decay on A_log, D and the search logits α"),
    ("--eval", bool, "only evaluate --resume CKPT (validation and test splits)"), ("--eval-ema", bool, "the EMA's"),
    ("--search", bool, "train a *_search supernet and write directions.json"),
    ("--no-scattn", bool, "ablation: no SCAttn"), ("--no-compile", bool, "CPU: run the scan eagerly, not compiled"),
]
CHOICES = {"data": ("fashion-mnist", "imagenet"), "bad_images": ("skip", "stop"), "amp": ("bf16", "fp16", "off")}
FIXED = dict(data="fashion-mnist", bad_images="skip", ema_decay=0.0, seed=0, print_every=10.0,  # not per --data
             aa="rand-m9-mstd0.5-inc1", reprob=0.25)


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
        p.add_argument(*flags, type=typ, default=FIXED.get(key), choices=CHOICES.get(key), dest=key,
                       help=f"{help} ({default})" if default else help)
    return p.parse_args(argv)


POSITIVE = ("blr", "lr", "epochs", "batch_size", "max_steps", "classes", "train_per_class", "val_per_class",
            "test_per_class", "img_size", "clip_grad")
RANGES = {"weight_decay": (0, math.inf), "warmup_epochs": (0, math.inf), "mixup": (0, math.inf),
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


def adopt_checkpoint_settings(s, saved):
    """--resume / --eval build the model the checkpoint was trained as (model, image size, SCAttn,
    directions from its config); a different value on the command line is refused, since the same
    shapes with other scan directions would load without error and compute something else."""
    for key in ("model", "img_size"):
        if saved.get(key) is not None and getattr(s, key) is None:
            setattr(s, key, saved[key])
        elif saved.get(key) is not None and getattr(s, key) != saved[key]:
            raise UserError(f"--resume {s.resume} was trained with --{key.replace('_', '-')} {saved[key]}, "
                            f"not {getattr(s, key)}; drop the flag or pass the run's own value")
    s.no_scattn = s.no_scattn or bool(saved.get("no_scattn"))
    saved_dirs = None if saved.get("search") or saved.get("directions") is None else saved["directions"]
    if saved_dirs is not None and s.layer_directions is not None and s.layer_directions != saved_dirs:
        raise UserError(f"--directions {s.directions} differs from the directions {s.resume} was trained "
                        f"with; drop --directions (they are read from the checkpoint)")
    s.layer_directions = s.layer_directions or saved_dirs


def resolve_settings(args, saved, device):
    """A new namespace: the command line; for --resume/--eval the run's model settings from its
    checkpoint config `saved`; then the defaults of --data for everything still unset."""
    s = argparse.Namespace(**vars(args))
    if s.search and s.directions:
        raise UserError("--search and --directions do not go together: search first, then train with --directions")
    if s.eval and not s.resume:
        raise UserError("--eval needs --resume CKPT (the checkpoint to evaluate)")
    if s.finetune and s.resume:
        raise UserError("--finetune starts a new run from weights, --resume continues one: pass one of them")
    s.ema_decay = s.ema_decay or (0.9998 if s.model_ema else 0.0)
    if s.aa != "none" and not re.fullmatch(r"rand-m\d+(-(mstd|inc|n|w|mmax|p)[\d.]+)*", s.aa):
        raise UserError(f"--aa {s.aa}: expected timm's RandAugment spelling, e.g. rand-m9-mstd0.5-inc1, or none")
    s.layer_directions = localmamba.load_directions(s.directions) if s.directions else None
    if saved is not None:
        adopt_checkpoint_settings(s, saved)
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
    is_vim = localmamba.MODELS[s.model][0] is localmamba.LocalVimConfig
    s.amp = s.amp or ("bf16" if device.type == "cuda" and not is_vim else "off")
    default_out = Path(s.resume).parent if s.resume else f"runs/{s.model}-{time.strftime('%Y%m%d-%H%M%S')}-" \
                                                         f"{os.getpid()}"
    s.out = str(s.out or default_out)    # a resumed run continues in its own folder
    return s


# -----------------------------------------------------------------------------
# the pieces of a run
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


def make_mix(s, num_classes):
    """mixup 0.2 / cutmix 1.0, one of them per batch (switch prob 0.5), on soft targets."""
    ops = ([v2.MixUp(alpha=s.mixup, num_classes=num_classes)] if s.mixup > 0 else []) + \
          ([v2.CutMix(alpha=s.cutmix, num_classes=num_classes)] if s.cutmix > 0 else [])
    return v2.RandomChoice(ops) if len(ops) > 1 else (ops[0] if ops else None)


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


def make_loader(ds, s, sampler, device, gen=None):
    """A loader with its own generator: an epoch's start draws nothing from the global RNG."""
    return torch.utils.data.DataLoader(ds, s.batch_size, sampler=sampler, drop_last=sampler.shuffle, pin_memory=
                                       device.type == "cuda", generator=gen or torch.Generator(), num_workers=s.workers)


def claim_run_dir(s, is_main, world):
    """Make --out this run's before any setup: created, proven writable, locked by this process
    (an flock: released when the process ends, even killed), and holding no other run. --resume
    continues in the checkpoint's own folder or a new empty one. A folder whose run stopped before
    its first checkpoint is started again, its old log kept aside. Returns (folder, the lock)."""
    out, lock = Path(s.out), None
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = open(out / ".lock", "a")
        except OSError as e:
            raise UserError(f"--out {out} cannot be created or written ({e.strerror or e}); choose another "
                            f"--out") from None
        try:
            fcntl and fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"--out {out} is in use by another run (it holds {out / '.lock'}); wait for it to "
                            f"finish or choose another --out") from None
        has_log, has_ckpt = (out / "log.jsonl").exists(), (out / "checkpoint.pt").exists()
        if s.resume and Path(s.resume).resolve().parent != out.resolve() and (has_log or has_ckpt):
            raise UserError(f"--out {out} holds another run; --resume {s.resume} continues in its own folder "
                            f"(drop --out) or in a new empty one")
        if not s.resume and has_ckpt:   # never overwrite a run the user made
            raise UserError(f"{out} already holds a run (checkpoint.pt); pass --resume {out / 'checkpoint.pt'} "
                            f"to continue it, or choose another --out")
        if not s.resume and has_log:
            aside = out / f"log.stopped-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
            os.replace(out / "log.jsonl", aside)
            print(f"{out} holds a run that stopped before its first checkpoint: starting it again; its log is "
                  f"kept as {aside}", flush=True)
    if world > 1:
        dist.barrier()          # rank 0 has claimed --out before any rank sets up
    return out, lock


def load_finetune(model, path, log):
    """--finetune: weights only, from our, the official or timm's checkpoint layout (a DDP prefix
    dropped); a head for another number of classes keeps its fresh init; pos_embed is resampled."""
    sd = {k.removeprefix("module."): v for k, v in localmamba.state_dict_of(localmamba.read_checkpoint(path)).items()}
    own = model.state_dict()
    head = {n for n, _ in model.named_parameters() if n.startswith(("head.", "classifier.head."))}
    fresh = [k for k in head if k in sd and sd[k].shape != own[k].shape]
    localmamba.load_state_dict_strict(model, {**sd, **{k: own[k] for k in fresh}}, path)
    log(f"--finetune {path}: weights loaded" + (f"; the head re-initialised for {model.num_classes} classes"
                                                 if fresh else ""))


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
        torch.set_rng_state(ckpt["rng"][r.rank]["torch"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"][r.rank].get("cuda", torch.cuda.get_rng_state_all()))
    else:
        batch_in_epoch = batch_in_epoch * before[0] * before[1] // (now[0] * now[1])    # images seen, in new batches
        torch.manual_seed(r.s.seed + 1000 * ckpt["step"] + r.rank)
        r.log(f"--allow-changed-batch: batch {before[0]} x {before[1]} -> {now[0]} x {now[1]}: the epoch continues "
              f"after the same number of images, in another order; the lr follows the new global batch; RNG reseeded")
    step = ckpt["step"] if before == now else epoch * steps_per_epoch + batch_in_epoch
    r.log(f"resumed from {r.s.resume} at epoch {epoch}, step {step}")
    return epoch, step, batch_in_epoch


def save_checkpoint(r, epoch, step, batch_in_epoch, rec=None):
    """checkpoint.pt; and best.pt too when rec, a validation record, is the best top-1 so far."""
    states = rng_states(r.world)           # every rank takes part; rank 0 writes
    best = rec is not None and rec["top1"] > r.best_top1
    r.best_top1 = rec["top1"] if best else r.best_top1
    if r.is_main:
        ckpt = {"model": r.model.state_dict(), "optimizer": r.optimizer.state_dict(), "scaler": r.scaler.state_dict(),
                "model_ema": r.ema.module.state_dict() if r.ema else None, "epoch": epoch, "step": step,
                "batch_in_epoch": batch_in_epoch, "config": r.config, "rng": states, "best_top1": r.best_top1}
        ckpt["checksum"] = localmamba.tensor_checksum(ckpt)
        for name in ("checkpoint.pt", "best.pt") if best else ("checkpoint.pt",):
            save_atomic(ckpt, r.out / name)


def log_json(r, rec):
    if r.is_main:                              # rank 0 appends one line to the run's log
        with open(r.out / "log.jsonl", "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")


def eval_and_log(r, epoch, step, split="val"):
    res = evaluate(r.model, r.eval_loaders[split], r.device, r.amp_dtype, r.world)
    rec = {"split": split, "epoch": epoch, "step": step, "top1": res["top1"], "top5": res["top5"],
           "loss": res["loss"], "time_s": round(time.time() - r.clock["t0"], 1)}
    if r.ema is not None:
        rec["top1_ema"] = evaluate(r.ema.module, r.eval_loaders[split], r.device, r.amp_dtype, r.world)["top1"]
    if r.s.search:
        rec["search_probs"] = [[round(p, 5) for p in row] for row in localmamba.search_probabilities(r.model).tolist()]
    log_json(r, rec)
    r.log(f"{split} epoch {epoch:.4g} step {step}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  "
          f"loss {res['loss']:.4f}")
    return rec


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


def progress(r, loss, step, stop_at, epoch, n_images):
    """A progress line every --print-every seconds; the first one also estimates the whole run."""
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
    print(f"epoch {epoch} step {step}/{stop_at}  loss {loss.item():.4f}  {rate:.1f} img/s  "
          f"{left / 60:.1f} min left{first}", flush=True)


# -----------------------------------------------------------------------------
# the run: a table of contents, then the loop
def log_run_config(r, lr, sets, num_classes, in_chans, amp_flag):
    """Line 1 of log.jsonl (the resolved config, what --resume and --eval rebuild the run from) and
    the run's one-line summary."""
    s, world, (train_set, val_set, test_set) = r.s, r.world, sets
    n_params = sum(p.numel() for p in r.model.parameters())
    r.config = dict(vars(s), world_size=world, global_batch=s.batch_size * world, lr_used=lr,
                    num_classes=num_classes, in_chans=in_chans, params=n_params, steps_per_epoch=r.steps_per_epoch,
                    total_steps=r.total_steps, train_images=len(train_set), val_images=len(val_set),
                    test_images=len(test_set) if test_set else 0, directions=r.model.directions,
                    device=str(r.device), torch=str(torch.__version__))
    log_json(r, r.config)
    r.log(f"{s.model}: {n_params:,} params; {len(train_set):,} train / {len(val_set):,} val images, {num_classes} "
          f"classes; {world} process(es) × batch {s.batch_size}; lr {lr:.3g} "
          f"({'--lr' if s.lr else f'= --blr {s.blr:g} × {s.batch_size * world} / 1024'}); {s.epochs} epochs = "
          f"{r.total_steps} steps; amp {s.amp} ({'--amp' if amp_flag else 'default'}); {r.device}")


def train_loop(r, sampler, train_loader, loader_gen, lr, epoch, step, batch_in_epoch):
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
            loss = train_step(r, x, y, get_lr(step, lr, r.warmup_steps, r.total_steps), (epoch, step))
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
    """The test split once, the search's choice, and the process group closed."""
    result = eval_and_log(r, epoch, step, "test") if has_test else None
    if r.s.search and r.is_main:
        chosen, probs = localmamba.save_directions(r.model, r.out / "directions.json")
        print("\nsearch: softmax(α) per layer\n" + localmamba.draw_search_probabilities(probs))
        print(f"\nchosen directions (top-4 per layer) written to {r.out / 'directions.json'}:")
        print("\n".join(f"  layer {i:2d}: {d}" for i, d in enumerate(chosen)))
    r.log(f"done in {(time.time() - r.clock['t0']) / 60:.1f} min; outputs in {r.out}")
    if r.world > 1:
        r.ddp = None                  # DDP before its process group: gloo can abort at exit otherwise
        dist.barrier()
        dist.destroy_process_group()
    return result


def train(args):
    rank, world, device = setup_distributed()
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)
    ckpt = read_run_checkpoint(args.resume) if args.resume else None
    s = resolve_settings(args, None if ckpt is None else ckpt["config"], device)
    if device.type == "cpu" and not s.no_compile:
        scan_kernel.use_compiled_torch_path(True)   # the CPU scan as fused C++ (torch.compile): ~1.5-2x faster
    torch.manual_seed(s.seed + rank)
    r = argparse.Namespace(s=s, rank=rank, world=world, device=device, log=log, is_main=rank == 0,
                           amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[s.amp])
    if not s.eval:           # the run folder is this run's before anything else is set up
        r.out, r.lock = claim_run_dir(s, r.is_main, world)

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
    if s.finetune:
        load_finetune(r.model, s.finetune, log)
    r.model.to(device)
    r.eval_loaders = {split: make_loader(ds, s, EpochOrder(len(ds), s.seed, rank, world, False), device)
                      for split, ds in (("val", val_set), ("test", test_set)) if ds is not None}
    if s.eval:               # only the evaluation splits are read: no scan of a 1.28M-image train/
        return evaluate_checkpoint(r, ckpt)

    # 2. optimizer, restore, DDP, EMA
    lr = s.lr or s.blr * s.batch_size * world / 1024          # absolute when given, else the paper's rule
    r.optimizer = localmamba.configure_optimizer(r.model, lr, s.weight_decay, s.wd_exempt_ssm, log)
    r.scaler = torch.amp.GradScaler(device.type, enabled=s.amp == "fp16")
    epoch, step, batch_in_epoch = restore(ckpt, r, r.steps_per_epoch) if ckpt is not None else (0, 0, 0)
    r.best_top1 = -1.0 if ckpt is None else ckpt.get("best_top1", -1.0)
    r.ddp, r.ema = wrap_ddp_and_ema(r.model, s, world, device)
    if r.ema is not None and ckpt is not None and ckpt.get("model_ema") is not None:   # (timm's key for it)
        r.ema.module.load_state_dict(ckpt["model_ema"])   # (a run that had none starts at the resumed weights)
    log_run_config(r, lr, (train_set, val_set, test_set), num_classes, in_chans, args.amp)

    # 3. the loop, 4. the test split once and the search's choice
    r.mix = make_mix(s, num_classes)
    epoch, step = train_loop(r, sampler, train_loader, loader_gen, lr, epoch, step, batch_in_epoch)
    return finish(r, bool(test_set), epoch, step)


def main(argv=None):
    args = parse_args(argv)
    try:
        check_flags(args)
        train(args)
    except (UserError, localmamba.BadInput, scan_kernel.TorchCompileError) as e:
        msg = str(e)
        if "Original Traceback" in msg:   # raised in a DataLoader worker: keep the message, not the trace
            msg = msg.strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted: to continue, --resume the run's checkpoint.pt if it wrote one (every "
              "--checkpoint-every steps); otherwise run the same command again", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
