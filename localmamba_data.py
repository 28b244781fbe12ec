"""
localmamba_data.py: the data train_mini.py trains on, kept beside the trainer so that the
trainer reads as the training loop.

Reading guide. Two sources, each returning (train, val, test, classes, channels):
    Fashion-MNIST   its four IDX files (Debian's dataset-fashion-mnist, or torchvision's download):
                    28×28 grey images; the last FASHION_HOLDOUT images of each class of the
                    training file are the validation split, the t10k file the test split.
    ImageNet layout root/train/<class>/*.JPEG and root/val/<class>/*.JPEG through torchvision's
                    ImageFolder, with the paper's augmentation (§4.1: RandomResizedCrop, flip,
                    RandAugment rand-m9-mstd0.5, random erasing 0.25, bicubic; timm's own
                    transform where timm is installed, as the official code ran).
and the sampler both use, EpochOrder: a seeded per-epoch permutation, sharded over DDP ranks,
that can start mid-epoch (so a resumed run sees exactly the batches it would have).
Every problem with the data is one BadInput naming the file and what to do.
"""
import gzip
import importlib.util
import math
import os
import re
import struct
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

from localmamba_helpers import BadInput, FASHION_MEAN_STD, IMAGENET_MEAN_STD

FASHION_DIR = "/usr/share/datasets/fashion-mnist"     # Debian's dataset-fashion-mnist
FASHION_CACHE = Path.home() / ".cache" / "localmamba"  # where torchvision downloads it when that is missing
FASHION_HOLDOUT = 500                                 # last images per class of the training file: validation
(FASHION_MEAN,), (FASHION_STD,) = FASHION_MEAN_STD
IMAGENET_MEAN, IMAGENET_STD = IMAGENET_MEAN_STD


# -----------------------------------------------------------------------------
# Fashion-MNIST from its IDX files
FASHION_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                 "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path):
    """An IDX file (gzip or plain) -> numpy array. Raises BadInput naming the file if broken."""
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        if zero != 0 or dtype != 0x08 or len(data) != 4 + 4 * ndim + math.prod(shape):
            raise ValueError(f"not an unsigned-byte IDX file of the size its header says, {len(data)} bytes")
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise BadInput(f"{path} is not a readable IDX file ({e}); re-download it or reinstall "
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
            raise BadInput(f"Fashion-MNIST is not at {FASHION_DIR} and could not be downloaded ({type(e).__name__}: "
                            f"{e}); apt-get install dataset-fashion-mnist, or put its four IDX .gz files in a folder "
                            f"and pass --data-dir") from None
    return raw


def check_idx_pair(image_file, label_file, images, labels):
    """One images file and its labels file, as Fashion-MNIST has them: (n, 28, 28) images, n labels
    in 0..9. A mixed-up download (the 60k training images beside the 10k test labels) would pair
    images with the wrong labels without a word: refused, naming both files."""
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise BadInput(f"{image_file} holds arrays of shape {images.shape[1:]}, not 28×28 images (beside "
                       f"{label_file}); is it Fashion-MNIST's images file?")
    if labels.ndim != 1:
        raise BadInput(f"{label_file} holds arrays of shape {labels.shape[1:]}, not labels (beside {image_file}); "
                       f"is it Fashion-MNIST's labels file?")
    if len(images) != len(labels):
        raise BadInput(f"{image_file} has {len(images)} images but {label_file} has {len(labels)} labels; the two "
                       f"files must be a pair (train-* or t10k-*): re-download them")
    if len(labels) and labels.max() > 9:
        raise BadInput(f"{label_file} holds label {labels.max()}, outside Fashion-MNIST's classes 0-9 (beside "
                       f"{image_file}); re-download it")
    return images, labels


def fashion_splits(s, with_train=True):
    """(train, val, test, classes, channels): train and val from the training file (val = the last
    FASHION_HOLDOUT images of each class, never trained on), test = the t10k file."""
    root = Path(s.data_dir)
    if not root.exists() and s.data_dir == FASHION_DIR:        # no --data-dir and no Debian package
        root = download_fashion(FASHION_CACHE)
    if not root.is_dir():
        raise BadInput(f"--data-dir {root} {'is a file, not a folder' if root.exists() else 'does not exist'}; "
                       f"install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or point "
                       f"--data-dir at the folder of its four .gz files")
    arrays = {}
    for split, names in FASHION_FILES.items():
        files = [root / n if (root / n).exists() else root / n[:-3] for n in names]   # .gz, or unpacked
        for f in files:
            if not f.exists():
                raise BadInput(f"{f}.gz is missing; --data-dir must hold Fashion-MNIST's four IDX .gz files")
        arrays[split] = check_idx_pair(*files, *(read_idx(f) for f in files))
    (images, labels), (t_images, t_labels) = arrays["train"], arrays["test"]
    classes = s.classes or int(labels.max()) + 1
    if classes > labels.max() + 1:
        raise BadInput(f"--classes {classes} is larger than the {labels.max() + 1} classes of Fashion-MNIST")
    cut = lambda lab, n, **kw: subset_indices(lab, classes, n, **kw)
    train = FashionMNIST(images, labels, cut(labels, s.train_per_class, skip_last=FASHION_HOLDOUT), classes,
                         train=True) if with_train else None
    val = FashionMNIST(images, labels, cut(labels, s.val_per_class, only_last=FASHION_HOLDOUT), classes)
    return train, val, FashionMNIST(t_images, t_labels, cut(t_labels, s.test_per_class), classes), classes, 1


# -----------------------------------------------------------------------------
# ImageNet layout (root/train/<class>/*, root/val/<class>/*) with torchvision
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
                raise BadInput(f"{path}: a {img.mode} image with values in [{a.min():g}, {a.max():g}], outside "
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
            raise BadInput(f"{root}: {e}. Expected ImageNet layout: {root}/<class>/<image>.JPEG") from None
        if classes is not None and classes > len(self.classes):
            raise BadInput(f"--classes {classes} is larger than the {len(self.classes)} classes in {root}")
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
                    raise BadInput(f"cannot read image {path} ({type(e).__name__}: {e}); delete or replace it, "
                                    f"or run with --bad-images skip") from None
                if path not in self.warned:
                    self.warned.add(path)
                    print(f"warning: skipping unreadable image {path} ({type(e).__name__}: {e})", file=sys.stderr)
        raise BadInput("no readable image in the dataset")


def posterize_any_bits(img, bits_to_keep, **_):
    """timm's RandAugment posterize, also for 0 bits kept: a black image, as Pillow < 13 made it.
    timm's magnitude noise reaches level 10 (0 bits) in about 1 draw of 44 at m9 mstd0.5, and Pillow
    13 raises there, which stopped an ImageNet run within its first epoch (timm 1.0.31)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def parse_aa(aa):
    """--aa in timm's RandAugment spelling (rand-m9-mstd0.5-inc1; none = off) -> {option: value}:
    m (magnitude) 0-10 as timm's levels, n ops, mstd noise, inc 0/1 and, with timm only, mmax, w, p.
    Checked before any setup: timm would stop a run on a typo at its first image."""
    if aa == "none":
        return {}
    parts, opts = aa.split("-"), {}
    for part in parts[1:]:
        m = re.fullmatch(r"(mstd|mmax|inc|m|n|w|p)(\d+(?:\.\d+)?)", part)
        if not m or m.group(1) in opts:
            opts = None
            break
        opts[m.group(1)] = float(m.group(2))
    if parts[0] != "rand" or not opts or "m" not in opts or not opts["m"] <= 10 or opts.get("inc", 0) not in (0, 1) \
            or not opts.get("n", 2) >= 1 or opts.get("n", 2) % 1 or opts["m"] % 1:
        raise BadInput(f"--aa {aa}: expected timm's RandAugment spelling rand-m<0-10>[-n<ops>][-mstd<std>]"
                       f"[-inc<0|1>], e.g. rand-m9-mstd0.5-inc1, or none")
    timm_only = sorted(set(opts) & {"mmax", "w", "p"})
    if timm_only and importlib.util.find_spec("timm") is None:
        raise BadInput(f"--aa {aa}: {', '.join(timm_only)} need timm's RandAugment (pip install timm); without timm "
                       f"torchvision's takes m and n")
    return opts


def imagenet_transforms(img_size, train, aa, reprob, use_timm=None):
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
    opts = parse_aa(aa)
    ra = [] if aa == "none" else [v2.RandAugment(int(opts.get("n", 2)), int(opts["m"]), 11, interpolation=bicubic,
                                                 fill=[round(255 * c) for c in IMAGENET_MEAN])]
    return v2.Compose([v2.RandomResizedCrop(img_size, scale=(0.08, 1.0), interpolation=bicubic),
                       v2.RandomHorizontalFlip()] + ra + norm + [v2.RandomErasing(p=reprob, value="random")])


def imagenet_splits(s, with_train=True):
    """(train, val, None): ImageNet's val/ is the split every paper reports; there is no other."""
    root = Path(s.data_dir)
    if not root.is_dir():
        raise BadInput(f"--data-dir {root} does not exist; give the ImageNet root that holds train/ and val/")
    make = lambda split, per_class: ImageFolderSubset(root / split, s.classes, per_class, imagenet_transforms(
        s.img_size, split == "train", s.aa, s.reprob), s.bad_images)
    val = make("val", s.val_per_class)
    train = make("train", s.train_per_class) if with_train else None
    if train is not None and train.classes != val.classes:
        diff = next((a, b) for a, b in zip(train.classes + [None], val.classes + [None]) if a != b)
        raise BadInput(f"{root}: train/ and val/ have different classes ({len(train.classes)} vs "
                        f"{len(val.classes)}; first difference: {diff})")
    return train, val, None, len(val.classes), 3     # (ImageFolder refuses a class folder without images)


def seed_worker(worker_id):
    """A DataLoader worker's numpy RNG from the seed torch gave the worker (torch seeds its own and
    Python's `random` there, not numpy's: without this every worker would draw the same numbers)."""
    np.random.seed(torch.initial_seed() % 2 ** 32)


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
