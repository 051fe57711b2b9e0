"""Real photographs for the tokenizer: scikit-image's bundled photos -> two image folders.

    pip install -r requirements-dev.txt          # scikit-image (this script's only extra)
    python scripts/photos.py photos              # photos/train, photos/heldout (a few seconds)
    python train.py vqgan --data photos/train --workdir runs/vq_photos --preset photos

No captioned photo set can be downloaded where this project is built, but scikit-image's
wheel ships real photographs (`skimage/data`: astronaut, chelsea the cat, coffee, a rocket,
motorcycles, retina, the Hubble deep field, ...). This writes random square crops of them,
resized to --size px, as the image folders train.py reads (`metadata.jsonl`, one
`{"file_name", "text"}` a line; the caption names the photo). Whole photos are held out
(HELDOUT), so `evaluate.py reconstruct --data OUT/heldout` measures a tokenizer on scenes it
never saw, not on other crops of its training images.

Crops take a side between --size and half the photo's short side (uniform), so a 64 px crop
shows anything from a 1:1 patch of texture to a downscaled half of the scene.
"""
import argparse
import json
import os

import numpy as np
from PIL import Image

# The real photographs among scikit-image's data files (grey ones become RGB); the synthetic
# images (color, logo, phantom, chessboards, text, page) are left out.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg",
          "brick.png", "camera.png", "coins.png", "grass.png", "gravel.png", "moon.png")
HELDOUT = ("chelsea.png", "coffee.png", "gravel.png")           # never cropped for training


def skimage_data():
    """scikit-image's data folder, found without importing the package."""
    import importlib.util
    spec = importlib.util.find_spec("skimage")
    if spec is None:
        raise SystemExit("error: scripts/photos.py needs scikit-image (pip install -r requirements-dev.txt)")
    return os.path.join(list(spec.submodule_search_locations)[0], "data")


def write_folder(out, photos, n, size, rng):
    """n random crops of `photos` (PIL images by name) into out/, with metadata.jsonl."""
    os.makedirs(out, exist_ok=True)
    names = sorted(photos)
    with open(os.path.join(out, "metadata.jsonl"), "w") as meta:
        for i in range(n):
            name = names[i % len(names)]                         # every photo equally often
            img = photos[name]
            w, h = img.size
            side = int(rng.integers(size, max(size, min(w, h) // 2) + 1))
            x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = img.crop((x, y, x + side, y + side)).resize((size, size), Image.LANCZOS)
            file = f"{i:05d}.png"
            crop.save(os.path.join(out, file))
            meta.write(json.dumps({"file_name": file, "text": f"a photo of {name.split('.')[0].replace('_', ' ')}"})
                       + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write train/ and heldout/ into")
    p.add_argument("--size", type=int, default=64, help="side of the crops, in pixels")
    p.add_argument("--train", type=int, default=2000, help="crops of the training photos")
    p.add_argument("--heldout", type=int, default=96, help="crops of the held-out photos")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    folder = skimage_data()
    photos = {name: Image.open(os.path.join(folder, name)).convert("RGB") for name in PHOTOS}
    rng = np.random.default_rng(args.seed)
    write_folder(os.path.join(args.out, "train"), {k: v for k, v in photos.items() if k not in HELDOUT},
                 args.train, args.size, rng)
    write_folder(os.path.join(args.out, "heldout"), {k: v for k, v in photos.items() if k in HELDOUT},
                 args.heldout, args.size, rng)
    print(f"wrote {args.train} training crops of {len(PHOTOS) - len(HELDOUT)} photos to {args.out}/train and "
          f"{args.heldout} crops of the held-out {', '.join(HELDOUT)} to {args.out}/heldout ({args.size} px)")


if __name__ == "__main__":
    main()
