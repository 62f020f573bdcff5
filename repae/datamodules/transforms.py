"""Image transforms shared by the datasets and the preprocessing tool (reference section 2.1)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM center crop: the transform REPA-E's ``preprocessing.py`` applies to every image.

    While the short side is at least ``2 * image_size`` the image is halved with a BOX filter
    (cheap anti-aliasing for large photos), then resized so that the short side is ``image_size``
    (sizes rounded with ``round``) with BICUBIC, then the integer center square is cut out.

    Args:
        pil_image: any PIL image; converted to RGB first (greyscale, CMYK, palette, alpha dropped).
        image_size: side of the square output.

    Returns:
        An RGB PIL image of size ``image_size x image_size``.
    """
    pil_image = pil_image.convert("RGB")
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(side // 2 for side in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(
        tuple(round(side * scale) for side in pil_image.size), resample=Image.BICUBIC
    )
    arr = np.asarray(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y : crop_y + image_size, crop_x : crop_x + image_size])
