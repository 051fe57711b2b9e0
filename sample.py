"""Text to image with a trained Muse checkpoint: encode the prompt, decode in parallel, detokenize.

    python sample.py "a red circle above a blue square" --out out.png
    python sample.py "two green triangles" --num 16 --guidance 4 --out grid.png
    python sample.py --prompts-file prompts.txt --outdir samples/     # samples/000.png, 001.png, ...
    python sample.py --benchmark small                                  # speed, one JSON line

The checkpoint (--checkpoint, a workdir of `train.py base`) holds everything needed: the
transformer, the frozen VQGAN and the frozen text encoder, and their configs. Sampling
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


def generate(model, params, vq_model, vq_params, text_encoder, prompts, seed=0, steps=24, guidance=3.0,
             temperature=1.0, choice_temperature=4.5, negative=None):
    """Prompts -> uint8 images (B, S, S, 3). The prompts are encoded once, not once per step."""
    B = len(prompts)
    ctx, ctx_mask = text_encoder(prompts)                                  # (B, L, Dt), (B, L)
    uncond, uncond_mask = text_encoder([negative or ""] * B)               # empty or negative prompt
    ids, _ = muse.decode_jit(model, params, ctx, ctx_mask, uncond, uncond_mask, jax.random.PRNGKey(seed),
                             steps=steps, guidance=guidance, temperature=temperature,
                             choice_temperature=choice_temperature)       # (B, N)
    g = model.cfg.grid
    images = vqgan.decode_jit(vq_model, vq_params, ids.reshape(B, g, g))  # (B, S, S, 3) in [-1, 1]
    return vqgan.to_uint8(images)


def load_pipeline(path):
    """A base checkpoint -> (transformer, its params, VQGAN, its params, text encoder)."""
    ckpt = read_checkpoint(path)
    config = ckpt["config"]
    if config.get("stage") != "base":
        fail(f"{path} holds a {config.get('stage')!r} checkpoint; sampling needs a base one (`train.py base`)")
    try:
        model = muse.MaskedTransformer(muse.MuseConfig(**config["muse"]))
        vq_model = vqgan.VQGAN(vqgan.VQGANConfig(**config["vqgan"]))
        t5_cfg = muse.T5Config(**config["t5"])
        if config["tokenizer"] == "byt5":
            tokenizer = muse.byte_tokenizer()
        else:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, config["tokenizer"]))
        text_encoder = muse.TextEncoder(t5_cfg, ckpt["consts"]["t5"], tokenizer, config["text_length"])
        return model, ckpt["params"], vq_model, ckpt["consts"]["vqgan"], text_encoder
    except (KeyError, TypeError, OSError) as e:
        fail(f"{path}: incompatible checkpoint ({type(e).__name__}: {e})")


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
    params = model.init(rng, ids, ctx, mask)["params"]

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
    p = Parser(prog="sample.py", description="Text to image with a trained Muse checkpoint.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?", help="what to draw")
    p.add_argument("--out", default="out.png", help="output PNG (a grid when --num > 1)")
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="workdir of `train.py base`")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--steps", type=int, default=24, help="parallel decoding steps (paper: 24 for the base model)")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (0: off)")
    p.add_argument("--temperature", type=float, default=1.0, help="token sampling temperature")
    p.add_argument("--choice_temperature", type=float, default=4.5,
                   help="Gumbel noise on the confidences at step 0, annealed to 0 (MaskGIT)")
    p.add_argument("--negative", default=None, help="negative prompt, used in place of the empty prompt")
    p.add_argument("--num", type=int, default=1, help="images of the prompt, written as one grid")
    p.add_argument("--prompts-file", dest="prompts_file", default=None, help="one prompt per line")
    p.add_argument("--outdir", default=None, help="with --prompts-file: writes OUTDIR/000.png, 001.png, ...")
    p.add_argument("--batch_size", type=int, default=16, help="with --prompts-file: prompts per batch")
    p.add_argument("--benchmark", nargs="?", const="small", default=None, choices=sorted(muse.PRESETS),
                   help="time sampling of a preset with random weights and print one JSON line")
    args = p.parse_args(argv)
    if args.benchmark is None:
        if args.prompts_file is None and args.prompt is None:
            p.error("give a prompt, --prompts-file F --outdir D, or --benchmark")
        if args.prompts_file and not args.outdir:
            p.error("--prompts-file needs --outdir")
        if args.prompt is not None and not args.prompt.strip():
            p.error("the prompt is empty")
        if args.steps < 1 or args.num < 1 or args.batch_size < 1:
            p.error("--steps, --num and --batch_size must be at least 1")
    return args


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
    model, params, vq_model, vq_params, text_encoder = load_pipeline(args.checkpoint)
    kw = dict(steps=args.steps, guidance=args.guidance, temperature=args.temperature,
              choice_temperature=args.choice_temperature, negative=args.negative)
    if args.prompts_file:
        os.makedirs(args.outdir, exist_ok=True)
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start:start + args.batch_size]
            # pad the last batch to full size so it reuses the compiled program
            padded = chunk + [chunk[-1]] * (args.batch_size - len(chunk))
            images = generate(model, params, vq_model, vq_params, text_encoder, padded,
                              seed=args.seed + start, **kw)
            for i in range(len(chunk)):
                Image.fromarray(images[i]).save(os.path.join(args.outdir, f"{start + i:03d}.png"))
        print(f"wrote {len(prompts)} images to {args.outdir}")
        return
    images = generate(model, params, vq_model, vq_params, text_encoder, [args.prompt] * args.num,
                      seed=args.seed, **kw)
    save_grid(images, args.out, cols=math.ceil(math.sqrt(args.num)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
