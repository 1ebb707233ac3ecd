"""Config files, --key=value overrides and their errors, the choices they offer (~2 s)."""

import json
from pathlib import Path

import pytest

from fastgan import config as C

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").rglob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = C.load(path)
    assert isinstance(cfg, C.Config)
    assert cfg.sample_interval <= cfg.total_iters


def test_mmgen_recipe_is_exact():
    cfg = C.load(ROOT / "configs/dcgan/dcgan_celeba-cropped_64_b128x1_300k.py")
    assert (cfg.total_iters, cfg.batch_size, cfg.recipe) == (300_000, 128, "mmgen")
    assert (cfg.model.preset, cfg.model.resolution, cfg.model.channels, cfg.model.base_channels) == ("mmgen", 64, 3, None)
    o = cfg.optim
    assert (o.lr_g, o.lr_d, o.beta1, o.beta2) == (2e-4, 2e-4, 0.5, 0.999)
    assert (cfg.sample_interval, cfg.ckpt_interval, cfg.keep_ckpts, cfg.num_samples) == (10_000, 10_000, 20, 16)
    assert cfg.data.recipe == "resize"


def test_overrides_parse_and_convert():
    cfg = C.load(ROOT / "configs/quickstart.py",
                 ["--total_iters=7", "--model.base_channels", "16", "--compile=true", "--optim.lr_g=1",
                  "--data.crop_size=none", "--amp", "bf16", "--data.num-workers=0"])
    assert cfg.total_iters == 7 and cfg.model.base_channels == 16 and cfg.compile is True
    assert cfg.optim.lr_g == 1.0 and isinstance(cfg.optim.lr_g, float)
    assert cfg.data.crop_size is None and cfg.amp == "bf16" and cfg.data.num_workers == 0
    # The file's own object is untouched: a second load sees the file's values.
    assert C.load(ROOT / "configs/quickstart.py").total_iters != 7


@pytest.mark.parametrize("args,message", [
    (["--bogus=1"], "unknown config key 'bogus'; valid keys: work_dir"),
    (["--model.bogus=1"], "model.preset"),                     # the valid keys are listed
    (["--batch_size=abc"], "batch_size: 'abc' is not a int"),
    (["--compile=maybe"], "compile: 'maybe' is not a bool"),
    (["--amp=fp8"], "amp: 'fp8' is not one of fp32, bf16, fp16"),
    (["--model.resolution=48"], "not one of 32, 64, 128"),
    (["--total_iters=0"], "total_iters: must be at least 1"),
    (["--model.base_channels=0"], "model.base_channels: must be at least 1"),
    (["total_iters=5"], "expected --key=value"),
    (["--total_iters"], "needs a value"),
])
def test_override_errors_name_what_is_valid(args, message):
    with pytest.raises(C.ConfigError) as e:
        C.load(ROOT / "configs/quickstart.py", args)
    assert message in str(e.value)


def test_bad_files(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        C.load(tmp_path / "missing.py")
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(C.ConfigError, match="must define `config"):
        C.load(bad)
    typo = tmp_path / "typo.py"
    typo.write_text("from fastgan.config import Config\nconfig = Config(batch_size='many')\n")
    with pytest.raises(C.ConfigError, match="batch_size"):
        C.load(typo)


def test_json_round_trip(tmp_path):
    cfg = C.load(ROOT / "configs/quickstart.py", ["--seed=123", "--model.channels=1", "--data.flip=true"])
    C.save(cfg, tmp_path / "config.json")
    again = C.load(tmp_path / "config.json")
    assert C.to_dict(again) == C.to_dict(cfg)
    assert C.from_dict(json.loads(C.dumps(cfg))) == cfg
    d = C.to_dict(cfg)
    d["model"]["depth"] = 3
    with pytest.raises(C.ConfigError, match="model.depth"):
        C.from_dict(d)


def test_describe_lists_every_key():
    text = C.describe()
    for key in C.keys():
        assert f"--{key}=" in text
    assert "fp32|bf16|fp16" in text


def test_every_choice_is_one_the_code_accepts():
    """The config offers exactly the choices of the modules that give them meaning (models, step,
    data/transforms), and each one builds or runs there."""
    import torch

    from fastgan.data import transforms
    from fastgan.models import BACKENDS, build, resolve_backend
    from fastgan.step import AMP_DTYPES, TrainStep

    def choices(obj, name):
        return C._fields(obj)[name].metadata["choices"]
    m = C.ModelConfig()
    shapes = [(p, r, 3) for p in choices(m, "preset") for r in choices(m, "resolution")]
    for preset, resolution, channels in shapes + [("mmgen", 32, c) for c in choices(m, "channels")]:
        G, D = build(C.ModelConfig(preset, resolution, channels, base_channels=4))
        z = torch.randn(2, G.noise_size)
        assert G(z).shape == (2, channels, resolution, resolution) and D(G(z)).shape == (2, 1)
    for backend in choices(C.Config(), "backend"):
        assert resolve_backend(backend, "cpu") in BACKENDS and resolve_backend(backend, "cuda") in BACKENDS
    G, D = build(C.ModelConfig(resolution=32, base_channels=4))
    for recipe in choices(C.Config(), "recipe"):
        for amp in choices(C.Config(), "amp"):
            step = TrainStep(C.Config(recipe=recipe, amp=amp), G, D, torch.device("cpu"))
            assert step.amp_dtype == AMP_DTYPES[amp] and step.num_noise == (2 if recipe == "mmgen" else 1)
    for recipe in choices(C.DataConfig(), "recipe"):
        assert transforms.crop_box(30, 20, recipe, None) in ((0, 0, 30, 20), (5, 0, 25, 20))
