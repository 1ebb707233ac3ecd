# MMGeneration's DCGAN on MNIST (configs/dcgan/dcgan_mnist-64_b128x1_Glr4e-4_Dlr1e-4_5k.py): the
# MMGen DCGAN with one image channel at 64x64, batch 128 on one GPU, 5k iterations, Adam lr G 4e-4
# and D 1e-4 (0.5, 0.999), samples every 100 iterations, checkpoints every 500.
# MMGeneration's published figures for it: SWD (64, 32, 16 px / average) 21.16, 4.4, 8.41 / 11.32,
# MS-SSIM 0.1395 (SWD on 16384 images, MS-SSIM on 10k). Its released file,
# dcgan_mnist-64_b128x1_Glr4e-4_Dlr1e-4_5k_20210512_163926-207a1eaf.pth, loads with this config
# (one channel: nothing to convert from BGR).
# Differences from MMGen, on purpose: MMGen reads MNIST exported as 64x64 PNGs; fastgan reads the
# idx file as it downloads (28x28, resized to 64x64 like MMGen's Resize), e.g.
#   python fastgan/train.py configs/dcgan/dcgan_mnist-64_b128x1_Glr4e-4_Dlr1e-4_5k.py \
#       --data.root=data/mnist/train-images-idx3-ubyte.gz
from fastgan.config import Config, DataConfig, EMAConfig, EvalConfig, ModelConfig, OptimConfig

config = Config(
    work_dir="work_dirs/dcgan_mnist-64_b128x1_Glr4e-4_Dlr1e-4_5k",
    total_iters=5_000,
    batch_size=128,
    amp="bf16",
    compile=True,
    backend="auto",
    recipe="mmgen",
    sample_interval=100,
    num_samples=16,
    ckpt_interval=500,
    keep_ckpts=20,
    log_interval=100,
    eval_interval=0,
    model=ModelConfig(preset="mmgen", resolution=64, channels=1),
    data=DataConfig(source="idx", root="data/mnist/train-images-idx3-ubyte.gz", recipe="resize"),
    optim=OptimConfig(lr_g=4e-4, lr_d=1e-4, beta1=0.5, beta2=0.999),
    eval=EvalConfig(metrics="swd,ms_ssim", num_samples=16384, best_metric="swd"),
    ema=EMAConfig(enabled=False),      # MMGen's DCGAN keeps no EMA generator
)
