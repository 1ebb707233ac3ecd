"""The Evaluator and evaluate.py end to end, offline, with FASTGAN_TEST_FEATURE_NET=tiny (a small
random network standing in for Inception: a test hook, not a user option). ~30 s on 2 CPU cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from fastgan import checkpoint, errors
from fastgan import evaluate as evaluate_mod
from fastgan.config import Config, DataConfig, EvalConfig, ModelConfig
from fastgan.metrics import LOWER_IS_BETTER, Evaluator, InceptionWeightsError, parse_metrics
from fastgan.metrics.ms_ssim import ms_ssim_pairs
from fastgan.models import Generator

REPO = Path(__file__).resolve().parents[1]


def small_cfg(tmp_path, **eval_kw) -> Config:
    return Config(batch_size=16, seed=3,
                  model=ModelConfig(preset="mmgen", resolution=32, channels=3, base_channels=8),
                  data=DataConfig(source="synthetic", root=str(tmp_path / "synth"), synthetic_count=48,
                                  cache_dir=str(tmp_path / "cache"), num_workers=1),
                  eval=EvalConfig(**{"metrics": "swd,ms_ssim", "num_samples": 32, **eval_kw}))


class Replay(torch.nn.Module):
    """A 'generator' that returns given images in order, whatever the noise."""
    noise_size = 100

    def __init__(self, images):
        super().__init__()
        self.images, self.pos = images, 0

    def forward(self, z):
        out = self.images[self.pos:self.pos + z.shape[0]]
        self.pos += z.shape[0]
        return out.float() / 127.5 - 1


@pytest.fixture
def tiny_net(monkeypatch):
    monkeypatch.setenv("FASTGAN_TEST_FEATURE_NET", "tiny")


def random_reals(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)


def test_reals_replayed_as_fakes_score_perfectly(tmp_path, tiny_net):
    reals = random_reals(32)
    batches = reals.split(10)                                # batch sizes that do not divide 32
    ev = Evaluator(small_cfg(tmp_path, metrics="swd,ms_ssim,fid,kid,is"), "cpu", real_batches=batches,
                   progress=False)
    quantized = ((reals + 1) * 127.5).round().to(torch.uint8)
    scores = ev(Replay(quantized))
    assert scores["swd"] == 0 and scores["swd_32"] == 0 and scores["swd_16"] == 0
    assert abs(scores["fid"]) < 1e-6 and abs(scores["kid"]) < 1e-2
    assert scores["ms_ssim"] == pytest.approx(ms_ssim_pairs(quantized), rel=1e-9)
    assert 1 <= scores["is"] <= 10
    assert set(scores) <= set(LOWER_IS_BETTER)
    assert not (tmp_path / "cache").exists()                 # given batches are never cached
    other = ev(Replay(torch.flip(quantized, dims=[3])))      # mirrored faces: a real difference
    assert other["swd"] > 0 and other["fid"] > 1e-3


def test_scores_are_repeatable_and_follow_the_generator(tmp_path):
    torch.manual_seed(0)
    G = Generator(preset="mmgen", resolution=32, base_channels=8).eval()
    ev = Evaluator(small_cfg(tmp_path), "cpu", real_batches=random_reals(32).split(16), progress=False)
    first, again = ev(G), ev(G)
    assert first == again                                    # fixed noise, seeded patches and directions
    with torch.no_grad():
        G.output_layer.conv.weight.mul_(3)
    assert ev(G)["swd"] != first["swd"]


def test_metric_names_and_errors(tmp_path, monkeypatch):
    assert parse_metrics("SWD, ms-ssim,fid") == ("swd", "ms_ssim", "fid")
    with pytest.raises(ValueError, match="valid: swd, ms_ssim, fid, kid, is"):
        parse_metrics("swd,lpips")
    with pytest.raises(ValueError, match="best_metric"):
        Evaluator(small_cfg(tmp_path, best_metric="psnr"), "cpu", real_batches=[], progress=False)
    monkeypatch.delenv("FASTGAN_INCEPTION", raising=False)
    monkeypatch.delenv("FASTGAN_TEST_FEATURE_NET", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(InceptionWeightsError, match="pt_inception-2015-12-05-6726825d.pth"):
        Evaluator(small_cfg(tmp_path, metrics="swd,fid"), "cpu", real_batches=[], progress=False)


def write_generator(tmp_path, cfg) -> Path:
    torch.manual_seed(1)
    G = Generator(preset="mmgen", resolution=32, base_channels=8)
    return checkpoint.save_generator(G, cfg, tmp_path / "run" / "generator.safetensors")


def test_evaluate_script_end_to_end(tmp_path):
    """As a user runs it: a file, in a fresh process, on a synthetic dataset."""
    cfg = small_cfg(tmp_path)
    ckpt = write_generator(tmp_path, cfg)
    out = tmp_path / "scores.json"
    env = {**os.environ, "FASTGAN_TEST_FEATURE_NET": "tiny"}
    cmd = [sys.executable, str(REPO / "fastgan" / "evaluate.py"), str(REPO / "configs" / "quickstart.py"),
           str(ckpt), "--metrics", "swd,ms_ssim,fid,kid,is", "--num-samples", "32", "--out", str(out),
           "--device", "cpu", "--batch-size", "16", f"--data.root={cfg.data.root}",
           f"--data.cache_dir={cfg.data.cache_dir}", "--data.synthetic_count=48", "--model.base_channels=8"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert run.returncode == 0, run.stderr
    record = json.loads(out.read_text())
    assert set(record["metrics"]) == {"swd_32", "swd_16", "swd", "ms_ssim", "fid", "kid", "kid_std", "is", "is_std"}
    assert all(v == v and abs(v) < 1e6 for v in record["metrics"].values())     # finite numbers
    assert record["num_samples"] == 32 and "swd_32" in run.stdout and "real images" in run.stderr
    assert len(list(Path(cfg.data.cache_dir).glob("eval_real_*.npz"))) == 2     # images + tiny features


def test_evaluate_main_reuses_cached_statistics_and_reports_errors(tmp_path, tiny_net, monkeypatch, capsys):
    cfg = small_cfg(tmp_path)
    ckpt = write_generator(tmp_path, cfg)
    cfg_file = tmp_path / "config.json"
    cfg_file.write_text(json.dumps({**__import__("dataclasses").asdict(cfg)}))
    argv = [str(cfg_file), str(ckpt), "--metrics", "swd,fid", "--device", "cpu", "--batch-size", "16"]
    assert evaluate_mod.main(argv) == 0
    first = json.loads((tmp_path / "run" / "generator_metrics.json").read_text())["metrics"]
    import fastgan.data
    monkeypatch.setattr(fastgan.data, "build_loader", lambda *a, **k: pytest.fail("statistics not cached"))
    assert evaluate_mod.main(argv + ["--out", str(tmp_path / "again.json")]) == 0
    assert json.loads((tmp_path / "again.json").read_text())["metrics"] == first
    assert "swd_32" in capsys.readouterr().out
    monkeypatch.delenv("FASTGAN_TEST_FEATURE_NET")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    capsys.readouterr()

    def fails(argv, expected):          # as the script runs: one line from errors.main, status 1
        with pytest.raises(SystemExit) as e:
            errors.main(evaluate_mod.main, argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    fails(argv, "sha256 6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2")
    fails([str(cfg_file), str(tmp_path / "missing.pt"), "--metrics", "swd"], "checkpoint not found")


def _distributed_worker(rank, world, init, cfg, results):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        G = Generator(preset="mmgen", resolution=32, base_channels=8).eval()
        ev = Evaluator(cfg, "cpu", rank, world, progress=False)
        results[rank] = ev(G)
        bad = Config(**{**cfg.__dict__, "eval": EvalConfig(metrics="fid", num_samples=32)})
        try:
            Evaluator(bad, "cpu", rank, world, progress=False)       # fails on rank 0 only
        except Exception as e:
            results[f"error{rank}"] = str(e)
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_ranks_agree_and_share_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("FASTGAN_INCEPTION", raising=False)
    monkeypatch.delenv("FASTGAN_TEST_FEATURE_NET", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    cfg = small_cfg(tmp_path)
    results = mp.Manager().dict()
    mp.spawn(_distributed_worker, args=(2, f"file://{tmp_path / 'rendezvous'}", cfg, results), nprocs=2)
    assert results[0] == results[1] and results[0]["swd"] > 0
    assert "pt_inception" in results["error0"] and "rank 0" in results["error1"]
