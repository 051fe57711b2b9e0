"""VQGAN: the image tokenizer of Muse, in one file.

Muse never models pixels. A convolutional VQGAN (Esser et al. 2021, used by Muse §2.2)
maps an image to a small grid of integer codebook ids, and the transformers of muse.py
model those ids. This file holds:

  * `VQGANConfig` and a few presets (`tiny` for tests, `shapes` for the built-in data set,
    `photos` the real-photo recipe, `f16_256` the paper's base tokenizer shape),
  * the encoder / decoder (ResBlocks with GroupNorm and swish; the channel multipliers fix
    the downsampling factor f = 2 ** (len(ch_mult) - 1)),
  * the vector quantizer (K x d codebook, straight-through estimator, commitment loss),
  * a patch discriminator for the optional adversarial loss,
  * `vqgan_losses`: everything the tokenizer stage of train.py minimises,
  * last, `load_diffusers`: pretrained tokenizers in Hugging Face diffusers' VQModel format.

The public API is two methods of `VQGAN`:

    ids    = model.apply({'params': p}, images, method='encode')   # (B, H, W, 3) -> int32 (B, h, w)
    images = model.apply({'params': p}, ids, method='decode')      # int32 (B, h, w) -> (B, H, W, 3)

Images are float32 in [-1, 1], NHWC. Train it with `python train.py vqgan --data shapes ...`.

Decoder fine-tuning (§2.5): `train.py vqgan --finetune_decoder --init RUN --preset photos_big`
keeps RUN's encoder and codebook frozen (the tokens of every image stay the same, so the
transformers trained on them stay valid) and trains a wider, deeper decoder
(`decoder_channels`, `decoder_res_blocks`).

Departures from the paper / taming-transformers, and why:
  * The perceptual loss (LPIPS, lpips.py) is optional (`perceptual_weight`): on photos it
    lowers held-out LPIPS at equal steps and at equal time, where L1 alone keeps the better
    PSNR (docs/results.md, "Tokenizers on real photos"); `photos` has it on, as taming and
    MaskGIT do; the shapes presets keep it off, as their flat-coloured scenes have no
    texture for it to restore and it costs a frozen VGG16 pass per step (not measured on
    shapes).
  * The adversarial term uses a fixed weight (paper Table 5: 0.1) by default. Taming's
    adaptive weight is the `adv_adaptive` option (balance_gradients, at the image rather than
    at the last layer); on photos it did worse than the fixed one in CPU-length runs: a
    discriminator that has not learned to separate has a near-flat output, and the adaptive
    weight scales its gradient up to the full share anyway (docs/results.md).
  * No attention blocks in the presets' encoder/decoder: at the resolutions we train here
    (32-64 px) convolutions already see the whole image (`mid_attention` is there for the
    pretrained diffusers tokenizers that have one).
"""
import os
from dataclasses import dataclass

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn


@dataclass(frozen=True)
class VQGANConfig:
    resolution: int = 32             # side of the square input images, in pixels
    channels: int = 64               # width of the first conv stage
    ch_mult: tuple = (1, 2, 2)       # width multiplier per stage; f = 2 ** (len(ch_mult) - 1)
    num_res_blocks: int = 1          # ResBlocks per stage
    num_groups: int = 32             # GroupNorm groups (must divide every stage's width)
    codebook_size: int = 512         # K: number of codes
    embed_dim: int = 64              # d: dimension of a code vector
    beta: float = 0.25               # commitment weight (VQ-VAE, van den Oord et al. 2017)
    l2_codes: bool = True            # look codes up by cosine similarity (ViT-VQGAN): fewer dead codes
    recon_loss: str = "l1"           # "l1" or "l2"
    adv_weight: float = 0.0          # weight of the generator's adversarial loss (paper Table 5: 0.1); 0 = off
    adv_adaptive: bool = False       # adv_weight scales the adversarial gradient to the reconstruction's (taming)
    perceptual_weight: float = 0.0   # weight of the LPIPS perceptual loss (lpips.py; taming: 1.0); 0 = off
    disc_channels: int = 64          # width of the patch discriminator's first layer
    disc_layers: int = 3             # strided conv layers in the discriminator
    im2col: bool = True              # CPU only: 3x3 convs as matmuls (see Conv3x3); sampling turns it off
    # Architecture options of other tokenizers (diffusers' VQModel: from_diffusers, at the end);
    # the defaults are this file's own architecture
    down_conv: str = "4x4"           # downsampling: "4x4" (stride 2, 'SAME') or "3x3_pad01" (pad right/bottom by 1)
    mid_res_blocks: int = 1          # ResBlocks at the lowest resolution (encoder end, decoder start)
    mid_attention: bool = False      # a single-head self-attention block between the first two mid ResBlocks
    out_kernel: int = 1              # kernel of the encoder's last conv (1 or 3)
    latent_dim: int = 0              # > 0: the encoder ends at this width; 1x1 quant_convs map it to / from embed_dim
    decoder_channels: int = 0        # the decoder's first-stage width (0: channels); wider for fine-tuning (§2.5)
    decoder_res_blocks: int = 0      # ResBlocks per decoder stage (0: num_res_blocks)

    def __post_init__(self):         # JSON (our checkpoints) turns the tuple into a list; keep it hashable
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))

    @property
    def downsample(self) -> int:     # f: pixels per token along one side
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid(self) -> int:           # h = w: tokens per side
        return self.resolution // self.downsample


PRESETS = {
    # a few seconds on a CPU; used by the tests
    "tiny": VQGANConfig(resolution=16, channels=16, ch_mult=(1, 2, 2), num_groups=8,
                        codebook_size=64, embed_dim=16, disc_channels=16, disc_layers=2),
    # the same at twice the resolution: the high-res tokenizer of the super-res tests
    "tiny_hr": VQGANConfig(resolution=32, channels=16, ch_mult=(1, 2, 2), num_groups=8,
                           codebook_size=64, embed_dim=16, disc_channels=16, disc_layers=2),
    # `tiny` with a wider, deeper decoder: the decoder fine-tuning test's
    "tiny_big": VQGANConfig(resolution=16, channels=16, ch_mult=(1, 2, 2), num_groups=8, codebook_size=64,
                            embed_dim=16, disc_channels=16, disc_layers=2, decoder_channels=32, decoder_res_blocks=2),
    # the built-in shapes world at 32 px: f = 4, an 8 x 8 token grid
    "shapes": VQGANConfig(resolution=32, channels=32, ch_mult=(1, 2, 2), num_groups=8,
                          codebook_size=512, embed_dim=32),
    # the shapes world at 64 px, f = 4: a 16 x 16 grid, the super-resolution model's target
    "shapes_hr": VQGANConfig(resolution=64, channels=32, ch_mult=(1, 2, 2), num_groups=8,
                             codebook_size=512, embed_dim=32),
    # the real-photo recipe (scripts/photos.py, docs/results.md "Tokenizers on real photos"):
    # 64 px, f = 4, LPIPS at taming's weight 1.0; codes looked up in 8 dimensions (ViT-VQGAN's
    # factorised codes, §3.2): 2-4x the codes in use of 32 dimensions, better LPIPS and PSNR.
    # No adversarial term: in CPU-sized runs it did not pay (its discriminator had not begun
    # to separate real from reconstructed); long runs add the paper's `--adv_weight 0.1`
    "photos": VQGANConfig(resolution=64, channels=32, ch_mult=(1, 2, 2), num_groups=8,
                          codebook_size=1024, embed_dim=8, perceptual_weight=1.0),
    # decoder fine-tuning (§2.5) of a `photos` tokenizer: the same encoder and codes, a decoder
    # 1.5x as wide with twice the ResBlocks (`train.py vqgan --finetune_decoder --init RUN`)
    "photos_big": VQGANConfig(resolution=64, channels=32, ch_mult=(1, 2, 2), num_groups=8,
                              codebook_size=1024, embed_dim=8, perceptual_weight=1.0,
                              decoder_channels=48, decoder_res_blocks=2),
    # the paper's base tokenizer: 256 px, f = 16, a 16 x 16 grid, 8192 codes (Muse §2.2)
    "f16_256": VQGANConfig(resolution=256, channels=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                           codebook_size=8192, embed_dim=64, adv_weight=0.1, disc_channels=64),
}


class Conv3x3(nn.Module):
    """A 3x3 'same' convolution, with nn.Conv's parameters (kernel (3, 3, Cin, Cout), bias).

    A speed path for CPUs: there it runs as im2col + one matrix product, because XLA:CPU
    computes a convolution's kernel gradient far slower than its forward pass, and the
    matmul form trains a VQGAN about 3x faster (docs/results.md, "im2col convolutions on a
    CPU"). GPUs and TPUs have fast convolutions and use lax's directly, and so does sampling
    (im2col=False): without gradients the matmul form would only cost compile time.
    """
    features: int
    im2col: bool = True

    @nn.compact
    def __call__(self, x):                                       # (B, H, W, C)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        if not self.im2col or jax.default_backend() != "cpu":
            return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias
        B, H, W, C = x.shape
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        patches = jnp.concatenate([xp[:, i:i + H, j:j + W] for i in range(3) for j in range(3)], -1)  # (B, H, W, 9C)
        return patches @ kernel.reshape(9 * C, self.features) + bias                          # (B, H, W, Cout)


class ResBlock(nn.Module):
    """GroupNorm -> swish -> conv, twice, plus a (1x1-projected) skip connection."""
    out_ch: int
    num_groups: int
    im2col: bool = True

    @nn.compact
    def __call__(self, x):                                       # x: (B, H, W, C)
        h = Conv3x3(self.out_ch, self.im2col)(nn.swish(nn.GroupNorm(self.num_groups)(x)))
        h = Conv3x3(self.out_ch, self.im2col)(nn.swish(nn.GroupNorm(self.num_groups)(h)))
        if x.shape[-1] != self.out_ch:
            x = nn.Conv(self.out_ch, (1, 1))(x)
        return x + h                                             # (B, H, W, out_ch)


class AttnBlock(nn.Module):
    """GroupNorm -> single-head self-attention over the h * w positions, plus the input: the
    mid block of taming-transformers' and diffusers' VQGANs (this file's presets leave it out)."""
    num_groups: int

    @nn.compact
    def __call__(self, x):                                       # (B, h, w, C)
        B, H, W, C = x.shape
        t = nn.GroupNorm(self.num_groups, name="norm")(x).reshape(B, H * W, C)               # (B, hw, C)
        q, k, v = (nn.Dense(C, name=n)(t) for n in ("q", "k", "v"))                            # (B, hw, C) each
        attn = jax.nn.softmax(q @ k.transpose(0, 2, 1) / np.sqrt(C), axis=-1)                 # (B, hw, hw)
        return x + nn.Dense(C, name="proj_out")(attn @ v).reshape(B, H, W, C)                 # (B, h, w, C)


def mid_blocks(c, h):
    """The blocks at the lowest resolution: ResBlocks, with attention after the first if asked."""
    for i in range(c.mid_res_blocks):
        h = ResBlock(h.shape[-1], c.num_groups, c.im2col)(h)
        if i == 0 and c.mid_attention:
            h = AttnBlock(c.num_groups)(h)
    return h


class Encoder(nn.Module):
    cfg: VQGANConfig

    @nn.compact
    def __call__(self, x):                                       # (B, H, W, 3)
        c = self.cfg
        h = Conv3x3(c.channels, c.im2col)(x)
        for i, mult in enumerate(c.ch_mult):
            for _ in range(c.num_res_blocks):
                h = ResBlock(c.channels * mult, c.num_groups, c.im2col)(h)
            if i < len(c.ch_mult) - 1:                           # halve H and W between stages
                if c.down_conv == "4x4":
                    h = nn.Conv(h.shape[-1], (4, 4), strides=(2, 2))(h)
                else:                                            # diffusers' Downsample2D (padding 0)
                    h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)))(h)
        h = mid_blocks(c, h)
        h = nn.swish(nn.GroupNorm(c.num_groups)(h))
        width = c.latent_dim or c.embed_dim
        h = nn.Conv(width, (1, 1))(h) if c.out_kernel == 1 else Conv3x3(width, c.im2col)(h)
        if c.latent_dim:
            h = nn.Conv(c.embed_dim, (1, 1), name="quant_conv")(h)
        return h                                                 # (B, h, w, d)


class Decoder(nn.Module):
    cfg: VQGANConfig

    @nn.compact
    def __call__(self, z):                                       # (B, h, w, d)
        c = self.cfg
        channels, res_blocks = c.decoder_channels or c.channels, c.decoder_res_blocks or c.num_res_blocks
        if c.latent_dim:
            z = nn.Conv(c.latent_dim, (1, 1), name="post_quant_conv")(z)
        h = Conv3x3(channels * c.ch_mult[-1], c.im2col)(z)
        h = mid_blocks(c, h)
        for i, mult in reversed(list(enumerate(c.ch_mult))):
            for _ in range(res_blocks):
                h = ResBlock(channels * mult, c.num_groups, c.im2col)(h)
            if i > 0:                                            # nearest-neighbour x2, then a conv
                B, H, W, C = h.shape
                h = jax.image.resize(h, (B, 2 * H, 2 * W, C), "nearest")
                h = Conv3x3(C, c.im2col)(h)
        h = nn.swish(nn.GroupNorm(c.num_groups)(h))
        return Conv3x3(3, c.im2col)(h)                   # (B, H, W, 3)


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation with the straight-through estimator.

    The encoder output z_e is replaced by its nearest code z_q. argmin has no gradient, so
    the forward pass uses z_q while the backward pass copies the gradient of z_q onto z_e
    (`z_e + stop_gradient(z_q - z_e)`). Two extra losses train the codebook and keep the
    encoder close to it (VQ-VAE eq. 3): ||sg[z_e] - z_q||^2 + beta * ||z_e - sg[z_q]||^2.

    With l2_codes, z_e and the codes are L2-normalised before the lookup (ViT-VQGAN, Yu et
    al. 2022, §3.2): the nearest code is then the most similar in direction, no code can
    be stranded far from the encoder's outputs, and many more codes stay in use.
    """
    codebook_size: int
    embed_dim: int
    l2_codes: bool = True

    def setup(self):
        self.raw_codebook = self.param("codebook", nn.initializers.variance_scaling(1.0, "fan_in", "uniform"),
                                       (self.codebook_size, self.embed_dim))      # (K, d)

    def normalize(self, z):
        return z * jax.lax.rsqrt(jnp.sum(z ** 2, axis=-1, keepdims=True) + 1e-12) if self.l2_codes else z

    @property
    def codebook(self):                                          # (K, d)
        return self.normalize(self.raw_codebook)

    def nearest(self, z):                                        # z: (..., d) -> int32 ids (...)
        # ||z - e||^2 = ||z||^2 - 2 z.e + ||e||^2; the ||z||^2 term does not change the argmin
        dist = -2 * self.normalize(z) @ self.codebook.T + jnp.sum(self.codebook ** 2, axis=-1)  # (..., K)
        return jnp.argmin(dist, axis=-1).astype(jnp.int32)

    def embed(self, ids):                                        # (...) -> (..., d)
        return jnp.take(self.codebook, ids, axis=0)

    def __call__(self, z_e):                                     # (B, h, w, d)
        z_e = self.normalize(z_e)
        ids = self.nearest(z_e)                                  # (B, h, w)
        z_q = self.embed(ids)                                    # (B, h, w, d)
        codebook_loss = jnp.mean((jax.lax.stop_gradient(z_e) - z_q) ** 2, axis=(1, 2, 3))      # (B,)
        commit_loss = jnp.mean((z_e - jax.lax.stop_gradient(z_q)) ** 2, axis=(1, 2, 3))        # (B,)
        z_st = z_e + jax.lax.stop_gradient(z_q - z_e)            # straight-through
        return z_st, ids, codebook_loss, commit_loss


class VQGAN(nn.Module):
    cfg: VQGANConfig

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.quantizer = VectorQuantizer(self.cfg.codebook_size, self.cfg.embed_dim, self.cfg.l2_codes)
        self.decoder = Decoder(self.cfg)

    def __call__(self, images, frozen_encoder=False):
        """Reconstruct `images` (B, H, W, 3); also return ids and the per-example VQ losses.
        frozen_encoder: no gradient reaches the encoder or the codebook (decoder fine-tuning,
        §2.5), so the backward pass skips them."""
        z_e = self.encoder(images)
        z_st, ids, codebook_loss, commit_loss = self.quantizer(jax.lax.stop_gradient(z_e) if frozen_encoder else z_e)
        if frozen_encoder:
            z_st = jax.lax.stop_gradient(z_st)
        return self.decoder(z_st), ids, codebook_loss, commit_loss

    def encode(self, images):                                    # (B, H, W, 3) -> int32 (B, h, w)
        return self.quantizer.nearest(self.encoder(images))

    def decode(self, ids):                                       # int32 (B, h, w) -> (B, H, W, 3)
        return self.decoder(self.quantizer.embed(ids))


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): a real/fake logit for each overlapping image patch.

    GroupNorm instead of BatchNorm so that every example is normalised on its own and the
    training loss does not depend on how the batch is split across devices.
    """
    cfg: VQGANConfig

    @nn.compact
    def __call__(self, x):                                       # (B, H, W, 3)
        c = self.cfg
        h = nn.leaky_relu(nn.Conv(c.disc_channels, (4, 4), strides=(2, 2))(x), 0.2)
        for i in range(1, c.disc_layers):
            h = nn.Conv(c.disc_channels * 2 ** i, (4, 4), strides=(2, 2))(h)
            h = nn.leaky_relu(nn.GroupNorm(min(c.num_groups, h.shape[-1]))(h), 0.2)
        return nn.Conv(1, (3, 3))(h)[..., 0]                     # (B, H / 2^layers, W / 2^layers)


@jax.custom_vjp
def balance_gradients(recon, weight):
    """Two copies of the reconstruction (B, H, W, 3): the first for the reconstruction and
    perceptual losses, the second for the generator's adversarial term.

    The forward pass is the identity. The backward pass adds the two gradients that reach the
    copies, g_rec and g_adv, as g_rec + weight * (|g_rec| / |g_adv|) * g_adv: the adversarial
    pull on the image is `weight` times the reconstruction's, whatever the discriminator's
    scale. This is taming-transformers' adaptive weight (Esser et al. 2021, eq. 7), measured
    at the image, where both losses meet, instead of at the decoder's last layer: one
    backward pass gives both norms for free, where the last layer's need two.
    Norms are over the batch (each device's own, under pmap, as in taming's data parallelism).
    """
    return recon, recon


def _balance_fwd(recon, weight):
    return (recon, recon), weight


def _balance_bwd(weight, grads):
    g_rec, g_adv = grads
    # clipped at 1e4 as in taming: a discriminator with a flat output (g_adv ~ 0) must not
    # blow the generator's step up; before --disc_start g_adv is 0 and so is its share
    ratio = jnp.minimum(jnp.linalg.norm(g_rec) / (jnp.linalg.norm(g_adv) + 1e-12), 1e4)
    return g_rec + weight * ratio * g_adv, jnp.zeros_like(weight)


balance_gradients.defvjp(_balance_fwd, _balance_bwd)


def vqgan_losses(model, disc, params, disc_params, images, use_adv, perceptual=None, frozen_encoder=False):
    """All the tokenizer's losses for one batch; returns per-example vectors of shape (B,).

    `g_loss` trains the VQGAN (encoder, codebook, decoder), `d_loss` the discriminator. They
    are separate so that each gets the gradient of only its own objective (train.py takes
    `grad(g_loss)` w.r.t. `params` and `grad(d_loss)` w.r.t. `disc_params`).
    `use_adv` (a traced bool) switches the adversarial terms on after a warm-up: a
    discriminator that sees only blurry early reconstructions wins too easily.
    `perceptual(recon, images) -> (B,)` is the frozen LPIPS distance (lpips.py), needed when
    cfg.perceptual_weight > 0: L1 alone averages over what it cannot place and blurs; a
    distance between deep features penalises the missing texture (taming-transformers §3.1).
    With cfg.adv_adaptive, adv_weight is the adversarial gradient's size relative to the
    reconstruction's at the image (balance_gradients), not a weight on the loss.
    """
    cfg = model.cfg
    recon, ids, codebook_loss, commit_loss = model.apply({"params": params}, images, frozen_encoder)
    # the adversarial weight: on the loss, or (adaptive) inside balance_gradients' backward pass
    adv_on = jnp.where(use_adv, 1.0, 0.0)
    recon_adv, adv_weight = recon, adv_on * cfg.adv_weight
    if cfg.adv_weight > 0 and cfg.adv_adaptive:
        recon, recon_adv = balance_gradients(recon, adv_weight)
        adv_weight = adv_on
    err = recon - images
    rec_loss = jnp.mean(jnp.abs(err) if cfg.recon_loss == "l1" else err ** 2, axis=(1, 2, 3))   # (B,)
    g_loss = rec_loss + codebook_loss + cfg.beta * commit_loss
    p_loss = jnp.zeros_like(g_loss)
    if cfg.perceptual_weight > 0:
        p_loss = perceptual(recon, images)                                                    # (B,)
        g_loss = g_loss + cfg.perceptual_weight * p_loss
    d_loss = g_adv = logit_real = logit_fake = jnp.zeros_like(g_loss)
    if cfg.adv_weight > 0:
        # hinge GAN loss (Lim & Ye 2017, as in taming-transformers)
        logits_fake_g = disc.apply({"params": jax.lax.stop_gradient(disc_params)}, recon_adv)
        g_adv = -jnp.mean(logits_fake_g, axis=(1, 2))                                         # (B,)
        logits_real = disc.apply({"params": disc_params}, images)
        logits_fake = disc.apply({"params": disc_params}, jax.lax.stop_gradient(recon))
        d_loss = (jnp.mean(nn.relu(1.0 - logits_real), axis=(1, 2))
                  + jnp.mean(nn.relu(1.0 + logits_fake), axis=(1, 2)))                        # (B,)
        g_loss = g_loss + adv_weight * g_adv
        d_loss = jnp.where(use_adv, d_loss, 0.0)
        # the discriminator's mean logits, logged: how far apart it holds real and reconstructed
        logit_real, logit_fake = jnp.mean(logits_real, axis=(1, 2)), jnp.mean(logits_fake, axis=(1, 2))
    return dict(g_loss=g_loss, d_loss=d_loss, rec_loss=rec_loss, p_loss=p_loss, codebook_loss=codebook_loss,
                commit_loss=commit_loss, ids=ids, recon=recon, g_adv=g_adv, logit_real=logit_real,
                logit_fake=logit_fake)


def codebook_stats(counts):
    """Usage (fraction of codes used) and perplexity (exp of the code entropy), from the
    number of times each code was picked: counts (K,) = bincount(ids, length=K).

    A perplexity far below K means codebook collapse: few codes carry all the images.
    """
    p = counts / jnp.maximum(counts.sum(), 1)
    perplexity = jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))
    return dict(usage=jnp.mean(counts > 0), perplexity=perplexity)


# Compiled entry points for callers outside a training step (sample.py, train.py's sample
# grids, tokenize): the model is a hashable dataclass, so it can be a static argument.
encode_jit = jax.jit(lambda model, params, images: model.apply({"params": params}, images, method="encode"),
                     static_argnums=0)
decode_jit = jax.jit(lambda model, params, ids: model.apply({"params": params}, ids, method="decode"),
                     static_argnums=0)


def decode_ids(model, params, ids):
    """Token ids (B, N), N = grid ** 2 -> uint8 images (B, S, S, 3)."""
    g = model.cfg.grid
    return to_uint8(decode_jit(model, params, ids.reshape(ids.shape[0], g, g)))


def from_uint8(pixels):
    """uint8 pixels -> float32 images in [-1, 1] (the VQGAN's convention; inverse of to_uint8)."""
    return np.asarray(pixels, np.float32) / 127.5 - 1.0


def to_uint8(images):
    """[-1, 1] float images (the VQGAN's convention) -> uint8 pixels."""
    return np.asarray(jnp.clip((images + 1.0) * 127.5 + 0.5, 0, 255)).astype(np.uint8)


# -----------------------------------------------------------------------------
# Pretrained tokenizers: Hugging Face diffusers' VQModel (the aMUSEd / open-muse VQGANs)
# -----------------------------------------------------------------------------
# A folder with config.json and diffusion_pytorch_model.safetensors. Its architecture is
# taming-transformers' VQGAN, the one this file's is a slimmed copy of; the options it needs
# are VQGANConfig fields (down_conv, mid_res_blocks, mid_attention, out_kernel, latent_dim,
# decoder_res_blocks), and its codes are looked up by Euclidean distance (l2_codes=False).
# Read with safetensors' numpy loader: no torch.

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


def is_diffusers_folder(path):
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(os.path.join(path, DIFFUSERS_WEIGHTS))


def diffusers_config(dc, where):
    """diffusers' VQModel config.json (a dict) -> VQGANConfig; ValueError naming `where` and the
    first option this file's architecture cannot express."""
    def need(ok, what):
        if not ok:
            raise ValueError(f"{where}: unsupported VQModel option {what}")
    if dc.get("_class_name") != "VQModel":
        raise ValueError(f"{where}: holds a diffusers {dc.get('_class_name')!r}, not a VQModel")
    boc, groups = list(dc.get("block_out_channels", [64])), dc.get("norm_num_groups", 32)
    n = len(boc)
    need(dc.get("in_channels", 3) == 3 and dc.get("out_channels", 3) == 3, "in/out_channels other than 3")
    need(dc.get("act_fn", "silu") == "silu", f"act_fn={dc.get('act_fn')!r} (only silu)")
    need(dc.get("norm_type", "group") == "group", f"norm_type={dc.get('norm_type')!r} (only group)")
    need(list(dc.get("down_block_types", ["DownEncoderBlock2D"])) == ["DownEncoderBlock2D"] * n,
         "down_block_types other than DownEncoderBlock2D")
    need(list(dc.get("up_block_types", ["UpDecoderBlock2D"])) == ["UpDecoderBlock2D"] * n,
         "up_block_types other than UpDecoderBlock2D")
    need(all(c % boc[0] == 0 for c in boc), f"block_out_channels={boc} (each a multiple of the first)")
    need(all(c % groups == 0 for c in boc), f"norm_num_groups={groups} (must divide every block's channels)")
    latent = dc.get("latent_channels", 3)
    return VQGANConfig(
        resolution=dc.get("sample_size", 32), channels=boc[0], ch_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=dc.get("layers_per_block", 1), num_groups=groups,
        codebook_size=dc.get("num_vq_embeddings", 256), embed_dim=dc.get("vq_embed_dim") or latent,
        l2_codes=False, down_conv="3x3_pad01", mid_res_blocks=2,
        mid_attention=bool(dc.get("mid_block_add_attention", True)), out_kernel=3, latent_dim=latent,
        decoder_res_blocks=dc.get("layers_per_block", 1) + 1)


def diffusers_names(cfg):
    """{our param path: diffusers' module name} for a VQGANConfig made by diffusers_config.

    Our modules are auto-named in the order they are built (Conv3x3_0, ResBlock_3, ...), so
    this walks Encoder and Decoder in that same order, beside diffusers' names."""
    names = {}

    def resblock(ours, theirs):
        for a, b in (("GroupNorm_0", "norm1"), ("Conv3x3_0", "conv1"), ("GroupNorm_1", "norm2"),
                     ("Conv3x3_1", "conv2"), ("Conv_0", "conv_shortcut")):
            names[f"{ours}/{a}"] = f"{theirs}.{b}"

    def mid(ours, theirs, first):                # mid ResBlocks (numbered from `first`), attention
        resblock(f"{ours}/ResBlock_{first}", f"{theirs}.mid_block.resnets.0")
        if cfg.mid_attention:
            for a, b in (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")):
                names[f"{ours}/AttnBlock_0/{a}"] = f"{theirs}.mid_block.attentions.0.{b}"
        resblock(f"{ours}/ResBlock_{first + 1}", f"{theirs}.mid_block.resnets.1")

    n = len(cfg.ch_mult)
    names["encoder/Conv3x3_0"] = "encoder.conv_in"
    for i in range(n):
        for j in range(cfg.num_res_blocks):
            resblock(f"encoder/ResBlock_{i * cfg.num_res_blocks + j}", f"encoder.down_blocks.{i}.resnets.{j}")
        if i < n - 1:
            names[f"encoder/Conv_{i}"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
    mid("encoder", "encoder", n * cfg.num_res_blocks)
    names.update({"encoder/GroupNorm_0": "encoder.conv_norm_out", "encoder/Conv3x3_1": "encoder.conv_out",
                  "encoder/quant_conv": "quant_conv", "quantizer": "quantize",
                  "decoder/post_quant_conv": "post_quant_conv", "decoder/Conv3x3_0": "decoder.conv_in",
                  "decoder/GroupNorm_0": "decoder.conv_norm_out"})
    mid("decoder", "decoder", 0)
    r = cfg.decoder_res_blocks
    for u in range(n):                           # diffusers' up_blocks.0 is the lowest resolution
        for j in range(r):
            resblock(f"decoder/ResBlock_{2 + u * r + j}", f"decoder.up_blocks.{u}.resnets.{j}")
        if u < n - 1:
            names[f"decoder/Conv3x3_{1 + u}"] = f"decoder.up_blocks.{u}.upsamplers.0.conv"
    names[f"decoder/Conv3x3_{n}"] = "decoder.conv_out"
    return names


TORCH_LEAF = {"kernel": "weight", "scale": "weight", "codebook": "embedding.weight"}   # ours -> torch's


def from_torch(leaf, weight):
    """One torch array -> our layout: conv (O, I, kh, kw) -> (kh, kw, I, O); linear (O, I) -> (I, O)."""
    if leaf == "kernel":
        return weight.transpose(2, 3, 1, 0) if weight.ndim == 4 else weight.T
    return weight                                # biases, GroupNorm scales, the codebook


def load_diffusers(path):
    """A diffusers VQModel folder -> (VQGANConfig, params); ValueError (one line naming the
    file) for another model class, an option this architecture lacks, or weights that do
    not fit the config."""
    import json
    from safetensors.numpy import load_file
    config_file = os.path.join(path, "config.json")
    try:
        with open(config_file) as f:
            dc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file}: unreadable ({type(e).__name__}: {e})")
    cfg = diffusers_config(dc, config_file)
    try:
        weights = load_file(os.path.join(path, DIFFUSERS_WEIGHTS))
    except Exception as e:                      # safetensors' own error types: truncated, not a safetensors file
        raise ValueError(f"{path}/{DIFFUSERS_WEIGHTS}: unreadable ({type(e).__name__}: {e})")
    ours = jax.eval_shape(VQGAN(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, cfg.resolution, cfg.resolution, 3)))
    names, params, used = diffusers_names(cfg), {}, set()
    for keys, shape in jax.tree_util.tree_leaves_with_path(ours["params"]):
        keys = [k.key for k in keys]
        module, leaf = "/".join(keys[:-1]), keys[-1]
        theirs = f"{names[module]}.{TORCH_LEAF.get(leaf, leaf)}"
        if theirs not in weights:
            raise ValueError(f"{path}/{DIFFUSERS_WEIGHTS}: no {theirs} (expected by config.json)")
        value = from_torch(leaf, weights[theirs].astype(np.float32))
        if value.shape != shape.shape:
            raise ValueError(f"{path}/{DIFFUSERS_WEIGHTS}: {theirs} has shape {weights[theirs].shape}, "
                             f"expected {shape.shape} in our layout")
        node = params
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[leaf], _ = value, used.add(theirs)
    unused = sorted(set(weights) - used)
    if unused:
        raise ValueError(f"{path}/{DIFFUSERS_WEIGHTS}: holds weights this architecture has no place for: {unused[:3]}")
    return cfg, params
