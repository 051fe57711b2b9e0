"""Text to image with a trained Muse checkpoint: encode the prompt, decode in parallel, detokenize.

    python sample.py "a red circle above a blue square" --out out.png
    python sample.py "two green triangles" --num 16 --guidance 4 --out grid.png
    python sample.py --prompts-file prompts.txt --outdir samples/     # samples/000.png, 001.png, ...

    # zero-shot editing (§3.3): no fine-tuning, the same decoder started from an image's tokens
    python sample.py "a blue square" --init in.png --mask mask.png --out out.png     # inpainting
    python sample.py "a red circle" --init in.png --outpaint right --amount 0.25     # outpainting
    python sample.py "a green circle" --edit in.png --edit-steps 100                 # mask-free editing

The checkpoint (--checkpoint, a workdir of `train.py base`) holds everything needed: the
transformer, the frozen VQGAN and the frozen text encoder, and their configs. A folder
with `base/` and `superres/` (or --superres DIR) runs base -> super-resolution (§2.4). Sampling
(§2.8 of the paper) is `muse.generate`: one jit-compiled loop of --steps forward passes, each
revealing the most confident tokens on a cosine schedule, with classifier-free guidance
whose scale ramps linearly up to --guidance; --negative replaces the empty prompt of the
unconditional pass with a prompt to steer away from. evaluate.py scores samples; bench.py
times them.
"""
import argparse
import math
import os
import sys

import numpy as np
import jax
import jax.numpy as jnp
from PIL import Image

import data
import muse
import vqgan
from checkpoint import Parser, fail, finite, load_pipeline, seed, unwritable

# Every random draw here is keyed per example (muse.example_keys) and none is sharded across
# devices, which is all the default "partitionable" threefry PRNG is for; XLA:CPU compiles the
# other one several times faster, a large part of a cold start on a laptop.
jax.config.update("jax_threefry_partitionable", False)

# the shipped demo pipeline (README.md), found wherever sample.py is run from
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "demo")
MAX_GRID = 4096                                 # images in one --num grid (a 64 px grid of 4096 is 48 MB)


# -----------------------------------------------------------------------------
# Editing without fine-tuning (§3.3): inpainting, outpainting, mask-free editing
# -----------------------------------------------------------------------------

def centre_square(a):
    """The central square of an (H, W, ...) array: how an inpainting mask is cropped (the same
    square data.center_crop takes of the --init image)."""
    h, w = a.shape[:2]
    side = min(h, w)
    return a[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]


def open_image(path, what):
    """An image file of any mode PIL reads -> RGB (data.to_rgb), or one line naming the problem:
    unreadable, or so large that PIL takes it for a decompression bomb."""
    try:
        with Image.open(path) as img:
            return data.to_rgb(img)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        fail(f"{what} {path}: not a readable image ({e})")


def load_image(path, resolution, what="--init"):
    """An image file -> float32 (S, S, 3) in [-1, 1], centre-cropped to a square and resized."""
    return vqgan.from_uint8(data.center_crop(open_image(path, what), resolution))


def load_mask(path, image_path):
    """A mask PNG (white = regenerate), as large as the --init image -> bool (S, S): its
    centre square, the part of the image that load_image keeps."""
    size = open_image(image_path, "--init").size
    mask = open_image(path, "--mask").convert("L")
    if mask.size != size:
        fail(f"--mask {path} is {mask.size[0]}x{mask.size[1]} but --init {image_path} is {size[0]}x{size[1]}")
    mask = np.asarray(mask) > 127
    if not mask.any():
        fail(f"--mask {path} has no white pixel: nothing to regenerate")
    return centre_square(mask)


def token_mask(pixel_mask, grid):
    """bool (S, S) pixels -> bool (grid, grid) tokens: a token is regenerated when any pixel
    of its cell is, so nothing the user marked is kept."""
    img = Image.fromarray(pixel_mask.astype(np.uint8) * 255)
    side = grid * max(1, math.ceil(img.size[0] / grid))          # a multiple of grid, >= S
    cells = np.asarray(img.resize((side, side), Image.NEAREST)) > 127
    f = side // grid
    return cells.reshape(grid, f, grid, f).any(axis=(1, 3))


def outpaint_tokens(ids, direction, n, mask_id):
    """Shift a token grid (B, g, g) by n tokens away from `direction` and mask the n new
    rows/columns there. The kept tokens are the original image's, moved: -> (ids, mask)."""
    B, g, _ = ids.shape
    out = np.full_like(ids, mask_id)
    keep = slice(n, g) if direction in ("right", "bottom") else slice(0, g - n)   # source rows/cols kept
    put = slice(0, g - n) if direction in ("right", "bottom") else slice(n, g)    # where they go
    if direction in ("left", "right"):
        out[:, :, put] = ids[:, :, keep]
    else:
        out[:, put, :] = ids[:, keep, :]
    return out, out == mask_id


def encode_image(stage, image):
    """float (S, S, 3) -> int32 token ids (1, N) of the stage's tokenizer."""
    return encode_images(stage, image[None])


def encode_images(stage, images, chunk=64):
    """float (B, S, S, 3) in [-1, 1] -> int32 token ids (B, N), `chunk` images at a time."""
    ids = [vqgan.encode_jit(stage.vq, stage.vq_params, images[i:i + chunk]) for i in range(0, len(images), chunk)]
    return np.concatenate([np.asarray(x).reshape(len(x), -1) for x in ids])


# -----------------------------------------------------------------------------
# The pipeline: prompts -> base tokens -> (super-resolution tokens) -> pixels
# -----------------------------------------------------------------------------

def editing_init(args, base, sr):
    """For --mask / --outpaint: the token grids to start decoding from (known tokens and
    [MASK]s), at the base scale and, with super-resolution, at the high-res scale."""
    inits = []
    pixel_hole = load_mask(args.mask, args.init) if args.mask else None    # read once, used at each scale
    for stage in (base, sr) if sr else (base,):
        c = stage.model.cfg
        ids = encode_image(stage, load_image(args.init, stage.vq.cfg.resolution))       # (1, N)
        if args.mask:
            hole = token_mask(pixel_hole, c.grid).reshape(1, -1)                         # (1, N)
            inits.append(np.where(hole, c.mask_id, ids))
        else:
            # whole base tokens, the same strip at every scale
            g = base.model.cfg.grid
            if round(args.amount * g) >= g:
                fail(f"--amount {args.amount} would shift the whole image out of its {g}-token grid "
                     f"(keep it under {(g - 0.5) / g:.2f})")
            n = max(1, round(args.amount * g)) * (c.grid // g)
            shifted, _ = outpaint_tokens(ids.reshape(1, c.grid, c.grid), args.outpaint, n, c.mask_id)
            inits.append(shifted.reshape(1, -1))
    return inits + [None] * (2 - len(inits))


def run(args, base, sr, prompts, seed, first=0):
    """Prompts -> (final uint8 images, low-res images or None), in the mode the flags ask.
    first: the index of prompts[0] in the whole job (muse.generate)."""
    B = len(prompts)
    if args.edit:                                # mask-free editing (§3.3.2), at both scales
        lowres, images = None, []
        for i, stage in enumerate([base, sr] if sr else [base]):
            image = load_image(args.edit, stage.vq.cfg.resolution, "--edit")
            ids = jnp.asarray(np.repeat(encode_image(stage, image), B, 0))              # (B, N)
            contexts = muse.encode_prompts(stage.text_encoder, prompts, args.negative)
            rngs = muse.example_keys(jax.random.PRNGKey(seed + i), first, B)            # (B,) keys, as muse.generate
            guidance, temperature = (args.guidance, args.temperature) if i == 0 else (args.sr_guidance,
                                                                                      args.sr_temperature)
            ids, _ = muse.edit_jit(stage.model, stage.params, *contexts, rngs, ids, iterations=args.edit_steps,
                                   fraction=args.edit_fraction, guidance=guidance, temperature=temperature,
                                   lowres_ids=lowres)
            images.append(vqgan.decode_ids(stage.vq, stage.vq_params, ids))
            lowres = ids                        # the super-res edit is conditioned on the edited base tokens
        return images[-1], (images[0] if sr else None)
    init_lo, init_hr = editing_init(args, base, sr) if args.init else (None, None)
    rep = lambda x: None if x is None else jnp.asarray(np.repeat(x, B, 0))
    lo_ids = base_ids(args, base, prompts, seed, first, init_ids=rep(init_lo))
    if sr is None:
        return vqgan.decode_ids(base.vq, base.vq_params, lo_ids), None
    # the low-res images are decoded only when asked for (--lowres-out): a decoder compile is ~1 s
    lo_images = vqgan.decode_ids(base.vq, base.vq_params, lo_ids) if args.lowres_out else None
    return superres_stage(args, sr, prompts, lo_ids, seed, first, init_ids=rep(init_hr)), lo_images


def base_ids(args, base, prompts, seed, first=0, init_ids=None):
    """run()'s base stage: prompts -> low-res ids (B, Nlo), at the base model's flags."""
    return muse.generate(base.model, base.params, base.text_encoder, prompts, seed, first, steps=args.steps,
                         guidance=args.guidance, temperature=args.temperature,
                         choice_temperature=args.choice_temperature, negative=args.negative, init_ids=init_ids)


def superres_ids(args, sr, prompts, lowres_ids, seed, first=0, init_ids=None):
    """run()'s super-res stage: low-res ids (B, Nlo) + prompts -> high-res ids (B, N), at the
    --sr_* flags, seeded seed + 1 (the base stage takes seed)."""
    return muse.generate(sr.model, sr.params, sr.text_encoder, prompts, seed + 1, first, steps=args.sr_steps,
                         guidance=args.sr_guidance, temperature=args.sr_temperature,
                         choice_temperature=args.choice_temperature, negative=args.negative,
                         init_ids=init_ids, lowres_ids=lowres_ids)


def superres_stage(args, sr, prompts, lowres_ids, seed, first=0, init_ids=None):
    """superres_ids, decoded to uint8 high-res images. `evaluate.py shapes` also feeds it the
    renders' true low-res tokens."""
    return vqgan.decode_ids(sr.vq, sr.vq_params, superres_ids(args, sr, prompts, lowres_ids, seed, first, init_ids))


def in_batches(args, items, fn):
    """fn(chunk, first) -> uint8 images, over `items` --batch_size at a time (first: the index
    of the chunk's first item, which keys its draws) -> uint8 (len(items), S, S, 3). The last
    chunk is padded to full size so that it reuses the compiled program."""
    images = []
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        padded = chunk + [chunk[-1]] * (args.batch_size - len(chunk))
        images.append(fn(padded, start)[:len(chunk)])
    return np.concatenate(images)


# -----------------------------------------------------------------------------
# The command line
# -----------------------------------------------------------------------------

def add_sampling_flags(p):
    """The flags of the pipeline itself, shared with `evaluate.py shapes`. The defaults are
    those that drew best on the shipped demo (docs/results.md, "Sampling defaults")."""
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="a `train.py base` workdir, or a folder with base/ and superres/")
    p.add_argument("--superres", default=None, help="a `train.py superres` workdir to run after the base model")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed")
    p.add_argument("--steps", type=int, default=24, help="parallel decoding steps (paper: 24 for the base model)")
    p.add_argument("--sr_steps", type=int, default=8, help="super-resolution decoding steps (paper: 8)")
    p.add_argument("--guidance", type=finite, default=None,
                   help="classifier-free guidance scale, 0 = off (default: 3, or 4 with --edit as in the paper)")
    # below 1: sharper token choices give crisper corners, so fewer squares read as circles;
    # --temperature 1 samples the model's full distribution
    p.add_argument("--temperature", type=finite, default=0.5, help="token sampling temperature")
    # the low-res tokens leave the super-res stage little to choose: at temperature 1 with
    # guidance its ragged edges turned squares into circles
    p.add_argument("--sr_guidance", type=finite, default=0.0,
                   help="super-res guidance (the text still conditions it; 0: no extra push)")
    p.add_argument("--sr_temperature", type=finite, default=0.1, help="super-res token sampling temperature")
    # 2 rather than MaskGIT's 4.5: less random choice of which tokens to keep early leaves
    # fewer blunted shapes
    p.add_argument("--choice_temperature", type=finite, default=2.0,
                   help="Gumbel noise on the confidences at step 0, annealed to 0 (MaskGIT)")
    p.add_argument("--negative", default=None, help="negative prompt, used in place of the empty prompt")
    p.add_argument("--batch_size", type=int, default=16, help="prompts per batch (--prompts-file, evaluate.py)")


def parse_args(argv=None):
    p = Parser(prog="sample.py", description="Text to image (and zero-shot editing) with a trained Muse checkpoint.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?", help="what to draw")
    p.add_argument("--out", default="out.png", help="output PNG (a grid when --num > 1)")
    p.add_argument("--num", type=int, default=1, help=f"images of the prompt, written as one grid (at most {MAX_GRID})")
    p.add_argument("--lowres-out", dest="lowres_out", default=None,
                   help="with super-resolution: also write the base model's low-res image here")
    p.add_argument("--prompts-file", dest="prompts_file", default=None, help="one prompt per line")
    p.add_argument("--outdir", default=None, help="with --prompts-file: writes OUTDIR/000.png, 001.png, ...")
    add_sampling_flags(p)
    p.add_argument("--init", default=None, help="inpainting / outpainting: the image to edit")
    p.add_argument("--mask", default=None, help="inpainting: mask PNG as large as --init, white = regenerate")
    p.add_argument("--outpaint", choices=["left", "right", "top", "bottom"], default=None,
                   help="outpainting: extend --init on this side (the canvas shifts the other way)")
    p.add_argument("--amount", type=finite, default=0.25, help="outpainting: fraction of the canvas to add")
    p.add_argument("--edit", default=None, help="mask-free editing: the image to move towards the prompt")
    p.add_argument("--edit-steps", dest="edit_steps", type=int, default=100,
                   help="mask-free editing: iterations (paper: 100)")
    p.add_argument("--edit-fraction", dest="edit_fraction", type=finite, default=0.08,
                   help="mask-free editing: fraction of tokens resampled per iteration (paper: 0.08)")
    # the spellings of the evaluation and the benchmark before they got files of their own
    argv = sys.argv[1:] if argv is None else argv
    for old, new in (("--evaluate", "python evaluate.py shapes ..."), ("--benchmark", "python bench.py sample PRESET")):
        if any(a == old or a.startswith(old + "=") for a in argv):
            p.error(f"{old} moved: run `{new}` (same flags)")
    args = p.parse_args(argv)
    if args.guidance is None:
        args.guidance = 4.0 if args.edit else 3.0
    if args.prompts_file is None and args.prompt is None:
        p.error("give a prompt, or --prompts-file F --outdir D")
    if args.prompts_file and not args.outdir:
        p.error("--prompts-file needs --outdir")
    if args.prompt is not None and not args.prompt.strip():
        p.error("the prompt is empty")
    if min(args.steps, args.sr_steps, args.num, args.batch_size, args.edit_steps) < 1:
        p.error("--steps, --sr_steps, --num, --batch_size and --edit-steps must be at least 1")
    modes = [m for m in ("mask", "outpaint", "edit") if getattr(args, m)]
    if len(modes) > 1:
        p.error(f"choose one editing mode, not --{' and --'.join(modes)}")
    if (args.mask or args.outpaint) and not args.init:
        p.error(f"--{modes[0]} needs --init IMAGE")
    if args.init and not (args.mask or args.outpaint):
        p.error("--init needs --mask MASK.png or --outpaint SIDE")
    if modes and args.prompts_file:
        p.error("editing works on one prompt, not --prompts-file")
    if not 0 < args.amount < 1 or not 0 < args.edit_fraction <= 1:
        p.error("--amount must be in (0, 1) and --edit-fraction in (0, 1]")
    if min(args.temperature, args.sr_temperature, args.choice_temperature) < 0:
        p.error("--temperature, --sr_temperature and --choice_temperature must be at least 0")
    if args.num > MAX_GRID:
        p.error(f"--num {args.num}: one grid holds at most {MAX_GRID} images; for more, write one file per "
                "image with --prompts-file F --outdir D")
    # the outputs, before anything is loaded or generated
    for flag, path in (("--out", None if args.prompts_file else args.out), ("--lowres-out", args.lowres_out)):
        if path is not None:
            ext = os.path.splitext(path)[1].lower()
            if Image.registered_extensions().get(ext) not in Image.SAVE:
                p.error(f"{flag} {path}: {'no' if not ext else 'an unknown'} image extension{' ' + ext if ext else ''}"
                        f" (use .png or .jpg)")
            if unwritable(path, folder=False):
                p.error(f"{flag} {path}: {unwritable(path, folder=False)}")
    if args.outdir and unwritable(args.outdir):
        p.error(f"--outdir: {unwritable(args.outdir)}")
    if args.lowres_out and not (args.superres or os.path.isdir(os.path.join(args.checkpoint, "superres"))):
        p.error(f"--lowres-out: {args.checkpoint} has no super-resolution stage (superres/ or --superres), "
                "so the base model's image is the output itself")
    return args


def read_prompts(path):
    """--prompts-file: its non-empty lines, stripped; one line if it is not UTF-8 text."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8")
    except OSError as e:
        fail(f"cannot read --prompts-file: {e}")
    except UnicodeDecodeError as e:
        fail(f"--prompts-file {path} is not UTF-8 text (byte {e.start}): one prompt per line")
    if "\0" in text:
        fail(f"--prompts-file {path} holds NUL bytes: it is not a text file")
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        fail(f"{path} holds no prompt")
    return prompts


def main(argv=None):
    args = parse_args(argv)
    prompts = read_prompts(args.prompts_file) if args.prompts_file else None
    # readable images, before any model loads (load_mask reads both --mask and --init)
    if args.mask:
        load_mask(args.mask, args.init)         # (as large as --init, with a white pixel)
    for flag in ("init", "edit"):
        if getattr(args, flag) and not args.mask:
            open_image(getattr(args, flag), f"--{flag}")
    folders = [args.outdir] if args.prompts_file else [os.path.dirname(os.path.abspath(p))
                                                        for p in (args.out, args.lowres_out) if p]
    for folder in folders:                      # where the images go exists before any work is done
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            fail(f"cannot make the output folder {folder}: {e.strerror or e}")
    base, sr = load_pipeline(args.checkpoint, args.superres)
    if args.prompts_file:
        generate = lambda chunk, first: run(args, base, sr, chunk, args.seed, first)[0]
        for i, image in enumerate(in_batches(args, prompts, generate)):
            Image.fromarray(image).save(os.path.join(args.outdir, f"{i:03d}.png"))
        print(f"wrote {len(prompts)} images to {args.outdir}")
        return
    # --batch_size images at a time (the keys are per image, so the grid is the same either way)
    images, lowres = [], []
    for first in range(0, args.num, args.batch_size):
        chunk = [args.prompt] * min(args.batch_size, args.num - first)
        final, low = run(args, base, sr, chunk, args.seed, first)
        images.append(final)
        lowres.append(low)
    images, lowres = np.concatenate(images), (np.concatenate(lowres) if lowres[0] is not None else None)
    cols = math.ceil(math.sqrt(args.num))
    data.save_grid(images, args.out, cols)
    if args.lowres_out and lowres is not None:
        data.save_grid(lowres, args.lowres_out, cols)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
