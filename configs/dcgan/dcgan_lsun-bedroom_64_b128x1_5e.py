# MMGeneration's DCGAN on LSUN bedroom (its config dcgan_lsun-bedroom_64x64_b128x1_5e.py; the
# released file is dcgan_lsun-bedroom_64_b128x1_5e_20210408_161713-117c498b.pth): the MMGen DCGAN
# at 64x64, batch 128 on one GPU, Adam 2e-4 (0.5, 0.999), samples every 10k iterations.
# MMGeneration's published figures for it: SWD (64, 32, 16 px / average) 42.79, 34.55, 98.46 / 58.6,
# MS-SSIM 0.2095 (SWD on 16384 images, MS-SSIM on 10k).
#
# 5 epochs as iterations: the LSUN bedroom training set is 3,033,042 images (bedroom_train_lmdb
# from the LSUN release, github.com/fyu/lsun; TensorFlow Datasets' lsun/bedroom lists the same
# train split), so one epoch at batch 128 is ceil(3,033,042 / 128) = 23,696 batches, the last one
# partial, and 5 epochs are 5 x 23,696 = 118,480 iterations. (MMGen's config file itself sets
# total_iters = 1500002, about 63 epochs, despite its name; for that run pass --total_iters=1500002.)
#
# Data: a folder of the bedroom images, as the LSUN repository's `python data.py export
# bedroom_train_lmdb --out_dir data/lsun/bedroom_train` writes them (MMGen's imgs_root), squashed to
# 64x64 like MMGen's Resize. Differences from MMGen, on purpose: RGB instead of BGR; bf16 with
# torch.compile (--amp=fp32 --compile=false for MMGen's numerics); checkpoints every 10k iterations
# (MMGen: every 100k of its 1.5M).
from fastgan.config import Config, DataConfig, EMAConfig, EvalConfig, ModelConfig, OptimConfig

config = Config(
    work_dir="work_dirs/dcgan_lsun-bedroom_64_b128x1_5e",
    total_iters=5 * 23_696,
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
    data=DataConfig(source="folder", root="data/lsun/bedroom_train", recipe="resize"),
    optim=OptimConfig(lr_g=2e-4, lr_d=2e-4, beta1=0.5, beta2=0.999),
    eval=EvalConfig(metrics="swd,ms_ssim", num_samples=16384, best_metric="swd"),
    ema=EMAConfig(enabled=False),      # MMGen's DCGAN keeps no EMA generator
)
