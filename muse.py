"""Muse: text-to-image generation via masked generative transformers, in one file.

Chang et al. 2023, "Muse: Text-To-Image Generation via Masked Generative Transformers"
(arXiv:2301.00704). Read it beside this file; section numbers below refer to it.

The pipeline (Fig. 3 of the paper):
  1. a VQGAN (vqgan.py) turns a 256x256 image into a 16x16 grid of codebook ids (§2.2);
  2. a frozen T5 encoder turns the prompt into a sequence of embeddings (§2.1);
  3. a bidirectional transformer sees the ids with a random subset replaced by [MASK],
     cross-attends to the text, and predicts the masked ids (§2.3, §2.6);
  4. at sampling time, parallel decoding starts from an all-[MASK] grid and, in a few
     steps (24 for the base model), keeps the most confident predictions and re-masks
     the rest on a cosine schedule (§2.8, from MaskGIT, Chang et al. 2022), with
     classifier-free guidance (§2.7).

This file holds, in the paper's order: the masked transformer (§2.3) and its
super-resolution variant (§2.4); the training objective (§2.6, with §2.7's dropped text);
parallel decoding (§2.8), `generate` (prompts -> token ids) and mask-free editing (§3.3);
a speed path for CPUs; and last, the frozen T5 text encoder with its checkpoint loading,
plumbing the paper takes for granted. §2.5's decoder fine-tuning (a larger VQGAN decoder
trained on the frozen tokens) is a tokenizer matter: vqgan.py, `train.py vqgan
--finetune_decoder`. train.py trains this model (`python train.py base ...`), sample.py samples it
(`python sample.py "a red circle"`).

Shape legend (used in every shape comment):
  B  batch                          N  image tokens = h * w (the VQGAN grid)
  L  text tokens (padded length)    D  transformer width
  Dt T5 width (d_model)             K  codebook size; id K is [MASK]
  H  attention heads                dh width of one head
  T  decoding steps                 M  context tokens cross-attended to: L, or L + Nlo
  Nlo  low-res tokens of the super-resolution model (its conditioning grid)
  S  image side in pixels
"""
import functools
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

# transformers (the tokenizers) warns at import that PyTorch is absent: nothing here uses it
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


# -----------------------------------------------------------------------------
# The masked transformer (§2.3, §2.4)
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class MuseConfig:
    codebook_size: int = 512       # K: ids 0..K-1 are VQGAN codes, id K is [MASK]
    grid: int = 8                  # h = w of the VQGAN token grid; N = grid ** 2
    width: int = 256               # D
    depth: int = 4                 # transformer blocks
    heads: int = 4                 # H
    head_dim: int = 64             # dh
    mlp_ratio: int = 4             # MLP hidden width = mlp_ratio * D
    text_dim: int = 64             # Dt: width of the T5 embeddings, projected to D
    text_length: int = 64          # L: longest prompt in tokens (the text gets learned positions)
    label_smoothing: float = 0.1   # on the masked-token cross-entropy
    cond_drop: float = 0.1         # fraction of examples trained on the empty prompt (§2.7)
    # super-resolution (§2.4): a model with lowres_grid > 0 is also conditioned on the
    # low-resolution token grid of the base model's tokenizer
    lowres_grid: int = 0           # side of the low-res token grid (0: a base model)
    lowres_codebook_size: int = 0  # K of the low-res tokenizer
    lowres_depth: int = 2          # self-attention layers over the low-res tokens
    # Departure (off in the paper's configuration): also add the encoded low-res tokens,
    # upsampled to the high-res grid, to the high-res token embeddings. In the paper the
    # high-res tokens only *cross-attend* to the low-res ones (Fig. 4), so a model must learn
    # from data which low-res token lies under each high-res one; at the paper's scale that
    # is cheap, but a small model trained for minutes on a CPU learns it slowly. Adding the
    # aligned encoding gives every position its own low-res neighbourhood for free.
    lowres_aligned: bool = False
    # compute dtype, "float32" or "bfloat16": mixed precision with float32 master weights.
    # The params stay float32 (Flax's param_dtype default) and are cast to this dtype inside
    # each layer; layer norms reduce in float32 and the logits come back as float32, so the
    # softmax, the loss and the optimizer never see bfloat16.
    dtype: str = "float32"
    # attention kernel, jax.nn.dot_product_attention's `implementation`: "xla" is XLA's own
    # softmax(QK^T)V (jax's default, any device); "cudnn" is cuDNN's fused flash-attention
    # kernel (NVIDIA GPUs with bfloat16/float16 compute only), which never writes the
    # (B, H, N, M) attention weights to memory. Same maths, so checkpoints work under either.
    attention: str = "xla"
    # training memory (train.py --remat): keep only each block's input for the backward pass
    # and recompute the rest of the block from it (jax.checkpoint, saving nothing inside the
    # block), so activations cost one (B, N, D) per block instead of a dozen, for one more
    # forward pass (~1/3 more compute). No effect on the outputs or the weights' names.
    remat: bool = False

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def num_tokens(self) -> int:   # N
        return self.grid * self.grid


PRESETS = {
    # seconds on a CPU: the tests
    "tiny": MuseConfig(codebook_size=64, grid=4, width=64, depth=2, heads=2, head_dim=32, text_dim=64),
    # the default of `train.py base` on the built-in shapes world
    "shapes": MuseConfig(codebook_size=512, grid=8, width=256, depth=4, heads=4, head_dim=64),
    # the shipped demo (checkpoints/demo): base and super-resolution models whose float16
    # checkpoints fit in a few tens of MB and sample in seconds on a laptop CPU
    "demo": MuseConfig(codebook_size=512, grid=8, width=256, depth=6, heads=4, head_dim=64),
    "demo_sr": MuseConfig(codebook_size=512, grid=16, width=192, depth=4, heads=3, head_dim=64, lowres_depth=1,
                          lowres_aligned=True),
    # the CPU recipe's models (scripts/train_demo.sh cpu): with minutes of a 2-core CPU it is
    # the budget, not the model, that limits, so models at two fifths and half of the FLOPs per
    # image of `demo` and `demo_sr` see twice the images in the same time, and score higher
    # (docs/results.md, "The CPU recipe"): as for language models, a small budget is best
    # spent on a smaller model and more data.
    "demo_cpu": MuseConfig(codebook_size=512, grid=8, width=192, depth=4, heads=3, head_dim=64),
    "demo_sr_cpu": MuseConfig(codebook_size=512, grid=16, width=128, depth=4, heads=2, head_dim=64, lowres_depth=1,
                              lowres_aligned=True),
    # two sizes to time against the PyTorch reference, muse-maskgit-pytorch (bench.py)
    "small": MuseConfig(codebook_size=512, grid=8, width=256, depth=4, heads=4, head_dim=64, text_dim=256),
    "medium": MuseConfig(codebook_size=512, grid=16, width=512, depth=8, heads=4, head_dim=64, text_dim=256),
    # Paper scale (§3: a 632M-parameter base transformer and a 3B one; 8192 codes, a 16x16 grid
    # at 256 px, T5-XXL's 4096-wide embeddings). Depth and width are chosen so that the
    # parameter count matches: a block holds 16 D^2 weights (self-attention 4 D^2,
    # cross-attention 4 D^2 since the text is projected to D first, MLP 8 D^2), so
    #   base:  36 blocks at D = 1024:  36 * 16.8M + embeddings, text projection, head = 625.8M
    #   large: 48 blocks at D = 2048:  48 * 67.1M + ...                                   = 3.26B
    # (exact counts from `jax.eval_shape` of the init, text_length 64). With float32 master
    # weights and AdamW a parameter costs ~16 bytes (weights, two moments, gradients), so
    # under pure data parallelism `large` needs ~52 GB per device before activations.
    "base": MuseConfig(codebook_size=8192, grid=16, width=1024, depth=36, heads=16, head_dim=64, text_dim=4096),
    "large": MuseConfig(codebook_size=8192, grid=16, width=2048, depth=48, heads=32, head_dim=64, text_dim=4096),
}


class Attention(nn.Module):
    """Multi-head attention of x over ctx (self-attention when ctx is x)."""
    heads: int
    head_dim: int
    dtype: str = "float32"                        # compute dtype (MuseConfig.dtype)
    attention: str = "xla"                        # kernel (MuseConfig.attention)

    @nn.compact
    def __call__(self, x, ctx, ctx_mask=None):    # x (B, N, D), ctx (B, M, D'), ctx_mask bool (B, M)
        proj = lambda name: nn.DenseGeneral((self.heads, self.head_dim), use_bias=False, name=name,
                                            dtype=self.dtype)
        q, k, v = proj("q")(x), proj("k")(ctx), proj("v")(ctx)                           # (B, *, H, dh)
        mask = None if ctx_mask is None else ctx_mask[:, None, None, :]                 # (B, 1, 1, M)
        if mask is not None and self.attention == "cudnn":   # cuDNN wants the mask's query axis spelled out
            mask = jnp.broadcast_to(mask, (x.shape[0], 1, x.shape[1], ctx.shape[1]))     # (B, 1, N, M)
        # scaled dot-product softmax attention (jax's default implementation is XLA's, even
        # on GPUs: cuDNN's fused kernel is used only when asked for, MuseConfig.attention)
        o = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=self.attention)  # (B, N, H, dh)
        return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="o", dtype=self.dtype)(o)  # (B, N, D)


class Block(nn.Module):
    """Pre-LN block: self-attention over image tokens, cross-attention to the text, MLP."""
    cfg: MuseConfig

    @nn.compact
    def __call__(self, x, ctx=None, ctx_mask=None):  # x (B, N, D), ctx (B, M, D), ctx_mask (B, M)
        c = self.cfg
        # (the norms reduce in float32 whatever the dtype; their output is in c.dtype)
        h = nn.LayerNorm(name="norm_self", dtype=c.dtype)(x)
        x = x + Attention(c.heads, c.head_dim, c.dtype, c.attention, name="self_attn")(h, h)
        if ctx is not None:                      # (the super-res model's low-res encoder has no context)
            # every image token reads the prompt; padding tokens of the prompt are masked out
            x = x + Attention(c.heads, c.head_dim, c.dtype, c.attention, name="cross_attn")(
                nn.LayerNorm(name="norm_cross", dtype=c.dtype)(x), ctx, ctx_mask)
        h = nn.Dense(c.mlp_ratio * c.width, name="mlp_in", dtype=c.dtype)(nn.LayerNorm(name="norm_mlp", dtype=c.dtype)(x))
        return x + nn.Dense(c.width, name="mlp_out", dtype=c.dtype)(nn.gelu(h))         # (B, N, D)


class MaskedTransformer(nn.Module):
    """ids (some = [MASK]) + text -> logits over the K codes at every position (§2.3).

    The super-resolution model (§2.4, Fig. 4) is the same transformer with one more input:
    the low-res token ids, embedded and run through a few self-attention layers, whose
    output is concatenated with the projected text to form the cross-attention context.
    """
    cfg: MuseConfig

    @nn.compact
    def __call__(self, ids, text_emb, text_mask, lowres_ids=None):
        # ids (B, N), text_emb (B, L, Dt), text_mask (B, L), lowres_ids (B, Nlo) for super-res
        c = self.cfg
        init = nn.initializers.normal(0.02)
        # The learned positions are float32 params: cast them to the compute dtype, or adding
        # them to bfloat16 activations would promote the whole residual stream to float32.
        # (Dense, DenseGeneral and Embed cast their inputs and params to `dtype` themselves,
        # so the float32 T5 embeddings become bfloat16 inside text_proj.)
        pos = lambda name, shape: self.param(name, init, shape).astype(c.dtype)
        x = nn.Embed(c.codebook_size + 1, c.width, embedding_init=init, name="tok_emb",
                     dtype=c.dtype)(ids)                                                     # (B, N, D)
        x = x + pos("pos_emb", (c.num_tokens, c.width))                                      # learned positions
        # the paper projects the T5 embeddings to the transformer's width (§2.3)
        ctx = nn.Dense(c.width, name="text_proj", dtype=c.dtype)(text_emb)                    # (B, L, D)
        # Departure: learned positions on the projected text. A pretrained T5 already encodes
        # word order, but the offline default is a small *random* frozen T5 whose relative
        # position bias is near zero, so "a red circle above a blue square" and "a blue circle
        # above a red square" would reach the transformer as nearly the same bag of bytes.
        ctx = ctx + pos("text_pos_emb", (c.text_length, c.width))[:ctx.shape[1]]
        ctx_mask = text_mask
        block = nn.remat(Block) if c.remat else Block                 # (MuseConfig.remat)
        if c.lowres_grid:
            lo = nn.Embed(c.lowres_codebook_size, c.width, embedding_init=init, name="lowres_emb",
                          dtype=c.dtype)(lowres_ids)
            lo = lo + pos("lowres_pos_emb", (c.lowres_grid ** 2, c.width))                     # (B, Nlo, D)
            for i in range(c.lowres_depth):
                lo = block(c, name=f"lowres_block_{i}")(lo)
            lo = nn.LayerNorm(name="lowres_norm", dtype=c.dtype)(lo)
            ctx = jnp.concatenate([ctx, lo], axis=1)                                            # (B, L + Nlo, D)
            ctx_mask = jnp.concatenate([text_mask, jnp.ones(lo.shape[:2], bool)], axis=1)
            if c.lowres_aligned:
                # each low-res token covers an r x r patch of high-res tokens (same image area)
                r, g = c.grid // c.lowres_grid, c.lowres_grid
                up = lo.reshape(-1, g, 1, g, 1, c.width)                                      # (B, g, 1, g, 1, D)
                up = jnp.broadcast_to(up, (up.shape[0], g, r, g, r, c.width)).reshape(x.shape)  # (B, N, D)
                x = x + nn.Dense(c.width, name="lowres_aligned", dtype=c.dtype)(up)
        for i in range(c.depth):
            x = block(c, name=f"block_{i}")(x, ctx, ctx_mask)
        x = nn.LayerNorm(name="norm_out", dtype=c.dtype)(x)
        # float32 logits whatever the compute dtype: the loss's log-softmax and the decoder's
        # sampling and confidences should not round to bfloat16's 8-bit mantissa
        return nn.Dense(c.codebook_size, name="head", dtype=c.dtype)(x).astype(jnp.float32)  # (B, N, K)


# -----------------------------------------------------------------------------
# Training objective (§2.6): cosine-distributed masking, loss on masked tokens only
# -----------------------------------------------------------------------------

def example_keys(key, first, n):
    """One PRNG key per example, (n,), from `key` and the example's index in the whole job
    (first, first + 1, ...): masked_token_loss and decode draw each example's randomness from
    its own key, so the results do not depend on how the examples are batched or split."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(first + jnp.arange(n))


def random_mask(rng, num_tokens):
    """Which of the N tokens of one example to mask: bool (N,).

    The masking rate is r = cos(pi/2 * u) with u ~ U(0, 1), i.e. density (2/pi)(1 - r^2)^(-1/2)
    (§2.6): biased towards high rates, as at the start of decoding. At least one token is
    masked, so every example contributes to the loss.
    """
    r_rate, r_pick = jax.random.split(rng)
    rate = jnp.cos(jnp.pi / 2 * jax.random.uniform(r_rate))
    n_masked = jnp.clip(jnp.ceil(rate * num_tokens), 1, num_tokens)
    rank = jnp.argsort(jnp.argsort(jax.random.uniform(r_pick, (num_tokens,))))  # a random permutation
    return rank < n_masked


def masked_token_loss(model, params, ids, text_emb, text_mask, empty_emb, empty_mask, rngs, lowres_ids=None):
    """Per-example loss of the masked-token objective; returns (loss (B,), accuracy (B,)).

    ids int32 (B, N) are the VQGAN tokens; text_emb (B, L, Dt) / text_mask (B, L) the prompt;
    empty_emb (L, Dt) / empty_mask (L,) the embedding of the empty prompt; rngs one key per
    example (B,), so an example's masking does not depend on the rest of the batch (and the
    result does not depend on how the batch is split across devices).

    Each example's loss is the cross-entropy averaged over its masked tokens; the batch loss
    is the mean over examples. lowres_ids (B, Nlo): the super-res model's low-res tokens
    (never dropped: only the text is).
    """
    c = model.cfg
    B, N = ids.shape
    keys = jax.vmap(lambda k: jax.random.split(k, 2))(rngs)                              # (B, 2) keys
    mask = jax.vmap(random_mask, in_axes=(0, None))(keys[:, 0], N)                       # (B, N)
    # classifier-free guidance (§2.7): 10% of examples see the empty prompt instead of theirs
    drop = jax.vmap(lambda k: jax.random.bernoulli(k, c.cond_drop))(keys[:, 1])          # (B,)
    text_emb = jnp.where(drop[:, None, None], empty_emb[None], text_emb)
    text_mask = jnp.where(drop[:, None], empty_mask[None], text_mask)

    logits = model.apply({"params": params}, jnp.where(mask, c.mask_id, ids), text_emb, text_mask,
                         lowres_ids)                                                     # (B, N, K)
    targets = jax.nn.one_hot(ids, c.codebook_size)
    targets = targets * (1 - c.label_smoothing) + c.label_smoothing / c.codebook_size
    ce = -jnp.sum(targets * jax.nn.log_softmax(logits), axis=-1)                        # (B, N)
    n_masked = mask.sum(axis=1)                                                          # (B,), >= 1
    loss = jnp.sum(ce * mask, axis=1) / n_masked
    acc = jnp.sum((logits.argmax(-1) == ids) * mask, axis=1) / n_masked
    return loss, acc


# -----------------------------------------------------------------------------
# Parallel decoding (§2.8, MaskGIT Chang et al. 2022) and editing (§3.3)
# -----------------------------------------------------------------------------

def mask_schedule(n0, t, steps, n_masked):
    """How many tokens stay masked after step t (0-based) of `steps`: int (B,).

    Cosine schedule (MaskGIT): floor(n0 * cos(pi/2 * (t+1)/steps)), where n0 is the number
    masked at the start (the whole grid for generation, the masked region for editing).
    Clipped so that every step reveals at least one still-masked token and the last step
    reveals all: n_masked is the count before this step.
    """
    target = jnp.floor(n0 * jnp.cos(jnp.pi / 2 * (t + 1) / steps)).astype(jnp.int32)
    return jnp.clip(jnp.minimum(target, n_masked - 1), 0, None)


def guided_logits(model, params, ids, ctx, ctx_mask, uncond, uncond_mask, scale, lowres_ids=None):
    """Classifier-free guidance (§2.7): (1 + s) * l_cond - s * l_uncond, logits (B, N, K).

    `uncond` is the empty prompt's embedding, or a negative prompt's: guidance then pushes
    away from it. Both passes run as one forward over a doubled batch (on a CPU, in
    slices of rows_per_pass(...) rows, one after the other: the same logits, faster). The
    super-res model's low-res tokens condition both passes: only the text differs.
    """
    B, N = ids.shape
    twice = lambda a, b: jnp.concatenate([a, b])
    inputs = (twice(ids, ids), twice(ctx, uncond), twice(ctx_mask, uncond_mask),
              None if lowres_ids is None else twice(lowres_ids, lowres_ids))            # 2B rows each
    forward = lambda x: model.apply({"params": params}, *x)
    rows = rows_per_pass(2 * B, N, CPU_TOKENS_PER_PASS)
    if rows == 2 * B:
        logits = forward(inputs)                                                        # (2B, N, K)
    else:
        sliced = jax.tree.map(lambda a: a.reshape((2 * B // rows, rows) + a.shape[1:]), inputs)  # (2B/rows, rows, ...)
        logits = jax.lax.map(forward, sliced).reshape(2 * B, N, -1)                      # (2B, N, K)
    cond, uncond_logits = logits[:B], logits[B:]
    return (1 + scale) * cond - scale * uncond_logits


def sample_codes(rng, logp):
    """One code per position from the distribution softmax(logp): logp (N, K) -> int (N,).

    Inverse-CDF sampling: one uniform u per position, and the code is the first whose
    cumulative probability exceeds u (a code of probability 0 is never drawn). The same
    distribution as jax.random.categorical, which adds Gumbel noise to every one of the K
    logits: one random number per position instead of K, and no logs, which makes a CPU
    decoding step measurably faster (docs/results.md, "Sampler"). Another sampler would
    give every seed another image.
    """
    u = jax.random.uniform(rng, logp.shape[:-1] + (1,))                                 # (N, 1)
    cdf = jnp.cumsum(jnp.exp(logp), axis=-1)                                            # (N, K)
    # (scaled by the total, which float32 rounding leaves a hair off 1; the min guards u -> 1)
    return jnp.minimum(jnp.sum(cdf <= u * cdf[..., -1:], axis=-1), logp.shape[-1] - 1)


def decode(model, params, ctx, ctx_mask, uncond, uncond_mask, rngs, init_ids=None, steps=24,
           guidance=3.0, temperature=1.0, choice_temperature=4.5, lowres_ids=None):
    """Parallel decoding: fill every [MASK] in `init_ids` in `steps` forward passes.

    ctx (B, L, Dt) / ctx_mask (B, L): the prompt's T5 embedding, encoded once by the caller.
    uncond / uncond_mask: same shapes, the empty or negative prompt.
    rngs (B,): one PRNG key per example, as in training, so an example's draws (and image)
    do not depend on what else is in the batch, nor on the batch size.
    init_ids (B, N): known tokens plus [MASK]s; None means an all-[MASK] grid (generation).
    Editing (§3.3) passes an image's tokens with the region to regenerate masked.
    lowres_ids (B, Nlo): the low-res tokens a super-resolution model is conditioned on.
    Returns (ids (B, N), history (T, B, N)): the grid after each step, so tests can check
    that every token is revealed exactly once and that known tokens never change.

    At step t: predict every position, sample a token at each masked one (with
    `temperature`), score it by its log-probability plus Gumbel noise whose temperature
    falls linearly to 0 (MaskGIT's "choice temperature": exploration early, greedy late),
    keep the most confident and re-mask the mask_schedule(...) least confident. Known
    tokens get confidence +inf, so they are never re-masked. The guidance scale ramps up
    linearly over the steps (§2.7): guidance * (t + 1) / steps at step t.
    """
    c = model.cfg
    B = ctx.shape[0]
    if init_ids is None:
        init_ids = jnp.full((B, c.num_tokens), c.mask_id, jnp.int32)
    n0 = jnp.sum(init_ids == c.mask_id, axis=1)                                         # (B,)

    def step(carry, t):
        ids, rngs = carry
        keys = jax.vmap(lambda k: jax.random.split(k, 3))(rngs)                          # (B, 3) keys
        rngs, r_sample, r_gumbel = keys[:, 0], keys[:, 1], keys[:, 2]
        ratio = (t + 1) / steps
        logits = guided_logits(model, params, ids, ctx, ctx_mask, uncond, uncond_mask, guidance * ratio,
                               lowres_ids)
        logp = jax.nn.log_softmax(logits / jnp.maximum(temperature, 1e-6))               # (B, N, K)
        unknown = ids == c.mask_id                                                       # (B, N)
        sampled = jnp.where(unknown, jax.vmap(sample_codes)(r_sample, logp), ids)             # (B, N)
        confidence = jnp.take_along_axis(logp, sampled[..., None], axis=-1)[..., 0]      # (B, N)
        gumbel = jax.vmap(lambda k: jax.random.gumbel(k, (c.num_tokens,)))(r_gumbel)     # (B, N)
        confidence += choice_temperature * (1 - ratio) * gumbel
        confidence = jnp.where(unknown, confidence, jnp.inf)
        n_after = mask_schedule(n0, t, steps, unknown.sum(axis=1))                      # (B,)
        rank = jnp.argsort(jnp.argsort(confidence, axis=1), axis=1)                      # 0 = least confident
        ids = jnp.where(rank < n_after[:, None], c.mask_id, sampled)
        return (ids, rngs), ids

    (ids, _), history = jax.lax.scan(step, (init_ids.astype(jnp.int32), rngs), jnp.arange(steps))
    return ids, history


# one compiled program for the whole decoding loop; the model and the step count are static
decode_jit = jax.jit(decode, static_argnames=("model", "steps"))


def encode_prompts(text_encoder, prompts, negative=None):
    """The conditional and the unconditional context of a batch, each (B, L, Dt) + mask (B, L).

    The unconditional pass of guidance reads the empty prompt, or the negative prompt in its place.
    """
    ctx, ctx_mask = text_encoder(prompts)
    uncond, uncond_mask = text_encoder([negative or ""] * len(prompts))
    return ctx, ctx_mask, uncond, uncond_mask


def generate(model, params, text_encoder, prompts, seed=0, first=0, steps=24, guidance=3.0, temperature=0.5,
             choice_temperature=2.0, negative=None, init_ids=None, lowres_ids=None):
    """Prompts -> token ids (B, N) by parallel decoding: Muse's text-to-image in one call
    (vqgan.decode_ids turns the ids into pixels). The prompts are encoded once per call, not
    per step; the defaults are sample.py's for the base model.

    Row i's random draws come from fold_in(PRNGKey(seed), first + i): `first` is the index of
    this call's first prompt in the whole job, so a prompt gets the same image whatever the
    batch size. init_ids (B, N) with [MASK]s: editing (only the masked tokens are generated);
    lowres_ids (B, Nlo): the low-res tokens a super-resolution model is conditioned on.
    """
    contexts = encode_prompts(text_encoder, prompts, negative)
    rngs = example_keys(jax.random.PRNGKey(seed), first, len(prompts))                        # (B,) keys
    ids, _ = decode_jit(model, params, *contexts, rngs, init_ids=init_ids, steps=steps, guidance=guidance,
                        temperature=temperature, choice_temperature=choice_temperature,
                        lowres_ids=lowres_ids)                                                 # (B, N)
    return ids


def edit(model, params, ctx, ctx_mask, uncond, uncond_mask, rngs, ids, iterations=100, fraction=0.08,
         guidance=4.0, temperature=1.0, lowres_ids=None):
    """Mask-free editing (§3.3.2): move an image's tokens towards a new prompt.

    ids (B, N): the tokens of the image to edit. Each iteration masks a random `fraction` of
    the tokens (paper: 8%) and resamples them, conditioned on the new prompt with guidance
    (paper: scale 4, 100 iterations), in one parallel step; the rest of the image stays
    as it is, so the edit keeps the layout while the prompt pulls the content.
    rngs (B,): one PRNG key per example, as in decode. Returns (ids (B, N), history
    (iterations, B, N)).
    """
    c = model.cfg
    n_masked = max(1, math.ceil(fraction * ids.shape[1]))

    def step(carry, _):
        ids, rngs = carry
        keys = jax.vmap(lambda k: jax.random.split(k, 3))(rngs)                          # (B, 3) keys
        rngs, r_mask, r_decode = keys[:, 0], keys[:, 1], keys[:, 2]
        scores = jax.vmap(lambda k: jax.random.uniform(k, (ids.shape[1],)))(r_mask)      # (B, N)
        remask = jnp.argsort(jnp.argsort(scores, axis=1), axis=1) < n_masked                # n_masked per row
        ids, _ = decode(model, params, ctx, ctx_mask, uncond, uncond_mask, r_decode,
                        init_ids=jnp.where(remask, c.mask_id, ids), steps=1, guidance=guidance,
                        temperature=temperature, choice_temperature=0.0, lowres_ids=lowres_ids)
        return (ids, rngs), ids

    (ids, _), history = jax.lax.scan(step, (ids.astype(jnp.int32), rngs), None, length=iterations)
    return ids, history


edit_jit = jax.jit(edit, static_argnames=("model", "iterations", "fraction"))


# -----------------------------------------------------------------------------
# A speed path for CPUs: the guided forward in passes of ~1024 tokens
#
# On a CPU a pass over many tokens runs slower per token than over a few: the activations of
# a big pass fall out of cache and the matmuls slow down with them. Accelerators want the
# opposite (one big batch keeps more of the chip busy), so they run every row in one pass.
# docs/results.md ("CPU passes and micro-batches") has the timings behind the figure.
# -----------------------------------------------------------------------------

CPU_TOKENS_PER_PASS = 1024


def rows_per_pass(rows, tokens_per_row, tokens):
    """How many of `rows` examples one pass takes: all of them on an accelerator; on a CPU,
    the largest divisor of `rows` that keeps a pass within `tokens` image tokens (at least
    one row), unless that divisor is under half the budget's rows (34 rows of 64 tokens
    would run as 17 passes of 2 rows): then all of them, in one pass. guided_logits passes
    CPU_TOKENS_PER_PASS; train.py its own figure for training's micro-batches."""
    target = max(1, tokens // tokens_per_row)
    if jax.default_backend() != "cpu" or rows <= target:
        return rows
    best = max(d for d in range(1, target + 1) if rows % d == 0)
    return best if 2 * best >= target else rows


# -----------------------------------------------------------------------------
# Plumbing the paper takes for granted: the frozen T5 text encoder (§2.1) and its checkpoints
#
# Muse conditions on the per-token outputs of a pretrained T5-XXL encoder, kept frozen.
# The module below reproduces transformers' `T5EncoderModel` (tested for parity in
# test_muse.py): RMS layer norm with no bias, no 1/sqrt(dh) attention scaling (T5 folds it
# into the initialisation), one learned relative-position bias computed in the first
# layer and shared by all layers, ReLU MLP for the original T5 and gated-GELU for
# T5 v1.1 / Flan-T5 / ByT5. Parameter names follow the checkpoint's, so
# `t5_params_from_hf` is a readable one-to-one mapping.
# -----------------------------------------------------------------------------

@dataclass(frozen=True)
class T5Config:
    vocab_size: int = 384                  # ByT5: 256 bytes + 3 special ids + 125 sentinels
    d_model: int = 64                      # Dt: width of the embeddings Muse cross-attends to
    d_kv: int = 16                         # dh: width of one attention head
    d_ff: int = 128                        # hidden width of the MLP
    num_layers: int = 2                    # encoder blocks
    num_heads: int = 4                     # H
    relative_attention_num_buckets: int = 32   # distinct relative-position biases (log-spaced)
    relative_attention_max_distance: int = 128  # distances beyond this share the last bucket
    layer_norm_epsilon: float = 1e-6       # of the RMS norms
    feed_forward_proj: str = "gated-gelu"  # "relu" (original T5) or "gated-gelu" (v1.1, Flan, ByT5)
    # "bfloat16": matmuls in bfloat16, for TPUs (load_t5(..., dtype="bfloat16") also stores the
    # weights in bfloat16, halving T5-XXL's encoder from 19 GB to 9.5 GB); the RMS norms
    # reduce in float32 and the output embeddings are float32 either way
    compute_dtype: str = "float32"


def relative_position_bucket(length, num_buckets, max_distance):
    """Bucket of the offset (key position - query position) for every pair: int (L, L).

    Bidirectional T5 buckets: half the buckets for keys to the left, half for the right;
    within each half, offsets below num_buckets/4 get their own bucket and larger ones
    share logarithmically wider buckets up to max_distance. Static, so numpy.
    """
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]            # (L, L)
    num_buckets //= 2
    bucket = (rel > 0).astype(np.int32) * num_buckets
    n = np.abs(rel)
    max_exact = num_buckets // 2
    # (offsets below max_exact take the `n` branch of the where; maximum(n, 1) only avoids log(0))
    large = max_exact + (np.log(np.maximum(n, 1) / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(np.int32)
    large = np.minimum(large, num_buckets - 1)
    return bucket + np.where(n < max_exact, n, large)


class T5LayerNorm(nn.Module):
    """RMS norm: scale only, no mean subtraction and no bias (T5's choice)."""
    eps: float

    @nn.compact
    def __call__(self, x):                                                   # (B, L, Dt)
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],))
        variance = jnp.mean(x.astype(jnp.float32) ** 2, axis=-1, keepdims=True)
        return weight.astype(jnp.float32) * (x * jax.lax.rsqrt(variance + self.eps))   # float32


class T5Block(nn.Module):
    cfg: T5Config

    @nn.compact
    def __call__(self, x, bias):                  # x (B, L, Dt); bias (B, H, L, L): positions + padding
        c = self.cfg
        B, L, _ = x.shape
        # init scales follow transformers' T5 so a random encoder has sensible activations
        normal = lambda fan: nn.initializers.normal(fan ** -0.5)
        dense = lambda n, name, fan: nn.Dense(n, use_bias=False, name=name, kernel_init=normal(fan),
                                              dtype=c.compute_dtype)

        h = T5LayerNorm(c.layer_norm_epsilon, name="attn_norm")(x)
        inner = c.num_heads * c.d_kv
        q = dense(inner, "q", c.d_model * c.d_kv)(h).reshape(B, L, c.num_heads, c.d_kv)   # (B, L, H, dh)
        k = dense(inner, "k", c.d_model)(h).reshape(B, L, c.num_heads, c.d_kv)
        v = dense(inner, "v", c.d_model)(h).reshape(B, L, c.num_heads, c.d_kv)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias                              # (B, H, L, L)
        weights = jax.nn.softmax(scores, axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(B, L, inner)               # (B, L, H*dh)
        x = x + dense(c.d_model, "o", inner)(o)

        h = T5LayerNorm(c.layer_norm_epsilon, name="ff_norm")(x)
        if c.feed_forward_proj == "gated-gelu":   # GEGLU (Shazeer 2020); transformers' "gelu_new" = tanh GELU
            h = (jax.nn.gelu(dense(c.d_ff, "wi_0", c.d_model)(h), approximate=True)
                 * dense(c.d_ff, "wi_1", c.d_model)(h))
        elif c.feed_forward_proj == "relu":
            h = jax.nn.relu(dense(c.d_ff, "wi", c.d_model)(h))
        else:
            raise ValueError(f"unsupported feed_forward_proj {c.feed_forward_proj!r}")
        return x + dense(c.d_model, "wo", c.d_ff)(h)                                     # (B, L, Dt)


class T5Encoder(nn.Module):
    cfg: T5Config

    @nn.compact
    def __call__(self, ids, mask):                # ids int (B, L), mask bool (B, L) -> (B, L, Dt)
        c = self.cfg
        x = nn.Embed(c.vocab_size, c.d_model, name="shared", dtype=c.compute_dtype,
                     embedding_init=nn.initializers.normal(1.0))(ids)                    # (B, L, Dt)
        buckets = relative_position_bucket(ids.shape[1], c.relative_attention_num_buckets,
                                           c.relative_attention_max_distance)            # (L, L)
        pos_bias = nn.Embed(c.relative_attention_num_buckets, c.num_heads, name="relative_attention_bias",
                            embedding_init=nn.initializers.normal(c.d_model ** -0.5))(buckets)  # (L, L, H)
        # padding keys get the most negative float, exactly as transformers does
        pad_bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)[:, None, None, :]   # (B, 1, 1, L)
        bias = pos_bias.transpose(2, 0, 1)[None] + pad_bias                              # (B, H, L, L)
        for i in range(c.num_layers):
            x = T5Block(c, name=f"block_{i}")(x, bias)
        return T5LayerNorm(c.layer_norm_epsilon, name="final_layer_norm")(x)


def t5_params_from_hf(state, cfg: T5Config):
    """Map a transformers T5 state dict (name -> numpy array) onto T5Encoder's params.

    torch's Linear stores its weight as (out, in); a Flax Dense kernel is (in, out). Returns
    host (numpy) float32 arrays: the caller casts and places them.
    """
    kernel = lambda name: {"kernel": np.asarray(state[name]).T}
    params = {"shared": {"embedding": state["shared.weight"]},
              "relative_attention_bias": {
                  "embedding": state["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]},
              "final_layer_norm": {"weight": state["encoder.final_layer_norm.weight"]}}
    mlp = ("wi_0", "wi_1", "wo") if cfg.feed_forward_proj == "gated-gelu" else ("wi", "wo")
    for i in range(cfg.num_layers):
        pre = f"encoder.block.{i}.layer."
        block = {"attn_norm": {"weight": state[pre + "0.layer_norm.weight"]},
                 "ff_norm": {"weight": state[pre + "1.layer_norm.weight"]}}
        for name in ("q", "k", "v", "o"):
            block[name] = kernel(pre + f"0.SelfAttention.{name}.weight")
        for name in mlp:
            block[name] = kernel(pre + f"1.DenseReluDense.{name}.weight")
        params[f"block_{i}"] = block
    return jax.tree.map(lambda a: np.asarray(a, np.float32), params)


class TextEncoder:
    """Prompts in, embeddings out: `emb, mask = enc(["a red circle"])`.

    emb float32 (B, L, Dt), mask bool (B, L). Prompts are padded to a fixed length L so
    that every call reuses one compiled function. The weights never change (frozen, §2.1).
    """

    def __init__(self, cfg: T5Config, params, tokenizer, max_length: int = 64):
        self.cfg, self.params, self.tokenizer, self.max_length = cfg, params, tokenizer, max_length
        self.model = T5Encoder(cfg)
        self._encode = jax.jit(lambda p, ids, mask: self.model.apply({"params": p}, ids, mask))

    def tokenize(self, prompts):
        """-> ids int32 (B, L), mask bool (B, L); the tokenizer appends </s>, so "" is one token."""
        rows = [self._tokenize_one(p) for p in prompts]
        return np.stack([ids for ids, _ in rows]), np.stack([mask for _, mask in rows])

    @functools.lru_cache(maxsize=1 << 16)
    def _tokenize_one(self, prompt):
        # Cached: transformers' Python tokenizers manage ~12k prompts/s, less than a GPU
        # trains on, and training data repeats captions (the shapes world has ~1,300).
        out = self.tokenizer([prompt], padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="np")
        return out["input_ids"][0].astype(np.int32), out["attention_mask"][0].astype(bool)

    def encode_ids(self, ids, mask):
        return self._encode(self.params, ids, mask)

    def __call__(self, prompts):
        ids, mask = self.tokenize(prompts)
        return self.encode_ids(ids, mask), jnp.asarray(mask)


def byte_tokenizer():
    """ByT5's tokenizer: UTF-8 bytes + 3, no vocabulary file, so it works offline."""
    from transformers import ByT5Tokenizer
    return ByT5Tokenizer()


def random_t5(cfg: T5Config = T5Config(), seed: int = 0, max_length: int = 64):
    """The offline default text encoder: ByT5's byte tokenizer and a small randomly
    initialised T5, frozen. No pretrained weights can be downloaded here, so this stands in
    for T5-XXL; its weights are saved in every Muse checkpoint so samples are reproducible.
    A random frozen encoder still gives each prompt a distinct, position-aware embedding
    that the transformer's cross-attention learns to read.
    """
    ids = jnp.zeros((1, max_length), jnp.int32)
    params = jax.jit(T5Encoder(cfg).init)(jax.random.PRNGKey(seed), ids, ids > 0)["params"]
    return TextEncoder(cfg, params, byte_tokenizer(), max_length)


def read_safetensors(path, keep=lambda name: True):
    """A transformers checkpoint folder's tensors that `keep` accepts -> {name: numpy array},
    from model.safetensors or, for a large checkpoint, the shards its index names."""
    from safetensors import safe_open
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):                   # large checkpoints are sharded
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    state = {}
    for shard in shards:
        # framework "flax", not "numpy": numpy's safetensors reader cannot hold bfloat16
        # checkpoints (many hub T5s are stored so); each tensor comes straight back to the host
        with safe_open(os.path.join(path, shard), framework="flax") as f:
            state.update({k: np.asarray(f.get_tensor(k)) for k in f.keys() if keep(k)})
    return state


def load_t5(name_or_path: str, max_length: int = 64, dtype: str = "float32"):
    """Load a transformers-format T5 encoder (config.json, model.safetensors, tokenizer files).

    Works for t5-*, t5-v1_1-*, flan-t5-* and byt5-*. A name that is not a local folder is
    fetched from the Hugging Face hub (needs internet). dtype "bfloat16" stores the weights
    in bfloat16 and multiplies in it (T5Config.compute_dtype).

    Only the encoder's tensors are read (a full T5 checkpoint also holds the decoder, more
    than half of T5-XXL's 11B parameters), each is brought to the host and cast there, and
    the encoder reaches the device once, in its final dtype: a bfloat16 T5-XXL encoder never
    holds its float32 copy (19 GB) in device memory. Checkpoints stored in float32, float16
    or bfloat16 all load.
    """
    from transformers import AutoTokenizer
    path = name_or_path
    if not os.path.isdir(path):
        from huggingface_hub import snapshot_download
        path = snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    with open(os.path.join(path, "config.json")) as f:
        hf = json.load(f)
    fields = set(T5Config.__dataclass_fields__)
    hf.setdefault("feed_forward_proj", "relu")  # the original t5-* configs omit it (transformers' default)
    cfg = T5Config(**{k: v for k, v in hf.items() if k in fields}, compute_dtype=dtype)
    state = read_safetensors(path, lambda k: k.startswith("encoder.") or k == "shared.weight")
    if "shared.weight" not in state:            # some exports keep only the encoder's tied copy
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    host = jnp.dtype(dtype).type                # numpy casts to bfloat16 too (ml_dtypes)
    params = jax.tree.map(lambda w: jnp.asarray(w.astype(host)), t5_params_from_hf(state, cfg))
    return TextEncoder(cfg, params, AutoTokenizer.from_pretrained(path), max_length)
