"""How well a super-resolution model reads its low-res tokens, with the base model out of the loop.

    python scripts/sr_probe.py checkpoints/demo/superres [--num 64] [--grid out.png]

Renders --num shapes scenes (seed 123) at both resolutions, tokenizes them with the run's own
tokenizers, and asks the super-res model for every high-res token at once (all masked, one
forward, argmax) given the true low-res tokens and the caption. Prints the token accuracy
(overall, and on tokens other than the most common one, the background), and the fraction
of the decoded images that pass `evaluate.check_image` against their caption. A diagnostic:
the model is not meant to decode in one step, but a model that cannot name a shape from
true low-res tokens cannot name it from generated ones either.
"""
import argparse
import json
import os
import sys

import numpy as np
import jax.numpy as jnp
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint, evaluate, muse, shapes, vqgan  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("checkpoint")
p.add_argument("--num", type=int, default=64)
p.add_argument("--grid", default=None, help="write originals above one-step outputs (first 8)")
args = p.parse_args()

ck = checkpoint.read_checkpoint(args.checkpoint)
cfg = ck["config"]
if cfg["stage"] != "superres":
    checkpoint.fail(f"{args.checkpoint} is a {cfg['stage']!r} checkpoint, not superres")
model = muse.MaskedTransformer(muse.MuseConfig(**cfg["muse"]))
lo_vq, hr_vq = (vqgan.VQGAN(vqgan.VQGANConfig(**cfg[k])) for k in ("vqgan", "vqgan_hr"))
enc = checkpoint.load_text_encoder(cfg, ck["consts"]["t5"], args.checkpoint)
n = args.num
hr_images, captions = shapes.shapes_batch(123, 0, n, hr_vq.cfg.resolution)
lo_images, _ = shapes.shapes_batch(123, 0, n, lo_vq.cfg.resolution)
lo = np.asarray(vqgan.encode_jit(lo_vq, ck["consts"]["vqgan"], vqgan.from_uint8(lo_images))).reshape(n, -1)     # (n, Nlo)
hr = np.asarray(vqgan.encode_jit(hr_vq, ck["consts"]["vqgan_hr"], vqgan.from_uint8(hr_images))).reshape(n, -1)  # (n, N)
emb, mask = enc(captions)
masked = jnp.full(hr.shape, model.cfg.mask_id, jnp.int32)
pred = np.asarray(model.apply({"params": ck["params"]}, masked, emb, mask, lo).argmax(-1))           # (n, N)
background = np.bincount(hr.ravel()).argmax()
g = model.cfg.grid                                                                            # high-res grid side
out = vqgan.to_uint8(np.asarray(vqgan.decode_jit(hr_vq, ck["consts"]["vqgan_hr"], jnp.asarray(pred).reshape(n, g, g))))
passed = [evaluate.check_image(o, c)[0] for o, c in zip(out, captions)]
print(json.dumps({"checkpoint": args.checkpoint, "step": int(ck["step"]), "examples": n,
                  "token_acc": float((pred == hr).mean()), "non_background_acc": float((pred == hr)[hr != background].mean()),
                  "one_step_pass": float(np.mean(passed))}))
if args.grid:
    grid = np.concatenate([np.concatenate(list(hr_images[:8]), 1), np.concatenate(list(out[:8]), 1)], 0)
    Image.fromarray(grid).save(args.grid)
