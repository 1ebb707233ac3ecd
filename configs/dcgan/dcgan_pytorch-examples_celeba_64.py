# The pytorch/examples DCGAN (dcgan/main.py): ngf = ndf = 64, LeakyReLU 0.2, BN weight N(1, 0.02),
# no biases, Resize(64) + CenterCrop(64), one G forward per iteration reused for the G step,
# batch 128, Adam 2e-4 (0.5, 0.999), 25 epochs of CelebA (25 x 1583 batches).
from fastgan.config import Config, DataConfig, ModelConfig, OptimConfig

config = Config(
    work_dir="work_dirs/dcgan_pytorch-examples_celeba_64",
    total_iters=25 * 1583,
    batch_size=128,
    amp="bf16",
    compile=True,
    backend="auto",
    recipe="pytorch_examples",
    sample_interval=1583,
    num_samples=64,
    ckpt_interval=1583,
    keep_ckpts=5,
    log_interval=100,
    model=ModelConfig(preset="pytorch_examples", resolution=64, channels=3),
    data=DataConfig(source="folder", root="data/celeba/img_align_celeba", recipe="center_crop"),
    optim=OptimConfig(lr_g=2e-4, lr_d=2e-4, beta1=0.5, beta2=0.999),
)
