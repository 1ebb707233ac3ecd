"""bench/triton_cache.py without a GPU: a cache packed where it was built, carried, and prepared
elsewhere (its __grp__ files' absolute paths rewritten, every key input compared), and the check
that `build` compiles this tree's code, also from a copy of it on PYTHONPATH (~10 s)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from runs import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import triton_cache  # noqa: E402


def fake_cache(folder: Path, kernels: int = 3) -> dict:
    """A cache as Triton leaves it: a folder per kernel, its files, and a __grp__ file listing them
    by absolute path; the manifest as `build` writes it. Returns each file's bytes by relative path."""
    written = {}
    for k in range(kernels):
        entry = folder / os.urandom(16).hex()
        entry.mkdir(parents=True)
        children = {}
        for suffix in ("cubin", "json", "source"):
            name = f"kernel{k}.{suffix}"
            written[f"{entry.name}/{name}"] = os.urandom(200 + k)
            (entry / name).write_bytes(written[f"{entry.name}/{name}"])
            children[name] = str(entry / name)
        (entry / f"__grp__kernel{k}.json").write_text(json.dumps({"child_paths": children}))
    manifest = {**triton_cache.key_inputs(), "target": "cuda 90 32", "kernels": kernels}
    (folder / triton_cache.MANIFEST).write_text(json.dumps(manifest))
    return written


def groups(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text())["child_paths"] for p in folder.glob("*/__grp__*.json")}


def test_carried_cache_is_relocated_and_its_key_inputs_compared(tmp_path, monkeypatch):
    built = tmp_path / "build" / ".triton-cache"
    written = fake_cache(built)
    packed = triton_cache.pack(built)
    assert packed == built.with_name(".triton-cache.tar.gz")
    with tarfile.open(packed) as tar:      # the tar holds relative names; only the __grp__ files name places
        assert all(not Path(m.name).is_absolute() for m in tar.getmembers())
    shutil.rmtree(built)                   # gone, as on the GPU machine

    here = tmp_path / "gpu" / "cache"
    out = triton_cache.prepare(here, packed)
    assert out["carried"] and out["unpacked"] and out["kernels"] == 3 and out["relocated"] == 3
    assert out["differ"] == {}, out["differ"]
    for grp in groups(here).values():
        for name, path in grp.items():
            assert Path(path).parent.parent == here and Path(path).name == name and Path(path).is_file()
    assert {str(p.relative_to(here)): p.read_bytes() for p in here.glob("*/kernel*")} == written

    # Prepared again: nothing to unpack or rewrite. A key input that differs is named; a Python
    # patch release is not one (libtriton's ABI is the minor version's).
    inputs = triton_cache.key_inputs()
    monkeypatch.setattr(triton_cache, "key_inputs", lambda: dict(inputs))
    again = triton_cache.prepare(here, packed)
    assert not again["unpacked"] and again["relocated"] == 0 and again["differ"] == {}
    manifest = json.loads((here / triton_cache.MANIFEST).read_text())
    major, minor, _ = inputs["python"].split(".")
    manifest.update(ptxas="ptxas: another build", python=f"{major}.{minor}.999")
    (here / triton_cache.MANIFEST).write_text(json.dumps(manifest))
    absent = tmp_path / "nothing-carried.tar.gz"      # the cache already in place is the one judged
    assert triton_cache.prepare(here, absent)["differ"] == {"ptxas": {"built": "ptxas: another build",
                                                                     "here": inputs["ptxas"]}}
    # A carried cache other than the one in place (rebuilt, on a machine still warm) replaces it.
    replaced = triton_cache.prepare(here, packed)
    assert replaced["unpacked"] and replaced["differ"] == {}
    assert {str(p.relative_to(here)): p.read_bytes() for p in here.glob("*/kernel*")} == written


def test_nothing_carried_says_so(tmp_path):
    out = triton_cache.prepare(tmp_path / "cache", tmp_path / "absent.tar.gz")
    assert not out["carried"] and "every kernel compiles here" in out["why"]


def copy_as_gpu_check_does(dst: Path) -> Path:
    """bench/gpu_check.sh's fallback when pip fails: fastgan/ with kernels/ copied into it."""
    shutil.copytree(ROOT / "fastgan", dst / "fastgan", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "kernels", dst / "fastgan" / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    return dst


def test_build_accepts_a_copy_of_this_tree_and_nothing_else(tmp_path):
    src = copy_as_gpu_check_does(tmp_path / "fastgan-src")
    ours = triton_cache.sources_hash(ROOT / "fastgan", ROOT / "kernels")
    assert triton_cache.sources_hash(src / "fastgan", src / "fastgan" / "kernels") == ours
    # the check itself, in a process that imports the copy (as gpu_check.sh's steps do)
    code = ("import sys, fastgan; sys.path.insert(0, sys.argv[1]); import triton_cache; "
            "print(fastgan.__file__, triton_cache.imported_is_this_tree())")
    env = {**os.environ, "PYTHONPATH": str(src), "TRITON_INTERPRET": "1"}
    said = subprocess.run([sys.executable, "-c", code, str(ROOT / "bench")], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)     # not the checkout: its fastgan/ would come first
    assert said.returncode == 0, said.stderr[-2000:]
    assert said.stdout.split() == [str(src / "fastgan" / "__init__.py"), "True"]

    for changed in (src / "fastgan" / "kernels" / "conv.py", src / "fastgan" / "models.py"):
        original = changed.read_bytes()
        changed.write_bytes(original + b"\n# another line\n")
        assert triton_cache.sources_hash(src / "fastgan", src / "fastgan" / "kernels") != ours, changed
        changed.write_bytes(original)
