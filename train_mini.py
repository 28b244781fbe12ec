"""
train_mini.py: train LocalMamba models, run the direction search, reproduce the paper's setup.

Reading guide
-------------
Paper: LocalMamba, arXiv 2403.09338, §3.4 (search) and §4.1 (ImageNet recipe). The official
training stack (hunto/LocalMamba classification/tools/train.py + lib/) is a framework; this is
one file with the same recipe (SPEC.md §6, §9):

    AdamW (lr 1e-3 at a global batch of 1024, eps 1e-8, weight decay 0.04), 20 warmup epochs
    from 1e-7, per-step cosine to 1e-6, label smoothing 0.1, mixup 0.2 / cutmix 1.0 (switch
    0.5), RandAugment m9, random erasing 0.25, RandomResizedCrop + flip; eval resize img/0.875
    (bicubic) + center crop; 300 epochs (supernet 100); drop path 0.1 (LocalVim-T).

The learning rate scales linearly with the global batch: `--lr` is the rate at a global batch
of 1024, and what is used is lr * batch_size * world_size / 1024 (printed at start).

Copy-paste commands:
    python train_mini.py                                   # Fashion-MNIST, CPU, ~10 minutes
    python train_mini.py --search --out runs/search        # search directions on Fashion-MNIST
    python train_mini.py --directions runs/search/directions.json --out runs/searched
    python train_mini.py --data imagenet --data-dir /data/imagenet --model local_vim_tiny     # one GPU
    torchrun --nproc_per_node=8 train_mini.py --data imagenet --data-dir /data/imagenet \\
        --model local_vmamba_tiny --batch-size 128        # the paper's 8 × 128
    python train_mini.py --data imagenet --data-dir /data/imagenet --model local_vim_tiny \\
        --eval --resume runs/x/checkpoint.pt              # evaluate a checkpoint
    python train_mini.py --study scans                     # the small-scale study (README "Results")

Outputs in --out: log.jsonl (line 1: the resolved config; then one line per evaluation),
checkpoint.pt (written to a temporary file, then renamed: a crash never destroys the last
good one), directions.json after --search.

Exit codes: 0 done, 2 bad input (one message, no traceback), 3 the loss became non-finite.
"""
import argparse
import gzip
import json
import math
import os
import random
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import localmamba

# -----------------------------------------------------------------------------
# defaults: the paper's ImageNet recipe, and a small CPU recipe for Fashion-MNIST

FASHION_DIR = "/usr/share/datasets/fashion-mnist"     # Debian's dataset-fashion-mnist
DEFAULTS = {
    "imagenet": dict(model="local_vim_tiny", search_model="local_vim_tiny_search", img_size=224, epochs=300,
                     search_epochs=100, batch_size=128, lr=1e-3, weight_decay=0.04, warmup_epochs=20,
                     drop_path=0.1, workers=8, label_smoothing=0.1, mixup=0.2, cutmix=1.0),
    # Fashion-MNIST: 28×28, patch 2 -> a 14×14 token grid, the grid of ImageNet-224 with patch 16.
    # One pass over the first 4000 images of each class (40k of 60k) fits ~10 minutes on 2 CPU
    # cores. lr 0.128 at a global batch of 1024 is 8e-3 at the default batch of 64 (higher than
    # ImageNet's: measured 72% vs 59% after 150 steps against 0.032).
    "fashion-mnist": dict(model="local_vim_nano", search_model="local_vim_nano_search", img_size=28, epochs=1,
                          search_epochs=1, batch_size=64, lr=0.128, weight_decay=0.04, warmup_epochs=0.05,
                          drop_path=0.0, workers=0, label_smoothing=0.1, mixup=0.0, cutmix=0.0,
                          train_per_class=4000),
}
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
                 "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path):
    """An IDX file (gzip or plain) -> numpy array. Raises UserError naming the file if broken."""
    path = Path(path)
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
        if arr.size != math.prod(shape):
            raise ValueError(f"holds {arr.size} values, its header says {math.prod(shape)}")
        return arr.reshape(shape)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise UserError(f"{path} is not a readable IDX file ({e}); re-download it or reinstall "
                        f"Debian's dataset-fashion-mnist") from None


def subset_indices(labels, classes, per_class):
    """The first `per_class` examples (in file order) of each of the first `classes` classes."""
    keep, seen = [], {}
    for i, y in enumerate(labels.tolist()):
        if y < classes and (per_class is None or seen.get(y, 0) < per_class):
            seen[y] = seen.get(y, 0) + 1
            keep.append(i)
    return keep


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST as (1, 28, 28) float tensors, normalised; light augmentation when training
    (random crop from a 2-pixel zero pad, horizontal flip)."""

    def __init__(self, root, split, classes=None, per_class=None, train=False):
        root = Path(root)
        if not root.is_dir():
            raise UserError(f"--data-dir {root} does not exist; install Debian's dataset-fashion-mnist "
                            f"(apt-get install dataset-fashion-mnist) or point --data-dir at the folder of its four .gz files")
        img_file, lab_file = (root / f for f in FASHION_FILES[split])
        for f in (img_file, lab_file):
            if not f.exists() and not f.with_suffix("").exists():
                raise UserError(f"{f} is missing; --data-dir must hold {', '.join(sum(FASHION_FILES.values(), ()))}")
        pick = lambda f: f if f.exists() else f.with_suffix("")
        images, labels = read_idx(pick(img_file)), read_idx(pick(lab_file))
        if len(images) != len(labels):
            raise UserError(f"{img_file} has {len(images)} images but {lab_file} {len(labels)} labels")
        self.num_classes = int(labels.max()) + 1
        classes = classes or self.num_classes
        if classes > self.num_classes:
            raise UserError(f"--classes {classes} is larger than the {self.num_classes} classes of Fashion-MNIST")
        idx = subset_indices(labels, classes, per_class)
        self.images = torch.from_numpy(images[idx].copy())
        self.labels = torch.from_numpy(labels[idx].astype(np.int64))
        self.classes, self.train = classes, train

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = (self.images[i].float() / 255 - FASHION_MEAN) / FASHION_STD          # (28, 28)
        if self.train:
            x = F.pad(x, (2, 2, 2, 2), value=-FASHION_MEAN / FASHION_STD)
            r, c = torch.randint(0, 5, (2,)).tolist()
            x = x[r:r + 28, c:c + 28]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x[None], self.labels[i]


# -----------------------------------------------------------------------------
# data: ImageNet layout (root/train/<class>/*, root/val/<class>/*) with torchvision

class ImageFolderSubset(torch.utils.data.Dataset):
    """torchvision's ImageFolder, cut to the first `classes` classes and the first `per_class`
    files of each (sorted, so deterministic). A corrupt or truncated image is named in a
    warning and replaced by the next good one (--bad-images skip), or stops the run (stop)."""

    def __init__(self, root, classes, per_class, transform, bad_images="skip"):
        from torchvision.datasets import ImageFolder
        try:
            full = ImageFolder(root)
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"{root}: {e}. Expected ImageNet layout: {root}/<class>/<image>.JPEG") from None
        if classes is not None and classes > len(full.classes):
            raise UserError(f"--classes {classes} is larger than the {len(full.classes)} classes in {root}")
        n_cls = classes or len(full.classes)
        self.classes = full.classes[:n_cls]
        # full.samples is sorted by class, then by file name
        self.samples = [full.samples[i] for i in subset_indices(np.array(full.targets), n_cls, per_class)]
        self.loader, self.transform, self.bad_images = full.loader, transform, bad_images
        self.warned = set()

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        for k in range(len(self.samples)):
            path, y = self.samples[(i + k) % len(self.samples)]
            try:
                img = self.loader(path)
                img.load()
                return self.transform(img), y
            except Exception as e:  # PIL raises many types for broken files
                if self.bad_images == "stop":
                    raise UserError(f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace it, "
                                    f"or run with --bad-images skip") from None
                if path not in self.warned:
                    self.warned.add(path)
                    print(f"warning: skipping unreadable image {path} ({type(e).__name__}: {e})", file=sys.stderr, flush=True)
        raise UserError("no readable image in the dataset")


def imagenet_transforms(img_size, train):
    from torchvision.transforms import v2
    norm = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if not train:
        return v2.Compose([v2.Resize(int(img_size / 0.875), interpolation=v2.InterpolationMode.BICUBIC),
                           v2.CenterCrop(img_size)] + norm)
    # rand-m9-mstd0.5 in timm draws the magnitude from N(9, 0.5); torchvision's RandAugment uses 9 exactly.
    return v2.Compose([v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC),
                       v2.RandomHorizontalFlip(), v2.RandAugment(num_ops=2, magnitude=9)] + norm +
                      [v2.RandomErasing(p=0.25, value="random")])


def check_imagenet_root(root, splits=("train", "val")):
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"--data-dir {root} does not exist; give the ImageNet root that holds train/ and val/")
    for split in splits:
        d = root / split
        if not d.is_dir():
            raise UserError(f"{root} has no {split}/ folder; expected {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG")
        if not any(p.is_dir() for p in d.iterdir()):
            raise UserError(f"{d} is empty; expected one folder per class with images in it")


def build_data(args, with_train=True):
    """(train_set, val_set, num_classes, in_chans); train_set is None without with_train (--eval)."""
    if args.data == "fashion-mnist":
        tr = FashionMNIST(args.data_dir, "train", args.classes, args.train_per_class, train=True) if with_train else None
        va = FashionMNIST(args.data_dir, "val", args.classes, args.val_per_class)
        return tr, va, va.classes, 1
    check_imagenet_root(args.data_dir, ("train", "val") if with_train else ("val",))
    va = ImageFolderSubset(Path(args.data_dir) / "val", args.classes, args.val_per_class,
                           imagenet_transforms(args.img_size, False), args.bad_images)
    if not with_train:
        if len(va) == 0:
            raise UserError(f"{Path(args.data_dir) / 'val'} holds no images")
        return None, va, len(va.classes), 3
    tr = ImageFolderSubset(Path(args.data_dir) / "train", args.classes, args.train_per_class,
                           imagenet_transforms(args.img_size, True), args.bad_images)
    if tr.classes != va.classes:
        raise UserError(f"{args.data_dir}: train/ and val/ have different classes "
                        f"({len(tr.classes)} vs {len(va.classes)}; first difference: "
                        f"{next((a, b) for a, b in zip(tr.classes + [None], va.classes + [None]) if a != b)})")
    for name, ds in (("train", tr), ("val", va)):
        if len(ds) == 0:
            raise UserError(f"{Path(args.data_dir) / name} holds no images")
    return tr, va, len(tr.classes), 3


class EpochOrder(torch.utils.data.Sampler):
    """Deterministic order: permutation seeded by (seed, epoch), this rank's shard, minus the
    batches already done (so --resume continues exactly where a checkpoint was written)."""

    def __init__(self, n, seed, rank, world, shuffle):
        self.n, self.seed, self.rank, self.world, self.shuffle = n, seed, rank, world, shuffle
        self.epoch, self.skip = 0, 0
        self.per_rank = n // world if shuffle else len(range(rank, n, world))

    def set_epoch(self, epoch, skip=0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        if self.shuffle:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)).tolist()
            order = order[:self.per_rank * self.world][self.rank::self.world]        # equal shards for DDP
        else:
            order = list(range(self.rank, self.n, self.world))                         # eval: every sample once
        return iter(order[self.skip:])

    def __len__(self):
        return self.per_rank - self.skip


# -----------------------------------------------------------------------------
# optimiser, schedule, EMA

def configure_optimizer(model, lr, weight_decay, exempt_ssm, log):
    """AdamW with two groups. As the official run: every tensor with >= 2 dims is decayed
    except the names in model.no_weight_decay() (pos_embed, cls_token); 1-D tensors (biases,
    norms, D) are not. The official optimizer ignored the `_no_weight_decay` flags, so A_log
    and the search logits α were decayed; --wd-exempt-ssm exempts A_log, D and α as Mamba intends."""
    skip = model.no_weight_decay()
    ssm = lambda n: n.split(".")[-1].startswith(("A_log", "D_", "Ds")) or n.endswith("multi_scan.weights")
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2 or n in skip or (exempt_ssm and ssm(n)):
            no_decay.append((n, p))
        else:
            decay.append((n, p))
    names = [n for n, _ in decay] + [n for n, _ in no_decay]
    assert len(names) == len(set(names)) == sum(1 for p in model.parameters() if p.requires_grad), "a parameter in two groups"
    log(f"optimizer: AdamW, {len(decay)} tensors ({sum(p.numel() for _, p in decay):,} params) with weight decay "
        f"{weight_decay}, {len(no_decay)} tensors ({sum(p.numel() for _, p in no_decay):,} params) without")
    return torch.optim.AdamW([{"params": [p for _, p in decay], "weight_decay": weight_decay},
                              {"params": [p for _, p in no_decay], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.999), eps=1e-8)


def get_lr(step, lr, warmup_steps, total_steps):
    """Linear warmup from 1e-7, then cosine to 1e-6, per step."""
    if step < warmup_steps:
        return WARMUP_LR + (lr - WARMUP_LR) * step / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return MIN_LR + 0.5 * (lr - MIN_LR) * (1 + math.cos(math.pi * min(1.0, t)))


class EMA:
    """Exponential moving average of the weights (off by default, as in the paper)."""

    def __init__(self, model, decay):
        import copy
        self.decay, self.model = decay, copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model):
        for e, m in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.lerp_(m, 1 - self.decay)
            else:
                e.copy_(m)


# -----------------------------------------------------------------------------
# checkpoints and logs

def save_atomic(obj, path, write=torch.save):
    """Write to path.tmp, then rename: the old file survives any crash before the rename."""
    tmp = Path(str(path) + ".tmp")
    write(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    s = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    np.random.set_state(s["numpy"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def heat_map(probs, directions=localmamba.DIRECTIONS):
    """Per-layer softmax(α) as text: one row per layer, one column per candidate."""
    shades = " .:-=+*#%@"
    lo, hi = probs.min().item(), probs.max().item()
    lines = ["layer  " + " ".join(f"{d:>7s}" for d in directions) + "   (darker = more probable)"]
    for i, row in enumerate(probs.tolist()):
        cells = []
        for p in row:
            k = int((p - lo) / max(hi - lo, 1e-12) * (len(shades) - 1))
            cells.append(f"{shades[k] * 2}{p:5.3f}")
        lines.append(f"{i:5d}  " + " ".join(cells))
    return "\n".join(lines)


def load_directions(path):
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"--directions {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--directions {path} is not valid JSON ({e})") from None
    dirs = data.get("directions") if isinstance(data, dict) else data
    if not isinstance(dirs, list) or not all(isinstance(d, list) for d in dirs):
        raise UserError(f"--directions {path} must hold a list of per-layer lists of direction names "
                        f"(or {{\"directions\": [...]}} as --search writes it)")
    return dirs


# -----------------------------------------------------------------------------
# train / evaluate

@torch.no_grad()
def evaluate(model, loader, device, amp_dtype, world):
    """top-1, top-5 (percent) and mean loss over the whole split, summed over all ranks."""
    model.eval()
    stats = torch.zeros(4, dtype=torch.float64, device=device)   # n, correct1, correct5, loss sum
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        stats += torch.stack([torch.tensor(float(len(y)), device=device), (top[:, 0] == y).sum(),  # no sync per batch
                              (top == y[:, None]).any(1).sum(), F.cross_entropy(logits, y, reduction="sum")]).double()
    if world > 1:
        dist.all_reduce(stats)
    n = stats[0].item()
    model.train()
    return dict(top1=100 * stats[1].item() / n, top5=100 * stats[2].item() / n, loss=stats[3].item() / n, n=int(n))


def make_mix(args, num_classes):
    """mixup 0.2 / cutmix 1.0, one of them per batch (switch prob 0.5), on soft targets."""
    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    from torchvision.transforms import v2
    ops = []
    if args.mixup > 0:
        ops.append(v2.MixUp(alpha=args.mixup, num_classes=num_classes))
    if args.cutmix > 0:
        ops.append(v2.CutMix(alpha=args.cutmix, num_classes=num_classes))
    return v2.RandomChoice(ops) if len(ops) > 1 else ops[0]


def soft_cross_entropy(logits, target, smoothing):
    """Cross-entropy on hard (B,) or mixed (B, classes) targets with label smoothing."""
    if target.dim() == 1:
        return F.cross_entropy(logits, target, label_smoothing=smoothing)
    target = target * (1 - smoothing) + smoothing / logits.shape[1]
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def setup_distributed():
    """(rank, world, local_rank, device) from torchrun's environment, or a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, local = 0, 0
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, local, device


def read_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise UserError(f"--resume {path} does not exist") from None
    except Exception as e:
        raise UserError(f"--resume {path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"--resume {path} holds no 'model' entry; for official checkpoints use "
                        f"localmamba.load_checkpoint")
    return ckpt


def load_weights(model, state_dict, path):
    """The checkpoint's weights into model, strictly; a mismatch is one UserError."""
    try:
        localmamba.load_state_dict_strict(model, state_dict, str(path))
    except ValueError as e:
        raise UserError(str(e)) from None


def adopt_run_settings(args, saved):
    """--resume / --eval build the model the checkpoint was trained as: its model name, image size,
    SCAttn switch and per-layer directions come from the checkpoint's config unless given on the
    command line, and a different value given there is refused (the same shapes with other scan
    directions would load without error and silently compute something else). Returns the
    checkpoint's directions (None for a supernet or an old checkpoint without them)."""
    for key in ("model", "img_size"):
        if saved.get(key) is not None:
            if getattr(args, key) is None:
                setattr(args, key, saved[key])
            elif getattr(args, key) != saved[key]:
                raise UserError(f"--resume {args.resume} was trained with --{key.replace('_', '-')} {saved[key]}, "
                                f"not {getattr(args, key)}; drop the flag or pass the run's own value")
    if saved.get("no_scattn"):
        args.no_scattn = True
    dirs = None if saved.get("search") or saved.get("directions") is None else [list(d) for d in saved["directions"]]
    if dirs is not None and args.directions and load_directions(args.directions) != dirs:
        raise UserError(f"--directions {args.directions} differs from the directions {args.resume} was trained "
                        f"with; drop --directions (they are read from the checkpoint)")
    return dirs


def train(args):
    rank, world, _, device = setup_distributed()
    is_main = rank == 0
    d = DEFAULTS[args.data]
    ckpt = read_checkpoint(args.resume) if args.resume else None
    saved_directions = adopt_run_settings(args, ckpt.get("config") or {}) if ckpt is not None else None
    for key in ("img_size", "batch_size", "lr", "weight_decay", "warmup_epochs", "workers", "label_smoothing",
                "mixup", "cutmix"):
        if getattr(args, key) is None:
            setattr(args, key, d[key])
    if args.drop_path is None:
        args.drop_path = d["drop_path"]
    if args.epochs is None:
        args.epochs = d["search_epochs"] if args.search else d["epochs"]
    if args.train_per_class is None and args.data == "fashion-mnist" and not args.eval:
        args.train_per_class = d.get("train_per_class")
    if args.model is None:
        args.model = d["search_model"] if args.search else d["model"]
    if args.data_dir is None:
        if args.data == "imagenet":
            raise UserError("--data imagenet needs --data-dir PATH (the folder that holds train/ and val/)")
        args.data_dir = FASHION_DIR
    if args.model not in localmamba.MODELS:
        raise UserError(f"--model {args.model} is not a model; choose one of: {', '.join(localmamba.MODELS)}")
    if args.search and not args.model.endswith("_search"):
        raise UserError(f"--search trains a supernet: pick a *_search model, not {args.model}")
    if args.search and args.directions:
        raise UserError("--search and --directions do not go together: search first, then train with --directions")
    if args.eval and not args.resume:
        raise UserError("--eval needs --resume CKPT (the checkpoint to evaluate)")
    amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    if device.type == "cpu" and not args.no_compile:
        import scan_kernel
        scan_kernel.compile_torch_path(True)   # the CPU scan as fused C++ (torch.compile): ~1.5-2x faster
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]

    if args.out is None:
        args.out = f"runs/{args.model}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(args.out)
    log_path = out / "log.jsonl"
    if log_path.exists() and not args.resume and not args.eval:   # never overwrite a run the user made
        raise UserError(f"{out} already holds a run (log.jsonl); pass --resume {out / 'checkpoint.pt'} "
                        f"to continue it, or choose another --out")
    log = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)

    torch.manual_seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    random.seed(args.seed + rank)

    train_set, val_set, num_classes, in_chans = build_data(args, with_train=not args.eval)
    directions = load_directions(args.directions) if args.directions else saved_directions
    kw = dict(num_classes=num_classes, img_size=args.img_size, in_chans=in_chans, drop_path_rate=args.drop_path)
    if directions is not None:
        kw["directions"] = directions
    if args.no_scattn:
        kw["scattn"] = False
    try:
        model = localmamba.create_model(args.model, **kw)
    except ValueError as e:
        raise UserError(f"cannot build {args.model}: {e}") from None
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())

    val_sampler = EpochOrder(len(val_set), args.seed, rank, world, shuffle=False)
    loader_kw = dict(num_workers=args.workers, pin_memory=device.type == "cuda", persistent_workers=False)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size, sampler=val_sampler,
                                             generator=torch.Generator().manual_seed(args.seed), **loader_kw)
    if args.eval:               # only the validation split is read: no scan of a 1.28M-image train/
        weights = "ema" if args.eval_ema else "model"
        if args.eval_ema and ckpt.get("ema") is None:
            raise UserError(f"--eval-ema: {args.resume} holds no EMA weights (its run had --ema-decay 0)")
        load_weights(model, ckpt[weights], args.resume)
        res = evaluate(model, val_loader, device, amp_dtype, world)
        log(json.dumps({"eval": args.resume, "weights": weights, **res}))
        return res

    global_batch = args.batch_size * world
    lr = args.lr * global_batch / 1024
    train_sampler = EpochOrder(len(train_set), args.seed, rank, world, shuffle=True)
    # The loader draws its workers' seeds from its own generator, re-seeded every epoch, so that
    # starting an epoch does not consume the global RNG: --resume then continues exactly (with
    # --workers 0; with workers the order is exact and the augmentation draws differ).
    loader_gen = torch.Generator()
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, sampler=train_sampler,
                                               drop_last=True, generator=loader_gen, **loader_kw)
    steps_per_epoch = len(train_sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise UserError(f"the training set has {len(train_sampler)} images per process, fewer than --batch-size "
                        f"{args.batch_size}; lower --batch-size or use more data")
    total_steps = int(args.epochs * steps_per_epoch)
    warmup_steps = int(args.warmup_epochs * steps_per_epoch)

    optimizer = configure_optimizer(model, lr, args.weight_decay, args.wd_exempt_ssm, log)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    ema = EMA(model, args.ema_decay) if args.ema_decay > 0 else None
    ddp = model
    if world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    epoch, step, batch_in_epoch = 0, 0, 0
    if ckpt is not None:
        load_weights(model, ckpt["model"], args.resume)
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        if ema is not None:     # a run that had no EMA starts its average at the resumed weights
            ema.model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else model.state_dict())
        epoch, step, batch_in_epoch = ckpt["epoch"], ckpt["step"], ckpt["batch_in_epoch"]
        set_rng_state(ckpt["rng"])
        log(f"resumed from {args.resume} at epoch {epoch}, step {step}")

    config = {k: v for k, v in vars(args).items()}
    config.update(world_size=world, global_batch=global_batch, lr_used=lr, amp=amp, num_classes=num_classes,
                  in_chans=in_chans, params=n_params, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                  train_images=len(train_set), val_images=len(val_set), directions=model.directions,
                  device=str(device), torch=torch.__version__)

    if world > 1:
        dist.barrier()          # every rank has checked --out before rank 0 writes to it
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as f:
            f.write(json.dumps(config, default=str) + "\n")
    log(f"{args.model}: {n_params:,} params; {len(train_set):,} train / {len(val_set):,} val images, "
        f"{num_classes} classes; {world} process(es) × batch {args.batch_size}; lr {lr:.3g} "
        f"(= {args.lr:g} × {global_batch} / 1024); {args.epochs} epochs = {total_steps} steps; amp {amp}; {device}")

    mix = make_mix(args, num_classes)
    stop_at = min(total_steps, args.max_steps) if args.max_steps else total_steps
    t0, seen, last_print = time.time(), 0, 0.0
    model.train()
    result = None

    def checkpoint(epoch_, step_, batch_):
        if is_main:
            save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                         "ema": ema.model.state_dict() if ema else None, "epoch": epoch_, "step": step_,
                         "batch_in_epoch": batch_, "config": config, "rng": rng_state()}, out / "checkpoint.pt")

    def eval_and_log(epoch_, step_):
        nonlocal result
        res = evaluate(model, val_loader, device, amp_dtype, world)
        rec = {"epoch": epoch_, "step": step_, "top1": res["top1"], "top5": res["top5"], "loss": res["loss"],
               "time_s": round(time.time() - t0, 1)}
        if ema is not None:
            rec["top1_ema"] = evaluate(ema.model, val_loader, device, amp_dtype, world)["top1"]
        if args.search:
            rec["search_probs"] = [[round(p, 5) for p in row] for row in localmamba.search_probabilities(model).tolist()]
        if is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        log(f"eval epoch {epoch_} step {step_}: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%  loss {res['loss']:.4f}")
        result = rec

    while step < stop_at:
        train_sampler.set_epoch(epoch, skip=batch_in_epoch * args.batch_size)
        loader_gen.manual_seed(args.seed * 1000 + rank * 100 + epoch)
        for x, y in train_loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if mix is not None:
                x, y = mix(x, y)
            cur_lr = get_lr(step, lr, warmup_steps, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = cur_lr
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = ddp(x)
            loss = soft_cross_entropy(logits.float(), y, args.label_smoothing)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"the loss became {loss.item()} at epoch {epoch}, step {step} (lr {cur_lr:.3g}); "
                                    f"the last good checkpoint is untouched. Try a lower --lr, --clip-grad 1.0, "
                                    f"--amp bf16 instead of fp16, or --amp off")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                ema.update(model)
            step += 1
            batch_in_epoch += 1
            seen += len(x) * world
            now = time.time()
            if is_main and (now - last_print > args.print_every or step == stop_at):
                last_print = now
                rate = seen / (now - t0)
                left = (stop_at - step) * args.batch_size * world / max(rate, 1e-9)
                print(f"epoch {epoch} step {step}/{stop_at}  loss {loss.item():.4f}  lr {cur_lr:.2e}  "
                      f"{rate:.1f} img/s  {left / 60:.1f} min left", flush=True)
            if step >= stop_at:
                break
        if batch_in_epoch >= steps_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
            eval_and_log(epoch, step)
            checkpoint(epoch, step, 0)
    if batch_in_epoch:          # stopped inside an epoch (--max-steps)
        eval_and_log(epoch + batch_in_epoch / steps_per_epoch, step)
        checkpoint(epoch, step, batch_in_epoch)

    if args.search and is_main:
        probs = localmamba.search_probabilities(model)
        chosen = localmamba.derive_directions(model, k=4)
        (out / "directions.json").write_text(json.dumps({"model": args.model, "directions": chosen,
                                                         "probabilities": [[round(p, 5) for p in r] for r in probs.tolist()],
                                                         "candidates": list(localmamba.DIRECTIONS)}, indent=1))
        print("\nsearch: softmax(α) per layer\n" + heat_map(probs))
        print(f"\nchosen directions (top-4 per layer) written to {out / 'directions.json'}:")
        for i, d in enumerate(chosen):
            print(f"  layer {i:2d}: {d}")
    log(f"done in {(time.time() - t0) / 60:.1f} min; outputs in {out}")
    if world > 1:
        dist.destroy_process_group()
    return result


# -----------------------------------------------------------------------------
# the small-scale study (paper RQ1-RQ2 on Fashion-MNIST): python train_mini.py --study scans

STUDY_ARMS = {  # arm: (what it tests, per-layer directions or "search", SCAttn on)
    "a_global_h": ("global h, h_flip (Vim-style bidirectional)", [["h", "h_flip"]], True),
    "b_global_hv": ("global h, h_flip, v, v_flip", [["h", "h_flip", "v", "v_flip"]], True),
    "c_local": ("local h, h_flip, w2, w2_flip", [["h", "h_flip", "w2", "w2_flip"]], True),
    "d_local_no_scattn": ("(c) without SCAttn", [["h", "h_flip", "w2", "w2_flip"]], False),
    "e_searched": ("directions from --search on the same data", "search", True),
}


STUDY_TRAIN_PER_CLASS = 2500


def compare_with_published(chosen, published=localmamba.SEARCHED_DIRECTIONS["local_vim_tiny"]):
    """Our n layers against LocalVim-T's 20: layer i of ours is compared with the published
    layers at the same relative depth; and which directions dominate early / middle / late."""
    n, m = len(chosen), len(published)
    rows = []
    for i, ours in enumerate(chosen):
        theirs = [published[j] for j in range(m) if j * n // m == i]
        overlap = sum(len(set(ours) & set(t)) for t in theirs) / len(theirs)
        rows.append({"layer": i, "ours": ours, "published_layers": [j for j in range(m) if j * n // m == i],
                     "mean_overlap_of_4": round(overlap, 2),
                     "same_set_as": sum(set(ours) == set(t) for t in theirs)})   # published layers there, same 4
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
    """The search probabilities as a PNG (matplotlib, an optional extra); False if not installed."""
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


def _finished_record(run_dir, args):
    """The final evaluation of a finished run in run_dir, or None if it has not finished. A run made
    with other settings than args is refused: a study never mixes runs of different setups."""
    log_path = run_dir / "log.jsonl"
    if not log_path.exists():
        return None
    lines = [json.loads(s) for s in log_path.read_text().splitlines() if s.strip()]
    configs = [r for r in lines if "total_steps" in r]
    records = [r for r in lines if "top1" in r]
    if not configs:
        return None
    config = configs[-1]
    wanted = {k: getattr(args, k) for k in ("train_per_class", "val_per_class", "classes", "batch_size", "lr",
                                            "epochs", "max_steps", "seed", "search", "no_scattn")}
    if args.directions:
        wanted["directions"] = load_directions(args.directions)
    for key, want in wanted.items():
        if want is not None and config.get(key) != want:
            raise UserError(f"{run_dir} was trained with {key}={config.get(key)!r}, but this study asks for "
                            f"{want!r}; choose another --out for a study with other settings")
    stop = min(config["total_steps"], config["max_steps"]) if config["max_steps"] else config["total_steps"]
    done = [r for r in records if r["step"] >= stop]
    if not done or (args.search and not (run_dir / "directions.json").exists()):
        return None
    return done[-1]


def _study_run(run_dir, argv):
    """One run of the study, resumable: a finished run is read back from its log, not retrained; an
    unfinished one continues from its checkpoint; one that stopped before its first checkpoint is
    moved aside (never deleted) and started again. Returns (final record, whether it was reused)."""
    args = parse_args(argv + ["--out", str(run_dir)])
    rec = _finished_record(run_dir, args)
    if rec is not None:
        print(f"study: {run_dir} has finished already (top-1 {rec['top1']:.2f}%), reusing it", flush=True)
        return rec, True
    if (run_dir / "checkpoint.pt").exists():
        args.resume = str(run_dir / "checkpoint.pt")
    elif (run_dir / "log.jsonl").exists():
        aside = run_dir.with_name(f"{run_dir.name}.incomplete-{time.strftime('%Y%m%d-%H%M%S')}")
        run_dir.rename(aside)
        print(f"study: {run_dir} stopped before its first checkpoint; moved it to {aside} and starting again",
              flush=True)
    return train(args), False


def save_study_png(results, path, title):
    """Top-1 per arm as a PNG: each seed a dot, the mean a bar, ± std as an error bar (matplotlib,
    an optional extra); False if matplotlib is not installed (results.md is the text form)."""
    plt = _pyplot()
    if plt is None:
        return False
    arms = list(results)
    fig, ax = plt.subplots(figsize=(8, 4))
    means = [results[a]["mean"] for a in arms]
    ax.bar(range(len(arms)), means, yerr=[results[a]["std"] for a in arms], color="#9ecae1", capsize=6)
    for i, a in enumerate(arms):
        ax.plot([i] * len(results[a]["top1"]), results[a]["top1"], "k.", markersize=8)
    lo = min(min(r["top1"]) for r in results.values())
    hi = max(max(r["top1"]) for r in results.values())
    pad = max(hi - lo, 0.5)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(range(len(arms)), arms, rotation=15)
    ax.set_ylabel("test top-1 %")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run_study(args):
    """Every arm trained with the same data order, augmentation, width, depth and step budget,
    for each seed; mean ± std of top-1 on the (full, by default) Fashion-MNIST test set.
    Run the same command again after a crash or Ctrl-C: finished runs are kept and read back."""
    import statistics
    if args.data != "fashion-mnist":
        raise UserError("--study scans runs on Fashion-MNIST (--data fashion-mnist)")
    out = Path(args.out or f"runs/study-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.study_seeds))
    if args.train_per_class is None:     # 16 runs must fit ~2 hours on 2 CPU cores: 25k images each
        args.train_per_class = STUDY_TRAIN_PER_CLASS
    base = ["--data", "fashion-mnist", "--print-every", str(args.print_every)]
    for flag in ("data_dir", "train_per_class", "val_per_class", "classes", "batch_size", "lr", "epochs", "max_steps"):
        v = getattr(args, flag)
        if v is not None:
            base += [f"--{flag.replace('_', '-')}", str(v)]
    t_start = time.time()
    print(f"study: {len(STUDY_ARMS)} arms × {len(seeds)} seeds (+ one search) into {out}", flush=True)

    # (e) needs the search first: the supernet on the same data and budget, seed 0
    search_dir = out / "search"
    search_rec, reused = _study_run(search_dir, base + ["--search", "--seed", "0"])
    run_seconds, n_reused = search_rec["time_s"], int(reused)
    found = json.loads((search_dir / "directions.json").read_text())
    probs = found["probabilities"]
    png = save_heat_map_png(probs, out / "search_heat_map.png", "LocalVim-nano search on Fashion-MNIST: softmax(α)")
    (out / "search_heat_map.txt").write_text(heat_map(torch.tensor(probs)) + "\n")
    comparison = compare_with_published(found["directions"])

    results = {}
    for arm, (what, dirs, scattn) in STUDY_ARMS.items():
        results[arm] = {"what": what, "top1": [], "time_s": []}
        if dirs == "search":
            dirs_file = search_dir / "directions.json"
        else:
            depth = localmamba.MODELS["local_vim_nano"][1]["depth"]
            dirs_file = out / f"{arm}_directions.json"
            dirs_file.write_text(json.dumps({"directions": dirs * depth}))
        for seed in seeds:
            rec, reused = _study_run(out / f"{arm}-seed{seed}", base + ["--seed", str(seed), "--directions",
                                                                         str(dirs_file)] + ([] if scattn else ["--no-scattn"]))
            results[arm]["top1"].append(rec["top1"])
            results[arm]["time_s"].append(rec["time_s"])
            first_line = (out / f"{arm}-seed{seed}" / "log.jsonl").read_text().split("\n", 1)[0]
            results[arm]["params"] = json.loads(first_line)["params"]
            run_seconds, n_reused = run_seconds + rec["time_s"], n_reused + int(reused)
            print(f"study: {arm} seed {seed}: top-1 {rec['top1']:.2f}%", flush=True)
        v = results[arm]["top1"]
        results[arm]["mean"] = statistics.mean(v)
        results[arm]["std"] = statistics.stdev(v) if len(v) > 1 else 0.0

    minutes = (time.time() - t_start) / 60
    lines = [f"| arm | directions | params | top-1 % (mean ± std over {len(seeds)} seeds) | runs | min per run |",
             "|---|---|---|---|---|---|"]
    for arm, r in results.items():
        lines.append(f"| {arm} | {r['what']} | {r['params']:,} | {r['mean']:.2f} ± {r['std']:.2f} | "
                     f"{', '.join(f'{x:.2f}' for x in r['top1'])} | {statistics.mean(r['time_s']) / 60:.1f} |")
    table = "\n".join(lines)
    bars = save_study_png(results, out / "results.png", f"LocalVim-nano on Fashion-MNIST, {len(seeds)} seeds per arm")
    summary = {"command": "python train_mini.py " + " ".join(sys.argv[1:]), "minutes": round(minutes, 1),
               "run_minutes": round(run_seconds / 60, 1), "reused_runs": n_reused, "seeds": seeds, "arms": results,
               "search": {"directions": found["directions"], "probabilities": probs, "heat_map_png": bool(png),
                          "time_s": search_rec["time_s"]},
               "results_png": bool(bars), "compare_with_local_vim_tiny": comparison, "base_args": base}
    save_atomic(summary, out / "results.json", write=lambda obj, p: p.write_text(json.dumps(obj, indent=1)))
    (out / "results.md").write_text(table + "\n")
    print("\n" + table)
    print("\nsearch (softmax(α) per layer):\n" + heat_map(torch.tensor(probs)))
    for row in comparison["per_layer"]:
        print(f"  layer {row['layer']}: ours {row['ours']}, mean overlap with LocalVim-T layers "
              f"{row['published_layers']}: {row['mean_overlap_of_4']} of 4; the same 4 as {row['same_set_as']} of them")
    print(f"  {comparison['layers_agreeing']} of {len(comparison['per_layer'])} layers choose the same 4 directions "
          f"as a published layer at the same relative depth; random choices would overlap "
          f"{comparison['chance_overlap']} of 4 on average")
    for name in ("early", "middle", "late"):
        print(f"  {name}: ours {comparison['dominant_ours'][name]}; LocalVim-T {comparison['dominant_published'][name]}")
    print(f"\nstudy done in {minutes:.1f} min ({n_reused} finished runs reused; the runs' own training + "
          f"evaluation time: {run_seconds / 60:.1f} min); {out / 'results.json'}")
    return summary


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Train LocalMamba models (see the module docstring for commands).")
    p.add_argument("--data", choices=["fashion-mnist", "imagenet"], default="fashion-mnist")
    p.add_argument("--data-dir", default=None, help=f"ImageNet root with train/ and val/; Fashion-MNIST: the folder of its 4 IDX .gz files (default {FASHION_DIR})")
    p.add_argument("--model", default=None, help="a localmamba.create_model name (default: by dataset)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (smoke runs)")
    p.add_argument("--batch-size", type=int, default=None, help="per process")
    p.add_argument("--lr", type=float, default=None, help="peak lr at a global batch of 1024; scaled linearly")
    p.add_argument("--weight-decay", type=float, default=None)
    p.add_argument("--wd-exempt-ssm", action="store_true", help="no weight decay on A_log, D and the search logits α")
    p.add_argument("--warmup-epochs", type=float, default=None)
    p.add_argument("--drop-path", type=float, default=None)
    p.add_argument("--label-smoothing", type=float, default=None)
    p.add_argument("--mixup", type=float, default=None)
    p.add_argument("--cutmix", type=float, default=None)
    p.add_argument("--clip-grad", type=float, default=None, help="max grad norm (off by default, as the paper)")
    p.add_argument("--ema-decay", type=float, default=0.0, help="e.g. 0.9998; 0 = no EMA (the paper's default)")
    p.add_argument("--eval-ema", action="store_true", help="with --eval: evaluate the EMA weights")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--classes", type=int, default=None, help="use the first N classes")
    p.add_argument("--train-per-class", type=int, default=None, help="first N training images per class")
    p.add_argument("--val-per-class", type=int, default=None, help="first N validation images per class")
    p.add_argument("--bad-images", choices=["skip", "stop"], default="skip", help="what to do with an unreadable image")
    p.add_argument("--out", default=None, help="output folder (default runs/<model>-<date>-<time>)")
    p.add_argument("--resume", default=None, help="checkpoint.pt to continue from (or to evaluate with --eval)")
    p.add_argument("--eval", action="store_true", help="only evaluate --resume CKPT on the validation split")
    p.add_argument("--search", action="store_true", help="train a *_search supernet and write directions.json")
    p.add_argument("--directions", default=None, help="directions.json from --search: per-layer directions")
    p.add_argument("--no-scattn", action="store_true", help="ablation: build the model without SCAttn")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None, help="default bf16 on CUDA, off on CPU")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="CPU: run the scan's chunk functions eagerly, not torch.compile'd")
    p.add_argument("--print-every", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--study", choices=["scans"], default=None, help="run the small-scale study (README 'Results')")
    p.add_argument("--study-seeds", type=int, default=3, help="seeds per arm in --study")
    args = p.parse_args(argv)
    for k in ("batch_size", "epochs", "max_steps", "classes", "train_per_class", "val_per_class", "img_size"):
        v = getattr(args, k)
        if v is not None and v <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {v}")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.study:
            return run_study(args)
        train(args)
    except UserError as e:
        msg = str(e)
        if "Original Traceback" in msg:   # raised in a DataLoader worker: keep the message, not the trace
            msg = msg.strip().splitlines()[-1].split("UserError: ", 1)[-1]
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint in --out is intact", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
