"""Checkpoint files: atomic writes, newest readable, pruning, RNG states, loading a generator (~3 s)."""

import random

import numpy as np
import pytest
import torch

from fastgan import checkpoint as ck
from fastgan.config import Config, ModelConfig, to_dict
from fastgan.models import build


def tiny_cfg(**kw) -> Config:
    return Config(model=ModelConfig(preset="mmgen", resolution=32, channels=3, base_channels=4), **kw)


def fake_state(iteration: int, cfg: Config) -> dict:
    G, D = build(cfg.model)
    return {"iteration": iteration, "G": G.state_dict(), "D": D.state_dict(), "opt_g": {}, "opt_d": {},
            "config": to_dict(cfg), "rng": [ck.rng_state()]}


def test_atomic_save_and_newest_readable(tmp_path):
    cfg = tiny_cfg()
    folder = tmp_path / "ckpt"
    for it in (5, 10, 20):
        ck.save(fake_state(it, cfg), folder / f"iter_{it}.pt")
    assert [n for n, _ in ck.list_checkpoints(folder)] == [20, 10, 5]
    assert not list(folder.glob("*.tmp"))
    # A kill mid-write: the newest file cut short, a zero-byte one, and a leftover temp file.
    data = (folder / "iter_20.pt").read_bytes()
    (folder / "iter_20.pt").write_bytes(data[: len(data) // 2])
    (folder / "iter_30.pt").write_bytes(b"")
    (folder / "iter_40.pt.tmp").write_bytes(data[:100])
    warnings = []
    path, state = ck.load_latest(folder, warn=warnings.append)
    assert path.name == "iter_10.pt" and state["iteration"] == 10
    assert len(warnings) == 2 and "iter_30.pt" in warnings[0] and "iter_20.pt" in warnings[1]
    assert [p.name for p in ck.remove_temp_files(folder)] == ["iter_40.pt.tmp"]
    with pytest.raises(ck.CheckpointError, match="cannot read"):
        ck.load(folder / "iter_20.pt")
    torch.save({"weights": torch.zeros(1)}, folder / "other.pt")
    with pytest.raises(ck.CheckpointError, match="missing: iteration"):
        ck.load(folder / "other.pt")
    assert ck.load_latest(tmp_path / "nothing") is None


def test_prune_keeps_newest(tmp_path):
    for it in (100, 200, 300, 1000):
        (tmp_path / f"iter_{it}.pt").write_bytes(b"x")
    (tmp_path / "best.pt").write_bytes(b"x")
    removed = ck.prune(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["iter_100.pt", "iter_200.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "iter_1000.pt", "iter_300.pt"]


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    state = ck.rng_state()
    ck.save({"rng": state}, tmp_path / "rng.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)["rng"]     # no pickled numpy needed
    ck.set_rng_state(loaded)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_clean_state_dict_strips_wrappers():
    G, _ = build(tiny_cfg().model)
    wrapped = torch.nn.Module()
    wrapped._orig_mod = G
    keys = set(ck.clean_state_dict(wrapped))
    assert keys == set(G.state_dict())


def test_load_generator_from_every_file_kind(tmp_path):
    cfg = tiny_cfg(work_dir=str(tmp_path))
    state = fake_state(7, cfg)
    ck.save(state, tmp_path / "ckpt" / "iter_7.pt")
    z = torch.randn(3, 100)
    ref = build(cfg.model)[0]
    ref.load_state_dict(state["G"])
    ref.eval()
    expected = ref(z)
    G_pt = ck.load_generator(tmp_path / "ckpt" / "iter_7.pt")             # config from the checkpoint
    assert not G_pt.training
    torch.testing.assert_close(G_pt(z), expected, rtol=0, atol=0)
    ck.save_generator(ref, cfg, tmp_path / "generator.safetensors")
    torch.testing.assert_close(ck.load_generator(tmp_path / "generator.safetensors")(z), expected, rtol=0, atol=0)
    torch.testing.assert_close(ck.load_generator(tmp_path)(z), expected, rtol=0, atol=0)   # a work_dir
    torch.save(state["G"], tmp_path / "bare.pt")
    torch.testing.assert_close(ck.load_generator(tmp_path / "bare.pt", cfg)(z), expected, rtol=0, atol=0)
    with pytest.raises(ck.CheckpointError, match="stores no config"):
        ck.load_generator(tmp_path / "bare.pt")
    wider = tiny_cfg()
    wider.model.base_channels = 8
    with pytest.raises(ck.CheckpointError, match="does not fit the configured model"):
        ck.load_generator(tmp_path / "generator.safetensors", wider)
    with pytest.raises(ck.CheckpointError, match="not found"):
        ck.load_generator(tmp_path / "missing.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ck.CheckpointError, match="cannot read"):
        ck.load_generator(tmp_path / "broken.safetensors", cfg)


def test_discriminator_and_init_from_a_work_dir(tmp_path):
    """A work_dir with generator.safetensors (no D) and a checkpoint: D comes from the checkpoint,
    for load_discriminator as for init_networks; without a checkpoint, one line says so."""
    cfg = tiny_cfg(work_dir=str(tmp_path))
    torch.manual_seed(int(torch.randint(0, 2**31, ())))
    state = fake_state(7, cfg)
    ck.save(state, tmp_path / "ckpt" / "iter_7.pt")
    ck.save_generator(build(cfg.model)[0], cfg, tmp_path / "generator.safetensors")
    D = ck.load_discriminator(tmp_path)
    assert all(torch.equal(v, state["D"][k]) for k, v in D.state_dict().items())
    G, D = build(cfg.model)
    ck.init_networks(tmp_path, G, D)
    assert all(torch.equal(v, state["G"][k]) for k, v in G.state_dict().items())
    assert all(torch.equal(v, state["D"][k]) for k, v in D.state_dict().items())
    (tmp_path / "ckpt" / "iter_7.pt").unlink()
    for load in (lambda: ck.load_discriminator(tmp_path), lambda: ck.init_networks(tmp_path, G, D)):
        with pytest.raises(ck.CheckpointError, match=r"holds no ckpt/iter_N.pt \(generator.safetensors holds no "
                                                     r"discriminator\)"):
            load()


def test_save_copies_to_the_host_before_writing(tmp_path):
    """A tensor that cannot be copied to the host (meta: no data, standing in for a GPU whose copy
    fails) raises its own error before anything is written, not a disk-write error."""
    state = {"iteration": 1, "opt_d": {"state": {0: {"exp_avg": torch.empty(3, device="meta")}}}}
    with pytest.raises(NotImplementedError) as info:
        ck.save(state, tmp_path / "iter_1.pt")
    assert not isinstance(info.value, ck.WriteError) and not list(tmp_path.iterdir())
    # The tensors reach torch.save on the CPU, nested containers kept.
    nested = {"a": [torch.randn(2), (torch.randn(1), 3)], "b": "x"}
    ck.save(nested, tmp_path / "ok.pt")
    loaded = torch.load(tmp_path / "ok.pt", weights_only=True)
    assert torch.equal(loaded["a"][0], nested["a"][0]) and loaded["a"][1][1] == 3 and loaded["b"] == "x"
