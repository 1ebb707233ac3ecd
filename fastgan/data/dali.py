"""NVIDIA DALI: decode JPEG/PNG on the GPU (nvJPEG, device="mixed") or on CPU threads.

One pipeline serves two uses:
  decode_into  fills the decoded cache (uint8 CHW), once per dataset; a batch DALI fails on is
               decoded again by PIL, file by file, so one corrupt file never stops the build
  DaliStream   streams normalised batches every epoch when there is no cache (data.cache=off,
               or a dataset too large for GPU memory): fn.readers.file over the epoch's
               permutation with shard_id=rank, num_shards=world_size, flips fed through
               fn.external_source into crop_mirror_normalize, DALIGenericIterator on top.
Both read only files sources.check_file passed, and build the same box as transforms.crop_box.
"""

from __future__ import annotations

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fastgan.errors import first_line

from .sampler import Loader, Schedule
from .sources import DataError


def available() -> bool:
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return False
    try:
        import nvidia.dali.fn  # noqa: F401  (a broken install fails here, not mid-build)
        return True
    except Exception:
        return False


def pipeline(files: list[str], labels: list[int], spec: tuple, *, batch_size: int, device_id: int | None,
             num_threads: int, shard_id: int = 0, num_shards: int = 1, mirror=None, normalize: bool = False):
    """A built pipeline: (images, labels) per batch. device_id=None decodes on CPU.

    images: uint8 (C, R, R), or with normalize float32 in [-1, 1] mirrored where `mirror(k)` (a
    callable: batch number -> int32 array of 0/1) says so. labels: the `labels` of the files read."""
    from nvidia.dali import fn, math as dmath, pipeline_def, types

    channels, resolution, recipe, crop_size = spec

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id)
    def define():
        jpegs, label = fn.readers.file(files=files, labels=labels, shard_id=shard_id, num_shards=num_shards,
                                       random_shuffle=False, name="reader")
        # fancy upsampling: the chroma filter libjpeg (and so PIL) uses; nvJPEG's default differs
        kw = dict(device="cpu" if device_id is None else "mixed", jpeg_fancy_upsampling=True,
                  output_type=types.RGB if channels == 3 else types.GRAY)
        if recipe == "center_crop":   # the box of transforms.crop_box, decoded directly (ROI decode)
            shape = fn.peek_image_shape(jpegs)
            h, w = shape[0], shape[1]
            side = dmath.min(h, w) if crop_size is None else dmath.min(dmath.min(h, w), crop_size)
            images = fn.decoders.image_slice(jpegs, fn.stack((h - side) // 2, (w - side) // 2), fn.stack(side, side),
                                             axes=[0, 1], normalized_anchor=False, normalized_shape=False, **kw)
        else:
            images = fn.decoders.image(jpegs, **kw)
        images = fn.resize(images, resize_x=resolution, resize_y=resolution,
                           interp_type=types.INTERP_LINEAR, antialias=True)
        if normalize:
            flip = 0 if mirror is None else fn.external_source(
                source=lambda info: mirror(info.iteration), batch=True, batch_info=True)
            images = fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="CHW", mirror=flip,
                                              mean=[127.5] * channels, std=[127.5] * channels)
        else:
            images = fn.transpose(images, perm=[2, 0, 1])
        return images, label

    pipe = define()
    pipe.build()
    return pipe


def gpu_decoder_works(path, spec: tuple, device_id: int, log=print) -> bool:
    """Decode one good file with the GPU ("mixed") decoder. Where nvJPEG, the driver or the GPU
    will not serve DALI this fails at once: False, after one log line (the caller decodes on the CPU)."""
    try:
        pipe = pipeline([str(path)], [0], spec, batch_size=1, device_id=device_id, num_threads=1)
        images, _ = pipe.run()
        images.as_cpu()
        del pipe
        return True
    except Exception as e:  # DALI raises RuntimeError subclasses; a broken GPU path may raise others
        log(f"warning: data: DALI's GPU decoder failed ({first_line(e, name=True)}); decoding on the CPU instead")
        return False


def decode_into(paths: list, out: np.ndarray, rows: list[int], spec: tuple, device_id: int | None,
                num_threads: int, progress=None, log=print, fallback=None, batch: int | None = None) -> dict[int, str]:
    """Decode paths[i] into out[rows[i]] through DALI; {row: error} for files that fail.

    A batch that makes DALI raise is decoded by `fallback` (PIL) instead, and the pipeline is
    rebuilt after it: a bad file costs one batch of PIL decoding, not the build."""
    batch = batch or (256 if device_id is not None else 64)
    failed, i, warned = {}, 0, False
    while i < len(paths):
        pipe = pipeline([str(p) for p in paths[i:]], list(range(i, len(paths))), spec, batch_size=batch,
                        device_id=device_id, num_threads=num_threads)
        try:
            while i < len(paths):
                images, labels = pipe.run()
                if device_id is not None:
                    images = images.as_cpu()
                images, labels = images.as_array(), labels.as_array().reshape(-1)
                take = min(batch, len(paths) - i)   # the reader wraps around after the last file
                for k in range(take):
                    out[rows[labels[k]]] = images[k]
                i += take
                if progress is not None:
                    progress.update(take)
        except Exception as e:  # DALI raises RuntimeError subclasses; any of them ends this pipeline
            if not warned:
                log(f"warning: data: DALI failed on a batch ({str(e).splitlines()[0][:200]}); "
                    "decoding that batch with PIL and carrying on")
                warned = True
            stop = min(i + batch, len(paths))
            failed.update(fallback(paths[i:stop], out, rows[i:stop]))
            if progress is not None:
                progress.update(stop - i)
            i = stop
        finally:
            del pipe
    if device_id is not None:   # hand nvJPEG's buffers back to the GPU for training
        from nvidia.dali.backend import ReleaseUnusedMemory
        ReleaseUnusedMemory()
    return failed


class DaliStream(Loader):
    """Decode every batch through DALI (no cache). Epoch e reads the epoch's permutation with
    shard_id=rank, num_shards=world_size; a resume inside an epoch reads the rank's remaining
    files directly. The pipeline is rebuilt each epoch, so the order is exactly sampler.Schedule's."""

    def __init__(self, paths: list, spec: tuple, schedule: Schedule, device, start_iter=0,
                 dtype=torch.float32, num_threads: int = 2, gpu_decode: bool = True):
        super().__init__(schedule, device, start_iter, dtype)
        self.paths, self.spec, self.num_threads = [str(p) for p in paths], spec, num_threads
        self.device_id = self.device.index or 0 if self.device.type == "cuda" and gpu_decode else None
        self.name = f"dali {'mixed' if self.device_id is not None else 'cpu'} (streaming, no cache)"

    def _epoch_pipeline(self, epoch: int, j: int):
        sched, B = self.schedule, self.schedule.batch_size
        perm, flips = sched.epoch(epoch)
        start, _ = sched.shard()
        first = start + j * B           # this rank's first image of this pipeline, as an epoch position
        if j == 0:
            order, shard = perm, dict(shard_id=sched.rank, num_shards=sched.world_size)
        else:
            order, shard = perm[first:start + sched.batches_per_epoch * B], {}
        mirror = None
        if flips is not None:
            mine = flips[first:start + sched.batches_per_epoch * B].astype(np.int32)

            def mirror(k):   # DALI asks ahead of the batches we take: zeros past the end
                part = mine[k * B:(k + 1) * B]
                return np.pad(part, (0, B - len(part)))
        return pipeline([self.paths[i] for i in order], order.tolist(), self.spec, batch_size=B,
                        device_id=self.device_id, num_threads=self.num_threads, mirror=mirror,
                        normalize=True, **shard)

    def __iter__(self):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        epoch, j = self.schedule.position(self.start_iter)
        # building a pipeline over CelebA's 202,599 names takes ~1 s: the next epoch's is built on
        # a thread while this epoch runs
        with ThreadPoolExecutor(1) as pool:
            upcoming = pool.submit(self._epoch_pipeline, epoch, j)
            while True:
                pipe = upcoming.result()
                upcoming = pool.submit(self._epoch_pipeline, epoch + 1, 0)
                it = DALIGenericIterator(pipe, ["images", "labels"], reader_name="reader", auto_reset=False,
                                         last_batch_policy=LastBatchPolicy.DROP)
                try:
                    for _ in range(j, self.schedule.batches_per_epoch):
                        try:
                            images = next(it)[0]["images"]
                        except (RuntimeError, StopIteration) as e:
                            raise DataError(f"DALI stopped in epoch {epoch}: {e}. Files that decode only in part "
                                            "stop DALI mid-epoch; data.cache=host checks every file first") from e
                        yield images.to(self.device, self.dtype, non_blocking=True)
                finally:
                    del it, pipe
                epoch, j = epoch + 1, 0
