"""Objective metrics that work offline: SWD, MS-SSIM (MMGeneration's DCGAN metrics) and FID, KID,
IS on the FID Inception network loaded from a local file.

    from fastgan.metrics import Evaluator, LOWER_IS_BETTER
    ev = Evaluator(cfg, device, rank=0, world_size=1)
    scores = ev(G)          # G in eval mode -> {"swd": ..., "swd_64": ..., "ms_ssim": ..., ...}

The functions on tensors: fastgan.metrics.swd.swd, fastgan.metrics.ms_ssim.ms_ssim_pairs,
fastgan.metrics.fid.{fid, kid, inception_score} (submodule names are not shadowed here).
"""

from fastgan.metrics.evaluator import LOWER_IS_BETTER, METRICS, Evaluator, parse_metrics, sample_images
from fastgan.metrics.inception import InceptionWeightsError

__all__ = ["Evaluator", "LOWER_IS_BETTER", "METRICS", "parse_metrics", "sample_images", "InceptionWeightsError"]
