# MMGeneration's DCGAN recipe (configs/dcgan/dcgan_celeba-cropped_64_b128x1_300k.py):
# CelebA aligned & cropped at 64x64, batch 128 on one GPU, 300k iterations, Adam 2e-4 (0.5, 0.999),
# samples and checkpoints every 10k iterations, 20 checkpoints kept.
# Differences from MMGen, on purpose: RGB instead of BGR; images come from img_align_celeba as it
# unzips, squashed to 64x64 without keeping aspect, exactly as MMGen's Resize(keep_ratio=False).
# OpenMMLab's released weights (dcgan_celeba-cropped_64_b128x1_300kiter_20210408_161607-1f8a2277.pth)
# load with this config: python fastgan/sample.py THIS_FILE THAT_FILE (converted from BGR to RGB).
from fastgan.config import Config, DataConfig, EMAConfig, EvalConfig, ModelConfig, OptimConfig

config = Config(
    work_dir="work_dirs/dcgan_celeba-cropped_64_b128x1_300k",
    total_iters=300_000,
    batch_size=128,
    amp="bf16",
    compile=True,
    backend="auto",
    recipe="mmgen",
    sample_interval=10_000,
    num_samples=16,
    ckpt_interval=10_000,
    keep_ckpts=20,
    log_interval=100,
    eval_interval=0,
    model=ModelConfig(preset="mmgen", resolution=64, channels=3),
    data=DataConfig(source="folder", root="data/celeba/img_align_celeba", recipe="resize"),
    optim=OptimConfig(lr_g=2e-4, lr_d=2e-4, beta1=0.5, beta2=0.999),
    # MMGen's DCGAN metrics: SWD on 16384 images, MS-SSIM on 10k.
    eval=EvalConfig(metrics="swd,ms_ssim", num_samples=16384, best_metric="swd"),
    ema=EMAConfig(enabled=False),      # MMGen's DCGAN keeps no EMA generator
)
