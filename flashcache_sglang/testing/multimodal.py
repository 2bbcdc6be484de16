"""Build a transformers reference that sees exactly what SGLang 0.5.23 feeds Qwen2.5-VL.

Measured on the tiny random Qwen2.5-VL (tests/sglang/test_multimodal_flashcache.py): an image
prompt matches SGLang out of the box, a video prompt does not, for three separate reasons:

1. Frames. SGLang does not hand the file to the HF processor. Its own loader
   (``srt/multimodal/processors/qwen_vl.py: preprocess_video``) decodes with decord (torchcodec if
   installed), samples ``FPS = 2`` frames per second with at least ``FPS_MIN_FRAMES = 4``
   (``np.linspace(0, total - 1, n)`` indices), and resizes the frames with torchvision bilinear
   to ``smart_resize(h, w, min_pixels=VIDEO_MIN_PIXELS=128*28*28, ...)``: a 64x64 clip is
   *upscaled* to 336x336, then the HF video processor shrinks it again to its own max_pixels
   (112x112 here). Feeding the raw frames to the HF processor gives another grid (2, 4, 4) and
   another token count. :func:`sglang_video_frames` reproduces this loader (frames verified
   byte-identical to SGLang's ``preprocess_video``).
2. Temporal M-RoPE. The frames reach the HF processor as a tensor *without* video metadata
   (SGLang passes ``video_metadata`` only for Qwen3-VL-type models), so transformers assumes
   24 fps: ``second_per_grid_ts = temporal_patch_size / 24 = 1/12`` s although the frames were
   sampled at 2 fps (the truth would be 1.0 s). With ``tokens_per_second = 4`` every temporal grid
   of the clip gets temporal position ``int(t * 4 / 12) = 0``. A reference that loads the video
   itself, or leaves out ``second_per_grid_ts`` (transformers then uses 1.0), numbers the frames
   0, 4, ... and differs by several nats. Passing the HF processor SGLang's frames the same way
   (a tensor, no metadata) reproduces SGLang's ``second_per_grid_ts``.
3. Vision attention. SGLang's Qwen2.5-VL vision tower (``srt/models/qwen2_5_vl.py``) builds the
   full-attention ``cu_seqlens`` from ``t * h * w`` per video: all frames of a clip attend to each
   other in the full-attention blocks. transformers (and the original Qwen2.5-VL code) use one
   segment of ``h * w`` per temporal grid (``get_vision_cu_seqlens(merge_temporal=False)``).
   Images have t = 1, so only videos differ (~0.1 nat on the tiny model).
   :func:`sglang_vision_attention` switches transformers to SGLang's convention.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch

__all__ = ["sglang_video_frames", "sglang_vision_attention"]

# SGLang 0.5.23 srt/multimodal/processors/qwen_vl.py constants
FPS = 2.0
FPS_MIN_FRAMES = 4
FPS_MAX_FRAMES = 768
FRAME_FACTOR = 2
IMAGE_FACTOR = 28
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)


def _smart_resize(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = IMAGE_FACTOR):
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def sglang_video_frames(path) -> torch.Tensor:
    """The frames SGLang's Qwen-VL video loader hands the HF processor: ``[T, 3, H, W]`` uint8.

    Default video config only (no ``--mm-process-config``); decord decoding.
    """
    import torchvision
    from decord import VideoReader, cpu
    from torchvision.transforms import InterpolationMode

    reader = VideoReader(str(path), ctx=cpu(0))
    total, fps = len(reader), reader.get_avg_fps()
    min_frames = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(min(FPS_MAX_FRAMES, total) / FRAME_FACTOR) * FRAME_FACTOR
    count = min(max(total / fps * FPS, min_frames), max_frames, total)
    count = math.floor(count / FRAME_FACTOR) * FRAME_FACTOR
    index = np.unique(np.linspace(0, total - 1, num=count, dtype=np.int64))
    frames = torch.from_numpy(reader.get_batch(index.tolist()).asnumpy()).permute(0, 3, 1, 2)
    _, _, height, width = frames.shape
    max_pixels = max(min(VIDEO_MAX_PIXELS, VIDEO_TOTAL_PIXELS / len(index) * FRAME_FACTOR),
                     int(VIDEO_MIN_PIXELS * 1.05))
    size = _smart_resize(height, width, VIDEO_MIN_PIXELS, max_pixels)
    return torchvision.transforms.functional.resize(frames, list(size), interpolation=InterpolationMode.BILINEAR)


@contextmanager
def sglang_vision_attention(whole_clip: bool = True):
    """Within the block, transformers' Qwen2.5-VL vision tower lets all frames of a video attend
    to each other in its full-attention blocks, as SGLang 0.5.23 does (see module docstring)."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    original = modeling.get_vision_attention_seqlens

    def seqlens(grid_thw, config, merge_temporal=False, kwargs=None):
        return original(grid_thw, config, merge_temporal=whole_clip or merge_temporal, kwargs=kwargs)

    modeling.get_vision_attention_seqlens = seqlens
    try:
        yield
    finally:
        modeling.get_vision_attention_seqlens = original
