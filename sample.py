"""Text to image with a trained Muse checkpoint: encode the prompt, decode in parallel, detokenize.

    python sample.py "a red circle above a blue square" --out out.png
    python sample.py "two green triangles" --num 16 --guidance 4 --out grid.png
    python sample.py --prompts-file prompts.txt --outdir samples/     # samples/000.png, 001.png, ...
    python sample.py --benchmark small                                  # speed, one JSON line

    # zero-shot editing (§2.6): no fine-tuning, the same decoder started from an image's tokens
    python sample.py "a blue square" --init in.png --mask mask.png --out out.png     # inpainting
    python sample.py "a red circle" --init in.png --outpaint right --amount 0.25     # outpainting
    python sample.py "a green circle" --edit in.png --edit-steps 100                 # mask-free editing

The checkpoint (--checkpoint, a workdir of `train.py base`) holds everything needed: the
transformer, the frozen VQGAN and the frozen text encoder, and their configs. A folder
with `base/` and `superres/` (or --superres DIR) runs base -> super-resolution (§2.3). Sampling
(§2.5 of the paper) is `muse.decode`: one jit-compiled loop of --steps forward passes, each
revealing the most confident tokens on a cosine schedule, with classifier-free guidance
whose scale ramps linearly up to --guidance; --negative replaces the empty prompt of the
unconditional pass with a prompt to steer away from.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import jax
import jax.numpy as jnp
from flax import serialization
from PIL import Image

import muse
import vqgan

# XLA on CPU compiles the default ("partitionable") threefry PRNG slowly: ~2.4 s instead of
# ~0.3 s for one draw of a few thousand numbers, which dominates start-up on a laptop. We
# shard with pmap and per-example keys, so the partitionable variant buys nothing here.
jax.config.update("jax_threefry_partitionable", False)

DEFAULT_CHECKPOINT = "checkpoints/demo"


def fail(message, code=1):
    """Bad input: one line on stderr and a non-zero exit, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def read_checkpoint(path):
    """The raw contents of a checkpoint (a workdir or its checkpoint.msgpack) as nested dicts."""
    file = os.path.join(path, "checkpoint.msgpack") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        fail(f"no checkpoint at {path} (train one with `python train.py ...`, or pass --checkpoint DIR)")
    try:
        with open(file, "rb") as f:
            ckpt = serialization.msgpack_restore(f.read())
        ckpt["config"] = json.loads(ckpt["config"])
    except Exception as e:                      # truncated, or not a checkpoint at all
        fail(f"{file} is not a readable checkpoint ({type(e).__name__}: {e})")
    return ckpt


def save_grid(images, path, cols):
    """uint8 (n, S, S, 3) -> one PNG with the images in rows of `cols`."""
    n, S = images.shape[0], images.shape[1]
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    grid = np.full((rows * S, cols * S, 3), 255, np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        grid[r * S:(r + 1) * S, c * S:(c + 1) * S] = img
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).save(path)


@dataclass
class Stage:
    """One trained transformer with what it needs to run: its params, the VQGAN whose
    tokens it predicts (the high-res one for super-resolution) and its text encoder."""
    model: muse.MaskedTransformer
    params: dict
    vq: vqgan.VQGAN
    vq_params: dict
    text_encoder: muse.TextEncoder


def encode_prompts(text_encoder, prompts, negative=None):
    """The conditional and the unconditional context of a batch, each (B, L, Dt) + mask (B, L).

    The unconditional pass reads the empty prompt, or the negative prompt in its place.
    """
    ctx, ctx_mask = text_encoder(prompts)
    uncond, uncond_mask = text_encoder([negative or ""] * len(prompts))
    return ctx, ctx_mask, uncond, uncond_mask


def generate_ids(model, params, text_encoder, prompts, seed=0, steps=24, guidance=3.0, temperature=1.0,
                 choice_temperature=4.5, negative=None, init_ids=None, lowres_ids=None):
    """Prompts -> token ids (B, N) by parallel decoding. The prompts are encoded once per call.

    init_ids (B, N) with [MASK]s: editing (only the masked tokens are generated);
    lowres_ids (B, Nlo): the low-res tokens a super-resolution model is conditioned on.
    """
    contexts = encode_prompts(text_encoder, prompts, negative)             # encoded once, not per step
    ids, _ = muse.decode_jit(model, params, *contexts, jax.random.PRNGKey(seed),
                             init_ids=init_ids, steps=steps, guidance=guidance, temperature=temperature,
                             choice_temperature=choice_temperature, lowres_ids=lowres_ids)    # (B, N)
    return ids


def ids_to_images(vq_model, vq_params, ids):
    """Token ids (B, N) -> uint8 images (B, S, S, 3)."""
    g = vq_model.cfg.grid
    return vqgan.to_uint8(vqgan.decode_jit(vq_model, vq_params, ids.reshape(ids.shape[0], g, g)))


def load_text_encoder(config, t5_params, folder):
    """The frozen text encoder stored in a checkpoint (tokenizer files, if any, in `folder`)."""
    if config["tokenizer"] == "byt5":
        tokenizer = muse.byte_tokenizer()
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, config["tokenizer"]))
    return muse.TextEncoder(muse.T5Config(**config["t5"]), t5_params, tokenizer, config["text_length"])


def load_stage(path, stage):
    """A `train.py base` or `train.py superres` workdir -> Stage."""
    ckpt = read_checkpoint(path)
    config = ckpt["config"]
    if config.get("stage") != stage:
        fail(f"{path} holds a {config.get('stage')!r} checkpoint; expected a {stage} one (`train.py {stage}`)")
    try:
        out = "vqgan_hr" if stage == "superres" else "vqgan"
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        return Stage(muse.MaskedTransformer(muse.MuseConfig(**config["muse"])), ckpt["params"],
                     vqgan.VQGAN(vqgan.VQGANConfig(**config[out])), ckpt["consts"][out],
                     load_text_encoder(config, ckpt["consts"]["t5"], folder))
    except (KeyError, TypeError, OSError) as e:
        fail(f"{path}: incompatible checkpoint ({type(e).__name__}: {e})")


def load_pipeline(path, superres=None):
    """-> (base Stage, super-res Stage or None).

    `path` is a base workdir, or a folder holding `base/` and optionally `superres/` (the
    layout of a shipped pipeline); `superres` names a super-res workdir explicitly.
    """
    if os.path.isdir(os.path.join(path, "base")):
        if superres is None and os.path.isdir(os.path.join(path, "superres")):
            superres = os.path.join(path, "superres")
        path = os.path.join(path, "base")
    base = load_stage(path, "base")
    sr = load_stage(superres, "superres") if superres else None
    if sr is not None and (sr.model.cfg.lowres_grid != base.model.cfg.grid
                           or sr.model.cfg.lowres_codebook_size != base.model.cfg.codebook_size):
        fail(f"{superres}: this super-res model was trained on another low-res tokenizer than {path}'s")
    return base, sr


# -----------------------------------------------------------------------------
# Editing without fine-tuning (§2.6): inpainting, outpainting, mask-free editing
# -----------------------------------------------------------------------------

def centre_square(a):
    """The central square of an (H, W, ...) array: how an --init image and its mask are cropped."""
    h, w = a.shape[:2]
    side = min(h, w)
    return a[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]


def load_image(path, resolution, what="--init"):
    """An image file -> float32 (S, S, 3) in [-1, 1], centre-cropped to a square and resized."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        fail(f"{what} {path}: not a readable image ({e})")
    img = Image.fromarray(centre_square(np.asarray(img))).resize((resolution, resolution), Image.BICUBIC)
    return np.asarray(img, np.float32) / 127.5 - 1.0


def load_mask(path, image_path):
    """A mask PNG (white = regenerate) -> bool (H, W), as large as the --init image."""
    try:
        size = Image.open(image_path).size
    except (OSError, ValueError) as e:
        fail(f"--init {image_path}: not a readable image ({e})")
    try:
        mask = Image.open(path).convert("L")
    except (OSError, ValueError) as e:
        fail(f"--mask {path}: not a readable image ({e})")
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
    return np.asarray(vqgan.encode_jit(stage.vq, stage.vq_params, image[None])).reshape(1, -1)


def benchmark(preset, batch=8, steps=24, text_length=32, repeats=5):
    """Time sampling with random weights (no checkpoint needed); returns a dict for JSON.

    Reports the time of one guided forward (conditional + unconditional as one doubled
    batch) beside the time per decoding step, so the decode loop's own overhead shows.
    """
    cfg = muse.PRESETS[preset]
    model = muse.MaskedTransformer(cfg)
    rng = jax.random.PRNGKey(0)
    ctx = jax.random.normal(rng, (batch, text_length, cfg.text_dim))
    mask = jnp.ones((batch, text_length), bool)
    ids = jnp.full((batch, cfg.num_tokens), cfg.mask_id, jnp.int32)
    params = jax.jit(model.init)(rng, ids, ctx, mask)["params"]

    def timed(fn):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
        return statistics.median(times), compile_s

    forward = jax.jit(muse.guided_logits, static_argnames="model")
    t_fwd, _ = timed(lambda: forward(model, params, ids, ctx, mask, ctx, mask, 3.0))
    t_batch, compile_s = timed(lambda: muse.decode_jit(model, params, ctx, mask, ctx, mask, rng, steps=steps)[0])
    return {"preset": preset, "batch": batch, "steps": steps, "images_per_sec": batch / t_batch,
            "sec_per_batch": t_batch, "ms_per_step": 1e3 * t_batch / steps, "ms_per_forward": 1e3 * t_fwd,
            "loop_overhead": t_batch / (steps * t_fwd) - 1, "compile_s": compile_s,
            "params": sum(x.size for x in jax.tree.leaves(params)),
            "backend": jax.default_backend(), "devices": jax.device_count()}


class Parser(argparse.ArgumentParser):
    def error(self, message):                   # one line and exit code 2, no usage dump
        fail(f"{self.prog}: {message}", code=2)


def parse_args(argv=None):
    p = Parser(prog="sample.py", description="Text to image (and zero-shot editing) with a trained Muse checkpoint.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?", help="what to draw")
    p.add_argument("--out", default="out.png", help="output PNG (a grid when --num > 1)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help="a `train.py base` workdir, or a folder with base/ and superres/")
    p.add_argument("--superres", default=None, help="a `train.py superres` workdir to run after the base model")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--steps", type=int, default=24, help="parallel decoding steps (paper: 24 for the base model)")
    p.add_argument("--sr_steps", type=int, default=8, help="super-resolution decoding steps (paper: 8)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, 0 = off (default: 3, or 4 with --edit as in the paper)")
    p.add_argument("--temperature", type=float, default=1.0, help="token sampling temperature")
    p.add_argument("--choice_temperature", type=float, default=4.5,
                   help="Gumbel noise on the confidences at step 0, annealed to 0 (MaskGIT)")
    p.add_argument("--negative", default=None, help="negative prompt, used in place of the empty prompt")
    p.add_argument("--num", type=int, default=1, help="images of the prompt, written as one grid")
    p.add_argument("--lowres-out", dest="lowres_out", default=None,
                   help="with super-resolution: also write the base model's low-res image here")
    p.add_argument("--prompts-file", dest="prompts_file", default=None, help="one prompt per line")
    p.add_argument("--outdir", default=None, help="with --prompts-file: writes OUTDIR/000.png, 001.png, ...")
    p.add_argument("--batch_size", type=int, default=16, help="with --prompts-file: prompts per batch")
    p.add_argument("--init", default=None, help="inpainting / outpainting: the image to edit")
    p.add_argument("--mask", default=None, help="inpainting: mask PNG as large as --init, white = regenerate")
    p.add_argument("--outpaint", choices=["left", "right", "top", "bottom"], default=None,
                   help="outpainting: extend --init on this side (the canvas shifts the other way)")
    p.add_argument("--amount", type=float, default=0.25, help="outpainting: fraction of the canvas to add")
    p.add_argument("--edit", default=None, help="mask-free editing: the image to move towards the prompt")
    p.add_argument("--edit-steps", dest="edit_steps", type=int, default=100,
                   help="mask-free editing: iterations (paper: 100)")
    p.add_argument("--edit-fraction", dest="edit_fraction", type=float, default=0.08,
                   help="mask-free editing: fraction of tokens resampled per iteration (paper: 0.08)")
    p.add_argument("--benchmark", nargs="?", const="small", default=None, choices=sorted(muse.PRESETS),
                   help="time sampling of a preset with random weights and print one JSON line")
    args = p.parse_args(argv)
    if args.guidance is None:
        args.guidance = 4.0 if args.edit else 3.0
    if args.benchmark is not None:
        return args
    if args.prompts_file is None and args.prompt is None:
        p.error("give a prompt, --prompts-file F --outdir D, or --benchmark")
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
    return args


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
            n = max(1, round(args.amount * base.model.cfg.grid)) * (c.grid // base.model.cfg.grid)
            shifted, _ = outpaint_tokens(ids.reshape(1, c.grid, c.grid), args.outpaint, n, c.mask_id)
            inits.append(shifted.reshape(1, -1))
    return inits + [None] * (2 - len(inits))


def run(args, base, sr, prompts, seed):
    """Prompts -> (final uint8 images, low-res images or None), in the mode the flags ask."""
    kw = dict(temperature=args.temperature, negative=args.negative)
    B = len(prompts)
    if args.edit:                                # mask-free editing (§2.6.2), at both scales
        lowres, images = None, []
        for i, stage in enumerate([base, sr] if sr else [base]):
            image = load_image(args.edit, stage.vq.cfg.resolution, "--edit")
            ids = jnp.asarray(np.repeat(encode_image(stage, image), B, 0))              # (B, N)
            contexts = encode_prompts(stage.text_encoder, prompts, args.negative)
            ids, _ = muse.edit_jit(stage.model, stage.params, *contexts, jax.random.PRNGKey(seed + i), ids,
                                   iterations=args.edit_steps, fraction=args.edit_fraction, guidance=args.guidance,
                                   temperature=args.temperature, lowres_ids=lowres)
            images.append(ids_to_images(stage.vq, stage.vq_params, ids))
            lowres = ids                        # the super-res edit is conditioned on the edited base tokens
        return images[-1], (images[0] if sr else None)
    init_lo, init_hr = editing_init(args, base, sr) if args.init else (None, None)
    rep = lambda x: None if x is None else jnp.asarray(np.repeat(x, B, 0))
    lo_ids = generate_ids(base.model, base.params, base.text_encoder, prompts, seed=seed, steps=args.steps,
                          guidance=args.guidance, choice_temperature=args.choice_temperature,
                          init_ids=rep(init_lo), **kw)
    lo_images = ids_to_images(base.vq, base.vq_params, lo_ids)
    if sr is None:
        return lo_images, None
    hr_ids = generate_ids(sr.model, sr.params, sr.text_encoder, prompts, seed=seed + 1, steps=args.sr_steps,
                          guidance=args.guidance, choice_temperature=args.choice_temperature,
                          init_ids=rep(init_hr), lowres_ids=lo_ids, **kw)
    return ids_to_images(sr.vq, sr.vq_params, hr_ids), lo_images


def main(argv=None):
    args = parse_args(argv)
    if args.benchmark:
        print(json.dumps(benchmark(args.benchmark)))
        return
    if args.prompts_file:
        try:
            with open(args.prompts_file) as f:
                prompts = [line.strip() for line in f if line.strip()]
        except OSError as e:
            fail(f"cannot read --prompts-file: {e}")
        if not prompts:
            fail(f"{args.prompts_file} holds no prompt")
    base, sr = load_pipeline(args.checkpoint, args.superres)
    if args.prompts_file:
        os.makedirs(args.outdir, exist_ok=True)
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            # pad the last batch to full size so it reuses the compiled program
            padded = chunk + [chunk[-1]] * (args.batch_size - len(chunk))
            images, _ = run(args, base, sr, padded, seed=args.seed + start)
            for i in range(len(chunk)):
                Image.fromarray(images[i]).save(os.path.join(args.outdir, f"{start + i:03d}.png"))
        print(f"wrote {len(prompts)} images to {args.outdir}")
        return
    images, lowres = run(args, base, sr, [args.prompt] * args.num, seed=args.seed)
    cols = math.ceil(math.sqrt(args.num))
    save_grid(images, args.out, cols)
    if args.lowres_out and lowres is not None:
        save_grid(lowres, args.lowres_out, cols)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
