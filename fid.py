"""FID: the Inception-v3 network FID is defined with, in Flax, and the Fréchet distance.

    python evaluate.py fid --inception pt_inception.safetensors --real real/ --fake samples/

Heusel et al. 2017 ("GANs trained by a two time-scale update rule", §3) define FID as the
Fréchet distance between two Gaussians fitted to Inception pool3 features; Muse reports it
on COCO and CC3M (§4.2, Tables 1-2). Numbers are only comparable when computed by the same
network, so this is the network of pytorch-fid (mseitzer/pytorch-fid, `InceptionV3` with
`use_fid_inception=True`): the 2015 TensorFlow Inception weights the original TF FID code
used, with the three quirks of that graph (FIDInceptionA/C/E: average pools that ignore the
padding; a max pool in the last block), input resized to 299 px by bilinear interpolation
without antialiasing, [0, 1] scaled to [-1, 1]. Parameter names are pytorch-fid's state-dict
keys, so `inception_params_from_torch` is a transpose per conv and nothing else; the file
pytorch-fid downloads is converted once (README, "Metrics"). The Fréchet distance is
pytorch-fid's `calculate_frechet_distance`, step for step, on the same float64 statistics.
evaluate.py streams images from disk through `Extractor`.

Shape legend: B images, H x W input pixels, C channels, F = 2048 pool3 features.
"""
import functools
import sys
import warnings

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
from scipy import linalg

FEATURES = 2048                 # pool3 width: what FID is computed on
SIZE = 299                      # Inception-v3's input side


# -----------------------------------------------------------------------------
# The network: torchvision's Inception-v3 with pytorch-fid's FID blocks
# -----------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm -> ReLU. Params named as torchvision's: conv.kernel,
    bn.{weight, bias, running_mean, running_var}."""
    features: int
    kernel: tuple
    stride: int = 1
    padding: tuple = (0, 0)

    @nn.compact
    def __call__(self, x):
        ph, pw = self.padding
        x = nn.Conv(self.features, self.kernel, self.stride, padding=((ph, ph), (pw, pw)), use_bias=False,
                    name="conv")(x)
        return nn.relu(BatchNorm(name="bn")(x))


class BatchNorm(nn.Module):
    """Inference BatchNorm over the last axis, from its stored running statistics."""

    @nn.compact
    def __call__(self, x):
        C = x.shape[-1]
        p = {k: self.param(k, init, (C,))
             for k, init in (("weight", nn.initializers.ones), ("bias", nn.initializers.zeros),
                             ("running_mean", nn.initializers.zeros), ("running_var", nn.initializers.ones))}
        # torchvision's BasicConv2d builds its BatchNorm with eps=0.001 (TF's value)
        scale = p["weight"] * jax.lax.rsqrt(p["running_var"] + 1e-3)
        return (x - p["running_mean"]) * scale + p["bias"]


def conv(features, kernel, stride=1, padding=(0, 0), name=None):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    padding = (padding, padding) if isinstance(padding, int) else padding
    return BasicConv2d(features, kernel, stride, padding, name=name)


def avg_pool_same(x):
    # TF's average pool divides by the pixels inside the image, not by 9 at the borders
    # (pytorch-fid's "Patch" in FIDInceptionA/C/E_1: count_include_pad=False)
    return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def max_pool(x, stride=2):
    return nn.max_pool(x, (3, 3), (stride, stride), ((1, 1), (1, 1)) if stride == 1 else "VALID")


class InceptionA(nn.Module):            # FIDInceptionA: Mixed_5b, 5c, 5d
    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = conv(64, 1, name="branch1x1")(x)
        b5 = conv(48, 1, name="branch5x5_1")(x)
        b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
        b3 = conv(64, 1, name="branch3x3dbl_1")(x)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
        b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, 1, name="branch_pool")(avg_pool_same(x))
        return jnp.concatenate([b1, b5, b3, bp], -1)             # channels last, torch's order


class InceptionB(nn.Module):            # torchvision's InceptionB: Mixed_6a (stride 2)
    @nn.compact
    def __call__(self, x):
        b3 = conv(384, 3, stride=2, name="branch3x3")(x)
        bd = conv(64, 1, name="branch3x3dbl_1")(x)
        bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = conv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, max_pool(x)], -1)


class InceptionC(nn.Module):            # FIDInceptionC: Mixed_6b..6e, factorised 7x7
    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = conv(192, 1, name="branch1x1")(x)
        b7 = conv(c7, 1, name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, 1, name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, 1, name="branch_pool")(avg_pool_same(x))
        return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):            # torchvision's InceptionD: Mixed_7a (stride 2)
    @nn.compact
    def __call__(self, x):
        b3 = conv(192, 1, name="branch3x3_1")(x)
        b3 = conv(320, 3, stride=2, name="branch3x3_2")(b3)
        b7 = conv(192, 1, name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, max_pool(x)], -1)


class InceptionE(nn.Module):            # FIDInceptionE_1 (Mixed_7b) and FIDInceptionE_2 (Mixed_7c)
    max_pool: bool                      # E_2's pool branch is a max pool (the TF graph's quirk)

    @nn.compact
    def __call__(self, x):
        b1 = conv(320, 1, name="branch1x1")(x)
        b3 = conv(384, 1, name="branch3x3_1")(x)
        b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
        bd = conv(448, 1, name="branch3x3dbl_1")(x)
        bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                              conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
        pooled = max_pool(x, stride=1) if self.max_pool else avg_pool_same(x)
        bp = conv(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], -1)


# pytorch-fid's --dims: the feature width -> the block whose (spatially averaged) output it is.
# FID proper is 2048; the smaller ones are cheap stand-ins (a 64-d FID is no paper's number).
BLOCKS = {64: 0, 192: 1, 768: 2, 2048: 3}


class FIDInceptionV3(nn.Module):
    """uint8 (B, H, W, 3) -> float32 (B, dims): pool3 features (dims 2048), as pytorch-fid's
    InceptionV3([BLOCKS[dims]]) computes them from the same images as [0, 1] tensors."""
    dims: int = FEATURES              # 2048 (FID), or 64 / 192 / 768: an earlier block (BLOCKS)

    @nn.compact
    def __call__(self, images):
        block = BLOCKS[self.dims]
        x = images.astype(jnp.float32) / 255                     # torchvision's ToTensor
        B = x.shape[0]
        # F.interpolate(bilinear, align_corners=False) neither antialiases nor skips a
        # 299 px input, and jax.image.resize with antialias=False samples the same points
        x = jax.image.resize(x, (B, SIZE, SIZE, 3), "bilinear", antialias=False)
        x = 2 * x - 1                                            # (B, 299, 299, 3) in [-1, 1]
        x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)       # (B, 149, 149, 32)
        x = conv(32, 3, name="Conv2d_2a_3x3")(x)
        x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = max_pool(x)                                          # (B, 73, 73, 64): block 0
        if block >= 1:
            x = conv(80, 1, name="Conv2d_3b_1x1")(x)
            x = conv(192, 3, name="Conv2d_4a_3x3")(x)
            x = max_pool(x)                                      # (B, 35, 35, 192): block 1
        if block >= 2:
            x = InceptionA(32, name="Mixed_5b")(x)
            x = InceptionA(64, name="Mixed_5c")(x)
            x = InceptionA(64, name="Mixed_5d")(x)               # (B, 35, 35, 288)
            x = InceptionB(name="Mixed_6a")(x)                   # (B, 17, 17, 768)
            for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
                x = InceptionC(c7, name=name)(x)                 # block 2
        if block >= 3:
            x = InceptionD(name="Mixed_7a")(x)                   # (B, 8, 8, 1280)
            x = InceptionE(False, name="Mixed_7b")(x)
            x = InceptionE(True, name="Mixed_7c")(x)             # (B, 8, 8, 2048)
        # (B, dims): AdaptiveAvgPool2d(1) in the network for pool3, in get_activations otherwise
        return x.mean(axis=(1, 2))


# -----------------------------------------------------------------------------
# Weights: pytorch-fid's state dict, converted once to safetensors (README, "Metrics")
# -----------------------------------------------------------------------------

def inception_params_from_torch(state):
    """pytorch-fid's state dict (name -> numpy array) -> FIDInceptionV3's params.

    Every key is a path: "Mixed_5b.branch1x1.conv.weight" -> params["Mixed_5b"]["branch1x1"]
    ["conv"]["kernel"], a torch conv weight (out, in, kh, kw) transposed to Flax's (kh, kw,
    in, out); BatchNorm's four arrays keep their names. num_batches_tracked (a training
    counter) and the 1008-way classifier fc.* are not part of the features.
    """
    params = {}
    for key, value in state.items():
        *path, leaf = key.split(".")
        if path[0] == "fc" or leaf == "num_batches_tracked":
            continue
        value = np.asarray(value, np.float32)
        if leaf == "weight" and path[-1] == "conv":
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)  # (O, I, kh, kw) -> (kh, kw, I, O)
        node = params
        for name in path:
            node = node.setdefault(name, {})
        node[leaf] = value
    return params


def expected_shapes():
    """{path: shape} of FIDInceptionV3's params, from its definition (nothing is computed)."""
    shapes = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3), jnp.uint8))
    return {"/".join(k.key for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(shapes["params"])}


def check_params(params, where):
    """-> None, or a one-line reason why `params` are not FIDInceptionV3's (another network)."""
    want = expected_shapes()
    got = {"/".join(k.key for k in path): np.shape(leaf)
           for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    wrong = [k for k in want if k in got and tuple(got[k]) != tuple(want[k])]
    if missing or extra or wrong:
        first = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}" if extra
                 else f"{wrong[0]} is {got[wrong[0]]}, expected {want[wrong[0]]}")
        return (f"{where} is not pytorch-fid's Inception-v3 ({len(missing)} missing, {len(extra)} unexpected, "
                f"{len(wrong)} misshapen tensors; {first})")
    return None


def load_inception(path):
    """A .safetensors or .npz holding pytorch-fid's state dict -> params, or raises ValueError
    with a one-line reason (not such a file, another network)."""
    if path.endswith((".pth", ".pt")):
        raise ValueError(f"--inception {path}: a torch file; convert it once to .safetensors with the one-liner "
                         "in README's \"Metrics\" (torch never runs here)")
    try:
        if path.endswith(".npz"):
            with np.load(path) as f:
                state = {k: f[k] for k in f.files}
        else:
            from safetensors.numpy import load_file
            state = load_file(path)
    except Exception as e:                      # missing, truncated, or another format
        raise ValueError(f"--inception {path}: not a readable .safetensors / .npz ({type(e).__name__}: {e})")
    try:
        params = inception_params_from_torch(state)
    except (IndexError, ValueError, AttributeError, TypeError) as e:
        raise ValueError(f"--inception {path} is not pytorch-fid's Inception-v3 ({e})")
    reason = check_params(params, f"--inception {path}")
    if reason:
        raise ValueError(reason)
    return params


# -----------------------------------------------------------------------------
# Features, batched and compiled; statistics; the Fréchet distance
# -----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _forward(dims, devices):
    """The compiled forward, one per feature width and device count, shared by every
    Extractor (a sweep, or a test, builds several)."""
    model = FIDInceptionV3(dims)
    apply = lambda p, x: model.apply({"params": p}, x)
    return jax.pmap(apply, axis_name="batch") if devices > 1 else jax.jit(apply)


class Extractor:
    """uint8 (B, H, W, 3) -> float32 (B, dims) features (pool3: dims 2048), on every local device.

    Batches are padded to `batch_size` (a multiple of the device count) so each input size
    compiles once; with several devices the batch is split across them with pmap.
    """

    def __init__(self, params, batch_size, dims=FEATURES):
        self.n, self.dims = jax.local_device_count(), dims
        self.batch_size = -(-batch_size // self.n) * self.n                  # round up to the devices
        self._apply = _forward(dims, self.n)
        if self.n > 1:
            # one copy per device along a new leading axis, placed once by a pmapped identity
            # (passed as host arrays, every batch would copy the 90 MB of weights again)
            copies = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.n,) + np.shape(x)), params)
            self.params = jax.pmap(lambda p: p)(copies)
        else:
            self.params = jax.device_put(params)

    def __call__(self, images):
        B = len(images)
        padded = np.concatenate([images, np.repeat(images[-1:], self.batch_size - B, 0)])
        if self.n > 1:
            # (batch, H, W, 3) -> (devices, batch / devices, H, W, 3): one slice per device
            padded = padded.reshape(self.n, -1, *padded.shape[1:])
        out = np.asarray(self._apply(self.params, padded))
        return out.reshape(-1, out.shape[-1])[:B]                           # (B, dims)


def statistics(features):
    """float (n, F) -> (mu (F,), sigma (F, F)) in float64, as pytorch-fid: np.cov, n - 1."""
    act = np.asarray(features, np.float64)
    return act.mean(0), np.cov(act, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), computed as pytorch-fid
    does: scipy's sqrtm; if the product is singular enough that sqrtm is not finite, eps on
    both diagonals (said on stderr); an imaginary part from rounding is dropped when the
    diagonal's is below 1e-3, and is an error (ValueError) above it."""
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"the two sets' statistics differ in shape: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # scipy warns "Matrix is singular" whenever there are fewer images than features;
        # what the result needs is decided below, as pytorch-fid decides it
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))     # pytorch-fid passes disp=False: the same matrix
    if not np.isfinite(covmean).all():
        print(f"warning: the covariance product is singular; adding {eps} to both diagonals", file=sys.stderr)
        offset = np.eye(sigma1.shape[0]) * eps
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", linalg.LinAlgWarning)
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm of the covariance product has an imaginary part of "
                             f"{np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
