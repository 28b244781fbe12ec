"""
localmamba.py: LocalMamba in one readable file.

Reading guide
-------------
Paper:    Huang, Pei, You, Wang, Qian, Xu. "LocalMamba: Visual State Space Model with Windowed
          Selective Scan", arXiv 2403.09338 (2024).
Official: github.com/hunto/LocalMamba, classification/lib/models/{local_vim.py,
          local_vmamba.py, mamba/multi_mamba.py, mamba/local_scan.py}. This file builds the same
          models parameter for parameter (same state_dict keys and shapes, so the released
          checkpoints load), with the official bugs fixed; each fix says "OFFICIAL BUG".

The idea (paper §3): a vision Mamba flattens the H×W token grid into a 1-D sequence and runs a
selective scan (S6) over it. Which order the tokens are visited in decides which tokens are
"near" each other in the scan (the state decays with distance along the sequence). LocalMamba
adds *windowed* orders that visit the grid window by window (§3.2, "local scan"), runs K = 4
orders per layer with independent SSM parameters, gates each with a small spatial-channel
attention (SCAttn, §3.3) and sums them; which 4 orders each layer uses was chosen by a
differentiable search over 8 candidates (§3.4).

Glossary (code name -> paper):
    B            batch size
    H, W         token grid (14×14 for 224 px with patch 16)
    L            tokens in a sequence (H*W, plus a cls token in one variant); Lmax: the longest scan
    D            model width (embed_dim / dims[i]);   E = d_inner = expand * D
    N            SSM state size (d_state = 16)
    R            rank of Δ's projection (dt_rank = ceil(D / 16))
    K            number of scan directions in a layer (4 in the published models, 8 in a supernet)
    window k     the side of a local-scan window: "w2" scans 2×2 windows, "w7" 7×7 (§3.2, Fig. 2)
    Δ, A, B, C   the S6 parameters (Mamba eq. 2); see scan_kernel.py
    directions   `h` row by row, `v` column by column, `wK` window by window, `*_flip` reversed
    SCAttn       spatial and channel attention that gates each direction before the sum (§3.3)
    α            the search logits, one softmax over the 8 candidate directions per layer (§3.4);
                 stored as `multi_scan.weights` (the official name, for checkpoint compatibility)

Order of the file: scan orders -> SCAttn -> MultiScan (K directions + the search relaxation)
-> the fused mixer path's switch -> shared parts -> LocalVim (config, mixer, block, RoPE, model)
-> LocalVMamba (config, SS2D, VSSBlock, PatchMerging2D, model) -> presets and create_model ->
derive / search helpers -> the pictures and __main__. Generic plumbing (timm's interface,
checkpoint files, the optimizer's groups, MAC drivers) is in localmamba_helpers.py; its
user-facing functions are re-exported here.

`python localmamba.py` prints the model table and the 8 scan orders; `--draw-orders FILE.png`
draws them as paths.
"""
import argparse
import functools
import json
import math
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from scan_kernel import ordered_conv, ordered_kernels_take, rope_rms_norm, scattn_sum, selective_scan, x_proj_scan
# the generic plumbing (timm's interface, checkpoint files, MAC counting) lives beside this file;
# what a user calls from it is re-exported here, so `from localmamba import ...` is the one import
from localmamba_helpers import (FASHION_MEAN_STD, IMAGENET_MEAN_STD, BadInput, FeatureInfo, FeatureMaps,
                                TimmInterface, check_fields, check_image, count_macs, draw_scan_orders_png,
                                maybe_checkpoint, model_table, register_with_timm, take_indices, load_pretrained,
                                released_url)
from localmamba_helpers import (configure_optimizer, count_flops_fvcore, draw_search_probabilities,  # noqa: F401
                                load_checkpoint, load_directions, load_state_dict_strict, read_checkpoint, weights_of,
                                resample_pos_embed, state_dict_of, tensor_checksum, STATE_DICT_KEYS, DetectionBackbone)
from localmamba_helpers import __version__  # noqa: F401 (the package's version: localmamba.__version__)


# -----------------------------------------------------------------------------
# Scan orders (paper §3.2, Fig. 2). Tokens are row-major: token (i, j) of an H×W grid is i*W + j.
# order[s] = the row-major index of the s-th token of the scanned sequence, -1 for padding.

DIRECTIONS = ("h", "h_flip", "v", "v_flip", "w2", "w2_flip", "w7", "w7_flip")  # canonical order, index 0..7


def parse_direction(name):
    """'w7_flip' -> ('w', 7, True); 'v' -> ('v', 0, False). Any window size K >= 1 parses."""
    base, flip = (name[:-5], True) if isinstance(name, str) and name.endswith("_flip") else (name, False)
    if base in ("h", "v"):
        return base, 0, flip
    m = re.fullmatch(r"w([1-9][0-9]*)", base) if isinstance(base, str) else None
    if m:
        return "w", int(m.group(1)), flip
    raise BadInput(f"unknown scan direction {name!r}: expected 'h', 'v' or 'wK' (window side K >= 1), "
                     f"optionally with '_flip', e.g. {', '.join(DIRECTIONS)}")


@functools.lru_cache(maxsize=None)
def _scan_order(direction, H, W):    # plain Python, cached as a tuple: also while torch.export traces
    kind, k, flip = parse_direction(direction)
    if kind == "h":                                   # row by row, left to right
        order = [i * W + j for i in range(H) for j in range(W)]
    elif kind == "v":                                 # column by column, top to bottom
        order = [i * W + j for j in range(W) for i in range(H)]
    else:                                             # k×k windows, row-major over windows and inside each,
        Hp, Wp = -(-H // k) * k, -(-W // k) * k       # the grid zero-padded bottom/right to multiples of k
        order = [i * W + j if i < H and j < W else -1 for wi in range(0, Hp, k) for wj in range(0, Wp, k)
                 for i in range(wi, wi + k) for j in range(wj, wj + k)]
    return tuple(order[::-1] if flip else order)      # *_flip: the whole (padded) sequence reversed


def scan_order(direction, H, W):
    """The scanned sequence of an H×W grid as row-major token indices, -1 where a window scan
    pads the grid (padding tokens are zeros and are scanned like real tokens, as the official
    code does). Length H*W, or Hp*Wp for a window scan.

    Windows larger than the grid: allowed, everywhere (create_model, the trainer, --directions,
    checkpoints), as the official code allows them. The grid is padded to one window (w7 on a
    4×4 grid scans 49 tokens, 33 of them padding): a published model at a small image size, or a
    late LocalVMamba stage, does exactly that; a window far larger than its grid (w100 on 14×14)
    costs (100/14)² times the tokens, and nothing refuses it."""
    if H < 1 or W < 1:
        raise BadInput(f"scan_order: the grid must be at least 1×1, got {H}×{W}")
    return torch.tensor(_scan_order(direction, int(H), int(W)), dtype=torch.long)


def inverse_order(order, L):
    """inv[..., p] = the position in the scanned sequence of token p (padding dropped), for one
    order (Ls,) or a stack of K orders (K, Lmax). The true inverse for every H, W.
    OFFICIAL BUG: multi_mamba.py un-scans `v` and `v_flip` with
    rearrange('b d (h w) -> b d (w h)'), the inverse only when H == W."""
    pos = torch.arange(order.shape[-1]).expand_as(order)
    inv = torch.zeros(*order.shape[:-1], L + 1, dtype=torch.long)             # slot L collects the padding
    inv.scatter_(-1, torch.where(order >= 0, order, L), pos)
    return inv[..., :L]


def scan_tokens(x, order):
    """(B, C, L) row-major -> (B, C, *order.shape) in scan order, zeros where order is -1.
    order: one direction (Ls,), or K directions (K, Lmax) gathered at once."""
    L = x.shape[-1]
    x = F.pad(x, (0, 1))                                                     # (B, C, L + 1), a zero slot
    return x[..., torch.where(order >= 0, order, L).to(x.device)]


def unscan_tokens(y, inv):
    """The inverse of scan_tokens: (B, C, *S) in scan order -> (B, C, *inv.shape) row-major,
    with inv = inverse_order(order, L)."""
    inv = inv.to(y.device)
    return y.gather(-1, inv.expand(*y.shape[:-inv.dim()], *inv.shape))


# -----------------------------------------------------------------------------
# SCAttn (paper §3.3, Fig. 3b; `BiAttn` in the official multi_mamba.py)

class SCAttn(nn.Module):
    """Spatial and channel attention that gates one direction's output before the directions
    are summed. As the released code runs it, only the channel branch is on:

        g = mean_L LayerNorm(x)                                   (B, 1, C)
        a = sigmoid(channel_select(GELU(global_reduce(g))))       (B, 1, C)   C -> C/8 -> C
        out = x * a

    The paper also describes a spatial branch (a per-token gate from local and global
    features); the official code has it commented out. `spatial=True` turns it on (adds the
    parameters `local_reduce` and `spatial_select`, so released checkpoints no longer match).
    Leading dimensions are free: (B, K, L, C) gates each of the K directions on its own.
    """

    def __init__(self, dim, ratio=0.125, spatial=False):
        super().__init__()
        reduced = int(dim * ratio)
        self.norm = nn.LayerNorm(dim)
        self.global_reduce = nn.Linear(dim, reduced)
        self.channel_select = nn.Linear(reduced, dim)
        self.spatial = spatial
        if spatial:
            self.local_reduce = nn.Linear(dim, reduced)
            self.spatial_select = nn.Linear(2 * reduced, 1)

    def forward(self, x):
        # x: (..., L, C) -> (..., L, C)
        u = self.norm(x)
        g, attn = self.channel_branch(u.mean(-2, keepdim=True))                 # (..., 1, C/8), (..., 1, C)
        if self.spatial:
            local = F.gelu(self.local_reduce(u))                                 # (..., L, C/8)
            s = self.spatial_select(torch.cat([local, g.expand_as(local)], -1))  # (..., L, 1)
            attn = attn * torch.sigmoid(s)                                       # (..., L, C)
        return x * attn

    def channel_branch(self, mean_u):
        """The channel branch from the token mean of the normalised input, mean_u (..., 1, C): the global
        feature g = GELU(global_reduce(mean_u)) (..., 1, C/8) and the channel gate (..., 1, C)."""
        g = F.gelu(self.global_reduce(mean_u))
        return g, torch.sigmoid(self.channel_select(g))

    def macs(self, L):
        """Multiply-adds of one direction of one image (convention in `count_macs`)."""
        C, r = self.global_reduce.in_features, self.global_reduce.out_features
        f = 2 * C * r                                                            # global_reduce + channel_select
        return f + (L * C * r + L * 2 * r if self.spatial else 0)                # local_reduce + spatial_select


# -----------------------------------------------------------------------------
# MultiScan: the K directions of one layer, and the search relaxation (paper §3.2, §3.4)

class MultiScan(nn.Module):
    """Turns one token sequence into K scanned sequences (one gather, `scan_tokens` with all K
    orders stacked), and back (`unscan_tokens`); then, after the owner's SCAttn,

        fixed model:  y = sum_k SCAttn(y_k)                                   (no 1/K)
        supernet:     y = sum_k softmax(α)_k · LN_k(SCAttn(y_k))   LN_k parameter-free (§3.4)

    The K sequences are padded at the end to the longest (a window scan of a grid that its
    window does not divide is longer) so that all K run through ONE grouped selective-scan
    call; the scan and the depthwise conv are causal, so end padding changes nothing before it.

    `cls_pos`: LocalVim's middle-cls-token variant keeps a cls token at sequence position
    cls_pos; it sits outside the grid, and every scanned sequence has it at position cls_pos.
    `attn`: LocalVMamba keeps its SCAttn here (official key op.multi_scan.attn.*); LocalVim keeps
    it in the mixer (mixer.attn.*).
    """

    def __init__(self, directions: Sequence[str], search: bool = False, attn: Optional[nn.Module] = None):
        super().__init__()
        for d in directions:
            parse_direction(d)
        self.directions = tuple(directions)
        if search:   # α: one logit per candidate, init 1e-3·randn; shape (K, 1, 1, 1) as in the official code
            self.weights = nn.Parameter(1e-3 * torch.randn(len(self.directions), 1, 1, 1))
        if attn is not None:
            self.attn = attn

    @property
    def search(self):
        return hasattr(self, "weights")

    def _orders(self, H, W, cls_pos):
        """The K orders over the input sequence, stacked: (K, Lmax), -1 for padding."""
        seqs = []
        for d in self.directions:
            order = scan_order(d, H, W)
            if cls_pos is not None:                     # grid token p sits at p or p+1 around the cls
                order = torch.where(order >= cls_pos, order + 1, order)
                order = torch.cat([order[:cls_pos], torch.tensor([cls_pos]), order[cls_pos:]])
            seqs.append(order)
        Lmax = max(len(s) for s in seqs)
        return torch.stack([F.pad(s, (0, Lmax - len(s)), value=-1) for s in seqs]), tuple(len(s) for s in seqs)

    def index(self, H, W, cls_pos=None, device=None):
        """(orders (K, Lmax), their inverse (K, L_in), each direction's length) for this grid,
        built once per (H, W, cls_pos, device) and cached."""
        key = (H, W, cls_pos, str(device))
        cache = self.__dict__.setdefault("_index_cache", {})
        if key in cache:
            return cache[key]
        orders, lengths = self._orders(H, W, cls_pos)
        built = (orders.to(device), inverse_order(orders, H * W + int(cls_pos is not None)).to(device), lengths)
        if not (torch.compiler.is_compiling() or torch.compiler.is_exporting()):   # tracing: fake tensors, not cached
            cache[key] = built
        return built

    def scan(self, x, H, W, cls_pos=None):
        # x: (B, C, L_in) -> (B, K, C, Lmax)
        orders, _, _ = self.index(H, W, cls_pos, x.device)
        return scan_tokens(x, orders).transpose(1, 2)

    def unscan(self, ys, H, W, cls_pos=None):
        # ys: (B, K, C, Lmax) -> (B, K, L_in, C), each direction back in row-major order
        _, inv, _ = self.index(H, W, cls_pos, ys.device)
        return unscan_tokens(ys.transpose(1, 2), inv).permute(0, 2, 3, 1)

    def combine(self, ys):
        # ys: (B, K, L_in, C) gated directions -> (B, L_in, C)
        if not self.search:
            return ys.sum(1)
        w = self.weights.view(-1).softmax(0)                                     # (K,)
        ys = F.layer_norm(ys, ys.shape[-1:])                                     # LN_k, no parameters
        return torch.einsum("k,bklc->blc", w.to(ys.dtype), ys)

    def probabilities(self):
        """softmax(α) over the candidates, or None for a fixed layer."""
        return self.weights.detach().view(-1).softmax(0) if self.search else None

    def extra_repr(self):
        return f"directions={list(self.directions)}, search={self.search}"


# -----------------------------------------------------------------------------
# The fused mixer path: the same mixer with the scan orders inside the kernels' loads and stores
# (scan_kernel.ordered_scan / ordered_conv). Per-token ops (the projections, the gate, SCAttn, the
# sum) commute with a permutation of the tokens, so only the conv along the scan and the scan
# itself need the orders; neither the gathered (B, K, C, Lmax) copy of the inputs nor the un-scan
# of the outputs is ever made. Each mixer's forward keeps the readable path beside it (scan_tokens
# -> conv -> selective_scan -> unscan_tokens), which is the reference the tests hold the fused one to.

def fused_env():
    """LOCALMAMBA_FUSED: unset or 1 = the fused mixer where its kernels run, 0 = the readable path always."""
    value = os.environ.get("LOCALMAMBA_FUSED", "")
    if value not in ("", "0", "1"):
        raise BadInput(f"LOCALMAMBA_FUSED={value!r}: set it to 0 (every mixer runs the readable path) or 1 "
                       f"(the fused path where its kernels run: CUDA with Triton, or the CPU with the C++ scan on), "
                       f"or unset it")
    return value != "0"


def set_fused(model, enabled=True):
    """Switch the fused mixer path of every mixer in `model` on (where its kernels run) or off (the
    readable path, as LOCALMAMBA_FUSED=0 does for every model). Returns the model."""
    for m in model.modules():
        if isinstance(m, (LocalVimMixer, SS2D)):
            m.fused = bool(enabled)
    return model


def _attend_and_sum(multi_scan, attn, ys):
    """multi_scan.combine(attn(ys)) on the fused path: ys (B, K, L, E) -> (B, L, E). A fixed layer with
    SCAttn's channel branch reads ys twice (scan_kernel.scattn_sum): once for the token mean of its
    LayerNorm (no normalised copy written), once to gate and sum the K directions (no gated copy); its
    backward writes ys's gradient once. The supernet's LN_k and the spatial branch run as written."""
    if multi_scan.search or not isinstance(attn, SCAttn) or attn.spatial:
        return multi_scan.combine(attn(ys))
    norm, reduce, select = attn.norm, attn.global_reduce, attn.channel_select
    return scattn_sum(ys, norm.eps, norm.weight, norm.bias, reduce.weight, reduce.bias, select.weight, select.bias)


def _fused(mixer, x):
    """Whether `mixer` runs its fused path on x: switched on, and scan_kernel.ordered_kernels_take(x)
    (an fp32/fp16/bf16 tensor, no exporter tracing; on CUDA with Triton, on the CPU with the C++ scan on)."""
    return mixer.fused and ordered_kernels_take(x) and fused_env()


# -----------------------------------------------------------------------------
# Shared parts: DropPath, RMSNorm, PatchEmbed, the direction lists' check, init (the image check: helpers)

class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al. 2016): drop the whole branch with prob p, scale the
    kept ones by 1/(1-p). (B, ...) -> (B, ...)."""

    def __init__(self, p=0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep.div_(1 - self.p)                  # the (B, 1, ...) mask scaled, as timm's: one pass over x

    def extra_repr(self):
        return f"p={self.p}"


class RMSNorm(nn.Module):
    """Mamba's RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight over the last
    dimension, (..., D) -> (..., D). nn.RMSNorm's math and state_dict ("weight"), written out because the legacy ONNX
    exporter has no aten::rms_norm."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}"


class PatchEmbed(nn.Module):
    """Conv2d(in_chans, D, p, stride p): (B, C, H, W) -> (B, H/p * W/p, D)."""

    def __init__(self, in_chans, dim, patch_size):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def _check_directions(directions, n_layers, name):
    """A per-layer list of direction lists, one per layer; None means a search supernet."""
    if directions is None:
        return None
    if isinstance(directions, (str, bytes)) or len(directions) != n_layers:
        got = "a string" if isinstance(directions, (str, bytes)) else f"{len(directions)} lists"
        raise BadInput(f"{name}: directions must be one list of direction names per layer, "
                         f"{n_layers} lists, got {got}")
    out = []
    for i, layer in enumerate(directions):
        if isinstance(layer, str) or len(layer) == 0:
            raise BadInput(f"{name}: directions[{i}] must be a non-empty list of names like ['h', 'w2'], "
                             f"got {layer!r}")
        for d in layer:
            parse_direction(d)
        if len(set(layer)) < len(layer):
            raise BadInput(f"{name}: directions[{i}] = {list(layer)} lists a direction twice (two identical scans)")
        out.append(list(layer))
    return out


def _dt_bias_init(d_inner, dt_min=1e-3, dt_max=0.1, floor=1e-4):
    """Mamba's Δ bias: inverse softplus of dt ~ log-uniform[dt_min, dt_max] (floored)."""
    log_dt = torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = torch.exp(log_dt).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


def _A_log_init(d_inner, d_state):
    """S4D-real: A = -(1, 2, ..., N) for every channel, stored as log."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1)   # (E, N)


def _init_linear_and_norms(model):
    """The official models' first init pass: every Linear trunc-normal(0.02) with zero bias,
    every LayerNorm weight 1, bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# -----------------------------------------------------------------------------
# LocalVim: the plain (Vim-based) model. Official: local_vim.py + multi_mamba.py MultiMamba.

@dataclass
class LocalVimConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 192              # D
    depth: int = 20
    d_state: int = 16                 # N
    expand: int = 2                   # E = d_inner = expand * D
    d_conv: int = 4                   # causal depthwise conv1d kernel
    directions: Optional[List[List[str]]] = None   # per layer; None = search supernet with all 8
    middle_cls_token: bool = False    # LocalVim-T* of the official README: cls token at position L//2, no RoPE
    rope: bool = True
    pt_hw_seq_len: int = 14           # RoPE positions are rescaled to a 14×14 grid (as in Vim)
    drop_path_rate: float = 0.1
    spatial_attn: bool = False        # SCAttn's spatial branch (paper Fig. 3b; off in the released code)
    scattn: bool = True               # False: no SCAttn at all (an ablation, paper Table 5)
    drop_rate: float = 0.0            # dropout before the head (timm's / DeiT's --drop)
    global_pool: str = "avg"          # "avg" over tokens, or "token": the middle cls token (the cls variant's)
    mean_std: tuple = IMAGENET_MEAN_STD   # the input normalisation (pretrained_cfg)
    dynamic_img_size: bool = False    # any image size (timm's name): pos embed resampled, orders and RoPE per grid

    def __post_init__(self):
        check_fields(self, "LocalVim")
        if self.dynamic_img_size and self.middle_cls_token:
            raise BadInput("LocalVim: dynamic_img_size is not offered for the middle-cls-token variant (where its "
                           "cls token sits depends on the grid); build it for your image size with img_size=...")
        if self.global_pool not in ("avg", "token") or (self.global_pool == "token" and not self.middle_cls_token):
            raise BadInput(f"global_pool {self.global_pool!r}: LocalVim pools with 'avg' (the mean over tokens), "
                           f"its middle-cls-token variant with 'token' too")
        if self.img_size % self.patch_size:
            raise BadInput(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}: "
                             f"use an img_size that is a multiple of {self.patch_size}")
        self.directions = _check_directions(self.directions, self.depth, "LocalVim")

    @property
    def grid(self):
        return self.img_size // self.patch_size, self.img_size // self.patch_size

    def layer_directions(self):
        return self.directions if self.directions is not None else [list(DIRECTIONS)] * self.depth


class LocalVimMixer(nn.Module):
    """The multi-direction Mamba mixer of LocalVim (official `MultiMamba`), paper Fig. 1/4,
    built for one token grid (H, W) and, in the middle-cls variant, a cls token at cls_pos.

    Shared by all K directions: in_proj (D -> 2E: x and gate z), out_proj (E -> D), SCAttn.
    Per direction k (parameter suffix _k = position in the layer's list): causal depthwise
    conv1d_k, x_proj_k (E -> R + 2N: Δ's low-rank input, B, C), dt_proj_k (R -> E), A_log_k,
    D_k. Each direction's x and z are scanned in its order, run through its own S6, un-scanned.
    """

    def __init__(self, d_model, directions, grid, cls_pos=None, d_state=16, expand=2, d_conv=4, search=False,
                 spatial_attn=False, scattn=True):
        super().__init__()
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.grid, self.cls_pos = tuple(grid), cls_pos
        self.d_inner = E = expand * d_model
        self.dt_rank = R = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.multi_scan = MultiScan(directions, search=search)
        for k in range(len(directions)):
            setattr(self, f"conv1d_{k}", nn.Conv1d(E, E, d_conv, groups=E, padding=d_conv - 1, bias=True))
            setattr(self, f"x_proj_{k}", nn.Linear(E, R + 2 * d_state, bias=False))
            setattr(self, f"dt_proj_{k}", nn.Linear(R, E, bias=True))
            # OFFICIAL BUG: multi_mamba.py wraps ONE tensor in K nn.Parameters, so the K A_log_k of
            # a layer share storage, train as one, and a checkpoint loads as the last of them.
            # Here each direction's A_log is its own tensor.
            setattr(self, f"A_log_{k}", nn.Parameter(_A_log_init(E, d_state)))
            setattr(self, f"D_{k}", nn.Parameter(torch.ones(E)))
        self.out_proj = nn.Linear(E, d_model, bias=False)
        self.attn = SCAttn(E, spatial=spatial_attn) if scattn else nn.Identity()   # Identity: the ablation
        self.fused = True                   # the fused path where its kernels run (set_fused, LOCALMAMBA_FUSED)

    @property
    def K(self):
        return len(self.multi_scan.directions)

    def _stacked(self, name):
        """The K per-direction parameters `name_k`, concatenated along their first axis."""
        return torch.cat([getattr(self, f"{name}_{k}") for k in range(self.K)])

    def forward(self, h, grid=None):
        # h: (B, L_in, D) -> (B, L_in, D); grid: the input's token grid, if not the one it was built for
        B, K, E, N, R = h.shape[0], self.K, self.d_inner, self.d_state, self.dt_rank
        (H, W), cls_pos = grid or self.grid, self.cls_pos
        if _fused(self, h):
            return self._forward_fused(h, H, W, cls_pos)
        xz = self.in_proj(h).transpose(1, 2)                                       # (B, 2E, L_in)
        xz = self.multi_scan.scan(xz, H, W, cls_pos)                               # (B, K, 2E, Lmax)
        Lmax = xz.shape[-1]
        x, z = xz.chunk(2, dim=2)                                                  # (B, K, E, Lmax) each
        convs = [getattr(self, f"conv1d_{k}") for k in range(K)]
        conv_w, conv_b = torch.cat([c.weight for c in convs]), torch.cat([c.bias for c in convs])  # (K*E, 1, d_conv)
        x = F.conv1d(x.reshape(B, K * E, Lmax), conv_w, conv_b, padding=self.d_conv - 1, groups=K * E)
        x = F.silu(x[..., :Lmax]).view(B, K, E, Lmax)                              # causal conv + SiLU
        x_proj_w = torch.stack([getattr(self, f"x_proj_{k}").weight for k in range(K)])  # (K, R+2N, E)
        x_dbl = torch.einsum("bkel,kce->bkcl", x, x_proj_w)                        # (B, K, R+2N, Lmax)
        dt, Bs, Cs = x_dbl.split([R, N, N], dim=2)
        dt_projs = [getattr(self, f"dt_proj_{k}") for k in range(K)]
        dt = torch.einsum("bkrl,ker->bkel", dt, torch.stack([p.weight for p in dt_projs]))  # (B, K, E, Lmax)
        dt_b = torch.cat([p.bias for p in dt_projs])                               # (K*E,)
        y = selective_scan(x.reshape(B, K * E, Lmax), dt.reshape(B, K * E, Lmax),
                           -torch.exp(self._stacked("A_log").float()), Bs.contiguous(), Cs.contiguous(),
                           D=self._stacked("D").float(), z=z.reshape(B, K * E, Lmax),
                           delta_bias=dt_b.float(), delta_softplus=True)          # (B, K*E, Lmax), G = K groups
        ys = self.multi_scan.unscan(y.view(B, K, E, Lmax), H, W, cls_pos)         # (B, K, L_in, E)
        y = self.multi_scan.combine(self.attn(ys))                                 # SCAttn per direction, then sum
        return self.out_proj(y)                                                    # (B, L_in, D)

    def _forward_fused(self, h, H, W, cls_pos):
        """forward's math with the orders inside the kernels: the conv reads x through each order and
        writes scan order; x_proj runs per token on that and the scan computes Δ from its low-rank input
        (dt_proj inside the kernel; x_proj_scan: one autograd node), reads z through the order and writes
        every direction's output at its row-major tokens."""
        K = self.K
        orders, inv, _ = self.multi_scan.index(H, W, cls_pos, h.device)           # (K, Lmax), (K, L_in)
        L_in = inv.shape[1]
        x, z = self.in_proj(h).chunk(2, dim=-1)                                    # (B, L_in, E) each, views
        convs = [getattr(self, f"conv1d_{k}") for k in range(K)]
        u = ordered_conv(x, torch.cat([c.weight for c in convs]), torch.cat([c.bias for c in convs]),
                         orders, inv)                                              # (K, B, Lmax, E): conv + SiLU
        dt_projs = [getattr(self, f"dt_proj_{k}") for k in range(K)]
        ys = x_proj_scan(u, torch.stack([getattr(self, f"x_proj_{k}").weight for k in range(K)]),   # (K, R+2N, E)
                         -torch.exp(self._stacked("A_log").float()), self._stacked("D").float(), z.unsqueeze(1),
                         torch.cat([p.bias for p in dt_projs]).float(), orders, L_in,
                         torch.stack([p.weight for p in dt_projs]))              # (B, K, L_in, E)
        y = _attend_and_sum(self.multi_scan, self.attn, ys)                         # SCAttn per direction, then sum
        return self.out_proj(y)                                                    # (B, L_in, D)

    def macs(self):
        """Multiply-adds of one image (convention in `count_macs`)."""
        (H, W), cls_pos = self.grid, self.cls_pos
        L_in = H * W + int(cls_pos is not None)
        E, N, R, D = self.d_inner, self.d_state, self.dt_rank, self.d_model
        f = L_in * D * 2 * E + L_in * E * D                                        # in_proj, out_proj
        for Lk in self.multi_scan.index(H, W, cls_pos)[2]:
            f += Lk * E * self.d_conv + Lk * E * (R + 2 * N) + Lk * R * E         # conv1d_k, x_proj_k, dt_proj_k
            f += 9 * Lk * E * N + Lk * E                                           # the scan
            f += self.attn.macs(L_in) if isinstance(self.attn, SCAttn) else 0
        return f


class LocalVimBlock(nn.Module):
    """Mamba's block (official `Block` with fused_add_norm, residual_in_fp32, RMSNorm):
    Add -> RMSNorm -> mixer. It returns the mixer output and the fp32 residual stream; the
    next block adds them. No MLP."""

    def __init__(self, d_model, mixer, drop_path=0.0):
        super().__init__()
        self.mixer = mixer
        self.norm = RMSNorm(d_model, eps=1e-5)
        self.drop_path = DropPath(drop_path)

    def forward(self, hidden, residual, grid=None, rope=None):
        # hidden, residual: (B, L_in, D) -> (B, L_in, D), (B, L_in, D) fp32; residual None in the first block;
        # rope: RoPE2D of the sum, = rope(residual) + DropPath(rope(hidden)) as the official code adds them
        if _fused(self.mixer, hidden) and self.norm.weight.dtype == torch.float32:   # the same math in one pass
            cos, sin = (None, None) if rope is None else rope.cos_sin(grid, hidden.device)
            hidden = hidden if residual is None else self.drop_path(hidden)
            residual, h, _ = rope_rms_norm(residual, hidden, cos, sin, self.norm.weight, self.norm.eps)
            return self.mixer(h, grid), residual
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        residual = residual.float()                                                 # kept in fp32
        if rope is not None:
            residual = rope(residual, grid)
        hidden = self.mixer(self.norm(residual.to(self.norm.weight.dtype)), grid)
        return hidden, residual


class RoPE2D(nn.Module):
    """EVA-02-style 2-D rotary embedding (official mamba/rope.py VisionRotaryEmbeddingFast),
    applied before every layer to the hidden states and the residual stream (officially to each;
    here the block rotates their sum, the same numbers: see LocalVim._layer). The first D/2
    channels rotate with the token's row, the last D/2 with its column; frequencies
    1/10000^(2m/(D/2)), each used for one pair of channels. Positions are rescaled to a
    pt_seq_len grid (14) as in Vim. freqs_cos/freqs_sin are buffers in the official
    state_dict, so they are persistent buffers here too."""

    def __init__(self, dim, H, W, pt_seq_len=14, theta=10000.0):
        super().__init__()
        self.dim, self.grid, self.pt_seq_len, self.theta = dim, (H, W), pt_seq_len, theta
        ang = self._angles(H, W)
        self.register_buffer("freqs_cos", ang.cos())                                  # (L, D)
        self.register_buffer("freqs_sin", ang.sin())

    def _angles(self, H, W):
        half = self.dim // 2
        freqs = 1.0 / self.theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)   # (D/4,)
        rows = torch.arange(H) / H * self.pt_seq_len
        cols = torch.arange(W) / W * self.pt_seq_len
        fr = (rows[:, None] * freqs).repeat_interleave(2, -1)                         # (H, D/2)
        fc = (cols[:, None] * freqs).repeat_interleave(2, -1)                         # (W, D/2)
        ang = torch.cat([fr[:, None, :].expand(H, W, -1), fc[None, :, :].expand(H, W, -1)], -1)  # (H, W, D)
        return ang.reshape(H * W, -1)

    def cos_sin(self, grid=None, device=None):
        """cos and sin of the angles, (L, D) each: the buffers, or another grid's own angles."""
        if grid is None or tuple(grid) == self.grid:
            return self.freqs_cos, self.freqs_sin
        ang = self._angles(*grid).to(device)
        return ang.cos(), ang.sin()

    def forward(self, t, grid=None):
        # t: (B, L, D); pairs (t0, t1) -> (t0 cos - t1 sin, t1 cos + t0 sin)
        cos, sin = self.cos_sin(grid, t.device)
        t1, t2 = t.unflatten(-1, (-1, 2)).unbind(-1)
        rot = torch.stack([-t2, t1], -1).flatten(-2)
        return t * cos + rot * sin


class LocalVim(TimmInterface, nn.Module):
    """LocalVim (paper §4.1 "plain structure"; official local_vim.py VisionMamba).

    Patch embed -> + learnable pos embed -> depth × [RoPE on hidden and residual (their sum) -> block] ->
    add -> RMSNorm -> mean pool (or the middle cls token) -> Linear head.
    """
    timm_names = dict(first_conv="patch_embed.proj", classifier="head", final_norm="norm_f")

    def __init__(self, cfg: LocalVimConfig):
        super().__init__()
        self.cfg = cfg
        D, p = cfg.embed_dim, cfg.patch_size
        H, W = cfg.grid
        self.num_classes = cfg.num_classes
        self.num_features = self.embed_dim = D
        self.patch_embed = PatchEmbed(cfg.in_chans, D, p)
        self.cls_pos = (H * W) // 2 if cfg.middle_cls_token else None              # 98 for 14×14
        if cfg.middle_cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, H * W + cfg.middle_cls_token, D))
        if cfg.rope:
            self.rope = RoPE2D(D, H, W, pt_seq_len=cfg.pt_hw_seq_len)
        dirs = cfg.layer_directions()
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()   # (also under a meta device)
        inter_dpr = [0.0] + dpr      # official: layer i drops the PREVIOUS layer's output with rate [0]+dpr at i
        mixer = lambda i: LocalVimMixer(D, dirs[i], (H, W), self.cls_pos, cfg.d_state, cfg.expand, cfg.d_conv,
                                        search=cfg.directions is None, spatial_attn=cfg.spatial_attn,
                                        scattn=cfg.scattn)
        self.layers = nn.ModuleList([LocalVimBlock(D, mixer(i), drop_path=inter_dpr[i]) for i in range(cfg.depth)])
        self.drop_path = DropPath(cfg.drop_path_rate)                               # the final add: full rate
        self.norm_f = RMSNorm(D, eps=1e-5)
        self.global_pool, self.head_drop = cfg.global_pool, nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(D, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.feature_info = FeatureInfo(dict(num_chs=D, reduction=p, module=f"layers.{i}") for i in range(cfg.depth))
        self.default_out_indices = [cfg.depth * k // 4 - 1 for k in (1, 2, 3, 4)]   # 4, 9, 14, 19 for depth 20
        self._init_weights()

    def _init_weights(self):
        """As the official code executes it: every Linear trunc-normal(0.02) with zero bias (this
        overwrites Mamba's Δ init: dt_proj bias starts at 0), LayerNorms 1/0, pos embed
        trunc-normal(0.02), then out_proj re-initialised kaiming-uniform(a=√5) / √depth."""
        _init_linear_and_norms(self)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for layer in self.layers:
            nn.init.kaiming_uniform_(layer.mixer.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                layer.mixer.out_proj.weight /= math.sqrt(self.cfg.depth)

    @property
    def directions(self):
        return [list(layer.mixer.multi_scan.directions) for layer in self.layers]

    def multi_scans(self):
        return [layer.mixer.multi_scan for layer in self.layers]

    def _embed(self, x):
        # x: (B, C, H, W) image -> hidden (B, L_in, D), no residual stream yet, and the token grid
        check_image(x, self.cfg, any_size=self.cfg.dynamic_img_size)
        p = self.cfg.patch_size
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        x = self.patch_embed(x)                                                   # (B, L, D)
        if self.cls_pos is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :self.cls_pos], cls, x[:, self.cls_pos:]], 1)     # (B, L+1, D), cls in the middle
        pos = self.pos_embed
        if grid != self.cfg.grid:             # dynamic_img_size: resampled to this grid (bicubic, as for checkpoints)
            pos = F.interpolate(pos.unflatten(1, self.cfg.grid).permute(0, 3, 1, 2), size=grid, mode="bicubic",
                                align_corners=False).flatten(2).transpose(1, 2)  # (1, L, D)
        return x + pos, None, grid

    def _layer(self, layer, hidden, residual, grid):
        # RoPE on the hidden states and the residual stream, then the block: (B, L_in, D) each. The official
        # code rotates both and the block adds them; RoPE is linear and per token (DropPath a per-sample
        # scale), so the block rotates their sum instead: the same numbers, half the RoPE work.
        return maybe_checkpoint(self, layer, hidden, residual, None if grid == self.cfg.grid else grid,
                                self.rope if self.cfg.rope else None)

    def _final(self, hidden, residual):
        # the last add and the final norm: (B, L_in, D)
        residual = residual + self.drop_path(hidden)
        return self.norm_f(residual.to(self.norm_f.weight.dtype))

    def forward_features(self, x):
        # x: (B, C, H, W) image -> (B, L_in, D) tokens after the final norm
        hidden, residual, grid = self._embed(x)
        for layer in self.layers:
            hidden, residual = self._layer(layer, hidden, residual, grid)
        return self._final(hidden, residual)

    def forward_head(self, x, pre_logits=False):
        # x: (B, L_in, D) -> (B, num_classes), or (B, D) with pre_logits
        c = self.cls_pos
        if self.global_pool == "token":
            x = x[:, c]                                                            # (B, D) the middle cls token
        else:                                                                      # the grid tokens' mean (B, D),
            x = (x if c is None else torch.cat([x[:, :c], x[:, c + 1:]], 1)).mean(1)   # a cls token left out (timm)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x):
        # x: (B, C, H, W) -> (B, num_classes)
        return self.forward_head(self.forward_features(x))

    # --- what the outside world calls: timm's feature and classifier API, MACs, weight decay -----

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        """timm's feature API: after each chosen block, the stream the next block reads (residual +
        block output; with norm, through the final norm), cls token dropped, as (B, D, H/p, W/p)
        maps (output_fmt "NHWC": (B, H/p, W/p, D)). Returns (final features, maps), or the maps."""
        take = take_indices(len(self.layers), indices)
        hidden, residual, (H, W) = self._embed(x)
        maps = []
        for i, layer in enumerate(self.layers[:max(take) + 1] if stop_early or intermediates_only else self.layers):
            hidden, residual = self._layer(layer, hidden, residual, (H, W))
            if i in take:
                t = self._final(hidden, residual) if norm else residual + hidden              # (B, L_in, D)
                if self.cls_pos is not None:
                    t = torch.cat([t[:, :self.cls_pos], t[:, self.cls_pos + 1:]], 1)        # (B, L, D)
                t = t.unflatten(1, (H, W))                                                   # (B, H, W, D)
                maps.append(t.permute(0, 3, 1, 2) if output_fmt == "NCHW" else t)
        return maps if intermediates_only else (self._final(hidden, residual), maps)

    def macs(self):
        H, W = self.cfg.grid
        f = H * W * self.embed_dim * self.cfg.in_chans * self.cfg.patch_size ** 2   # patch embed
        f += sum(layer.mixer.macs() for layer in self.layers)
        return f + self.embed_dim * self.num_classes                            # head

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}   # the official set; configure_optimizer groups by it

    def group_matcher(self, coarse=False):
        """Parameter groups for layer-wise lr decay (timm's param_groups_layer_decay): the stem, one
        group per block, the final norm with the last."""
        return dict(stem=r"^patch_embed|^pos_embed|^cls_token",
                    blocks=[(r"^layers\.(\d+)", None), (r"^norm_f", (99999,))])


# -----------------------------------------------------------------------------
# LocalVMamba: the hierarchical (VMamba-based) model. Official: local_vmamba.py VSSM.

@dataclass
class LocalVMambaConfig:
    img_size: int = 224
    patch_size: int = 4
    in_chans: int = 3
    num_classes: int = 1000
    dims: Sequence[int] = (96, 192, 384, 768)       # C of each stage
    depths: Sequence[int] = (2, 2, 9, 2)
    d_state: int = 16                 # N
    ssm_ratio: float = 2.0            # E = ssm_ratio * C
    d_conv: int = 3                   # depthwise 3×3 conv before the scan
    directions: Optional[List[List[str]]] = None   # per block in forward order; None = supernet
    drop_path_rate: float = 0.2
    spatial_attn: bool = False        # SCAttn's spatial branch
    scattn: bool = True               # False: no SCAttn (ablation)
    drop_rate: float = 0.0            # dropout before the head (timm's / DeiT's --drop)
    global_pool: str = "avg"          # average over H×W (the only pooling the official head has)
    mean_std: tuple = IMAGENET_MEAN_STD

    def __post_init__(self):
        check_fields(self, "LocalVMamba")
        # img_size is nominal (MACs, pretrained_cfg): no parameter depends on it, any image >= patch runs
        if self.img_size < self.patch_size or self.global_pool != "avg":
            raise BadInput(f"LocalVMamba: img_size {self.img_size} must be at least the patch size {self.patch_size}, "
                           f"and global_pool 'avg' (got {self.global_pool!r})")
        if len(self.dims) != len(self.depths):
            raise BadInput(f"dims {tuple(self.dims)} and depths {tuple(self.depths)} must have the same length")
        self.directions = _check_directions(self.directions, sum(self.depths), "LocalVMamba")

    def layer_directions(self):
        return self.directions if self.directions is not None else [list(DIRECTIONS)] * sum(self.depths)


class SS2D(nn.Module):
    """VMamba's 2-D selective scan block with LocalMamba's K directions (official `SS2D` +
    `MultiScanVSSM`).

    in_proj C -> 2E (x, z), z = SiLU(z); x -> depthwise 3×3 conv + SiLU, SHARED by the K
    directions; scan x in K orders; per direction its own x_proj, dt_proj, A_log, D (stored
    stacked: x_proj_weight (K, R+2N, E), dt_projs_weight (K, E, R), dt_projs_bias (K, E),
    A_logs (K·E, N), Ds (K·E)); ONE grouped selective scan (no z inside, softplus Δ, D skip);
    un-scan, SCAttn per direction (shared), sum; LayerNorm(E); · z; out_proj E -> C.
    """

    def __init__(self, d_model, directions, d_state=16, ssm_ratio=2.0, d_conv=3, search=False,
                 spatial_attn=False, scattn=True):
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = E = int(ssm_ratio * d_model)
        self.dt_rank = R = math.ceil(d_model / 16)
        K = len(directions)
        self.in_proj = nn.Linear(d_model, 2 * E, bias=False)
        self.conv2d = nn.Conv2d(E, E, d_conv, padding=(d_conv - 1) // 2, groups=E, bias=True)
        bound = 1 / math.sqrt(E)                                        # nn.Linear's default init, as official
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * d_state, E).uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, E, R).uniform_(-R ** -0.5, R ** -0.5))
        self.dt_projs_bias = nn.Parameter(torch.stack([_dt_bias_init(E) for _ in range(K)]))   # (K, E)
        self.A_logs = nn.Parameter(_A_log_init(E, d_state).repeat(K, 1))                     # (K*E, N)
        self.Ds = nn.Parameter(torch.ones(K * E))
        self.out_norm = nn.LayerNorm(E)
        self.out_proj = nn.Linear(E, d_model, bias=False)
        self.multi_scan = MultiScan(directions, search=search,
                                    attn=SCAttn(E, spatial=spatial_attn) if scattn else nn.Identity())
        self.fused = True                   # the fused path where its kernels run (set_fused, LOCALMAMBA_FUSED)

    def forward(self, x):
        # x: (B, H, W, C) -> (B, H, W, C)
        B, H, W, _ = x.shape
        E, N, R = self.d_inner, self.d_state, self.dt_rank
        K = len(self.multi_scan.directions)
        x, z = self.in_proj(x).chunk(2, dim=-1)                                     # (B, H, W, E) each
        z = F.silu(z)
        x = F.silu(self.conv2d(x.permute(0, 3, 1, 2)))                              # (B, E, H, W)
        if _fused(self, x):
            y = self._scan_fused(x, H, W)                                           # (B, H*W, E)
            return self.out_proj(self.out_norm(y).view(B, H, W, E) * z)
        xs = self.multi_scan.scan(x.flatten(2), H, W)                               # (B, K, E, Lmax)
        Lmax = xs.shape[-1]
        x_dbl = torch.einsum("bkel,kce->bkcl", xs, self.x_proj_weight)              # (B, K, R+2N, Lmax)
        dt, Bs, Cs = x_dbl.split([R, N, N], dim=2)
        dt = torch.einsum("bkrl,ker->bkel", dt, self.dt_projs_weight)                # (B, K, E, Lmax)
        y = selective_scan(xs.reshape(B, K * E, Lmax), dt.reshape(B, K * E, Lmax),
                           -torch.exp(self.A_logs.float()), Bs.contiguous(), Cs.contiguous(),
                           D=self.Ds.float(), delta_bias=self.dt_projs_bias.view(-1).float(),
                           delta_softplus=True)                                     # (B, K*E, Lmax)
        ys = self.multi_scan.unscan(y.view(B, K, E, Lmax), H, W)                    # (B, K, H*W, E)
        y = self.multi_scan.combine(self.multi_scan.attn(ys))                       # SCAttn per direction, sum
        y = self.out_norm(y).view(B, H, W, E) * z
        return self.out_proj(y)                                                    # (B, H, W, C)

    def _scan_fused(self, x, H, W):
        """forward's scan with the orders inside the kernel: x_proj runs per token in row-major order;
        the scan reads x, Δ's low-rank input, B, C through each order (zeros at padding), computes Δ
        (dt_proj inside the kernel) and writes every direction's output at its row-major tokens.
        x: (B, E, H, W) -> (B, H*W, E), summed."""
        B, E = x.shape[0], self.d_inner
        orders, _, _ = self.multi_scan.index(H, W, None, x.device)
        xr = x.permute(0, 2, 3, 1).reshape(B, H * W, E)                   # (B, L, E); a view: conv2d kept channels-last
        ys = x_proj_scan(xr, self.x_proj_weight, -torch.exp(self.A_logs.float()), self.Ds.float(), None,
                         self.dt_projs_bias.view(-1).float(), orders, H * W, self.dt_projs_weight)   # (B, K, L, E)
        return _attend_and_sum(self.multi_scan, self.multi_scan.attn, ys)      # SCAttn per direction, sum

    def macs(self, H, W):
        L, C, E, N, R = H * W, self.d_model, self.d_inner, self.d_state, self.dt_rank
        f = L * C * 2 * E + L * E * 9 + L * E * C                                  # in_proj, 3×3 dw conv, out_proj
        attn = self.multi_scan.attn
        for Lk in self.multi_scan.index(H, W)[2]:
            f += Lk * E * (R + 2 * N) + Lk * R * E + 9 * Lk * E * N + Lk * E     # x_proj, dt_proj, scan
            f += attn.macs(L) if isinstance(attn, SCAttn) else 0
        return f


class VSSBlock(nn.Module):
    """x + DropPath(SS2D(LayerNorm(x))); no MLP (official VSSBlock as LocalVMamba configures it)."""

    def __init__(self, dim, directions, drop_path=0.0, **ss2d):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.op = SS2D(dim, directions, **ss2d)
        self.drop_path = DropPath(drop_path)

    def forward(self, x):
        # x: (B, H, W, C) -> (B, H, W, C)
        return x + self.drop_path(self.op(self.norm(x)))


class PatchMerging2D(nn.Module):
    """Swin patch merging: pad odd sides, concat the 4 phases (0,0),(1,0),(0,1),(1,1),
    LayerNorm(4C), Linear 4C -> 2C. (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)."""

    def __init__(self, dim, out_dim):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x):
        H, W = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class Permute(nn.Module):
    def __init__(self, *dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return x.permute(*self.dims)


class LocalVMamba(TimmInterface, nn.Module):
    """LocalVMamba (paper §4.1 "hierarchical structure"; official local_vmamba.py VSSM).

    Stem: Conv2d(3, C0, 4, stride 4) -> channels-last -> LayerNorm; 4 stages of VSS blocks at
    H/4, H/8, H/16, H/32 with patch merging between them; LayerNorm -> avg pool -> Linear.
    """
    timm_names = dict(first_conv="patch_embed.0", classifier="classifier.head", final_norm="classifier.norm")

    def __init__(self, cfg: LocalVMambaConfig):
        super().__init__()
        self.cfg = cfg
        dims = list(cfg.dims)
        self.num_classes = cfg.num_classes
        self.num_features = dims[-1]
        self.patch_embed = nn.Sequential(
            nn.Conv2d(cfg.in_chans, dims[0], cfg.patch_size, stride=cfg.patch_size), Permute(0, 2, 3, 1),
            nn.LayerNorm(dims[0]))
        dirs = cfg.layer_directions()
        dpr = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        ss2d = dict(d_state=cfg.d_state, ssm_ratio=cfg.ssm_ratio, d_conv=cfg.d_conv, search=cfg.directions is None,
                    spatial_attn=cfg.spatial_attn, scattn=cfg.scattn)
        self.layers = nn.ModuleList()
        i = 0
        for s, (dim, depth) in enumerate(zip(dims, cfg.depths)):
            blocks = [VSSBlock(dim, dirs[i + j], dpr[i + j], **ss2d) for j in range(depth)]
            i += depth
            down = PatchMerging2D(dim, dims[s + 1]) if s < len(dims) - 1 else nn.Identity()
            self.layers.append(nn.Sequential(OrderedDict(blocks=nn.Sequential(*blocks), downsample=down)))
        head = nn.Linear(dims[-1], cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.classifier = nn.Sequential(OrderedDict(
            norm=nn.LayerNorm(dims[-1]), permute=Permute(0, 3, 1, 2), avgpool=nn.AdaptiveAvgPool2d(1),
            flatten=nn.Flatten(1), head=head))
        self.global_pool, self.head_drop = cfg.global_pool, nn.Dropout(cfg.drop_rate)
        self.feature_info = FeatureInfo(dict(num_chs=d, reduction=cfg.patch_size * 2 ** s, module=f"layers.{s}")
                                        for s, d in enumerate(dims))
        self.default_out_indices = list(range(len(dims)))
        _init_linear_and_norms(self)   # official VSSM._init_weights

    def blocks(self):
        return [b for stage in self.layers for b in stage.blocks]

    @property
    def directions(self):
        return [list(b.op.multi_scan.directions) for b in self.blocks()]

    def multi_scans(self):
        return [b.op.multi_scan for b in self.blocks()]

    def _stages(self, x, take=()):
        # x: (B, C, H, W) image -> (B, H/32, W/32, C3) before the final norm, and the stage outputs in
        # take (after their blocks, before the downsample: (B, H/4·2^-s, W/4·2^-s, C_s) channels-last)
        check_image(x, self.cfg, any_size=True)
        x = self.patch_embed(x)                                                   # (B, H/4, W/4, C0)
        outs = []
        for s, stage in enumerate(self.layers):
            for block in stage.blocks:
                x = maybe_checkpoint(self, block, x)
            outs += [x] if s in take else []
            x = stage.downsample(x)
        return x, outs

    def forward_features(self, x):
        # x: (B, C, H, W) image, any H, W -> (B, H/32, W/32, C3) after the final norm
        return self.classifier.norm(self._stages(x)[0])

    def forward_head(self, x, pre_logits=False):
        # x: (B, H/32, W/32, C3) -> (B, num_classes), or (B, C3) with pre_logits
        x = self.classifier.flatten(self.classifier.avgpool(self.classifier.permute(x)))  # (B, C3)
        x = self.head_drop(x)
        return x if pre_logits else self.classifier.head(x)

    def forward(self, x):
        # x: (B, C, H, W) -> (B, num_classes)
        return self.forward_head(self.forward_features(x))

    # --- what the outside world calls: timm's feature and classifier API, MACs, weight decay -----

    def forward_intermediates(self, x, indices=None, norm=False, stop_early=False, output_fmt="NCHW",
                              intermediates_only=False):
        """timm's feature API: the output of each chosen stage (strides 4, 8, 16, 32; with norm, the
        last through the final norm: the official backbone's extra per-stage norms are not in the
        classification weights), as NCHW maps. Returns (final features, maps), or the maps."""
        take = take_indices(len(self.layers), indices)
        x, outs = self._stages(x, take)
        if norm and len(self.layers) - 1 in take:
            outs[-1] = self.classifier.norm(outs[-1])
        maps = [o.permute(0, 3, 1, 2) if output_fmt == "NCHW" else o for o in outs]
        return maps if intermediates_only else (self.classifier.norm(x), maps)

    def macs(self):
        Hs = Ws = self.cfg.img_size // self.cfg.patch_size
        f = Hs * Ws * self.cfg.dims[0] * self.cfg.in_chans * self.cfg.patch_size ** 2
        for stage in self.layers:
            H, W = Hs, Ws
            f += sum(b.op.macs(H, W) for b in stage.blocks)
            if isinstance(stage.downsample, PatchMerging2D):
                Hs, Ws = -(-H // 2), -(-W // 2)
                f += Hs * Ws * stage.downsample.reduction.in_features * stage.downsample.reduction.out_features
        return f + self.num_features * self.num_classes

    def no_weight_decay(self):
        return set()   # the official VSSM's set

    def group_matcher(self, coarse=False):
        """Parameter groups for layer-wise lr decay: the stem, then per stage (coarse) or per block,
        each downsample after its stage's blocks (it runs there, so decays no more than they do),
        the final norm with the last."""
        if coarse:
            return dict(stem=r"^patch_embed", blocks=[(r"^layers\.(\d+)", None), (r"^classifier\.norm", (99999,))])
        return dict(stem=r"^patch_embed", blocks=[(r"^layers\.(\d+)\.downsample", (99999,)),
                                                  (r"^layers\.(\d+)\.blocks\.(\d+)", None),
                                                  (r"^classifier\.norm", (99999,))])


# -----------------------------------------------------------------------------
# Presets: the published per-layer directions (official local_vim.py / local_vmamba.py at commit
# 75e5d1f, where each model's definition lists them). Position k in a list is parameter suffix _k.

SEARCHED_DIRECTIONS = {
    "local_vim_tiny": [  # LocalVim-T, 20 layers
        ["h", "v_flip", "w7", "w7_flip"], ["h_flip", "w2_flip", "w7", "w7_flip"], ["h", "h_flip", "v", "w7"],
        ["h", "h_flip", "v", "v_flip"], ["h", "h_flip", "v", "v_flip"], ["h", "h_flip", "v", "v_flip"],
        ["h_flip", "v", "v_flip", "w7"], ["h_flip", "v", "v_flip", "w2_flip"], ["h", "h_flip", "v", "v_flip"],
        ["h", "h_flip", "v", "v_flip"], ["h", "v", "v_flip", "w2"], ["h", "v", "v_flip", "w2_flip"],
        ["h", "h_flip", "v_flip", "w7"], ["h_flip", "v", "v_flip", "w2"], ["h", "h_flip", "v", "v_flip"],
        ["h", "v", "w2", "w2_flip"], ["v", "v_flip", "w2", "w7"], ["h", "h_flip", "v", "w2"],
        ["h", "h_flip", "w2_flip", "w7"], ["v", "v_flip", "w2", "w2_flip"],
    ],
    # LocalVim-S as the official code registers it: `local_vim_small` is defined twice in
    # local_vim.py and the second definition, [h, h_flip, w2, w2_flip] in every layer, wins.
    # (Its segmentation configs instead reuse the LocalVim-T list: pass directions= for that.)
    "local_vim_small": [["h", "h_flip", "w2", "w2_flip"]] * 20,
    "local_vmamba_tiny": [  # LocalVMamba-T, 15 blocks in forward order (stages 2, 2, 9, 2)
        ["h", "h_flip", "w7", "w7_flip"], ["h_flip", "v_flip", "w2", "w2_flip"],
        ["h_flip", "v_flip", "w2_flip", "w7"], ["h_flip", "v", "v_flip", "w2"],
        ["h", "h_flip", "v_flip", "w2_flip"], ["h_flip", "v_flip", "w2", "w2_flip"], ["h", "w2_flip", "w7", "w7_flip"],
        ["h", "h_flip", "v", "v_flip"], ["h", "v_flip", "w7", "w7_flip"], ["h_flip", "v", "w2", "w7_flip"],
        ["v", "v_flip", "w2", "w7_flip"], ["h", "h_flip", "v_flip", "w2_flip"], ["v_flip", "w2_flip", "w7", "w7_flip"],
        ["h_flip", "v_flip", "w2_flip", "w7_flip"], ["h_flip", "v", "w7", "w7_flip"],
    ],
    "local_vmamba_small": [  # LocalVMamba-S, 33 blocks in forward order (stages 2, 2, 27, 2)
        ["h", "v", "v_flip", "w7_flip"], ["h", "h_flip", "v", "w7"],
        ["h_flip", "v", "v_flip", "w7"], ["h_flip", "v", "w2_flip", "w7"],
        ["h_flip", "v", "w2_flip", "w7"], ["h_flip", "v_flip", "w2", "w7_flip"], ["h_flip", "v", "v_flip", "w7"],
        ["h", "v", "v_flip", "w7"], ["h", "v", "v_flip", "w7"], ["h", "v", "v_flip", "w7_flip"],
        ["h", "h_flip", "v", "v_flip"], ["h", "v", "v_flip", "w2"], ["v", "v_flip", "w2_flip", "w7"],
        ["h", "h_flip", "v", "w2"], ["h_flip", "v", "v_flip", "w7_flip"], ["h", "h_flip", "v", "v_flip"],
        ["h", "v", "v_flip", "w7_flip"], ["h", "v", "v_flip", "w7_flip"], ["h", "h_flip", "v_flip", "w7"],
        ["h_flip", "v_flip", "w2_flip", "w7"], ["h_flip", "v", "v_flip", "w7_flip"], ["v", "v_flip", "w7", "w7_flip"],
        ["h", "v", "v_flip", "w7_flip"], ["h_flip", "v", "v_flip", "w2"], ["h", "v", "v_flip", "w2_flip"],
        ["h", "h_flip", "v", "w7"], ["h", "h_flip", "w7", "w7_flip"], ["h", "v_flip", "w2", "w2_flip"],
        ["h", "v_flip", "w2", "w7"], ["h", "v", "v_flip", "w7_flip"],
        ["h_flip", "v", "w2_flip", "w7"], ["h_flip", "v_flip", "w7", "w7_flip"], ["h", "v", "w7", "w7_flip"],
    ],
}

_LOCAL = [["h", "h_flip", "w2", "w2_flip"]]
_FASHION = dict(mean_std=FASHION_MEAN_STD)   # the nano presets' data: Fashion-MNIST (grey; in_chans=1 to match)
MODELS = {
    # name: (config class, fields). Params / GMACs at 224 px (count_macs' convention), 1000 classes,
    # from `python localmamba.py`; the paper's figures beside them.
    "local_vim_tiny": (LocalVimConfig, dict(  # paper 8M 1.5G 76.2%
        embed_dim=192, directions=SEARCHED_DIRECTIONS["local_vim_tiny"])),
    "local_vim_tiny_middle_cls_token": (LocalVimConfig, dict(  # paper 77.8%
        embed_dim=192, directions=SEARCHED_DIRECTIONS["local_vim_tiny"], middle_cls_token=True, rope=False,
        global_pool="token")),
    "local_vim_small": (LocalVimConfig, dict(  # paper 28M 4.8G 81.2%
        embed_dim=384, directions=SEARCHED_DIRECTIONS["local_vim_small"])),
    "local_vim_tiny_search": (LocalVimConfig, dict(embed_dim=128, directions=None)),
    "local_vmamba_tiny": (LocalVMambaConfig, dict(  # paper 26M 5.7G 82.7%
        depths=(2, 2, 9, 2), directions=SEARCHED_DIRECTIONS["local_vmamba_tiny"])),
    "local_vmamba_small": (LocalVMambaConfig, dict(  # paper 50M 11.4G 83.7%
        depths=(2, 2, 27, 2), directions=SEARCHED_DIRECTIONS["local_vmamba_small"])),
    "local_vmamba_tiny_search": (LocalVMambaConfig, dict(
        dims=(32, 64, 128, 256), depths=(2, 2, 9, 2), directions=None, drop_path_rate=0.1)),
    "local_vmamba_small_search": (LocalVMambaConfig, dict(
        dims=(32, 64, 128, 256), depths=(2, 2, 27, 2), directions=None, drop_path_rate=0.1)),
    # CPU-sized, not published: at 28 px patch 2 gives 14×14 tokens (ImageNet-224's grid), patch 1 28×28 (784 tokens)
    "local_vim_nano": (LocalVimConfig, dict(
        img_size=28, patch_size=2, embed_dim=32, depth=3, directions=_LOCAL * 3, drop_path_rate=0.0, **_FASHION)),
    "local_vim_nano_p1": (LocalVimConfig, dict(
        img_size=28, patch_size=1, embed_dim=32, depth=3, directions=_LOCAL * 3, drop_path_rate=0.0, **_FASHION)),
    "local_vim_nano_search": (LocalVimConfig, dict(
        img_size=28, patch_size=2, embed_dim=32, depth=3, directions=None, drop_path_rate=0.0, **_FASHION)),
}
ALIASES = {  # the names the official local_vmamba.py registers (and its checkpoints carry) -> ours
    "local_vssm_tiny": "local_vmamba_tiny", "local_vssm_small": "local_vmamba_small",
    "local_vssm_tiny_search": "local_vmamba_tiny_search", "local_vssm_small_search": "local_vmamba_small_search",
}

PAPER = {  # published ImageNet-1K figures (paper Tables 1-2, official README): top-1 %, params M, "GFLOPs"
    "local_vim_tiny": (76.2, 8, 1.5), "local_vim_tiny_middle_cls_token": (77.8, 8, 1.5),
    "local_vim_small": (81.2, 28, 4.8), "local_vmamba_tiny": (82.7, 26, 5.7), "local_vmamba_small": (83.7, 50, 11.4),
}


def create_model(name, features_only=False, out_indices=None, pretrained=False, pretrained_cfg_overlay=None,
                 **kwargs):
    """Build a model by name (or an official alias, local_vssm_*). kwargs override the preset's
    config fields, e.g. num_classes, img_size, in_chans, drop_path_rate, drop_rate, global_pool,
    directions (per-layer lists), spatial_attn; an unknown one is refused with the list. With
    features_only=True: a FeatureMaps backbone of the maps at out_indices (default: the 4 stages of
    LocalVMamba, 4 evenly spaced blocks of LocalVim). pretrained=True: the official release's
    weights (localmamba_helpers.RELEASED), downloaded once into torch's hub cache and loaded
    strictly; pretrained_cfg_overlay=dict(file=PATH) or dict(url=URL), and sha256=HEX to pin the
    file, as timm spells it."""
    name = ALIASES.get(name, name)
    if name not in MODELS:
        raise BadInput(f"unknown model {name!r}; choose one of: {', '.join(list(MODELS) + list(ALIASES))}")
    cls, fields = MODELS[name]
    allowed = set(cls.__dataclass_fields__)
    if bad := sorted(set(kwargs) - allowed):
        raise BadInput(f"create_model({name!r}): unknown option(s) {', '.join(bad)}; "
                       f"options are {', '.join(sorted(allowed))}")
    if features_only and cls is LocalVimConfig and not fields.get("middle_cls_token"):
        kwargs.setdefault("dynamic_img_size", True)     # a backbone takes what a detector feeds it (timm's name)
    cfg = cls(**{**fields, **kwargs})
    model = LocalVim(cfg) if cls is LocalVimConfig else LocalVMamba(cfg)
    model.released_url = released_url(name)                                  # pretrained_cfg["url"]
    if pretrained:
        load_pretrained(model, name, pretrained_cfg_overlay)
    return FeatureMaps(model, model.default_out_indices if out_indices is None else out_indices) if features_only \
        else model


def derive_directions(model, k=4):
    """Paper §3.4: after the search, keep in each layer the k candidates with the largest
    softmax(α), listed in canonical order. Returns one list per layer, in forward order."""
    out = []
    for i, ms in enumerate(model.multi_scans()):
        p = ms.probabilities()
        if p is None:
            raise BadInput(f"derive_directions: layer {i} is not a search layer; build a *_search model")
        if not 1 <= k <= len(p):
            raise BadInput(f"derive_directions: k must be between 1 and {len(p)}, got {k}")
        top = sorted(p.topk(k).indices.tolist())
        out.append([ms.directions[j] for j in top])
    return out


def search_probabilities(model):
    """softmax(α) of every search layer: a (layers, candidates) tensor."""
    return torch.stack([ms.probabilities() for ms in model.multi_scans()])


def save_directions(model, path, k=4):
    """After a search: write the chosen per-layer directions (derive_directions) and softmax(α)
    as JSON, the file `create_model(name, directions=load_directions(path))` reads back."""
    probs = search_probabilities(model)
    chosen = derive_directions(model, k)
    text = json.dumps({"directions": chosen, "candidates": list(DIRECTIONS), "probabilities": [
        [round(p, 5) for p in row] for row in probs.tolist()]}, indent=1)
    tmp = Path(f"{path}.tmp-{os.getpid()}")     # written whole or not at all: a full disk leaves no half file
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BadInput(f"cannot write {path} ({e.strerror or e}); is the disk full?") from None
    return chosen, probs


# -----------------------------------------------------------------------------
# timm (optional): `import timm, localmamba` makes timm.create_model("local_vim_tiny") work
register_with_timm(list(MODELS) + list(ALIASES), create_model, __name__)


# -----------------------------------------------------------------------------
# The 8 orders as pictures: text (`python localmamba.py`), or paths in a PNG (--draw-orders)

def draw_scan_orders(H=4, W=6):
    """Text pictures of the 8 scan orders: each cell shows the step at which it is visited."""
    lines = []
    for d in DIRECTIONS:
        order = scan_order(d, H, W)
        pos = inverse_order(order, H * W).view(H, W)
        lines.append(f"{d}  (sequence length {len(order)}{', padded' if len(order) > H * W else ''})")
        lines += ["   " + " ".join(f"{int(v):3d}" for v in row) for row in pos] + [""]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description="LocalMamba: the model table and the 8 scan orders")
    ap.add_argument("--draw-orders", metavar="FILE.png", help="draw the 8 orders as paths (needs matplotlib)")
    ap.add_argument("--grid", type=int, nargs=2, default=(8, 8), metavar=("H", "W"), help="for --draw-orders")
    args = ap.parse_args(argv)
    if args.draw_orders:
        try:
            draw_scan_orders_png(args.draw_orders, {d: scan_order(d, *args.grid) for d in DIRECTIONS}, *args.grid)
        except (BadInput, OSError) as e:
            sys.exit(f"error: {e}")
        return print(f"the 8 scan orders on a {args.grid[0]}×{args.grid[1]} grid: {args.draw_orders}")
    print(model_table(MODELS, create_model, PAPER) + "\n\nThe 8 candidate scan orders on a 4×6 grid (number = "
          "step at which a token is visited):\n\n" + draw_scan_orders())


if __name__ == "__main__":
    main()
