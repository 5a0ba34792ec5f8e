"""Qwen3-VL's image inputs built on the engine's device: pixels normalised and cut into merged patches there.

Equivalent to ``Qwen2VLImageProcessor`` with ``do_resize=False`` (``prepare_image`` has already sized each
image to multiples of the patch-merge factor), but only the 8-bit pixels cross to the device: rescaling,
normalisation and the patch layout run there, where they take microseconds instead of ~5 ms of CPU per
image. tests/engine/test_vision_inputs.py checks the result against the processor.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class PatchSpec:
    """The image processor's geometry and normalisation."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def of(cls, image_processor: object) -> PatchSpec:
        """The spec of a Qwen2/3-VL image processor."""
        get = image_processor.__getattribute__
        return cls(
            patch_size=int(get("patch_size")),
            merge_size=int(get("merge_size")),
            temporal_patch_size=int(get("temporal_patch_size")),
            mean=tuple(float(v) for v in get("image_mean")),  # type: ignore[arg-type]
            std=tuple(float(v) for v in get("image_std")),  # type: ignore[arg-type]
        )

    def tokens(self, width: int, height: int) -> int:
        """Visual tokens (merged patches) of an image of this size."""
        return (height // self.patch_size) * (width // self.patch_size) // (self.merge_size**2)


def pixel_patches(
    images: Sequence[Image.Image], spec: PatchSpec, device: torch.device, pool: Executor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values`` (patches, C*T*P*P) float32 and ``image_grid_thw`` (N, 3), as the processor makes them."""
    patch, merge, temporal = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        if image.mode != "RGB" or image.width % (patch * merge) or image.height % (patch * merge):
            raise ValueError(f"image {index} must be RGB with sides multiple of {patch * merge}")
        by_size.setdefault(image.size, []).append(index)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1)
    parts: list[torch.Tensor | None] = [None] * len(images)
    for (width, height), indices in by_size.items():
        # Pixels are copied straight into (pinned) host memory, by several threads when a pool is given.
        pixels = torch.empty(
            (len(indices), height, width, 3), dtype=torch.uint8, pin_memory=device.type == "cuda"
        )
        host = pixels.numpy()

        def fill(j: int, host: np.ndarray = host, indices: list[int] = indices) -> None:
            host[j] = np.asarray(images[indices[j]])

        list(pool.map(fill, range(len(indices))) if pool else map(fill, range(len(indices))))
        stacked = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        stacked = (stacked * (1.0 / 255.0) - mean) / std
        count = len(indices)
        grid_h, grid_w = height // patch, width // patch
        patches = stacked.reshape(count, 3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
        patches = patches.permute(0, 2, 5, 3, 6, 1, 4, 7)
        flat = (
            patches.unsqueeze(6)
            .expand(-1, -1, -1, -1, -1, -1, temporal, -1, -1)
            .reshape(count, grid_h * grid_w, 3 * temporal * patch * patch)
        )
        for j, i in enumerate(indices):
            parts[i] = flat[j]
    grid = [[1, image.height // patch, image.width // patch] for image in images]
    pixel_values = torch.cat([p for p in parts if p is not None], dim=0)
    return pixel_values, torch.tensor(grid, dtype=torch.long, device=device)
