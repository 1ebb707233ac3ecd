"""An exponential moving average of the generator's weights, updated inside the training step.

As StyleGAN2-ADA states it (training_loop.py): after each iteration, with B images per iteration
over all ranks and n images seen before it,

    half_life = min(half_life_kimg * 1000, rampup * n)      (no min without a ramp-up)
    beta      = 0.5 ** (B / half_life)
    ema       = lerp(G, ema, beta) = ema + (1 - beta) * (G - ema)

and the BN buffers (running statistics) are copied from G, as StyleGAN2-ADA and MMagic do. Until
`start_iter` the average is a copy of G. Everything is computed on the device from a device-side
iteration counter, so the update is one `torch._foreach_lerp_` and one `_foreach_copy_` with no
host sync: torch.compile traces it and a CUDA graph captures it (the weight reaches foreach_lerp
as a device tensor; a Python number would be baked into the graph, and a 0-d tensor passed as a
Scalar would be read by the host).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.distributed as dist
from torch import nn

from fastgan.convert import clean_state_dict


class EMA:
    """The average (`module`, a Generator in eval mode) of G's weights, and its iteration counter."""

    def __init__(self, G: nn.Module, cfg_ema, batch_size: int):
        """cfg_ema: fastgan.config.EMAConfig; batch_size: per process (times the world size here)."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.images_per_iter = batch_size * world
        self.half_life = cfg_ema.half_life_kimg * 1000.0
        self.rampup, self.start_iter = cfg_ema.rampup, cfg_ema.start_iter
        self.G = G
        self.module = copy.deepcopy(G).eval().requires_grad_(False)
        for p in self.module.parameters():
            p.grad = None
        self._params, self._source = list(self.module.parameters()), list(G.parameters())
        self._buffers, self._source_buffers = list(self.module.buffers()), list(G.buffers())
        device = self._params[0].device
        self.iteration = torch.zeros((), dtype=torch.int64, device=device)   # updates so far

    def weight(self) -> torch.Tensor:
        """1 - beta for this update, as a 0-d float32 tensor on the device (no host sync)."""
        seen = self.iteration.to(torch.float32) * self.images_per_iter
        half_life = torch.full_like(seen, self.half_life)
        if self.rampup is not None:
            half_life = torch.minimum(half_life, seen * self.rampup)
        # 1 - 0.5 ** (B / h) = -expm1(-ln2 * B / h), accurate when B << h; h = 0 gives 1 (a copy).
        w = -torch.expm1(-math.log(2.0) * self.images_per_iter / half_life.clamp_min(1e-8))
        if self.start_iter > 0:
            w = torch.where(self.iteration < self.start_iter, torch.ones_like(w), w)
        return w

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average, after G's optimizer step."""
        w = self.weight()
        torch._foreach_lerp_(self._params, self._source, [w] * len(self._params))
        torch._foreach_copy_(self._buffers, self._source_buffers)
        self.iteration.add_(1)

    # -- checkpoint state -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"G_ema": clean_state_dict(self.module), "ema_iteration": self.iteration.detach().cpu().clone()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> str | None:
        """The checkpoint's average, copied in place (a captured graph keeps its addresses). A
        checkpoint without one (EMA was off) starts the average from G; returns a note saying so."""
        if "G_ema" in state:
            self.module.load_state_dict(state["G_ema"])     # names upgraded by checkpoint.load
            self.iteration.copy_(state["ema_iteration"])
            return None
        self.module.load_state_dict(self.G.state_dict())
        self.iteration.fill_(int(state.get("iteration", 0)))
        return "ema on (the checkpoint has no EMA generator: it starts from G)"
