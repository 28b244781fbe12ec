"""
experiments/export_onnx.py: export the nano preset (28 px) and LocalVMamba-T (64 px) to ONNX on
the path current PyTorch recommends (torch.onnx.export(dynamo=True), a dynamic batch) and with
the legacy TorchScript exporter, run each in onnxruntime and print the time, the node count and
the largest difference from PyTorch at two batch sizes (docs/interop.md, "Export").

    pip install onnx onnxruntime onnxscript
    python experiments/export_onnx.py [--out DIR]
"""
import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # the project's top-level files
import localmamba  # noqa: E402

CASES = [("local_vim_nano", dict(in_chans=1), (1, 28, 28)), ("local_vmamba_tiny", dict(img_size=64), (3, 64, 64))]


def export_and_run(name, kw, shape, dynamo, out):
    import onnx
    import onnxruntime as ort
    torch.manual_seed(0)
    model = localmamba.create_model(name, **kw).eval()
    x = torch.randn(2, *shape)
    path = Path(out) / f"{name}-{'dynamo' if dynamo else 'legacy'}.onnx"
    t0 = time.time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), path, dynamo=True, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=256)},))
        else:
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=17)
    seconds = time.time() - t0
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errs = []
    for xb in (x, torch.randn(3, *shape)) if dynamo else (x,):
        with torch.no_grad():
            want = model(xb).numpy()
        errs.append(float(np.abs(sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})[0] - want).max()))
    return seconds, len(onnx.load(path).graph.node), errs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for the .onnx files (default: a temporary one)")
    args = p.parse_args(argv)
    try:
        import onnx, onnxruntime, onnxscript  # noqa: F401,E401
    except ImportError as e:
        sys.exit(f"error: this needs {e.name}: pip install onnx onnxruntime onnxscript")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        try:                                    # before any export: a path that cannot be a folder is one line
            out.mkdir(parents=True, exist_ok=True)
            (out / ".write-test").touch()
            (out / ".write-test").unlink()
        except OSError as e:
            sys.exit(f"error: --out {out} cannot be a folder of .onnx files ({e.strerror or e}); choose another --out")
        print(f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
        print("| model | exporter | export s | ONNX nodes | max abs diff from PyTorch (batch 2, 3) |")
        print("|---|---|---|---|---|")
        for name, kw, shape in CASES:
            for dynamo in (True, False):
                s, nodes, errs = export_and_run(name, kw, shape, dynamo, out)
                size = f"{shape[-1]} px"
                print(f"| {name} {size} | {'dynamo, dynamic batch' if dynamo else 'legacy (opset 17)'} | {s:.0f} | "
                      f"{nodes:,} | {', '.join(f'{e:.1e}' for e in errs)} |", flush=True)


if __name__ == "__main__":
    main()
