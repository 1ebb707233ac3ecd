"""One training iteration (D step, then G step) as one function, so torch.compile sees all of it.

recipe "mmgen" (MMGeneration's StaticUnconditionalGAN.train_step with disc_steps=1):
    fake = G(z1) without grad;  D(fake), then D(real) (two BN batches)
    loss_d = BCE(D(fake), 0) + BCE(D(real), 1);  D step
    G(z2) -> D (D's parameters frozen) -> loss_g = BCE(., 1);  G step
recipe "pytorch_examples" (pytorch/examples dcgan/main.py):
    fake = G(z);  D(real), then D(fake.detach());  D step;  D(fake) -> G step

The losses come back as one detached tensor [loss_d_fake, loss_d_real, loss_g, d_real, d_fake,
d_fake_g] (OUTPUTS): the last three are D's mean output, sigmoid(logits).mean(), on the real and the
fake batch in the D step and on the fake batch in the G step (the DCGAN tutorial's D(x), D(G(z))
before and after the D step), reduced from logits the losses already need. The caller reads it only
at log intervals, so nothing here waits for the device.

DDP: G and D are wrapped separately with broadcast_buffers=False. DDP expects one forward per
backward and a grad for every parameter, so D's two batches run through `DiscPair` (one DDP
forward, two D calls: still two BN batches), and the G step runs the unwrapped D, whose frozen
parameters get no grads and leave DDP's reducer alone. The no-grad G forward runs unwrapped too.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.parallel import DistributedDataParallel as DDP

from fastgan.ema import EMA

# Each rank keeps its own BN running statistics between explicit syncs. torch 2.13 renamed
# broadcast_buffers=False to forward_sync_buffers=False (a FutureWarning); 2.11 has only the old name.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                   else {"broadcast_buffers": False})

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
RECIPES = ("mmgen", "pytorch_examples")    # the iteration orders of the module docstring
OUTPUTS = ("loss_d_fake", "loss_d_real", "loss_g", "d_real", "d_fake", "d_fake_g")   # step()'s tensor


class DiscPair(nn.Module):
    """D on two batches in one forward (`first` runs first: BN statistics are per batch)."""

    def __init__(self, D: nn.Module):
        super().__init__()
        self.D = D

    def forward(self, first, second):
        return self.D(first), self.D(second)


def _bce(logits: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits, target, dtype=torch.float32))


def _d_out(logits: torch.Tensor) -> torch.Tensor:
    """D's mean probability of "real" for a batch; detached, outside the loss graph."""
    return torch.sigmoid(logits.detach().float()).mean()


def num_noise(recipe: str) -> int:
    """How many noise batches an iteration draws: mmgen draws fresh z for the G step."""
    return 2 if recipe == "mmgen" else 1


class TrainStep:
    """Owns the optimizers, the GradScaler and the EMA generator (cfg.ema); `step(real, z)` runs
    one iteration.

    z: (num_noise, N, noise_size), drawn by the caller from its own generator so that the
    iteration is a pure function of its inputs and the state (resume replays it exactly).
    """

    def __init__(self, cfg, G: nn.Module, D: nn.Module, device: torch.device, distributed: bool = False,
                 compile_backend: str = "inductor", capturable: bool = False):
        if cfg.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)}, got {cfg.recipe!r}")
        self.G, self.D, self.device = G, D, device
        self.recipe = cfg.recipe
        self.num_noise = num_noise(cfg.recipe)
        self.amp_dtype = AMP_DTYPES[cfg.amp]
        cuda = device.type == "cuda"
        o = self.optim = cfg.optim
        # capturable (fastgan/cuda_graph.py): Adam keeps its step count on the device, so one CUDA
        # graph can replay the whole iteration, optimizer steps included.
        self.capturable = capturable
        adam = dict(fused=True, capturable=True) if capturable else dict(fused=cuda or None)
        self.opt_g = torch.optim.Adam(G.parameters(), lr=o.lr_g, betas=(o.beta1, o.beta2), **adam)
        self.opt_d = torch.optim.Adam(D.parameters(), lr=o.lr_d, betas=(o.beta1, o.beta2), **adam)
        if capturable:     # the warm-up iterations run uncaptured on purpose: no warning
            for opt in (self.opt_g, self.opt_d):
                opt._warned_capturable_if_run_uncaptured = True
        # fp16 needs loss scaling; one scaler serves both optimizers (torch AMP docs, "multiple
        # models, losses, and optimizers"), updated once per iteration.
        self.fp16 = cfg.amp == "fp16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.fp16)
        pair = DiscPair(D)
        if distributed:
            ids = [device.index] if cuda else None
            self.g_train = DDP(G, device_ids=ids, **_NO_BUFFER_SYNC)
            self.d_pair = DDP(pair, device_ids=ids, **_NO_BUFFER_SYNC)
        else:
            self.g_train, self.d_pair = G, pair
        # The EMA generator (cfg.ema) is updated at the end of the iteration, inside the same function.
        self.ema = EMA(G, cfg.ema, cfg.batch_size) if cfg.ema.enabled else None
        fn = self._recipe = self._mmgen if self.recipe == "mmgen" else self._pytorch_examples
        if self.ema is not None:
            fn = self._with_ema
        # compile_backend: "aot_eager" traces the same graphs without inductor's codegen (tests).
        self._fn = torch.compile(fn, backend=compile_backend) if cfg.compile else fn

    def noise(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(self.num_noise, batch_size, self.G.noise_size, device=self.device, generator=generator)

    def step(self, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self._fn(real, z)

    def _with_ema(self, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        losses = self._recipe(real, z)
        self.ema.update()
        return losses

    # -- the recipes ---------------------------------------------------------------------------

    @staticmethod
    def _detached(module: nn.Module) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in module.named_parameters()}

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def _update(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        if self.fp16:   # branches, not a disabled scaler: torch.compile cannot trace GradScaler
            self.scaler.scale(loss).backward()
            self.scaler.step(opt)
        else:
            loss.backward()
            opt.step()

    def _g_update(self, fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # MMGen freezes D here (set_requires_grad(D, False)); D's weights enter as detached
        # tensors instead: same effect, no grads for D, and no requires_grad_ calls, which
        # torch.compile cannot trace.
        with self._autocast():
            pred = functional_call(self.D, self._detached(self.D), (fake,))
            loss_g = _bce(pred, 1.0)
        self._update(self.opt_g, loss_g)
        if self.fp16:
            self.scaler.update()
        return loss_g, _d_out(pred)

    def _mmgen(self, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            with torch.no_grad():
                fake = self.G(z[0])
            pred_fake, pred_real = self.d_pair(fake, real)
            loss_fake, loss_real = _bce(pred_fake, 0.0), _bce(pred_real, 1.0)
        self._update(self.opt_d, loss_fake + loss_real)
        with self._autocast():
            fake = self.g_train(z[1])
        loss_g, d_fake_g = self._g_update(fake)
        return torch.stack([loss_fake, loss_real, loss_g, _d_out(pred_real), _d_out(pred_fake), d_fake_g]).detach()

    def _pytorch_examples(self, real: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            fake = self.g_train(z[0])
        # Compiled, G's and D's forwards would become one autograd node, whose saved tensors the D
        # step's backward frees before the G step's backward needs them; a break keeps them apart.
        torch._dynamo.graph_break()
        with self._autocast():
            pred_real, pred_fake = self.d_pair(real, fake.detach())
            loss_real, loss_fake = _bce(pred_real, 1.0), _bce(pred_fake, 0.0)
        self._update(self.opt_d, loss_real + loss_fake)
        loss_g, d_fake_g = self._g_update(fake)
        return torch.stack([loss_fake, loss_real, loss_g, _d_out(pred_real), _d_out(pred_fake), d_fake_g]).detach()

    # -- checkpoint state -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "scaler": self.scaler.state_dict(), **(self.ema.state_dict() if self.ema is not None else {})}

    def load_state_dict(self, state: dict) -> list[str]:
        """Restores the optimizer moments, the scaler and the EMA; lr and betas stay the config's (a
        resumed run with --optim.lr_d=... must train with that lr, as its log says). Returns
        the hyperparameters that differ from the checkpoint's, for the log."""
        changed = []
        for name, opt, lr in (("g", self.opt_g, self.optim.lr_g), ("d", self.opt_d, self.optim.lr_d)):
            opt.load_state_dict(state[f"opt_{name}"])
            betas = (self.optim.beta1, self.optim.beta2)
            for group in opt.param_groups:
                old_lr = float(group["lr"])
                if old_lr != lr:
                    changed.append(f"lr_{name} {old_lr:g} -> {lr:g}")
                if tuple(float(b) for b in group["betas"]) != betas:
                    changed.append(f"betas_{name} {tuple(group['betas'])} -> {betas}")
                if isinstance(group["lr"], torch.Tensor):     # capturable/fused optimizers keep a tensor lr
                    group["lr"].fill_(lr)
                else:
                    group["lr"] = lr
                group["betas"] = betas
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            changed += filter(None, [self.ema.load_state_dict(state)])
        elif "G_ema" in state:
            changed.append("ema off (the checkpoint's EMA generator is not kept)")
        return changed
