"""Text to image with a trained Muse checkpoint: encode the prompt, decode in parallel, detokenize.

    python sample.py "a red circle above a blue square" --out out.png
    python sample.py "two green triangles" --num 16 --guidance 4 --out grid.png
    python sample.py --prompts-file prompts.txt --outdir samples/     # samples/000.png, 001.png, ...
    python sample.py --benchmark small                                  # speed, one JSON line

    # zero-shot editing (§3.3): no fine-tuning, the same decoder started from an image's tokens
    python sample.py "a blue square" --init in.png --mask mask.png --out out.png     # inpainting
    python sample.py "a red circle" --init in.png --outpaint right --amount 0.25     # outpainting
    python sample.py "a green circle" --edit in.png --edit-steps 100                 # mask-free editing

The checkpoint (--checkpoint, a workdir of `train.py base`) holds everything needed: the
transformer, the frozen VQGAN and the frozen text encoder, and their configs. A folder
with `base/` and `superres/` (or --superres DIR) runs base -> super-resolution (§2.4). Sampling
(§2.8 of the paper) is `muse.decode`: one jit-compiled loop of --steps forward passes, each
revealing the most confident tokens on a cosine schedule, with classifier-free guidance
whose scale ramps linearly up to --guidance; --negative replaces the empty prompt of the
unconditional pass with a prompt to steer away from.
"""
import argparse
import collections
import functools
import glob
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import jax
import jax.numpy as jnp
from flax import serialization
from PIL import Image

import data
import muse
import vqgan

# XLA on CPU compiles the default ("partitionable") threefry PRNG slowly: ~2.4 s instead of
# ~0.3 s for one draw of a few thousand numbers, which dominates start-up on a laptop.
# Sampling, and training (train.py imports this module, and so this setting), draw with
# per-example keys and never shard one random draw across devices, which is all the
# partitionable variant is for.
jax.config.update("jax_threefry_partitionable", False)

# the shipped demo pipeline (README.md, "The demo checkpoint"), found wherever sample.py is run from
DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints", "demo")


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
    # shipped checkpoints store their weights in float16 (`train.py export`); compute in float32
    return jax.tree.map(lambda x: x.astype(np.float32) if getattr(x, "dtype", None) == np.float16 else x, ckpt)


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
    config: dict                                # the run's full config (train.py new_run)


def encode_prompts(text_encoder, prompts, negative=None):
    """The conditional and the unconditional context of a batch, each (B, L, Dt) + mask (B, L).

    The unconditional pass reads the empty prompt, or the negative prompt in its place.
    """
    ctx, ctx_mask = text_encoder(prompts)
    uncond, uncond_mask = text_encoder([negative or ""] * len(prompts))
    return ctx, ctx_mask, uncond, uncond_mask


def generate_ids(model, params, text_encoder, prompts, seed=0, first=0, steps=24, guidance=3.0, temperature=0.5,
                 choice_temperature=2.0, negative=None, init_ids=None, lowres_ids=None):
    """Prompts -> token ids (B, N) by parallel decoding. The prompts are encoded once per call;
    the defaults are the command line's for the base model (parse_args says why).

    Row i's random draws come from fold_in(PRNGKey(seed), first + i): `first` is the index of
    this call's first prompt in the whole job, so a prompt gets the same image whatever the
    batch size (--batch_size, --evaluate). init_ids (B, N) with [MASK]s: editing (only the
    masked tokens are generated); lowres_ids (B, Nlo): the low-res tokens a super-resolution
    model is conditioned on.
    """
    contexts = encode_prompts(text_encoder, prompts, negative)             # encoded once, not per step
    rngs = muse.example_keys(jax.random.PRNGKey(seed), first, len(prompts))                   # (B,) keys
    ids, _ = muse.decode_jit(model, params, *contexts, rngs,
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
        vq_cfg = vqgan.VQGANConfig(**dict(config[out], im2col=False))   # no gradients here (Conv3x3)
        # a model trained with cuDNN's fused attention (train.py --attention cudnn) samples with
        # XLA's, the same maths, wherever there is no GPU
        attention = config["muse"].get("attention", "xla") if jax.default_backend() == "gpu" else "xla"
        cfg = muse.MuseConfig(**dict(config["muse"], attention=attention))
        return Stage(muse.MaskedTransformer(cfg), ckpt["params"],
                     vqgan.VQGAN(vq_cfg), ckpt["consts"][out],
                     load_text_encoder(config, ckpt["consts"]["t5"], folder), config)
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
# Editing without fine-tuning (§3.3): inpainting, outpainting, mask-free editing
# -----------------------------------------------------------------------------

def centre_square(a):
    """The central square of an (H, W, ...) array: how an inpainting mask is cropped (the same
    square data.center_crop takes of the --init image)."""
    h, w = a.shape[:2]
    side = min(h, w)
    return a[(h - side) // 2:(h - side) // 2 + side, (w - side) // 2:(w - side) // 2 + side]


def load_image(path, resolution, what="--init"):
    """An image file -> float32 (S, S, 3) in [-1, 1], centre-cropped to a square and resized."""
    try:
        img = Image.open(path).convert("RGB")
    except (OSError, ValueError) as e:
        fail(f"{what} {path}: not a readable image ({e})")
    return vqgan.from_uint8(data.center_crop(img, resolution))


def load_mask(path, image_path):
    """A mask PNG (white = regenerate), as large as the --init image -> bool (S, S): its
    centre square, the part of the image that load_image keeps."""
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
    return encode_images(stage, image[None])


def encode_images(stage, images, chunk=64):
    """float (B, S, S, 3) in [-1, 1] -> int32 token ids (B, N), `chunk` images at a time."""
    ids = [vqgan.encode_jit(stage.vq, stage.vq_params, images[i:i + chunk]) for i in range(0, len(images), chunk)]
    return np.concatenate([np.asarray(x).reshape(len(x), -1) for x in ids])


# Dense bfloat16 matmul peaks (no sparsity) in TFLOP/s, by a substring of jax's device_kind,
# from the vendors' datasheets (H100 / H200 SXM: 989; A100: 312; TPU v4: 275; v5e: 197;
# v5p: 459). The same figure is used whatever --dtype is: MFU is quoted against the
# bfloat16 peak, so a float32 run shows how much it leaves on the table. First match wins,
# so "v5p" is listed before the v5e spellings.
PEAK_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("TPU v4", 275.0),
               ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("v5e", 197.0))


@functools.lru_cache(maxsize=None)
def peak_flops():
    """-> (FLOP/s, where the figure comes from) of the first device, the denominator of MFU.

    A known accelerator gets its datasheet bfloat16 peak (PEAK_TFLOPS). Anything else (a
    CPU, an unknown GPU) gets a measurement: the median of several 2048x2048 float32
    matmuls, a practical ceiling for the dense work a training step is made of. Cached, so
    train.py and sample.py measure at most once per process.
    """
    device = jax.devices()[0]
    for name, tflops in PEAK_TFLOPS:
        if name in device.device_kind:
            return tflops * 1e12, f"datasheet bf16 dense peak of {name}"
    n = 2048
    a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))            # compile
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times), f"measured {n}x{n} float32 matmul on {device.device_kind}"


def op_category(text):
    """What kind of work an op does, from its line in the compiled HLO (or its kernel's name).

    Reads the op's own name, opcode and attributes, and the jax primitive it came from (the
    last word of its metadata's op_name): not its operands, nor the rest of the op_name path,
    which says "transpose(jvp(...))" for every op of the backward pass."""
    m = re.match(r"%?(\S+) = .*? ([\w-]+)\([^)]*\)(.*)", text)
    name, opcode, attrs = m.groups() if m else (text, "", "")
    primitive = re.search(r'op_name="[^"]*?([\w-]+)"', attrs)
    primitive = primitive.group(1) if primitive else ""
    own = f"{name} {opcode} {re.sub(r'metadata=[{][^}]*[}]', '', attrs)} {primitive}"
    if "command_buffer" in own:                # XLA ran a stretch of kernels as one CUDA graph
        return "CUDA graph (its kernels show with XLA_FLAGS=--xla_gpu_enable_command_buffer=)"
    if any(k in own for k in ("fmha", "sdpa", "flash")):
        return "attention (cuDNN fused)"
    if any(k in own for k in ("gemm", "matmul", "dot_general", "nvjet", "cutlass")) or opcode in ("dot", "convolution"):
        return "matmul"
    if name.startswith(("copy", "transpose")) or opcode in ("copy", "transpose") or primitive == "transpose":
        return "copies / transposes"
    if "kind=kInput" in own or "reduce" in own:
        return "reductions (softmax, norms, loss, grad norm)"
    if "kind=kLoop" in own or "fusion" in name:
        return "elementwise (loop fusions)"
    return "other"


def profile_report(trace_dir, hlo_text, steps):
    """Device time per step of each op of the compiled step, from a jax.profiler trace.

    Reads the trace back with jax.profiler.ProfileData (no TensorBoard needed). On a GPU the
    device's stream lines hold one event per kernel (named by its XLA op, stat `hlo_op`, or
    else by the kernel); on a TPU the "XLA Ops" line; on a CPU the host's XLA thunks. Each
    op's time is summed and put in a category from its line in the compiled HLO (`hlo_text`).
    Writes trace_dir/ops.txt (the categories, then the 60 costliest ops with their HLO) and
    returns {category: ms per step}, plus "total" (the device's busy time per step).
    """
    path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    hlo = {}                                    # op name -> its instruction line
    for line in hlo_text.splitlines():
        line = line.strip().removeprefix("ROOT ")
        if " = " in line:
            hlo.setdefault(line.split(" = ")[0].lstrip("%"), line)
    planes = list(jax.profiler.ProfileData.from_file(path).planes)
    devices = [p for p in planes if p.name.startswith("/device:")]
    per_op, lines_seen = collections.Counter(), []
    for plane in devices or planes:
        lines = list(plane.lines)
        lines_seen += [f"{plane.name} / {line.name}" for line in lines]
        if devices:                             # kernels per stream (GPU), else the op line (TPU)
            streams = [line for line in lines if line.name.startswith("Stream")]
            lines = streams or [line for line in lines if line.name == "XLA Ops"]
        for line in lines:
            for event in line.events:
                op = next((v for k, v in event.stats if k == "hlo_op"), None) or (event.name if devices else None)
                if op is not None:
                    per_op[op] += event.duration_ns / 1e6 / steps
    category = lambda op: op_category(hlo.get(op, op))
    by_category = collections.Counter()
    for op, ms in per_op.items():
        by_category[category(op)] += ms
    report = {k: round(v, 3) for k, v in by_category.most_common()}
    report["total"] = round(sum(per_op.values()), 3)
    with open(os.path.join(trace_dir, "ops.txt"), "w") as f:
        f.write(f"device time per step (ms) over {steps} traced steps, from {path}\n\n")
        f.writelines(f"{v:10.3f}  {k}\n" for k, v in report.items())
        f.write("\nthe 60 costliest ops:\n")
        f.writelines(f"{ms:10.3f}  {category(op)}  {op}  {hlo.get(op, '')[:400]}\n"
                     for op, ms in per_op.most_common(60))
        f.write("\ntrace lines:\n" + "\n".join(lines_seen) + "\n")
    return report


def benchmark(preset, batch=8, steps=24, text_length=32, repeats=5, dtype="float32", profile=None):
    """Time sampling with random weights (no checkpoint needed); returns a dict for JSON.

    Reports the time of one guided forward (conditional + unconditional as one doubled
    batch) beside the time per decoding step, so the decode loop's own overhead shows, and
    the analytic FLOPs of the work (muse.transformer_flops: each decoding step is one
    forward over the doubled batch) against the device's peak (peak_flops). dtype: the
    transformer's compute dtype ("float32" or "bfloat16"; the weights stay float32).
    profile: a folder to trace one more decode into; adds the device time per decoding
    step of each kind of op (profile_report).
    """
    cfg = replace(muse.PRESETS[preset], dtype=dtype)
    model = muse.MaskedTransformer(cfg)
    rng = jax.random.PRNGKey(0)
    ctx = jax.random.normal(rng, (batch, text_length, cfg.text_dim))
    mask = jnp.ones((batch, text_length), bool)
    ids = jnp.full((batch, cfg.num_tokens), cfg.mask_id, jnp.int32)
    params = model.init(rng, ids, ctx, mask)["params"]           # eager: see train.py train()

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
    rngs = jax.random.split(rng, batch)
    t_batch, compile_s = timed(lambda: muse.decode_jit(model, params, ctx, mask, ctx, mask, rngs, steps=steps)[0])
    flop_step = muse.transformer_flops(cfg, 2 * batch, text_length)     # guidance doubles the batch
    achieved = steps * flop_step / t_batch                               # FLOP/s over the whole decode
    peak, peak_source = peak_flops()
    report = {}
    if profile:
        os.makedirs(profile, exist_ok=True)
        try:                                    # (a profiler that fails costs the profile, not the timing)
            with jax.profiler.trace(profile):
                jax.block_until_ready(muse.decode_jit(model, params, ctx, mask, ctx, mask, rngs, steps=steps)[0])
            hlo = muse.decode_jit.lower(model, params, ctx, mask, ctx, mask, rngs, steps=steps).compile().as_text()
            report = {"profile": profile_report(profile, hlo, steps)}
        except Exception as e:
            report = {"profile_error": f"{type(e).__name__}: {e}"[:300]}
    return {"preset": preset, "dtype": dtype, "batch": batch, "steps": steps, "images_per_sec": batch / t_batch,
            "sec_per_batch": t_batch, "ms_per_step": 1e3 * t_batch / steps, "ms_per_forward": 1e3 * t_fwd,
            "loop_overhead": t_batch / (steps * t_fwd) - 1, "compile_s": compile_s,
            "params": sum(x.size for x in jax.tree.leaves(params)),
            "gflop_per_step": flop_step / 1e9, "gflop_per_batch": steps * flop_step / 1e9,
            "achieved_tflops": achieved / 1e12, "peak_tflops": peak / 1e12, "mfu": achieved / peak,
            "peak_source": peak_source, "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(), **report}


# -----------------------------------------------------------------------------
# Evaluation on the shapes world: a checker that reads pixels only (SHAPES.md)
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
    import shapes
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
    """`sample.py --evaluate shapes`: how often the pipeline draws what the prompt says.

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
    import shapes
    final = sr or base
    S = final.vq.cfg.resolution
    holdout = shapes.parse_holdout(base.config["train"].get("holdout", ""))
    prompts = evaluation_prompts(args.num, args.seed, holdout)
    captions = [c for _, c, _ in prompts]
    renders = np.stack([shapes.render(objects, S) for _, _, objects in prompts])        # (P, S, S, 3) uint8
    recon = ids_to_images(final.vq, final.vq_params, encode_images(final, vqgan.from_uint8(renders)))
    rows = [("renders", renders), ("reconstructions", recon)]
    if sr:
        S_lo = base.vq.cfg.resolution
        lo_ids = encode_images(base, vqgan.from_uint8(np.stack([shapes.render(o, S_lo) for _, _, o in prompts])))

        superres = lambda chunk, first: superres_stage(
            args, sr, [c for c, _ in chunk], jnp.asarray(np.stack([ids for _, ids in chunk])), args.seed, first)
        rows.append(("super-res only", in_batches(args, list(zip(captions, lo_ids)), superres)))
    generate = lambda chunk, first: run(args, base, sr, chunk, args.seed, first)[0]
    rows.append(("generated", in_batches(args, captions, generate)))
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
    # Sampling the base model's tokens at temperature 0.5 rather than 1 (measured on the demo,
    # `--evaluate shapes`, 240 prompts, guidance 3, choice temperature 4.5): 90.5% passed against 84.5%,
    # 0.2 also gave 90.5% but fewer held-out relations (57.5% against 72.5%), and guidance 5
    # at 0.5 gave 79.5%. Sharper token choices give crisper corners, hence fewer squares read
    # as circles; pass --temperature 1 for the full diversity of the model's distribution.
    p.add_argument("--temperature", type=float, default=0.5, help="token sampling temperature")
    # The super-res stage's own defaults (measured on the demo, `--evaluate shapes`, 240 prompts):
    # its low-res tokens leave little to choose, and sampling its tokens at temperature 1 with
    # guidance 3 left ragged edges that turned squares into circles: 32.0% of prompts passed,
    # against 38.5% at temperature 0.1 and 43.5% at temperature 0.1 without guidance.
    p.add_argument("--sr_guidance", type=float, default=0.0,
                   help="super-res guidance (the text still conditions it; 0: no extra push)")
    p.add_argument("--sr_temperature", type=float, default=0.1, help="super-res token sampling temperature")
    # 2 rather than MaskGIT's 4.5 (measured on the demo, both stages sharing it): 92.5% against
    # 90.5% of the 240 seed-0 prompts, 90.8% against 88.0% of 600 seed-1 prompts; less random
    # choice of which tokens to keep early leaves fewer blunted shapes
    p.add_argument("--choice_temperature", type=float, default=2.0,
                   help="Gumbel noise on the confidences at step 0, annealed to 0 (MaskGIT)")
    p.add_argument("--negative", default=None, help="negative prompt, used in place of the empty prompt")
    p.add_argument("--num", type=int, default=None,
                   help="images of the prompt, written as one grid (default 1; --evaluate: prompts, default 200)")
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
    p.add_argument("--evaluate", choices=["shapes"], default=None,
                   help="score --num prompts (default 200) of the shapes world with a pixel checker; "
                        "with --outdir, also write the images and results.jsonl there")
    p.add_argument("--benchmark", nargs="?", const="small", default=None, choices=sorted(muse.PRESETS),
                   help="time sampling of a preset with random weights and print one JSON line")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="--benchmark: the transformer's compute dtype (weights stay float32)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="--benchmark: also trace one decode into DIR and add the device time per decoding step "
                        "of each kind of op (matmul, elementwise, ...) to the JSON; DIR/ops.txt lists the costliest")
    args = p.parse_args(argv)
    if args.guidance is None:
        args.guidance = 4.0 if args.edit else 3.0
    if args.num is None:
        args.num = 200 if args.evaluate else 1
    if args.profile and args.benchmark is None:
        p.error("--profile goes with --benchmark (it traces the benchmark's decode)")
    if args.benchmark is not None:
        return args
    if args.evaluate and (args.prompt or args.prompts_file):
        p.error("--evaluate draws its own prompts: give no prompt or --prompts-file")
    if args.prompts_file is None and args.prompt is None and not args.evaluate:
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
    if modes and (args.prompts_file or args.evaluate):
        p.error(f"editing works on one prompt, not --{'prompts-file' if args.prompts_file else 'evaluate'}")
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
    first: the index of prompts[0] in the whole job (generate_ids)."""
    B = len(prompts)
    if args.edit:                                # mask-free editing (§3.3.2), at both scales
        lowres, images = None, []
        for i, stage in enumerate([base, sr] if sr else [base]):
            image = load_image(args.edit, stage.vq.cfg.resolution, "--edit")
            ids = jnp.asarray(np.repeat(encode_image(stage, image), B, 0))              # (B, N)
            contexts = encode_prompts(stage.text_encoder, prompts, args.negative)
            rngs = muse.example_keys(jax.random.PRNGKey(seed + i), first, B)            # (B,) keys, as generate_ids
            guidance, temperature = (args.guidance, args.temperature) if i == 0 else (args.sr_guidance,
                                                                                      args.sr_temperature)
            ids, _ = muse.edit_jit(stage.model, stage.params, *contexts, rngs, ids, iterations=args.edit_steps,
                                   fraction=args.edit_fraction, guidance=guidance, temperature=temperature,
                                   lowres_ids=lowres)
            images.append(ids_to_images(stage.vq, stage.vq_params, ids))
            lowres = ids                        # the super-res edit is conditioned on the edited base tokens
        return images[-1], (images[0] if sr else None)
    init_lo, init_hr = editing_init(args, base, sr) if args.init else (None, None)
    rep = lambda x: None if x is None else jnp.asarray(np.repeat(x, B, 0))
    lo_ids = base_ids(args, base, prompts, seed, first, init_ids=rep(init_lo))
    if sr is None:
        return ids_to_images(base.vq, base.vq_params, lo_ids), None
    # the low-res images are decoded only when asked for (--lowres-out): a decoder compile is ~1 s
    lo_images = ids_to_images(base.vq, base.vq_params, lo_ids) if args.lowres_out else None
    return superres_stage(args, sr, prompts, lo_ids, seed, first, init_ids=rep(init_hr)), lo_images


def base_ids(args, base, prompts, seed, first=0, init_ids=None):
    """run()'s base stage: prompts -> low-res ids (B, Nlo), at the base model's flags."""
    return generate_ids(base.model, base.params, base.text_encoder, prompts, seed, first, steps=args.steps,
                        guidance=args.guidance, temperature=args.temperature,
                        choice_temperature=args.choice_temperature, negative=args.negative, init_ids=init_ids)


def superres_ids(args, sr, prompts, lowres_ids, seed, first=0, init_ids=None):
    """run()'s super-res stage: low-res ids (B, Nlo) + prompts -> high-res ids (B, N), at the
    --sr_* flags, seeded seed + 1 (the base stage takes seed)."""
    return generate_ids(sr.model, sr.params, sr.text_encoder, prompts, seed + 1, first, steps=args.sr_steps,
                        guidance=args.sr_guidance, temperature=args.sr_temperature,
                        choice_temperature=args.choice_temperature, negative=args.negative,
                        init_ids=init_ids, lowres_ids=lowres_ids)


def superres_stage(args, sr, prompts, lowres_ids, seed, first=0, init_ids=None):
    """superres_ids, decoded to uint8 high-res images. `--evaluate` also feeds it the renders'
    true low-res tokens."""
    return ids_to_images(sr.vq, sr.vq_params, superres_ids(args, sr, prompts, lowres_ids, seed, first, init_ids))


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


def main(argv=None):
    args = parse_args(argv)
    if args.benchmark:
        print(json.dumps(benchmark(args.benchmark, dtype=args.dtype, profile=args.profile)))
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
    if args.evaluate:
        print(json.dumps(evaluate(args, base, sr)))
        return
    if args.prompts_file:
        os.makedirs(args.outdir, exist_ok=True)
        generate = lambda chunk, first: run(args, base, sr, chunk, args.seed, first)[0]
        for i, image in enumerate(in_batches(args, prompts, generate)):
            Image.fromarray(image).save(os.path.join(args.outdir, f"{i:03d}.png"))
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
