"""Writes the resize references of tests/vision_preprocess.rs: small seeded RGB images and what
torchvision's uint8 antialiased bicubic resize (the processor's resize) makes of them.

    python3 make_resize_refs.py      # in tests/media; needs numpy, torch, torchvision, Pillow

PNG is lossless, so the expected files hold torchvision's output exactly.
"""
import numpy as np
import torch
import torchvision.transforms.v2.functional as tvF
from PIL import Image
from torchvision.transforms import InterpolationMode

# (name, source height, width, seed, targets (height, width)): shrinking and enlarging each axis,
# strong shrinks (wide kernels), and the camera case 480x640 -> 476x644 on a small stand-in.
CASES = [
    ("src_a", 37, 53, 1, [(23, 90), (61, 31), (37, 52)]),
    ("src_b", 120, 97, 2, [(28, 28), (13, 200), (131, 100)]),
    ("src_c", 48, 64, 3, [(47, 65), (56, 84)]),
]


def make(h, w, seed):
    rs = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([255 * xx / max(w - 1, 1), 255 * yy / max(h - 1, 1),
                    127.5 + 127.5 * np.sin((xx * yy) / 17.0)], axis=-1)
    img[h // 3: h // 2, w // 4: w // 2] = [255, 0, 255]  # hard edges ring under bicubic
    img = img + rs.randint(-40, 41, size=img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


for name, h, w, seed, targets in CASES:
    src = make(h, w, seed)
    Image.fromarray(src).save(f"{name}.png")
    chw = torch.from_numpy(src).permute(2, 0, 1).contiguous()
    for th, tw in targets:
        out = tvF.resize(chw, [th, tw], interpolation=InterpolationMode.BICUBIC, antialias=True)
        Image.fromarray(out.permute(1, 2, 0).numpy()).save(f"{name}_to_{th}x{tw}.png")
        print(name, (h, w), "->", (th, tw))

# A JPEG of src_c and what PIL (the official loader) decodes from it, for the decoding test;
# JPEG decoders may differ by a grey level or two, so that test allows a little.
Image.fromarray(make(48, 64, 3)).save("src_c.jpg", quality=92)
Image.open("src_c.jpg").convert("RGB").save("src_c_jpg_pil.png")
