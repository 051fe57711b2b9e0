"""CLIP in Flax (Radford et al. 2021), and the CLIP score Muse reports (§4.2, Table 1, Fig. 8).

    python evaluate.py clip --clip clip-vit-base-patch32/ --images samples/ --captions captions.txt

The CLIP score (Hessel et al. 2021, as torchmetrics' CLIPScore computes it) is the cosine
of a caption's CLIP text embedding with its image's, clamped at 0, times 100, averaged over
pairs. Muse's 0.32 is the same cosine without the 100 (0.32 here reads 32). The network is
transformers' `CLIPModel`: a ViT image tower (patch embedding, class token, pre-norm
encoder, the class token's output projected) and a causal text tower whose embedding is the
end-of-text token's output, projected. Parameter names follow transformers' state dict, so
any Hugging Face CLIP folder (config.json, model.safetensors, the tokenizer's files,
preprocessor_config.json) loads: ViT-B/32, ViT-B/16, ViT-L/14, ... with `load_clip`.

Shape legend: B batch, S image side, P patches (+1 class token), L text tokens, T either
tower's tokens (P or L), D tower width, H heads, dh = D / H, E shared embedding width
(projection_dim).
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import jax
import jax.numpy as jnp
import flax.linen as nn
from PIL import Image

import muse

# transformers (the tokenizer) warns at import that PyTorch is absent: nothing here uses it
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

# OpenAI CLIP's pixel statistics: what preprocessor_config.json holds for every CLIP
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class TowerConfig:
    """One tower, named as transformers' CLIPTextConfig / CLIPVisionConfig."""
    hidden_size: int = 512                 # D
    intermediate_size: int = 2048          # MLP width
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"         # OpenAI's x * sigmoid(1.702 x); some ports use "gelu"
    # text tower
    vocab_size: int = 49408
    max_position_embeddings: int = 77      # L: captions are padded and truncated to it
    eos_token_id: int = 49407              # 2 in old configs: then the pooled token is argmax(ids)
    # vision tower
    image_size: int = 224                  # S
    patch_size: int = 32


@dataclass(frozen=True)
class CLIPConfig:
    text: TowerConfig                      # the causal text encoder
    vision: TowerConfig                    # the ViT
    projection_dim: int = 512              # E: both towers project to it


ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: nn.gelu(x, approximate=False),
               "gelu_new": lambda x: nn.gelu(x, approximate=True),
               "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True)}


class EncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""
    cfg: TowerConfig

    @nn.compact
    def __call__(self, x, bias):
        c = self.cfg
        B, T, D = x.shape
        H = c.num_attention_heads
        h = nn.LayerNorm(c.layer_norm_eps, name="layer_norm1")(x)
        split = lambda y: y.reshape(B, T, H, D // H)                      # (B, T, H, dh)
        q, k, v = (split(nn.Dense(D, name=f"self_attn_{n}")(h)) for n in ("q_proj", "k_proj", "v_proj"))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (D // H) ** -0.5 + bias   # (B, H, T, T)
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v).reshape(B, T, D)    # (B, T, D)
        x = x + nn.Dense(D, name="self_attn_out_proj")(out)
        h = nn.LayerNorm(c.layer_norm_eps, name="layer_norm2")(x)
        h = nn.Dense(c.intermediate_size, name="mlp_fc1")(h)
        return x + nn.Dense(D, name="mlp_fc2")(ACTIVATIONS[c.hidden_act](h))


def encoder(cfg, x, bias):
    for i in range(cfg.num_hidden_layers):
        x = EncoderLayer(cfg, name=f"layers_{i}")(x, bias)
    return x


class VisionTower(nn.Module):
    """float (B, S, S, 3), normalised pixels -> (B, D): the class token's output, normed."""
    cfg: TowerConfig

    @nn.compact
    def __call__(self, pixels):
        c = self.cfg
        p = c.patch_size
        x = nn.Conv(c.hidden_size, (p, p), p, padding="VALID", use_bias=False, name="patch_embedding")(pixels)
        B = x.shape[0]
        x = x.reshape(B, -1, c.hidden_size)                               # (B, P - 1, D), row-major as torch's flatten
        cls = self.param("class_embedding", nn.initializers.normal(1.0), (c.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (B, 1, c.hidden_size)), x], 1)    # (B, P, D)
        x = x + nn.Embed(x.shape[1], c.hidden_size, name="position_embedding")(jnp.arange(x.shape[1]))
        x = nn.LayerNorm(c.layer_norm_eps, name="pre_layrnorm")(x)       # transformers' spelling
        x = encoder(c, x, 0.0)
        return nn.LayerNorm(c.layer_norm_eps, name="post_layernorm")(x[:, 0])


class TextTower(nn.Module):
    """int ids (B, L), bool mask (B, L) -> (B, D): the end-of-text token's output."""
    cfg: TowerConfig

    @nn.compact
    def __call__(self, ids, mask):
        c = self.cfg
        L = ids.shape[1]
        x = nn.Embed(c.vocab_size, c.hidden_size, name="token_embedding")(ids)
        x = x + nn.Embed(c.max_position_embeddings, c.hidden_size, name="position_embedding")(jnp.arange(L))
        # causal (CLIP's text tower is a GPT-style encoder) and no attention to padding
        allowed = jnp.tril(jnp.ones((L, L), bool))[None] & mask[:, None, :]        # (B, L, L)
        bias = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)[:, None]        # (B, 1, L, L)
        x = nn.LayerNorm(c.layer_norm_eps, name="final_layer_norm")(encoder(c, x, bias))
        # configs from before transformers fixed CLIP's eos id (2) pool at the largest id,
        # which the tokenizer's end-of-text token is; newer ones at its first occurrence
        eos = ids.argmax(-1) if c.eos_token_id == 2 else (ids == c.eos_token_id).argmax(-1)
        return x[jnp.arange(ids.shape[0]), eos]                              # (B, D)


class CLIPModel(nn.Module):
    cfg: CLIPConfig

    def setup(self):
        self.vision_model = VisionTower(self.cfg.vision)
        self.text_model = TextTower(self.cfg.text)
        self.visual_projection = nn.Dense(self.cfg.projection_dim, use_bias=False)
        self.text_projection = nn.Dense(self.cfg.projection_dim, use_bias=False)

    def image_features(self, pixels):
        return self.visual_projection(self.vision_model(pixels))          # (B, E), as get_image_features

    def text_features(self, ids, mask):
        return self.text_projection(self.text_model(ids, mask))           # (B, E), as get_text_features

    def __call__(self, pixels, ids, mask):
        return self.image_features(pixels), self.text_features(ids, mask)


def clip_score(image_features, text_features):
    """(B, E), (B, E) -> float (B,): 100 * max(cos, 0) of each image with its caption."""
    a = image_features / np.linalg.norm(image_features, axis=-1, keepdims=True)
    b = text_features / np.linalg.norm(text_features, axis=-1, keepdims=True)
    return 100 * np.maximum((a * b).sum(-1), 0)


# -----------------------------------------------------------------------------
# Loading a Hugging Face CLIP folder
# -----------------------------------------------------------------------------

def clip_params_from_hf(state):
    """transformers' CLIPModel state dict (name -> numpy array) -> CLIPModel's params.

    "text_model.encoder.layers.3.self_attn.q_proj.weight" -> params["text_model"]["layers_3"]
    ["self_attn_q_proj"]["kernel"]: the module path without its "embeddings." / "encoder."
    containers, a Linear's (out, in) weight transposed to a Dense kernel, a LayerNorm's weight
    renamed scale, an Embedding's weight renamed embedding, the patch conv (D, 3, p, p) to
    (p, p, 3, D). position_ids buffers (older exports) are not weights.
    """
    params = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        value = np.asarray(value, np.float32)
        parts = [p for p in key.split(".") if p not in ("embeddings", "encoder")]
        # layers.3.self_attn.q_proj -> layers_3, self_attn_q_proj (and mlp.fc1 -> mlp_fc1)
        joined = ".".join(parts).replace("layers.", "layers_").replace("self_attn.", "self_attn_").replace("mlp.", "mlp_")
        *path, leaf = joined.split(".")
        if not path:                                  # logit_scale: not used by the score
            continue
        module = path[-1]
        if leaf == "class_embedding":
            pass
        elif module == "patch_embedding":
            leaf, value = "kernel", value.transpose(2, 3, 1, 0)           # (D, 3, p, p) -> (p, p, 3, D)
        elif module.endswith("_embedding"):
            leaf = "embedding"
        elif "norm" in module:
            leaf = {"weight": "scale"}.get(leaf, leaf)
        elif leaf == "weight":                         # Linear
            leaf, value = "kernel", value.T
        node = params
        for name in path:
            node = node.setdefault(name, {})
        node[leaf] = value
    return params


# transformers' CLIPVisionConfig defaults where they differ from CLIPTextConfig's (which are
# TowerConfig's own): a config.json may leave out any value equal to its default
VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12)


def config_from_hf(hf):
    """transformers' CLIPConfig (config.json, a dict) -> CLIPConfig."""
    fields = set(TowerConfig.__dataclass_fields__)
    tower = lambda d: TowerConfig(**{k: v for k, v in d.items() if k in fields})
    vision = {**VISION_DEFAULTS, **(hf.get("vision_config") or {})}
    return CLIPConfig(tower(hf.get("text_config") or {}), tower(vision), hf.get("projection_dim", 512))


class CLIP:
    """A loaded CLIP: `clip.image_features(np.stack([clip.preprocess(im) for im in pil_images]))`
    and `clip.text_features(captions)`, each float32 (B, E): transformers' get_image_features /
    get_text_features on what CLIPProcessor makes of the same images and captions."""

    def __init__(self, cfg: CLIPConfig, params, tokenizer, preprocess=None):
        self.cfg, self.params, self.tokenizer = cfg, params, tokenizer
        pre = preprocess or {}
        S = cfg.vision.image_size
        size = pre.get("size", {"shortest_edge": S})
        self.resize = size.get("shortest_edge", size.get("height", S)) if isinstance(size, dict) else size
        crop = pre.get("crop_size", {"height": S, "width": S})
        self.crop = crop.get("height", S) if isinstance(crop, dict) else crop
        self.mean = np.array(pre.get("image_mean", OPENAI_MEAN), np.float32)
        self.std = np.array(pre.get("image_std", OPENAI_STD), np.float32)
        model = CLIPModel(cfg)
        image = lambda p, x: model.apply({"params": p}, x, method=CLIPModel.image_features)
        text = lambda p, i, m: model.apply({"params": p}, i, m, method=CLIPModel.text_features)
        self.n = jax.local_device_count()
        if self.n > 1:                          # data-parallel over the local devices
            self._image, self._text = jax.pmap(image), jax.pmap(text)
            copies = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (self.n,) + np.shape(x)), params)
            self.params = jax.pmap(lambda p: p)(copies)       # placed once, one copy per device
        else:
            self._image, self._text = jax.jit(image), jax.jit(text)

    def _run(self, fn, *arrays):
        """fn over arrays (B, ...): with several devices, padded to a multiple of their count
        and split (devices, B / devices, ...) across them -> (B, E)."""
        if self.n == 1:
            return np.asarray(fn(self.params, *arrays))
        B = len(arrays[0])
        pad = -B % self.n
        split = lambda a: np.concatenate([a, np.repeat(a[-1:], pad, 0)]).reshape(self.n, -1, *a.shape[1:])
        out = np.asarray(fn(self.params, *map(split, arrays)))
        return out.reshape(-1, out.shape[-1])[:B]                           # (B, E)

    def preprocess(self, image: Image.Image):
        """A PIL image -> float32 (S, S, 3): CLIPImageProcessor's steps. The short side is
        resized bicubically to `resize` (the long side to int(resize * long / short)), the
        centre `crop` square is taken, pixels scaled to [0, 1] and normalised."""
        img = image.convert("RGB")
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(self.resize * long / short)
        size = (self.resize, new_long) if w <= h else (new_long, self.resize)     # PIL: (width, height)
        x = np.asarray(img.resize(size, Image.BICUBIC), np.float32) / 255
        top, left = (x.shape[0] - self.crop) // 2, (x.shape[1] - self.crop) // 2
        x = x[top:top + self.crop, left:left + self.crop]
        return (x - self.mean) / self.std

    def image_features(self, pixels):
        """float (B, S, S, 3), preprocessed -> (B, E)."""
        return self._run(self._image, pixels)

    def tokenize(self, captions):
        """-> ids int32 (B, L), mask bool (B, L): padded to L so every batch reuses one
        compiled program, truncated to L keeping the end-of-text token (torchmetrics cuts
        longer captions after tokenizing, dropping it; captions that long are rare)."""
        out = self.tokenizer(list(captions), padding="max_length", truncation=True,
                             max_length=self.cfg.text.max_position_embeddings, return_tensors="np")
        return out["input_ids"].astype(np.int32), out["attention_mask"].astype(bool)

    def text_features(self, captions):
        return self._run(self._text, *self.tokenize(captions))


def load_clip(path):
    """A Hugging Face CLIP folder (config.json, model.safetensors, tokenizer files) -> CLIP.
    Raises ValueError with a one-line reason when the folder is not one."""
    from transformers import CLIPTokenizer
    try:
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
        if "vision_config" not in hf or "text_config" not in hf:
            raise ValueError("its config.json is not a CLIPModel's (no text_config / vision_config)")
        state = muse.read_safetensors(path)     # sharded too (ViT-bigG), float32, float16 or bfloat16
        tokenizer = CLIPTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"--clip {path}: not a Hugging Face CLIP folder (config.json, model.safetensors, "
                         f"tokenizer files): {e}")
    preprocess = None
    if os.path.exists(os.path.join(path, "preprocessor_config.json")):
        with open(os.path.join(path, "preprocessor_config.json")) as f:
            preprocess = json.load(f)
    cfg = config_from_hf(hf)
    params = jax.tree.map(jnp.asarray, clip_params_from_hf(state))
    return CLIP(cfg, params, tokenizer, preprocess)
