"""
localmamba_helpers.py: what the LocalMamba models need from the outside world, kept out of the
method's file the way timm keeps `_features.py`, `_builder.py` and `_helpers.py` out of its
model files. It holds only what the models use; the trainer's run files (atomic writes, the run
folder's claim, RNG states, curves) are in localmamba_run.py.

Reading guide. `localmamba.py` is the method (paper arXiv 2403.09338); everything here is generic
plumbing around it, and `localmamba.py` re-exports what a user calls (`load_checkpoint`,
`count_macs`, `configure_optimizer`, ...), so `from localmamba import ...` is the one import.
Nothing here imports localmamba.py: it receives the models (and `create_model`, for timm's
registry) as arguments.

    checks                      check_fields (a config's values), check_image
    timm's model interface      FeatureInfo, take_indices, TimmInterface (pretrained_cfg,
                                grad checkpointing), FeatureMaps (features_only backbones),
                                DetectionBackbone (for torchvision's detectors: FPN, or ViTDet's pyramid)
    checkpoint files            tensor_checksum, read_checkpoint, weights_of (raw or EMA),
                                load_checkpoint, load_state_dict_strict, adapt_input_conv,
                                resample_pos_embed
    the optimizer               configure_optimizer (the official run's weight-decay groups)
    direction files             load_directions (the JSON a search writes), draw_search_probabilities
    MAC counting                count_macs, count_flops_fvcore (the per-module formulas live
                                with their modules in localmamba.py, as `macs()`)
    timm's registry             register_with_timm
    pictures and tables         draw_scan_orders_png (the 8 orders as paths, paper Fig. 2), model_table,
                                need_pyplot (matplotlib, or one message)
"""
import argparse
import collections
import dataclasses
import hashlib
import io
import json
import math
import os
import pickletools
import urllib.parse
import warnings
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


__version__ = "0.2.0"   # the package's (localmamba.__version__; pyproject.toml reads it from here)
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))   # the input normalisation of the presets
FASHION_MEAN_STD = ((0.2860,), (0.3530,))                              # Fashion-MNIST's, for the nano presets


class BadInput(ValueError):
    """A wrong name, option, shape or file given to localmamba; the message says what to fix."""


# -----------------------------------------------------------------------------
# Checks

def check_fields(cfg, name):
    """Every field of a model config of the type its dataclass declares: ints >= 1 (num_classes >= 0),
    rates (`*_rate`) in [0, 1), other floats > 0, bools True/False, Sequence[int] of ints >= 1.
    One BadInput naming the field, what it must be and what it got."""
    for f in dataclasses.fields(cfg):
        v, lo = getattr(cfg, f.name), 0 if f.name == "num_classes" else 1
        is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)
        need = {int: None if is_int(v) and v >= lo else f"an integer >= {lo}",
                bool: None if isinstance(v, bool) else "True or False",
                float: None if (is_int(v) or isinstance(v, float)) and math.isfinite(v) and (
                    0 <= v < 1 if f.name.endswith("_rate") else v > 0) else
                "a number in [0, 1)" if f.name.endswith("_rate") else "a number > 0",
                Sequence[int]: None if isinstance(v, (list, tuple)) and v and all(is_int(x) and x >= 1 for x in v)
                else "a non-empty list of integers >= 1"}.get(f.type)
        if need:
            raise BadInput(f"{name}: {f.name} must be {need}, got {v!r}")


def check_image(x, cfg, any_size=False):
    """LocalVim is built for one image size (its pos embed and RoPE); LocalVMamba takes any size."""
    size_ok = x.dim() == 4 and (min(x.shape[2:]) >= cfg.patch_size if any_size else
                                tuple(x.shape[2:]) == (cfg.img_size, cfg.img_size))
    if not size_ok or x.shape[1] != cfg.in_chans:
        want = f"(B, {cfg.in_chans}, H, W) with H, W >= {cfg.patch_size}" if any_size else \
            f"(B, {cfg.in_chans}, {cfg.img_size}, {cfg.img_size})"
        dynamic = "" if any_size else ", or any size with dynamic_img_size=True"
        raise BadInput(f"expected images of shape {want}, got {tuple(x.shape)}; build the model for your images "
                       f"with create_model(name, img_size=..., in_chans=...{dynamic}) (a checkpoint of another size "
                       f"loads, its pos_embed resampled)")


# -----------------------------------------------------------------------------
# timm's model interface: feature maps, pretrained_cfg, grad checkpointing

class FeatureInfo(list):
    """What each feature map of a backbone is (timm's feature_info): dicts of num_chs, reduction
    (its stride in pixels) and module (where it is taken)."""

    def channels(self):
        return [f["num_chs"] for f in self]

    def reduction(self):
        return [f["reduction"] for f in self]


def take_indices(n, indices):
    """timm's convention: None = all n, an int k = the last k, a list = those (negative from the end)."""
    take = list(range(n) if indices is None else range(n - indices, n) if isinstance(indices, int) else indices)
    if not take or any(not -n <= i < n for i in take) or (isinstance(indices, int) and not 0 < indices <= n):
        raise BadInput(f"feature indices {indices!r} do not fit {n} feature levels")
    return sorted({i % n for i in take})


def maybe_checkpoint(model, fn, *args):
    """fn(*args), or with activation checkpointing (recomputed in backward, the same RNG draws)
    when the model's set_grad_checkpointing is on and it trains."""
    if model.grad_checkpointing and model.training and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class TimmInterface:
    """The part of timm's model interface both families share: pretrained_cfg (its data config),
    set_grad_checkpointing, get_classifier / reset_classifier. A model class names its first conv,
    its classifier and its final norm in `timm_names` (what timm's adapt_input_conv and
    reset_classifier look for, and what features_only drops)."""
    grad_checkpointing = False
    timm_names = dict(first_conv="", classifier="", final_norm="")

    @property
    def pretrained_cfg(self):
        """What timm's data pipeline reads: input size, mean/std, interpolation, crop_pct, classes."""
        c = self.cfg
        mean, std = c.mean_std if c.in_chans == len(c.mean_std[0]) else ((0.5,) * c.in_chans, (0.5,) * c.in_chans)
        return dict(input_size=(c.in_chans, c.img_size, c.img_size), mean=mean, std=std, num_classes=self.num_classes,
                    interpolation="bicubic", crop_pct=0.875, first_conv=self.timm_names["first_conv"],
                    classifier=self.timm_names["classifier"], url=getattr(self, "released_url", ""))

    @property
    def default_cfg(self):
        return self.pretrained_cfg

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def get_classifier(self):
        return self.get_submodule(self.timm_names["classifier"])

    def reset_classifier(self, num_classes, global_pool=None):
        """A fresh Linear head for num_classes (0: none, pre-logits out); global_pool checked by the config."""
        if global_pool is not None:
            self.global_pool = replace(self.cfg, global_pool=global_pool).global_pool
        self.num_classes = num_classes
        parent, _, name = self.timm_names["classifier"].rpartition(".")
        head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        setattr(self.get_submodule(parent) if parent else self, name, head)


class FeatureMaps(nn.Module):
    """create_model(..., features_only=True): a backbone for detection / segmentation necks, timm's
    FeatureGetterNet contract. forward(x) returns the NCHW maps at out_indices; feature_info says
    their channels and strides."""

    def __init__(self, model, out_indices):
        super().__init__()
        self.model, self.out_indices = model, take_indices(len(model.feature_info), out_indices)
        self.feature_info = FeatureInfo([model.feature_info[i] for i in self.out_indices])
        # What the maps do not use is dropped, as timm's prune_intermediate_layers does: the head, the
        # final norm and the layers after the last map would never get a gradient (DDP without
        # find_unused_parameters stops on them). Checkpoints still load: their keys are skipped.
        before = set(model.state_dict())
        model.reset_classifier(0)
        model.layers = model.layers[:max(self.out_indices) + 1]
        if hasattr(model.layers[-1], "downsample"):             # LocalVMamba: the merge after the last map
            model.layers[-1].downsample = nn.Identity()
        parent, _, name = model.timm_names["final_norm"].rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, name, nn.Identity())
        model.pruned_keys = before - set(model.state_dict())

    def forward(self, x):
        return self.model.forward_intermediates(x, self.out_indices, intermediates_only=True)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map (ViTDet's, ConvNeXt's)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DetectionBackbone(nn.Module):
    """A FeatureMaps backbone as torchvision's detection models take it (FasterRCNN, MaskRCNN,
    RetinaNet): `out_channels`, and forward(x) -> an OrderedDict of maps "0".."3" at strides 4, 8,
    16, 32 and "pool" (a max pool of "3"), as torchvision's resnet_fpn_backbone gives (LocalVim
    with patch 16; a patch-p LocalVim's strides are p/4 .. 2p).
    - maps at distinct strides (LocalVMamba's 4 stages): torchvision's FeaturePyramidNetwork;
    - maps all at one stride (LocalVim, stride 16): ViTDet's simple feature pyramid (Li et al. 2022,
      "Exploring Plain Vision Transformer Backbones for Object Detection", §3) from the last map:
      up x4 (two 2x2 transposed convs), up x2, identity, down x2 (max pool), each then 1x1 and 3x3
      convs with LayerNorm, then the same "pool" level."""

    def __init__(self, backbone, out_channels=256):
        super().__init__()
        info = getattr(backbone, "feature_info", None)
        if not (hasattr(info, "channels") and hasattr(info, "reduction")) or hasattr(backbone, "forward_head"):
            raise BadInput(f"DetectionBackbone takes a features_only model, got {type(backbone).__name__}; build it "
                           f"with create_model(name, features_only=True)")
        if not isinstance(out_channels, int) or isinstance(out_channels, bool) or out_channels < 1:
            raise BadInput(f"DetectionBackbone: out_channels must be an integer >= 1 (256 in torchvision's "
                           f"detectors), got {out_channels!r}")
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
        self.body, self.out_channels = backbone, out_channels
        chans, strides = backbone.feature_info.channels(), backbone.feature_info.reduction()
        self.simple = len(set(strides)) == 1
        if not self.simple:
            self.fpn = FeaturePyramidNetwork(chans, out_channels, extra_blocks=LastLevelMaxPool())
            return
        D = chans[-1]
        up = lambda i, o: nn.ConvTranspose2d(i, o, 2, stride=2)
        self.scales = nn.ModuleList([nn.Sequential(up(D, D // 2), LayerNorm2d(D // 2), nn.GELU(), up(D // 2, D // 4)),
                                     up(D, D // 2), nn.Identity(), nn.MaxPool2d(2)])
        self.outs = nn.ModuleList(nn.Sequential(nn.Conv2d(c, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                                                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
                                                LayerNorm2d(out_channels)) for c in (D // 4, D // 2, D, D))
        self.pool = LastLevelMaxPool()

    def forward(self, x):
        maps = self.body(x)
        if not self.simple:
            return self.fpn(collections.OrderedDict((str(i), m) for i, m in enumerate(maps)))
        ps = [out(scale(maps[-1])) for scale, out in zip(self.scales, self.outs)]
        names = [str(i) for i in range(len(ps))]
        ps, names = self.pool(ps, ps, names)
        return collections.OrderedDict(zip(names, ps))


# -----------------------------------------------------------------------------
# Checkpoint files. A checkpoint is data, never code: read with torch.load(weights_only=True), which
# unpickles only tensors and plain Python containers. `unsafe=True` is the explicit escape hatch
# for a file you trust that holds other objects (it runs whatever the pickle holds). One class is
# let through, as timm's own loader does: argparse.Namespace, the `args` that timm's train.py and
# DeiT's / Vim's main.py save beside the weights (a plain attribute holder; its values are still
# only tensors and plain containers).

# where checkpoints keep weights: raw (ours and the official "model", timm's "state_dict") and EMA
# (timm's "state_dict_ema", ours and the official "model_ema"; None in ours when the run had no EMA)
RAW_KEYS, EMA_KEYS = ("model", "state_dict"), ("state_dict_ema", "model_ema")
STATE_DICT_KEYS = RAW_KEYS + EMA_KEYS


def tensor_checksum(obj, everything=False):
    """sha256 of every tensor in a checkpoint (nested dicts, lists; keys in sorted order; the
    "checksum" entry itself left out), and with everything=True of every plain value too (the
    step, the config): what train_mini.py saves under "checksum" (with "checksum_covers":
    "everything"), so that a file corrupted or edited after it was written is refused instead of
    loaded."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif everything and isinstance(o, (bool, int, float, str, type(None))):
            h.update(f"{type(o).__name__}:{o!r}".encode())
        elif isinstance(o, dict):
            for k in sorted((k for k in o if k != "checksum"), key=str):
                h.update(str(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
    walk(obj)
    return h.hexdigest()


def _builds_objects(path):
    """Whether a file's pickles (a plain or legacy torch file, or data.pkl in torch's zip format) name
    or build Python objects: read with pickletools, which runs nothing. False for a file that is no
    pickle at all."""
    ops = set()
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        else:
            data = Path(path).read_bytes()
        f = io.BytesIO(data)
        while f.tell() < len(data):                   # torch's legacy format: several pickles in a row
            for op, _, _ in pickletools.genops(f):
                ops.add(op.name)
    except Exception:                                 # not a pickle (any more): what it held so far counts
        pass
    return bool(ops & {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD"})


def read_checkpoint(path, unsafe=False):
    """The object in a checkpoint file, loaded on the CPU. Raises one BadInput naming the file:
    missing, unreadable, corrupted (its tensors no longer match the checksum saved with them), or
    holding more than tensors and plain containers (then the message names the escape hatch)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")          # torch's own advice (to load unsafely) is not passed on
            ckpt = torch.load(path, map_location="cpu", weights_only=not unsafe)
    except FileNotFoundError:
        raise BadInput(f"no file at {path}") from None
    except IsADirectoryError:
        raise BadInput(f"{path} is a folder, not a checkpoint file") from None
    except Exception as e:
        # the pickle names a Python object (GLOBAL), or builds one in an older protocol's opcodes: refused
        if "GLOBAL" in str(e) or (str(e).startswith("Weights only load failed") and _builds_objects(path)):
            raise BadInput(f"{path} holds Python objects other than tensors, and loading them could run code "
                             f"from the file; if you trust it, load it with unsafe=True "
                             f"(load_checkpoint(model, path, unsafe=True))") from None
        why = str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0]   # not torch's advice
        raise BadInput(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                       f"{' '.join(why.split())[:300]})") from None
    if isinstance(ckpt, dict) and "checksum" in ckpt and ckpt["checksum"] != tensor_checksum(
            ckpt, everything=ckpt.get("checksum_covers") == "everything"):
        raise BadInput(f"{path} is corrupted: its tensors no longer match the checksum saved with them; "
                       f"use an earlier copy of it")
    return ckpt


def weights_of(ckpt, use_ema=False):
    """(key, state_dict) of a checkpoint: with use_ema the EMA weights where the file has them,
    else (or without use_ema) the raw ones, as timm's load_state_dict picks; (None, ckpt) for a
    bare state_dict."""
    if isinstance(ckpt, dict):
        for key in (EMA_KEYS if use_ema else ()) + RAW_KEYS + EMA_KEYS:
            if isinstance(ckpt.get(key), dict):
                return key, ckpt[key]
    return None, ckpt


def state_dict_of(ckpt, use_ema=False):
    """The state_dict weights_of picks: a bare one, or the one under a key of STATE_DICT_KEYS."""
    return weights_of(ckpt, use_ema)[1]


Loaded = collections.namedtuple("Loaded", "weights missing_keys unexpected_keys")


def load_checkpoint(model, path, use_ema=True, strict=True, unsafe=False):
    """Load an official, timm or our checkpoint into model. use_ema=True (timm's default) takes the
    EMA weights where the file has them (timm's "state_dict_ema", ours and the official
    "model_ema"), else the raw ones; use_ema=False always the raw ones ("model" / "state_dict").
    A DDP "module." prefix is dropped, a LocalVim pos_embed of another grid resampled, a 3-channel
    first conv adapted to the model's in_chans. strict=True raises one BadInput listing missing /
    unexpected / mis-shaped keys; strict=False loads what fits and reports the rest. Returns
    Loaded(weights: the key read, or None for a bare state_dict; missing_keys; unexpected_keys)."""
    try:
        ckpt = read_checkpoint(path, unsafe)
    except ValueError as e:
        raise BadInput(f"load_checkpoint: {e}") from None
    key, sd = weights_of(ckpt, use_ema)
    missing, unexpected = load_state_dict_strict(model, sd, f"{path}" + (f" [{key!r}]" if key else ""), strict)
    return Loaded(key, missing, unexpected)


# The released weights: the official release v1.0.0 (no hash published, so none is checked unless
# you pin one). LocalVim-S's README link points at LocalVMamba-S's file; LocalVMamba-T was never released.
RELEASE_URL = "https://github.com/hunto/LocalMamba/releases/download/v1.0.0/"
RELEASED = {"local_vim_tiny": "local_vim_tiny.ckpt",
            "local_vim_tiny_middle_cls_token": "local_vim_tiny_middle_cls_token.ckpt",
            "local_vmamba_small": "local_vssm_small.ckpt"}


def released_url(name):
    """The official release's URL of `name`'s weights, or "" where none were released."""
    return RELEASE_URL + RELEASED[name] if name in RELEASED else ""


def pretrained_file(name, overlay=None):
    """The local path of `name`'s released weights: overlay["file"] as given, else the file at
    overlay["url"] (default: the official release's) downloaded once into torch's hub cache
    (torch.hub.get_dir()/checkpoints). torch writes a download to a temporary file beside it and
    renames it when complete: a failure leaves no half file. overlay["sha256"] pins the file's
    sha256 (checked on the download and on a cached file). One BadInput for a model without
    released weights, a failed download, a wrong hash."""
    overlay = dict(overlay or {})
    if unknown := sorted(set(overlay) - {"file", "url", "sha256"}):
        raise BadInput(f"pretrained_cfg_overlay: unknown key(s) {', '.join(unknown)}; use file, url or sha256")
    url = overlay.get("url") or released_url(name)
    if overlay.get("file"):
        path = Path(overlay["file"])
    elif not url:
        raise BadInput(f"{name} has no released weights (the official release v1.0.0 has "
                       f"{', '.join(RELEASED)}); pass pretrained_cfg_overlay=dict(file=PATH) for weights you have")
    else:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urllib.parse.urlparse(url).path)
        if not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(url, str(path), progress=False)
            except (OSError, ValueError) as e:        # URLError/HTTPError are OSErrors
                why = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
                why = f"HTTP {e.code}: {why}" if isinstance(getattr(e, "code", None), int) else why   # (404, 403)
                raise BadInput(f"cannot download the weights of {name} from {url} ({why}); download the file "
                               f"by hand and pass pretrained_cfg_overlay=dict(file=PATH)") from None
    if overlay.get("sha256"):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != str(overlay["sha256"]).lower():
            raise BadInput(f"{path} has sha256 {digest}, not the pinned {overlay['sha256']}; delete it (a damaged "
                           f"or different file) and try again, or pin the right hash")
    return path


def load_pretrained(model, name, overlay=None):
    """The released weights of `name` into model (create_model(name, pretrained=True)), read
    weights-only and loaded strictly through load_checkpoint's loader, with its one answer per file
    (the EMA weights where the file has them, else the raw ones); a head for another class count is
    left as initialised, as timm does."""
    path = pretrained_file(name, overlay)
    ckpt = read_checkpoint(path)
    key, sd = weights_of(ckpt, use_ema=True)
    head = model.timm_names["classifier"]
    own = model.state_dict()
    if any(k.startswith(head + ".") and k in sd and sd[k].shape != own.get(k, sd[k]).shape for k in sd):
        sd = {k: v for k, v in sd.items() if not k.startswith(head + ".")}   # another class count: fresh head
    missing, _ = load_state_dict_strict(model, sd, f"{path}" + (f" [{key!r}]" if key else ""), strict=False)
    if [k for k in missing if not k.startswith(head + ".")] or set(sd) - set(own):
        load_state_dict_strict(model, sd, f"{path}" + (f" [{key!r}]" if key else ""), strict=True)   # says what
    return path


def adapt_input_conv(sd, own_sd, key, source, log=print):
    """sd's first conv `key` trained on 3 channels, fitted to own_sd's (the model's in_chans) as
    timm's adapt_input_conv does: summed over RGB for 1 channel, else RGB repeated and scaled by 3/in_chans."""
    own, w = own_sd.get(key), sd.get(key)
    if own is None or w is None or w.dim() != 4 or w.shape[1] != 3 or own.shape[1] == 3 or \
            (w.shape[0], *w.shape[2:]) != (own.shape[0], *own.shape[2:]):
        return sd
    n = own.shape[1]
    new = w.sum(1, keepdim=True) if n == 1 else w.repeat(1, -(-n // 3), 1, 1)[:, :n] * (3 / n)
    log(f"load_checkpoint: {source}: {key} adapted from 3 input channels to {n} "
        f"({'summed over RGB' if n == 1 else 'RGB repeated, scaled by 3/' + str(n)}, as timm's adapt_input_conv)")
    return dict(sd, **{key: new.to(w.dtype)})


def load_state_dict_strict(model, sd, source="state_dict", strict=True):
    """model.load_state_dict(sd) with a DDP "module." prefix dropped, and one BadInput naming
    `source` and listing missing / unexpected / mis-shaped keys (with strict=False only the
    mis-shaped ones; the others are returned). A LocalVim pos_embed of another grid is resampled
    (resample_pos_embed), a 3-channel first conv adapted (adapt_input_conv). Returns (missing,
    unexpected) key lists."""
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BadInput(f"load_checkpoint: {source} holds no state_dict (looked at the top level and under "
                         f"{', '.join(map(repr, STATE_DICT_KEYS))})")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    model = model.model if isinstance(model, FeatureMaps) else model         # a backbone: its model's keys
    sd = {k: v for k, v in sd.items() if k not in getattr(model, "pruned_keys", ())}   # (what it dropped)
    own = model.state_dict()
    if "pos_embed" in own and "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape:
        sd = resample_pos_embed(sd, model, source)
    if hasattr(model, "timm_names"):
        sd = adapt_input_conv(sd, own, model.timm_names["first_conv"] + ".weight", source)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if shapes or (strict and (missing or unexpected)):
        show = lambda xs: ", ".join(xs[:8]) + (f" (+{len(xs) - 8} more)" if len(xs) > 8 else "")
        parts = [f"{len(missing)} missing: {show(missing)}" if missing else "",
                 f"{len(unexpected)} unexpected: {show(unexpected)}" if unexpected else "",
                 f"{len(shapes)} with other shapes: {show(shapes)}" if shapes else ""]
        raise BadInput(f"load_checkpoint: {source} does not fit this model ({'; '.join(p for p in parts if p)}). "
                         f"Build the model the checkpoint was trained as (name, num_classes, img_size, directions).")
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return missing, unexpected


def resample_pos_embed(sd, model, source="state_dict"):
    """A LocalVim state_dict of another image size, fitted to model: pos_embed resampled to the
    model's grid (bicubic, as timm does for ViT; the middle cls token's entry moved to the new
    middle), the RoPE tables taken from the model (they are a function of the grid). Says so."""
    pe, D = sd["pos_embed"], model.embed_dim
    cls_old = None if model.cls_pos is None else (pe.shape[1] - 1) // 2
    grid = pe if cls_old is None else torch.cat([pe[:, :cls_old], pe[:, cls_old + 1:]], 1)    # (1, h*w, D)
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1] or pe.shape[-1] != D:
        raise BadInput(f"load_checkpoint: {source} has pos_embed {tuple(pe.shape)}, not a square grid of width {D}")
    H, W = model.cfg.grid
    new = F.interpolate(grid.reshape(1, side, side, D).permute(0, 3, 1, 2).float(), size=(H, W), mode="bicubic",
                        align_corners=False).permute(0, 2, 3, 1).reshape(1, H * W, D).to(pe.dtype)
    if cls_old is not None:
        new = torch.cat([new[:, :model.cls_pos], pe[:, cls_old:cls_old + 1], new[:, model.cls_pos:]], 1)
    print(f"load_checkpoint: {source}: pos_embed resampled from {side}×{side} to {H}×{W} tokens (bicubic)")
    own = model.state_dict()
    return dict(sd, pos_embed=new, **{k: own[k] for k in ("rope.freqs_cos", "rope.freqs_sin") if k in sd and k in own})


# -----------------------------------------------------------------------------
# The optimizer: the weight-decay groups (paper §4.1's AdamW, as the official optimizer built them)

def configure_optimizer(model, lr, weight_decay, exempt_ssm=False, log=print):
    """AdamW with two groups. As the official run: every tensor with >= 2 dims is decayed
    except the names in model.no_weight_decay() (pos_embed, cls_token); 1-D tensors (biases,
    norms, D) are not. The official optimizer ignored the `_no_weight_decay` flags, so A_log
    and the search logits α were decayed; exempt_ssm=True (train_mini.py --wd-exempt-ssm) exempts A_log, D
    and α as Mamba intends. The nanoGPT habit: the grouping is visible, counted and checked."""
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
    assert len(names) == len(set(names)) == sum(1 for p in model.parameters() if p.requires_grad), \
        "a parameter in two groups"
    log(f"optimizer: AdamW, {len(decay)} tensors ({sum(p.numel() for _, p in decay):,} params) with weight decay "
        f"{weight_decay}, {len(no_decay)} tensors ({sum(p.numel() for _, p in no_decay):,} params) without")
    return torch.optim.AdamW([{"params": [p for _, p in decay], "weight_decay": weight_decay},
                              {"params": [p for _, p in no_decay], "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.999), eps=1e-8)


# -----------------------------------------------------------------------------
# MACs: what papers, the official code and fvcore call "FLOPs" are multiply-accumulates (one per
# multiply-add); PyTorch's FlopCounterMode counts 2 per multiply-add. Here the unit has its name.

def count_macs(model, img_size=None):
    """Multiply-adds (MACs) of one image, our convention: every matmul / conv multiply-add counted
    once, every per-direction projection (conv1d_k, x_proj_k, dt_proj_k) counted per direction,
    SCAttn's two small Linears per direction, the selective scan as 9·L·E·N + L·E per
    direction over that direction's own length (window padding included); norms, activations,
    gates and softplus not counted. The formulas are the modules' own `macs()` in localmamba.py.

    The official code used two conventions: LocalVMamba's fvcore count (local_vmamba.py, with a
    handle for the selective scan) matches ours but for counting the grouped scan at the longest
    direction's length; LocalVim's hand count (local_vim.py) counts conv1d/x_proj/dt_proj once
    (not per direction) and the scan as 5·L·E·N + 2·L·E per direction, so its 1.5G is lower
    than what LocalVim-T computes. PyTorch's FlopCounterMode sees the matmuls and convs only (2
    FLOPs per MAC, over the padded lengths the grouped call runs), not the scan: a test checks
    FlopCounterMode / 2 + the scan term = count_macs, up to that padding.
    """
    if img_size is not None and img_size != model.cfg.img_size:
        model = type(model)(replace(model.cfg, img_size=img_size, num_classes=model.num_classes))
    return int(model.macs())


def count_flops_fvcore(model, img_size=None):
    """The official LocalVMamba figure, the way local_vmamba.py's VSSM.flops computes it: fvcore's
    flop_count (an optional dependency: pip install fvcore) of one image, every matmul / conv /
    einsum multiply-add once, LayerNorms by fvcore's rule, the selective scan by the official
    handle (9·L·D·N + L·D over the grouped call, at its padded length), SiLU / exp / flip free.
    LocalVMamba-T gives 5.73 G, -S 11.37 G: the paper's 5.7 and 11.4. (The official LocalVim
    figure is a hand count instead; see count_macs.)"""
    try:
        from fvcore.nn import flop_count
    except ImportError:
        raise BadInput("count_flops_fvcore needs fvcore: pip install fvcore") from None

    def scan(inputs, outputs):                     # u: (batch, D, L), A: (D, N)
        (batch, D, L), N = inputs[0].type().sizes(), inputs[2].type().sizes()[1]
        return 9 * batch * L * D * N + batch * D * L
    ops = {"aten::silu": None, "aten::neg": None, "aten::exp": None, "aten::flip": None,
           "prim::PythonOp._SelectiveScanTorch": scan, "prim::PythonOp._SelectiveScanCPU": scan,
           "prim::PythonOp._SelectiveScanTriton": scan}
    size = img_size or model.cfg.img_size
    x = torch.zeros(1, model.cfg.in_chans, size, size, device=next(model.parameters()).device)
    was_training = model.training
    with torch.no_grad():
        gflops, _ = flop_count(model.eval(), (x,), supported_ops=ops)
    model.train(was_training)
    return sum(gflops.values()) * 1e9


# -----------------------------------------------------------------------------
# Direction files and the search's text heat map

def load_directions(path):
    """Per-layer direction lists from a JSON file: a list of lists, or {"directions": [...]} as
    save_directions writes it. Raises one ValueError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"{path} does not exist") from None
    except (OSError, ValueError) as e:
        raise BadInput(f"{path} is not valid JSON ({e})") from None
    dirs = data.get("directions") if isinstance(data, dict) else data
    if not isinstance(dirs, list) or not all(isinstance(d, list) for d in dirs):
        raise BadInput(f"{path} must hold a list of per-layer lists of direction names "
                         f"(or {{\"directions\": [...]}} as save_directions writes it)")
    return dirs


def draw_search_probabilities(probs, directions):
    """Per-layer softmax(α) as a text heat map: one row per layer, one column per candidate."""
    shades = " .:-=+*#%@"
    lo, hi = probs.min().item(), probs.max().item()
    lines = ["layer  " + " ".join(f"{d:>7s}" for d in directions) + "   (darker = more probable)"]
    for i, row in enumerate(probs.tolist()):
        level = lambda p: shades[int((p - lo) / max(hi - lo, 1e-12) * (len(shades) - 1))] * 2
        lines.append(f"{i:5d}  " + " ".join(f"{level(p)}{p:5.3f}" for p in row))
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# timm (an optional dependency): register every constructor, so that
# timm.create_model("local_vim_tiny") works where timm is installed.

def register_with_timm(names, create_model, module):
    """Register create_model(name) under each name in timm's registry; False where timm is missing."""
    try:
        from timm.models import register_model
    except ImportError:
        return False                      # timm is not installed: nothing to register
    for name in names:
        def ctor(pretrained=False, _name=name, pretrained_cfg_overlay=None, **kwargs):
            for key in ("pretrained_cfg", "cache_dir"):   # timm's own kwargs
                kwargs.pop(key, None)
            return create_model(_name, pretrained=pretrained, pretrained_cfg_overlay=pretrained_cfg_overlay, **kwargs)
        ctor.__name__ = name
        ctor.__module__ = module          # timm files the model under this module's name
        register_model(ctor)
    return True


# -----------------------------------------------------------------------------
# Pictures and tables

def model_table(models, create_model, paper):
    """`python localmamba.py`'s table: each model's parameters and MACs at 224 px, the paper's figures."""
    rows = ["LocalMamba models at 224 px, 1000 classes (MACs: count_macs' convention, see its docstring)\n",
            "| model | params | GMACs | paper top-1 | paper params (M) | paper GFLOPs |", "|---|---|---|---|---|---|"]
    for name in models:
        m = create_model(name)
        cells = [name, f"{sum(p.numel() for p in m.parameters()):,}", f"{count_macs(m) / 1e9:.2f}",
                 *paper.get(name, "   ")]
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows)


def need_pyplot(what):
    """matplotlib's pyplot without a display, or one BadInput saying how to get it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput(f"{what} needs matplotlib: pip install matplotlib") from None
    return plt


def draw_scan_orders_png(path, orders, H, W):
    """The scan orders as paths on an H×W grid, one panel each, the way the paper's Fig. 2 draws
    them: `orders` maps a direction name to its scan_order (row-major token indices, -1 for
    window padding, which the path skips). Needs matplotlib."""
    plt = need_pyplot("drawing the scan orders (`python localmamba.py` prints them as text without it)")
    n = len(orders)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 3.3 * rows * H / W + 0.5), squeeze=False)
    for ax, (name, order) in zip(axes.flat, orders.items()):
        real = [int(p) for p in order if p >= 0]                       # the tokens in the order visited
        ys, xs = [p // W for p in real], [p % W for p in real]
        ax.plot(xs, ys, "-", color="0.55", lw=1.2, zorder=1)
        ax.scatter(xs, ys, c=range(len(real)), cmap="viridis", s=36, zorder=2)
        ax.scatter(xs[:1], ys[:1], marker="s", s=90, facecolors="none", edgecolors="red", zorder=3)   # start
        ax.annotate("", xy=(xs[-1], ys[-1]), xytext=(xs[-2], ys[-2]),
                    arrowprops=dict(arrowstyle="->", color="red", lw=1.5)) if len(real) > 1 else None
        pad = len(order) - len(real)
        ax.set_title(name + (f"  (+{pad} padding)" if pad else ""), fontsize=10)
        ax.set_xlim(-0.5, W - 0.5), ax.set_ylim(H - 0.5, -0.5)
        ax.set_xticks(range(W)), ax.set_yticks(range(H))
        ax.set_aspect("equal"), ax.grid(True, color="0.9", lw=0.5)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(f"scan orders on a {H}×{W} token grid: red square = first token, arrow = last, "
                 f"colour = step", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
