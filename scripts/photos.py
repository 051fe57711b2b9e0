"""Real photographs for the tokenizer: scikit-image's bundled photos -> three image folders.

    pip install -r requirements-dev.txt          # scikit-image (this script's only extra)
    python scripts/photos.py photos              # photos/train, heldout, heldout_crops (seconds)
    python train.py vqgan --data photos/train --workdir runs/vq_photos --preset photos

No captioned photo set can be downloaded where this project is built, but scikit-image's
wheel ships real photographs (`skimage/data`: astronaut, chelsea the cat, coffee, a rocket,
motorcycles, retina, the Hubble deep field, ...). This writes random square crops of them,
resized to --size px, as the image folders train.py reads (`metadata.jsonl`, one
`{"file_name", "text"}` a line; the caption names the photo). Whole photos are held out
(HELDOUT), so `evaluate.py reconstruct --data OUT/heldout` measures a tokenizer on scenes it
never saw, not on other crops of its training images. A third folder, OUT/heldout_crops,
holds new crops of the training photos (drawn after the other two, so never among the
training crops): a tokenizer's score there against its score on OUT/heldout separates
what it learned of images in general from what it learned of these twelve photos;
--train_photos N trains on fewer of them, and --augment mirrors and turns the training crops
(OUT/heldout keeps the same crops, pixel for pixel, with either).

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


def draw_crops(photos, n, size, rng):
    """n random square crops of `photos` (PIL images by name): [(name, (left, top, right, bottom))]."""
    names, crops = sorted(photos), []
    for i in range(n):
        name = names[i % len(names)]                             # every photo equally often
        w, h = photos[name].size
        side = int(rng.integers(size, max(size, min(w, h) // 2) + 1))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        crops.append((name, (x, y, x + side, y + side)))
    return crops


def write_folder(out, photos, crops, size, flips=None):
    """The crops, resized to size x size, into out/ as PNGs, with metadata.jsonl; flips: one of
    the square's 8 symmetries a crop (mirrored or not, then turned by 0-3 quarter turns)."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "metadata.jsonl"), "w") as meta:
        for i, (name, box) in enumerate(crops):
            file = f"{i:05d}.png"
            crop = photos[name].crop(box).resize((size, size), Image.LANCZOS)
            if flips is not None and flips[i] >= 4:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            if flips is not None and flips[i] % 4:              # (exact: a square's pixels only move)
                crop = crop.transpose((Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270)[flips[i] % 4 - 1])
            crop.save(os.path.join(out, file))
            meta.write(json.dumps({"file_name": file, "text": f"a photo of {name.split('.')[0].replace('_', ' ')}"})
                       + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder to write train/, heldout/ and heldout_crops/ into")
    p.add_argument("--size", type=int, default=64, help="side of the crops, in pixels")
    p.add_argument("--train", type=int, default=2000, help="crops of the training photos")
    p.add_argument("--heldout", type=int, default=96, help="crops of the held-out photos, and new crops of the training ones")
    p.add_argument("--train_photos", type=int, default=0,
                   help="train on the first N of the training photos in a seeded order (0 = all); the held-out ones stay")
    p.add_argument("--augment", action="store_true",
                   help="mirror and turn each training crop by one of the square's 8 symmetries (seeded)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    training = every_training = sorted(k for k in PHOTOS if k not in HELDOUT)
    if not 0 <= args.train_photos <= len(training):      # (before any photo is read)
        raise SystemExit(f"error: --train_photos {args.train_photos}: there are {len(training)} training photos")
    folder = skimage_data()
    photos = {name: Image.open(os.path.join(folder, name)).convert("RGB") for name in PHOTOS}
    if args.train_photos:   # the first N of one seeded order: 3 photos are among 6, 6 among 12
        # (its own generator, so that the default crops stay those of every earlier run)
        training = sorted(np.random.default_rng(args.seed + 1).permutation(training)[:args.train_photos])
    pick = lambda names: {k: photos[k] for k in names}
    rng = np.random.default_rng(args.seed)
    train = draw_crops(pick(training), args.train, args.size, rng)
    if args.train_photos:   # held-out crops the same whatever --train_photos: draw as the default does
        rng = np.random.default_rng(args.seed)
        draw_crops(pick(every_training), args.train, args.size, rng)
    heldout = draw_crops(pick(HELDOUT), args.heldout, args.size, rng)
    new_crops = draw_crops(pick(training), args.heldout, args.size, rng)
    flips = np.random.default_rng(args.seed + 2).integers(0, 8, args.train) if args.augment else None
    write_folder(os.path.join(args.out, "train"), photos, train, args.size, flips)
    write_folder(os.path.join(args.out, "heldout"), photos, heldout, args.size)
    write_folder(os.path.join(args.out, "heldout_crops"), photos, new_crops, args.size)
    print(f"wrote {args.train} training crops of {len(training)} photos to {args.out}/train, {args.heldout} crops "
          f"of the held-out {', '.join(HELDOUT)} to {args.out}/heldout and {args.heldout} new crops of the "
          f"training photos to {args.out}/heldout_crops ({args.size} px)")


if __name__ == "__main__":
    main()
