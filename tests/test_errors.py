"""Errors a person can act on: each of a user's mistakes ends in one line and exit status 1 from
every entry point, FASTGAN_DEBUG=1 shows the traceback, and every row of the README's fault table
names tests that exist. Tiny runs (tests/runs.py).
"""

import subprocess
import sys

import pytest
import torch

from fastgan import errors
from fastgan import train as train_mod
from fastgan.distrib import Dist
from fastgan.train import train
from runs import QUICKSTART, ROOT, TRAIN, error_lines, run_main, tiny, tiny_args


@pytest.fixture(scope="module")
def data_args(tmp_path_factory) -> list[str]:
    return tiny_args(tmp_path_factory.mktemp("data"))


# -- errors a person can act on --------------------------------------------------------------------

def test_user_errors_are_one_line(tmp_path, data_args, monkeypatch, capsys):
    """train.py's entry point, in this process: each mistake ends in one line, status 1."""
    def fails(argv, *expected, env=None):
        with monkeypatch.context() as m:
            for k, v in (env or {}).items():
                m.setenv(k, v)
            code, out, err = run_main(argv, capsys)
        assert code == 1 and len(err) == 1, err
        for text in expected:
            assert text in err[0], err
        assert "weights_only" not in err[0]

    monkeypatch.chdir(tmp_path)            # no data/ here: the configs' data.root is missing
    celeba = ROOT / "configs" / "dcgan" / "dcgan_celeba-cropped_64_b128x1_300k.py"
    fails([celeba, "--work_dir=w"], "download CelebA's img_align_celeba.zip", "unzip it into data/celeba/",
          "data/celeba/img_align_celeba/000001.jpg")
    fails([QUICKSTART, "--work_dir=w", "--data.source=idx", "--data.root=data/mnist"],
          "train-images-idx3-ubyte.gz", "--data.root=data/mnist/train-images-idx3-ubyte.gz")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_bytes(b"<html>not a picture</html>")
    fails([QUICKSTART, "--work_dir=w", "--data.source=folder", f"--data.root={bad}",
           f"--data.cache_dir={tmp_path / 'c'}"], f"no usable image in {bad}")
    fails([QUICKSTART, "--work_dir=w", *data_args, "--data.synthetic_count=12", "--batch_size=64"],
          "fewer than one batch of 64; use --batch_size=8 (at most 12)")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fails([QUICKSTART, f"--work_dir={blocker / 'run'}", *data_args], f"work_dir '{blocker / 'run'}' cannot be written")
    fails([QUICKSTART, "--work_dir=w", *data_args, f"--data.cache_dir={blocker / 'cache'}",
           "--data.synthetic_count=16"], f"data.cache_dir '{blocker / 'cache'}' cannot be written", "--data.cache=off")
    fails([QUICKSTART, "--work_dir=w", "--total_iters=0"], "total_iters: must be at least 1")
    if not torch.cuda.is_available():
        fails([QUICKSTART, "--work_dir=w", "--device", "cuda"], "--device=cuda, but no CUDA device is visible")
    fails([QUICKSTART, "--work_dir=w"], "RANK=2 is outside WORLD_SIZE=2", env={"RANK": "2", "WORLD_SIZE": "2"})
    fails([QUICKSTART, "--work_dir=w"], "WORLD_SIZE=2 needs MASTER_ADDR and MASTER_PORT",
          env={"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "", "MASTER_PORT": ""})
    # checkpoints: not one, cut short, another model
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    fails([QUICKSTART, "--work_dir=w", *data_args, "--resume", text],
          f"cannot read checkpoint {text}: not a PyTorch checkpoint")
    train(tiny(tmp_path / "r", data_args, "--total_iters=2", "--ckpt_interval=2", "--sample_interval=100"), Dist())
    good = (tmp_path / "r" / "ckpt" / "iter_2.pt").read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good[: len(good) // 2])
    fails([QUICKSTART, "--work_dir=w", *data_args, "--resume", cut],
          f"cannot read checkpoint {cut}: truncated or damaged")
    fails([QUICKSTART, "--work_dir=w", *data_args, "--model.base_channels=16", "--resume",
           tmp_path / "r/ckpt/iter_2.pt"],
          "the generator does not fit the configured model", "in the checkpoint", "it fits --model.preset=mmgen")
    # out of GPU memory in the loop
    from fastgan.step import TrainStep

    def oom(self, real, z):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(TrainStep, "step", oom)
    fails([QUICKSTART, "--work_dir=w", *data_args, "--total_iters=4"],
          "out of GPU memory (CUDA out of memory): batch_size=8 per process does not fit; try --batch_size=4")


def test_every_entry_point_prints_one_line(tmp_path):
    """The scripts as a user runs them."""
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04not a checkpoint")
    cfg = ROOT / "configs" / "quickstart.py"
    cases = [
        ([TRAIN, cfg, "--work_dir=w", "--data.source=folder", "--data.root=data/celeba/img_align_celeba"],
         "img_align_celeba.zip"),
        ([ROOT / "fastgan" / "sample.py", cfg, junk], f"cannot read checkpoint {junk}: not a PyTorch checkpoint"),
        ([ROOT / "fastgan" / "evaluate.py", cfg, junk], f"cannot read checkpoint {junk}: not a PyTorch checkpoint"),
        ([ROOT / "fastgan" / "export.py", cfg, junk], f"cannot read checkpoint {junk}: not a PyTorch checkpoint"),
        ([ROOT / "fastgan" / "report.py", tmp_path], f"{tmp_path} is not a fastgan work dir: it has no config.json"),
        ([ROOT / "bench" / "loader.py", "--data", tmp_path / "nothing"],
         f"data.root '{tmp_path / 'nothing'}' is not a folder"),
    ]
    procs = [subprocess.Popen([sys.executable, *map(str, argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=tmp_path) for argv, _ in cases]
    for proc, (argv, expected) in zip(procs, cases):      # all at once: each is mostly importing torch
        err = proc.communicate(timeout=180)[1]
        lines = error_lines(err)
        assert proc.returncode == 1 and len(lines) == 1 and expected in lines[0], err
        assert "Traceback" not in err


def test_fastgan_debug_shows_the_traceback(tmp_path, monkeypatch):
    from fastgan.data import DataError
    monkeypatch.setenv("FASTGAN_DEBUG", "1")
    with pytest.raises(DataError, match="img_align_celeba.zip"):
        errors.main(train_mod.main, [QUICKSTART, f"--work_dir={tmp_path}", "--data.source=folder",
                                     f"--data.root={tmp_path / 'celeba' / 'img_align_celeba'}"])


# -- the README's fault table ----------------------------------------------------------------------

def test_readme_fault_table_names_existing_tests():
    text = (ROOT / "README.md").read_text()
    table = text.split("## Faults", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in table.splitlines() if r.startswith("| ") and not r.startswith("| fault")]
    assert len(rows) >= 10
    defined = {line.split("(")[0][len("def "):] for f in (ROOT / "tests").glob("test_*.py")
               for line in f.read_text().splitlines() if line.startswith("def test_")}
    for row in rows:
        named = [c.strip("` ") for c in row.split("|")[-2].split(",")]
        assert named and all(n in defined for n in named), row
