"""Export a trained generator to ONNX.

    python fastgan/export.py CONFIG CKPT [--out generator.onnx] [--raw] [--opset 18]

CKPT: anything sample.py takes (ckpt/iter_N.pt, generator.safetensors, a work_dir, an MMGeneration
or MMagic DCGAN .pth, converted to RGB). The EMA generator when the file has one; --raw for the
trained one. G runs in eval mode (BatchNorm from its running statistics) on the reference
(plain torch) modules; the batch size is dynamic.

The model: input "z" float32 (N, noise_size), output "images" float32 (N, channels, R, R) in
[-1, 1], RGB. Needs `pip install -e ".[onnx]"`. When onnxruntime is installed the exported file
is run once against torch and the largest difference is printed.
"""

import os
import sys

if sys.path and os.path.abspath(sys.path[0] or os.curdir) == os.path.dirname(os.path.abspath(__file__)):
    del sys.path[0]      # run as a file: fastgan/ must not shadow other modules

try:
    import fastgan  # noqa: F401
except ImportError:
    sys.exit("fastgan is not installed: run `pip install -e .` in the repository root")

import argparse
import importlib.util
import logging
import warnings
from pathlib import Path

import torch

from fastgan import config as config_mod
from fastgan import errors, files
from fastgan.checkpoint import load_generator

# The exporter writes opset 18 and converts it (onnxscript's version converter). Down to 16 it
# converts this model; at 14 and 15 it fails and silently keeps 18 (onnxscript 0.7), so below 16 is
# refused, and `export` checks the opset of what it wrote. Up to the newest the installed onnx knows.
DEFAULT_OPSET, MIN_OPSET = 18, 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python fastgan/export.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config file (.py) or a work_dir's config.json")
    p.add_argument("ckpt", help="ckpt/iter_N.pt, generator.safetensors, a work_dir, or an MMGeneration .pth")
    p.add_argument("--out", default="generator.onnx", help="ONNX file to write (default generator.onnx)")
    p.add_argument("--raw", action="store_true", help="the trained generator, not its EMA (when the file has one)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                   help=f"ONNX opset, {MIN_OPSET} to the newest the installed onnx knows (default {DEFAULT_OPSET})")
    args = p.parse_args(argv)
    newest = _newest_opset()
    if newest is not None and not MIN_OPSET <= args.opset <= newest:
        p.error(f"--opset must be from {MIN_OPSET} to {newest} (the newest the installed onnx knows), got {args.opset}")
    return args


def _newest_opset() -> int | None:
    """The newest ai.onnx opset the installed onnx knows; None without onnx (_check_exporter says so)."""
    if importlib.util.find_spec("onnx") is None:
        return None
    import onnx
    return onnx.defs.onnx_opset_version()


def _check_exporter() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise errors.UserError(f"ONNX export needs {' and '.join(missing)}: pip install -e \".[onnx]\"")


def export(G: torch.nn.Module, out: str | Path, opset: int = DEFAULT_OPSET) -> Path:
    """G (eval mode, torch backend) to `out` at `opset`, batch dimension dynamic; written whole or not
    at all, and not at all when the exporter could not convert the model to that opset."""
    _check_exporter()
    G = G.eval()
    z = torch.randn(2, G.noise_size)
    batch = torch.export.Dim("batch", min=1)
    # The exporter warns about torchvision ops a DCGAN never uses and about pytree internals;
    # fastgan's own line says what was written.
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(G, (z,), dynamo=True, input_names=["z"], output_names=["images"],
                                        dynamic_shapes={"z": {0: batch}}, opset_version=opset, verbose=False)
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto        # a property that builds the whole model, weights included
    written = opset_of(proto)
    if written != opset:
        raise errors.UserError(f"the ONNX exporter could not convert the generator to opset {opset} (it made "
                               f"opset {written}): pass --opset {written}, or one it converts to")
    # one file, the weights inside: G is far below protobuf's 2 GB
    return files.atomic_write(out, lambda f: f.write(proto.SerializeToString()))


def opset_of(model) -> int | None:
    """The ai.onnx opset an onnx ModelProto declares."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def check(G: torch.nn.Module, path: str | Path, batch: int = 3, seed: int = 0) -> float | None:
    """Largest |onnxruntime - torch| on `batch` random noise vectors; None without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort
    z = torch.randn(batch, G.noise_size, generator=torch.Generator().manual_seed(seed))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["images"], {"z": z.numpy()})[0]
    with torch.no_grad():
        want = G.eval()(z)
    return float((torch.from_numpy(got) - want).abs().max())


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = config_mod.load(args.config)      # a ConfigError, CheckpointError, OSError: one line (errors.main)
    _check_exporter()       # before reading a checkpoint of maybe hundreds of MB
    G = load_generator(args.ckpt, cfg, device="cpu", backend="torch", raw=args.raw, log=print)
    out = export(G, args.out, args.opset)
    m = cfg.model
    # export() checked that the file declares the opset asked for
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, opset {args.opset}): "
          f"z (N, {G.noise_size}) -> images (N, {m.channels}, {m.resolution}, {m.resolution}) in [-1, 1], RGB")
    diff = check(G, out)
    if diff is not None:
        print(f"onnxruntime vs torch on 3 noise vectors: max |difference| {diff:.2e}")
    return 0


if __name__ == "__main__":
    errors.main(main, oom_hint="the export traces G on the CPU: free host memory")
