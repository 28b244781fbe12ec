"""
localmamba_run.py: what a training run writes and restores, the trainer's side of the files
(train_mini.py and experiments/ use it; the models never do, so it is not in the copy set).

    save_atomic          write a file so that a crash or a full disk never leaves it half-written
    claim_run_dir        --out made this run's: created, proven writable, locked (one writer),
                         nothing a user made overwritten
    seed_everything, rng_state, set_rng_state
                         torch's, Python's and numpy's RNG: what a resumed run restores
    keep_freed_memory    CPU training speed: freed activations reused, not faulted in again
    draw_run_curves      a run's log.jsonl as curves (train_mini.py --plot)
"""
import contextlib
import ctypes
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch

from localmamba_helpers import BadInput, need_pyplot

try:
    import fcntl          # POSIX: one writer per run folder (an flock the kernel drops when the process ends)
except ImportError:       # pragma: no cover - Windows: the folder checks hold, without the lock
    fcntl = None


def save_atomic(obj, path, write=torch.save):
    """Write to a temporary file of this process, fsync it, rename it over path (then fsync the
    folder): a crash, a full disk or another writer never leaves a half-written file at path, and
    the previous file stays whole until the new one is complete. A failed write is one BadInput,
    and the temporary file is removed. (torch.save reports a full disk as a RuntimeError from its
    zip writer, not an OSError: both are caught.)"""
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    try:
        write(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):       # a folder's fsync: POSIX only
            fd = os.open(Path(path).parent, os.O_RDONLY)
            os.fsync(fd), os.close(fd)
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        why = (e.strerror or e) if isinstance(e, OSError) else f"{str(e).splitlines()[0][:200]}; is the disk full?"
        raise BadInput(f"cannot write {path} ({why}); the previous {Path(path).name}, if any, is kept") from None


def claim_run_dir(s, is_main):
    """Make --out this run's before any setup: created, proven writable, locked by this process
    (an flock: released when the process ends, even killed), and holding no other run. --resume
    continues in the checkpoint's own folder or a new empty one. A folder whose run stopped before
    its first checkpoint is started again, its old log kept aside. Rank 0 claims (is_main); the
    trainer's other ranks wait for it. `s`: the trainer's settings (out, resume). Returns (folder, the lock)."""
    out, lock = Path(s.out), None
    if is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = open(out / ".lock", "a")
        except OSError as e:
            raise BadInput(f"--out {out} cannot be created or written ({e.strerror or e}); choose another "
                            f"--out") from None
        try:
            fcntl and fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInput(f"--out {out} is in use by another run (it holds {out / '.lock'}); wait for it to "
                            f"finish or choose another --out") from None
        has_log, has_ckpt = (out / "log.jsonl").exists(), (out / "checkpoint.pt").exists()
        if s.resume and Path(s.resume).resolve().parent != out.resolve() and (has_log or has_ckpt):
            raise BadInput(f"--out {out} holds another run; --resume {s.resume} continues in its own folder "
                            f"(drop --out) or in a new empty one")
        if s.resume and Path(s.resume).resolve() != (out / "checkpoint.pt").resolve() and has_ckpt:
            raise BadInput(f"--resume {s.resume} would continue in {out} and replace its checkpoint.pt; "
                            f"resume {out / 'checkpoint.pt'}, or pass --out NEW_FOLDER to continue from "
                            f"{Path(s.resume).name} there")
        for tmp in [*out.glob("checkpoint.pt.tmp-*"), *out.glob("best.pt.tmp-*")]:   # save_atomic's, left by a
            tmp.unlink(missing_ok=True)                      # writer that died mid-write (the folder is locked now)
        if not s.resume and has_ckpt:   # never overwrite a run the user made
            raise BadInput(f"{out} already holds a run (checkpoint.pt); pass --resume {out / 'checkpoint.pt'} "
                            f"to continue it, or choose another --out")
        if not s.resume and has_log:
            aside = out / f"log.stopped-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
            os.replace(out / "log.jsonl", aside)
            print(f"{out} holds a run that stopped before its first checkpoint: starting it again; its log is "
                  f"kept as {aside}", flush=True)
    return out, lock


def seed_everything(seed):
    """torch's, Python's and numpy's RNG from one seed (timm's transforms draw from all three)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


def keep_freed_memory():
    """CPU training speed: glibc's malloc returns every block over 32 MB to the OS when it is freed, so
    each step page-faults its large activations in again (at 784 tokens on 2 cores that was half the
    step time: 10 -> 22 img/s with this). Raise the mmap and trim thresholds (mallopt M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD) so freed blocks are reused. The process keeps its peak memory. Without glibc
    (macOS, Windows, musl) it does nothing. Returns whether it applied."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30)) and bool(libc.mallopt(-1, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False


def rng_state():
    """This process's RNG states, weights-only loadable (plain lists, ints and tensors): torch's,
    CUDA's, Python's `random` and numpy's, what a resumed run restores with set_rng_state."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            **({"cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})}


def set_rng_state(state):
    """The inverse of rng_state (a checkpoint from before Python's and numpy's were saved: torch's only)."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def draw_run_curves(run_dir, path=None):
    """A run's log.jsonl as curves (train_mini.py --plot RUN_DIR): the training loss (the mean since
    the previous record, what every record carries) and validation top-1 against steps, the test
    split's top-1 as a marker where it was read. Writes RUN_DIR/curves.png (or path); returns it."""
    log = Path(run_dir) / "log.jsonl"
    try:
        lines = [line for line in log.read_text().splitlines() if line.strip()]
    except FileNotFoundError:
        raise BadInput(f"--plot {run_dir}: no log.jsonl there; name a run folder of train_mini.py") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"--plot {run_dir}: {log} is not a readable log ({type(e).__name__}: {e})") from None
    recs = []
    for i, line in enumerate(lines):
        try:
            recs.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:   # a run killed mid-write (or still writing) cut its last line: the rest is good
                print(f"--plot: the last line of {log} is cut off; drawing the {len(recs)} records before it")
                break
            raise BadInput(f"--plot {run_dir}: line {i + 1} of {log} is not JSON ({e}); is it a log of "
                           f"train_mini.py?") from None
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    has = lambda r, *keys: isinstance(r, dict) and all(number(r.get(k)) for k in keys)   # a record missing one: out
    loss = [(r["step"], r["train_loss"]) for r in recs if has(r, "step", "train_loss")]
    split = lambda s: [(r["step"], r["top1"]) for r in recs if has(r, "step", "top1") and r.get("split") == s]
    if not loss and not split("val"):
        raise BadInput(f"--plot {run_dir}: its log holds no training or validation records yet")
    plt = need_pyplot("--plot")
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    if loss:
        a.plot(*zip(*loss), "-", lw=1.2)
    a.set_xlabel("step"), a.set_ylabel("training loss (mean since the previous record)"), a.grid(True, color="0.9")
    for s, style in (("val", "o-"), ("test", "r*")):
        if split(s):
            b.plot(*zip(*split(s)), style, ms=8 if s == "test" else 4, label=s)
    b.set_xlabel("step"), b.set_ylabel("top-1 %"), b.grid(True, color="0.9"), b.legend()
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    path = Path(path or Path(run_dir) / "curves.png")
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise BadInput(f"--plot {run_dir}: cannot write {path} ({e.strerror or e}); is the disk full?") from None
    finally:
        plt.close(fig)
    return path
