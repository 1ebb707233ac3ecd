"""Triton's compile cache for bench/gpu_check.sh, built without a GPU and carried to the GPU machine.

Compiling fastgan's kernels for sm_90 takes ~1-6 s each (bench/sm90.py times them); the GPU check
launches 295 distinct ones outside torch.compile, and a lease is 15 minutes. Triton keys its cache on what it compiles
and what it compiles with, none of which needs a GPU, so the cache is built here and carried:

    python bench/triton_cache.py build              # -> .triton-cache/ and .triton-cache.tar.gz (carried;
                                                    #    both git-ignored), in a Python 3.12 venv with
                                                    #    triton 3.6.0 (the GPU machine's versions)
    python bench/triton_cache.py prepare            # on the GPU machine, first: unpack, point the cache at
                                                    #    where it lies now, compare every input of the key
                                                    #    (--build-if-stale: build there if one differs)
    python bench/triton_cache.py run --stats FILE [--tag T] -- SCRIPT ARGS... | -m MODULE ARGS...
                                                    # run a program, counting its kernels found in the
                                                    #    cache and compiled (Triton's compilation listener)

What enters a kernel's key in triton 3.6.0, and why the GPU machine computes the same one
(triton/compiler/compiler.py compile(): key = get_cache_key(src, backend, options, env_vars),
runtime/cache.py get_cache_key(): triton_key()-src.hash()-backend.hash()-options.hash()-env vars):
  triton_key()       triton's version, the source of its compiler, backends and language, and the bytes
                     of libtriton.so, which differ per Python version: hence the same wheel under 3.12
  src.hash()         the kernel's source, line number and dependencies (runtime/jit.py cache_key), its
                     signature, constexprs and specialisation (16-byte divisibility of pointers and
                     integers): the launches are recorded from the real code paths on CPU tensors
                     (bench/sm90.py) and compiled by JITFunction.run itself, only with warmup=True
  backend.hash()     `ptxas --version` and the arch (backends/nvidia/compiler.py): the ptxas in
                     triton's wheel, target GPUTarget("cuda", 90, 32); the check pins TRITON_PTXAS_PATH
                     to it, since torch's inductor otherwise points it at torch's own ptxas mid-run
  options.hash()     num_warps, num_stages, debug, fp fusion, libdevice's bytes, ptxas options, arch
  env vars           the cache-invalidating variables that are set (none here; `prepare` compares)
The launcher (a C stub per argument signature, gcc -O3) is keyed on its source and the platform
(runtime/build.py compile_module_from_src) and built here too, against a stub libcuda.so.1.
Triton records absolute paths in each kernel's __grp__ file: `prepare` rewrites them. It also
prints each key input that differs there; the check's summary gives the hits and compiles per stage.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fastgan import files     # fastgan alone (no torch, no triton): see `run`

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DIR = ROOT / ".triton-cache"
PACK_SUFFIX = ".tar.gz"     # what the device call carries: .triton-cache.tar.gz (~15 MiB for ~60 MiB)
MANIFEST = "fastgan-manifest.json"
DEVICE_PYTHON, DEVICE_TRITON = (3, 12), "3.6.0"     # the GPU machine's image

# What bench/gpu_check.sh launches on the triton backend outside torch.compile (inductor compiles its
# own copies of the kernels: those cannot be carried). Keyword arguments of bench/sm90.py's scenario().
REAL = dict(resolution=64)
TINY = dict(resolution=32, base_channels=8, batch=4, deterministic=True)      # tests/test_cuda_graph.py
SCENARIOS = {
    # stage b: fastgan.selfcheck at the real shapes: bf16, tf32 and IEEE fp32, both presets; each
    # with its sample-grid path (G eval, fp32, 16 images)
    **{f"{p} {mode}": dict(preset=p, mode="train", batch=128, amp="fp32" if mode != "bf16" else "bf16",
                           tf32=mode != "ieee", **REAL)
       for p in ("mmgen", "pytorch_examples") for mode in ("bf16", "tf32", "ieee")},
    **{f"{p} grid {mode}": dict(preset=p, mode="sample", batch=16, amp="fp32", tf32=mode == "tf32", **REAL)
       for p in ("mmgen", "pytorch_examples") for mode in ("tf32", "ieee")},
    # stage b: the CUDA-graph step against the eager step, deterministic kernels
    "mmgen bf16 deterministic": dict(preset="mmgen", mode="train", batch=128, amp="bf16", deterministic=True, **REAL),
    # stage b: the CUDA tests of tests/test_cuda_graph.py (tiny models; tf32 is torch's default there)
    **{f"test_cuda_graph {p} {amp}": dict(preset=p, mode="train", amp=amp, **TINY)
       for p in ("mmgen", "pytorch_examples") for amp in ("fp32", "bf16")},
    # stage b: tests/test_fused_models.py test_tf32 (G, train-mode forward)
    **{f"test_tf32 {m}": dict(preset="mmgen", mode="forward", batch=8, amp="fp32", tf32=m == "tf32",
                              resolution=64, base_channels=16) for m in ("tf32", "ieee")},
    # and test_one_training_iteration, test_fifty_iterations_converge_alike (IEEE fp32: the on_device fixture)
    **{f"test_one_iteration {p}": dict(preset=p, mode="train", batch=4, amp="fp32", tf32=False, resolution=32,
                                       base_channels=4, deterministic=True) for p in ("mmgen", "pytorch_examples")},
    # stage c: bench/throughput.py's fastgan sampling row (G captured, bf16) at batch 1024
    "sample b1024 bf16": dict(preset="mmgen", mode="sample", batch=1024, amp="bf16", **REAL),
    # stage d: train.py (its self-check and steps are "mmgen bf16" and "mmgen grid tf32"), SWD's sampling
    "swd sampling b128": dict(preset="mmgen", mode="sample", batch=128, amp="fp32", **REAL),
}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# build (no GPU)

class _BuildDriver:
    """Triton's active driver while building: the H100/H200 target, device 0, stream 0, so that
    JITFunction.run(warmup=True) specialises and compiles exactly as on the GPU and launches nothing."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


_POOL: list = []


def _compile(i: int) -> tuple[str, float, str]:
    """Worker: compile one recorded launch through JITFunction.run(warmup=True)."""
    import triton
    launch = _POOL[i]
    triton.runtime.driver.set_active(_BuildDriver())
    t0 = time.perf_counter()
    try:
        launch.fn.run(grid=launch.grid, warmup=True, **launch.kwargs)
        error = ""
    except Exception as e:  # noqa: BLE001 -- reported per kernel
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}"
    return launch.fn.__name__, time.perf_counter() - t0, error


def _stub_libcuda(folder: Path) -> Path:
    """An empty libcuda.so.1 to link the launchers against (they resolve the driver at load time)."""
    (folder / "stub.c").write_text("")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(folder / "libcuda.so.1"),
                    str(folder / "stub.c")], check=True)
    return folder


class _Unloaded:
    """What the launcher build returns instead of loading the .so (there is no driver to bind)."""

    def __getattr__(self, name):
        return None


def _build_launchers(kernels: list) -> int:
    """The C launcher of each compiled kernel and Triton's cuda_utils module, into the cache."""
    import triton.runtime.build as build
    from triton.backends.nvidia import driver as nv
    real_load = build._load_module_from_path
    build._load_module_from_path = lambda name, path: _Unloaded()
    try:
        nv.CudaUtils()
        for k in kernels:
            nv.CudaLauncher(k.src, k.metadata)
    finally:
        build._load_module_from_path = real_load
    return len(kernels)


def key_inputs() -> dict:
    """This machine's values of what enters every key (and the launchers'), for the manifest."""
    import platform

    import triton
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.backends.nvidia.compiler import get_ptxas_version
    from triton.runtime.build import platform_key
    from triton.runtime.cache import triton_key
    kernels = hashlib.sha256(b"".join(p.read_bytes() for p in sorted((ROOT / "kernels").glob("*.py"))))
    return {"triton": triton.__version__, "python": platform.python_version(),
            "triton_key": hashlib.sha256(triton_key().encode()).hexdigest(),
            "ptxas": get_ptxas_version(90).strip(), "platform": platform_key(),
            "env_vars": dict(get_cache_invalidating_env_vars()), "kernels_source": kernels.hexdigest()}


def sources_hash(package: Path, kernels: Path) -> str:
    """sha256 of fastgan's sources: the .py files under `package` (fastgan/) and `kernels` (kernels/,
    which is fastgan.kernels), by name relative to each folder and by content."""
    h = hashlib.sha256()
    for name, top, skip in (("fastgan", package, kernels), ("kernels", kernels, None)):
        for path in sorted(top.rglob("*.py")):
            if skip is not None and path.is_relative_to(skip):
                continue          # a copy (gpu_check.sh without pip) holds the kernels inside fastgan/
            h.update(f"{name}/{path.relative_to(top).as_posix()}\n".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def imported_is_this_tree() -> bool:
    """Whether the fastgan this process imports is this tree's code: installed from it (editable), or
    a copy of it on PYTHONPATH (bench/gpu_check.sh when pip fails). Triton keys a kernel on its
    source, not its file's path, so a copy compiles the same kernels."""
    import fastgan
    import fastgan.kernels
    package, kernels = Path(fastgan.__file__).parent, Path(fastgan.kernels.__file__).parent
    if (package.resolve(), kernels.resolve()) == ((ROOT / "fastgan").resolve(), (ROOT / "kernels").resolve()):
        return True
    return sources_hash(package, kernels) == sources_hash(ROOT / "fastgan", ROOT / "kernels")


def build(folder: Path, jobs: int, names: list[str] | None = None) -> dict:
    import sm90
    import triton
    from triton.compiler import make_backend

    import fastgan.kernels
    if not imported_is_this_tree():
        raise SystemExit(f"fastgan comes from {Path(fastgan.kernels.__file__).parent.parent}, whose sources differ "
                         f"from {ROOT}'s: pip install --no-deps -e {ROOT} in this venv first")
    launches, per = [], {}
    t0 = time.perf_counter()
    for name in names or SCENARIOS:
        kw = dict(SCENARIOS[name])
        got = sm90.scenario(kw.pop("preset"), kw.pop("batch"), kw.pop("amp"), kw.pop("mode"), kw.pop("resolution"),
                            **kw)
        per[name] = len(got)
        launches += got
    backend = make_backend(_BuildDriver().get_current_target())
    unique: dict = {}
    for launch in launches:
        unique.setdefault(sm90._key(launch, sm90._specialise(launch, backend)), launch)
    _POOL[:] = list(unique.values())
    _log(f"recorded {len(launches)} launches of {len(per)} scenarios in {time.perf_counter() - t0:.0f} s: "
         f"{len(_POOL)} distinct kernels; compiling for sm_90 with {jobs} jobs into {folder}")
    t1 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        results = []
        for i, r in enumerate(pool.imap(_compile, range(len(_POOL))), 1):
            results.append(r)
            if i % 20 == 0 or i == len(_POOL):
                _log(f"  [{i}/{len(_POOL)}] {time.perf_counter() - t1:.0f} s")
    errors = [(n, e) for n, _, e in results if e]
    # Again in this process: each must now come from the cache (the listener says so); then the launchers.
    hits, previous = [], triton.runtime.driver._active
    triton.knobs.compilation.listener = lambda *, cache_hit, **_: hits.append(cache_hit)
    triton.runtime.driver.set_active(_BuildDriver())
    try:
        kernels = [launch.fn.run(grid=launch.grid, warmup=True, **launch.kwargs) for launch in _POOL
                   if not any(launch.fn.__name__ == n for n, _ in errors)]
        t2 = time.perf_counter()
        launchers = _build_launchers(kernels)
    finally:
        triton.knobs.compilation.listener = None
        triton.runtime.driver._active = previous
    manifest = {**key_inputs(), "target": "cuda 90 32", "built": time.strftime("%F %T"), "scenarios": per,
                "kernels": len(_POOL), "compile_s": round(sum(s for _, s, _ in results), 1),
                "compile_s_per_kernel": sorted(round(s, 2) for _, s, _ in results),
                "wall_s": round(time.perf_counter() - t0, 1), "launcher_s": round(time.perf_counter() - t2, 1),
                "launchers_checked": launchers, "reloaded_from_cache": f"{sum(hits)}/{len(hits)}",
                "errors": errors}
    files.write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _pack_path(folder: Path) -> Path:
    return folder.with_name(folder.name + PACK_SUFFIX)   # the folder's tar: .triton-cache -> .triton-cache.tar.gz


def pack(folder: Path) -> Path:
    """The cache as one gzipped tar next to it (cubins compress ~4x): what the device call carries."""
    import tarfile
    out = _pack_path(folder)
    with files.atomic(out) as tmp, tarfile.open(tmp, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return out


def unpack(folder: Path, src: Path) -> bool:
    """Extract the carried tar `src` into `folder`, unless the folder already holds that same cache
    (a warm machine keeps it between calls); a different one is replaced."""
    import tarfile
    if not src.is_file():
        return False
    if (folder / MANIFEST).is_file():
        with tarfile.open(src) as tar:       # its top folder is the cache folder's name where it was packed
            member = next((m for m in tar.getmembers() if Path(m.name).parts[1:] == (MANIFEST,)), None)
            if member is not None and tar.extractfile(member).read() == (folder / MANIFEST).read_bytes():
                return False
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(src) as tar:
        for member in tar.getmembers():          # the tar's top folder is the cache folder's name when packed
            member.name = str(Path(*Path(member.name).parts[1:])) if len(Path(member.name).parts) > 1 else "."
        tar.extractall(folder, filter="data")
    return True


# ---------------------------------------------------------------------------------------------
# on the GPU machine

def relocate(folder: Path) -> int:
    """Point every kernel's __grp__ file at the files where the cache lies now; returns how many changed."""
    changed = 0
    for grp in folder.glob("*/__grp__*.json"):
        data = json.loads(grp.read_text())
        paths = data.get("child_paths", {})
        fixed = {name: str(grp.parent / Path(p).name) for name, p in paths.items()}
        if fixed != paths:
            files.write_text(grp, json.dumps({"child_paths": fixed}))
            changed += 1
    return changed


def prepare(folder: Path, pack_path: Path | None = None) -> dict:
    """Unpack the carried tar if need be, relocate, then compare the key's inputs here with the manifest's."""
    t0 = time.perf_counter()
    pack_path = pack_path or _pack_path(folder)
    unpacked = unpack(folder, pack_path)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return {"carried": False, "why": f"no {manifest_path} (nor {pack_path}): every kernel compiles here"}
    built = json.loads(manifest_path.read_text())
    out = {"carried": True, "unpacked": unpacked, "kernels": built["kernels"], "relocated": relocate(folder),
           "size_mib": round(_size(folder) / 2**20, 1), "differ": {}}
    here = key_inputs()
    for k, v in here.items():
        if k == "python":
            same = v.split(".")[:2] == built[k].split(".")[:2]   # a patch release keeps libtriton's ABI
        else:
            same = v == built.get(k)
        if not same:
            out["differ"][k] = {"built": built.get(k), "here": v}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def run(stats: str, tag: str, argv: list[str]) -> None:
    """Run SCRIPT or -m MODULE with Triton's compilation listener; append its counts to `stats` at exit."""
    import atexit

    import torch
    seen = {"hits": 0, "compiled": 0, "compile_s": 0.0, "compiled_names": [], "other": 0}
    if not torch.cuda.is_available():
        # Nothing compiles in Triton's interpreter, and triton must not be imported before the
        # program sets TRITON_INTERPRET (its own @jit helpers would not be interpreted).
        _exec(argv)
        return
    import triton

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        fn = getattr(src, "fn", None)
        if not getattr(fn, "__module__", "").startswith("fastgan."):
            seen["other"] += 1          # inductor's kernels, compiled in this process
            return
        if cache_hit:
            seen["hits"] += 1
        else:
            seen["compiled"] += 1
            seen["compile_s"] += times.total / 1e6          # microseconds
            seen["compiled_names"].append(metadata.get("name", "?"))

    def write():
        with open(stats, "a") as f:
            f.write(json.dumps({"tag": tag, **seen, "compile_s": round(seen["compile_s"], 1)}) + "\n")
    triton.knobs.compilation.listener = listener
    atexit.register(write)
    # gpu_check.py stops a step past its time box with SIGTERM, whose default action skips atexit:
    # exit through Python instead, so a step cut short still reports what it compiled (a program
    # that handles SIGTERM itself, as train.py does, replaces this)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    _exec(argv)


def _exec(argv: list[str]) -> None:
    """Run `SCRIPT ARGS` or `-m MODULE ARGS` in this process as Python would run it."""
    import runpy
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, str(Path(argv[0]).resolve().parent))
        runpy.run_path(argv[0], run_name="__main__")


def build_here(folder: Path, jobs: int, scenarios=None) -> dict:
    """build() with the environment it needs: the cache folder, a stub libcuda to link launchers
    against, binaries only (no intermediate IR), the ptxas of triton's wheel."""
    os.environ.pop("TRITON_INTERPRET", None)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as stub:
        os.environ.update(TRITON_CACHE_DIR=str(folder), TRITON_LIBCUDA_PATH=str(_stub_libcuda(Path(stub))),
                          TRITON_STORE_BINARY_ONLY="1")
        os.environ.pop("TRITON_PTXAS_PATH", None)          # the wheel's ptxas, as the check pins it
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        return build(folder, jobs, scenarios)


def _built_line(m: dict, folder: Path) -> str:
    return (f"{m['kernels']} kernels built in {m['wall_s']} s ({m['compile_s']} s of compiling, "
            f"{m['launcher_s']} s of launchers), reloaded from the cache {m['reloaded_from_cache']}, "
            f"{len(m['errors'])} errors; {_size(folder) / 2**20:.1f} MiB in {folder}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="compile every kernel the GPU check launches for sm_90, no GPU needed")
    b.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    b.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    b.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), help="default: all")
    b.add_argument("--any-version", action="store_true", help="build although Python or triton differ from the GPU's")
    q = sub.add_parser("prepare", help="on the GPU machine: relocate the cache, compare the key's inputs")
    q.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    q.add_argument("--pack", type=Path, help=f"the carried tar (default: the folder's name + {PACK_SUFFIX})")
    q.add_argument("--json", type=Path, help="also write the result here")
    q.add_argument("--build-if-stale", action="store_true",
                   help="when nothing was carried or a key input differs, build here into the same folder "
                        "(what still matches loads, the rest compiles in --jobs processes)")
    q.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    r = sub.add_parser("run", help="run a program with Triton's compilation listener")
    r.add_argument("--stats", required=True)
    r.add_argument("--tag", default="", help="names the run in the stats file")
    r.add_argument("program", nargs=argparse.REMAINDER, help="-- SCRIPT ARGS... or -- -m MODULE ARGS...")
    args = p.parse_args(argv)
    if args.cmd == "run":
        program = args.program[1:] if args.program[:1] == ["--"] else args.program
        if not program:
            p.error("run: give a script or -m MODULE after --")
        run(args.stats, args.tag, program)
        return 0
    folder = args.dir.resolve()
    if args.cmd == "prepare":
        out = prepare(folder, args.pack)
        differ = out.get("differ", {})
        inputs = "all as built" if not differ else "DIFFER: " + "; ".join(
            f"{k} built {v['built']} here {v['here']}" for k, v in differ.items())
        print(f"triton cache {folder}: " + (out.get("why") or f"{out['kernels']} kernels, {out['size_mib']} MiB, "
                                            f"{out['relocated']} relocated; key inputs {inputs}"), flush=True)
        if args.json:
            files.write_text(args.json, json.dumps(out, indent=1))
        if args.build_if_stale and (differ or not out["carried"]):
            print(f"building the cache here with {args.jobs} jobs", flush=True)
            m = build_here(folder, args.jobs)
            out["rebuilt"] = {k: m[k] for k in ("kernels", "wall_s", "compile_s", "launcher_s", "reloaded_from_cache")}
            print(_built_line(m, folder))
            if args.json:
                files.write_text(args.json, json.dumps(out, indent=1))
        return 0
    import platform

    import triton
    if (sys.version_info[:2] != DEVICE_PYTHON or triton.__version__ != DEVICE_TRITON) and not args.any_version:
        p.error(f"the GPU machine runs Python {'.'.join(map(str, DEVICE_PYTHON))} and triton {DEVICE_TRITON}; this "
                f"is Python {platform.python_version()} and triton {triton.__version__}, whose keys would never "
                "match there (libtriton's bytes enter every key). Use such a venv, or --any-version")
    m = build_here(folder, args.jobs, args.scenarios)
    packed = pack(folder)
    print(_built_line(m, folder) + f", {packed.stat().st_size / 2**20:.1f} MiB in {packed.name} (carry this)")
    for name, error in m["errors"]:
        print(f"  {name}: {error}")
    return 1 if m["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
