# A few minutes on a 2-core CPU: a narrow MMGen DCGAN at 32x32 on the built-in synthetic faces.
# Samples every 100 iterations show noise, then blobs, then faces: at 600 iterations heads with
# hair and eyes on flat backgrounds, clearer by 1000 (2 min 16 s in all on a 2-core CPU, no GPU).
from fastgan.config import Config, DataConfig, EMAConfig, ModelConfig

config = Config(
    work_dir="work_dirs/quickstart",
    total_iters=1000,
    batch_size=64,
    amp="fp32",
    backend="auto",
    sample_interval=100,
    num_samples=64,
    ckpt_interval=100,
    keep_ckpts=3,
    log_interval=10,
    model=ModelConfig(preset="mmgen", resolution=32, channels=3, base_channels=32),
    data=DataConfig(source="synthetic", root="data/synthetic", synthetic_count=2048, recipe="resize"),
    # Samples and generator.safetensors come from an EMA of G (half-life 10k images, ramped up over
    # the first images: StyleGAN2-ADA's defaults). At iteration 1000 it scored SWD 40.3 against the
    # raw G's 45.3 (2048 samples; README, "The EMA generator").
    ema=EMAConfig(enabled=True, half_life_kimg=10.0, rampup=0.05),
)
