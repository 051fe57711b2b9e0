"""Checkpoints: how a run is stored on disk, read back and shipped, and how a trained pipeline
is loaded for sampling; and the one-line error that every command line ends bad input with.

    runs/base/checkpoint.msgpack                 written by `python train.py base ...` (and vqgan, superres)
    checkpoints/demo/{base,superres}/            written by `python train.py export` (float16, no optimizer)

A checkpoint is one msgpack file holding one dict, everything needed to resume or sample
(nanoGPT's rule):
    step, rng       where the run stands (the training step, its PRNG key)
    params          the trained weights (a vqgan run: {"vqgan", "disc"}; base/superres: the transformer)
    ema             with --ema_decay: their moving average, the weights that ship and sample (`weights`)
    opt_state       AdamW's moments (training checkpoints only; `export` drops them)
    consts          the frozen networks a transformer stage was trained over: {"vqgan", "t5"}
                    (+ "vqgan_hr" for super-resolution), so a checkpoint samples on its own
    config          JSON: the stage, every model config and the trajectory's flags (train.py new_run)
What can go wrong, and what happens then:
  - a crash or kill mid-write: the file is written to a temporary name, flushed and renamed
    into place, so the previous checkpoint stays intact; a failed write (a full disk) removes
    the temporary file, says so in one line and keeps the previous checkpoint;
  - bytes damaged afterwards: the file stores a SHA-256 of its payload, checked on every read
    (checkpoints written before the checksum existed still load, unchecked);
  - weights that are not finite: never written (train.py checks before saving), and refused
    on reading, so a broken run cannot hand its NaNs to sampling, --init or --vqgan.

`train.py --checkpoints orbax` stores the same contents through Orbax instead (orbax-checkpoint,
which flax depends on, so no new dependency), one folder per step, the last --keep of them:
    runs/base/orbax/STEP/{state,config}          "state": everything above but the config (an Orbax
                                                 PyTree of numpy arrays); "config": the same JSON
Orbax writes a step to a temporary folder and renames it once complete, so a kill mid-save leaves
the previous step loadable; the write runs in the background while training goes on; every
process takes part (process 0 writes the arrays, which are full and the same on every host);
and Orbax's storage layer (tensorstore, etils.epath) reaches gs:// paths. read_checkpoint reads
a run's latest step, so export, sampling, --init and --vqgan take either format.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass

import numpy as np
import jax
from flax import serialization
from tqdm import tqdm

import muse
import vqgan

CHECKPOINT = "checkpoint.msgpack"
ORBAX = "orbax"                             # the folder of an Orbax run's steps, in its workdir


# -----------------------------------------------------------------------------
# Bad input: one line on stderr and a non-zero exit, no traceback
# -----------------------------------------------------------------------------

def fail(message, code=1):
    """Bad input: one line on stderr and a non-zero exit, no traceback (on a line of its own,
    also when a progress bar is being drawn there)."""
    tqdm.write(f"error: {message}", file=sys.stderr)
    sys.exit(code)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of a usage dump."""

    def error(self, message):
        fail(f"{self.prog}: {message}", code=2)


def finite(text):
    """argparse type of every float flag: a number, not nan or inf (which would run, and draw noise)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


# Seeds are 32-bit under the threefry PRNG: PRNGKey(2 ** 32) is PRNGKey(0), so a larger seed
# would silently repeat another's images. (sample.py also uses seed + 1, for super-resolution.)
MAX_SEED = 2 ** 32 - 2


def seed(text):
    """argparse type of --seed: an integer in [0, MAX_SEED]."""
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..{MAX_SEED} (the PRNG's 32-bit seeds)")
    return value


def unwritable(path, folder=True):
    """Why `path` cannot be written (as a folder, or with folder=False as a file), or None.
    Checked before any model loads, so that a bad output path costs no compute."""
    if os.path.exists(path) and os.path.isdir(path) != folder:
        return f"{path} is {'a file' if folder else 'a folder'}"
    parent = os.path.abspath(path if folder else os.path.dirname(os.path.abspath(path)))
    while not os.path.exists(parent):           # (the root exists, so this ends)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, so {path} cannot be made"
    if not os.access(parent, os.W_OK):
        return f"{parent} is not writable"
    return None


def named_leaves(tree):
    """[(the '/'-joined name of a leaf, the leaf)] of a pytree (flax state or nested dicts)."""
    return [("/".join(str(getattr(k, "key", k)) for k in path), x)
            for path, x in jax.tree_util.tree_flatten_with_path(serialization.to_state_dict(tree))[0]]


def nonfinite(tree):
    """The name of the first float array in `tree` holding a nan or inf, else None."""
    for name, x in named_leaves(tree):
        if np.issubdtype(np.asarray(x).dtype, np.floating) and not np.isfinite(x).all():
            return name
    return None


# -----------------------------------------------------------------------------
# Writing and reading checkpoints
# -----------------------------------------------------------------------------

def write_atomically(path, payload):
    """payload: a pytree (msgpack) or bytes, written to path.tmp and renamed onto path.

    A write that fails (a full disk, a read-only folder) removes path.tmp, which would keep
    the disk full, and ends the program with one line; the file at `path` is untouched."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(payload if isinstance(payload, bytes) else serialization.msgpack_serialize(payload))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)                   # atomic on POSIX
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        folder = os.path.dirname(os.path.abspath(path))
        with contextlib.suppress(OSError):
            folder += f", {shutil.disk_usage(folder).free / 2 ** 20:.0f} MB free"
        kept = "the previous file is kept" if os.path.exists(path) else "nothing was written"
        fail(f"could not write {path} ({e.strerror or e}; {folder}); {kept}")


def write_checkpoint(path, payload):
    """A checkpoint file: the msgpack payload, wrapped with its SHA-256 so that read_checkpoint
    can tell a file damaged after it was written from a good one."""
    body = serialization.msgpack_serialize(payload)
    write_atomically(path, serialization.msgpack_serialize({"sha256": hashlib.sha256(body).hexdigest(),
                                                             "payload": body}))


def checkpoint_payload(state, consts, rng, where):
    """What a training checkpoint holds but its config, on the host: state {"params",
    "opt_state", "step"[, "ema"]}, the frozen `consts`, the run's PRNG key. Refuses weights
    that are not finite (train.py checks first; this is the last line of defence)."""
    payload = jax.tree.map(np.asarray, {
        "step": state["step"], "rng": rng,
        "params": state["params"], "opt_state": serialization.to_state_dict(state["opt_state"]),
        "consts": {k: consts[k] for k in ("vqgan", "vqgan_hr", "t5") if k in consts}})
    if "ema" in state:
        payload["ema"] = jax.tree.map(np.asarray, state["ema"])
    bad = nonfinite({"params": payload["params"], "opt_state": payload["opt_state"]})
    if bad:
        fail(f"not writing a checkpoint of step {int(state['step'])} to {where}: {bad} is not finite")
    return payload


def save_checkpoint(workdir, state, consts, config, rng):
    """A training checkpoint: state {"params", "opt_state", "step"}, the frozen `consts`, the run's config."""
    payload = checkpoint_payload(state, consts, rng, workdir)
    payload["config"] = json.dumps(config)
    write_checkpoint(os.path.join(workdir, CHECKPOINT), payload)


def is_remote(path):
    """A path that only Orbax's storage layer can reach (gs://bucket/run), not the os module."""
    return "://" in str(path)


def orbax_dir(workdir):
    """The folder of an Orbax run's steps (joined by hand for gs://, which os.path does not know)."""
    return f"{workdir.rstrip('/')}/{ORBAX}" if is_remote(workdir) else os.path.join(workdir, ORBAX)


def run_format(workdir):
    """What a run folder holds: "msgpack" (checkpoint.msgpack), "orbax" (orbax/ with a complete
    step), or None."""
    if not is_remote(workdir):                  # (only Orbax writes to gs://)
        if os.path.isfile(os.path.join(workdir, CHECKPOINT)):
            return "msgpack"
        if not os.path.isdir(orbax_dir(workdir)):
            return None
    manager = orbax_manager(workdir)
    try:
        return "orbax" if manager.latest_step() is not None else None
    finally:
        manager.close()


def orbax_manager(workdir, keep=None):
    """The Orbax CheckpointManager of a run's steps; keep=N: the one that writes them (the last N
    kept, saved in the background). Every process of a multi-host run must make it, in step."""
    import orbax.checkpoint as ocp              # (a second to import: only runs that use it pay)
    writing = keep is not None
    return ocp.CheckpointManager(
        orbax_dir(workdir), options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=writing, enable_async_checkpointing=True,
            # a save killed midway leaves its temporary folder: the writer removes it
            cleanup_tmp_directories=writing))


def save_orbax(manager, state, consts, config, rng):
    """The step's checkpoint through Orbax, in the background: save() returns once the arrays
    are copied (it first waits for the previous save to finish); wait_until_finished() ends it."""
    import orbax.checkpoint as ocp
    payload = checkpoint_payload(state, consts, rng, manager.directory)
    manager.save(int(state["step"]), args=ocp.args.Composite(
        state=ocp.args.StandardSave(payload),
        config=ocp.args.JsonSave(json.loads(json.dumps(config)))))   # a copy: train.py edits its config


def read_orbax(workdir):
    """The latest step of an Orbax run, as read_checkpoint returns a msgpack one (numpy arrays,
    whatever the device count that wrote them)."""
    import orbax.checkpoint as ocp
    manager = orbax_manager(workdir)
    step = manager.latest_step()
    if step is None:
        fail(f"no checkpoint at {workdir} (its {ORBAX}/ folder holds no complete step)")
    try:
        got = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                            config=ocp.args.JsonRestore()))
    except Exception as e:                      # a step folder damaged after it was written
        fail(f"{orbax_dir(workdir)}/{step} is not a readable Orbax checkpoint ({type(e).__name__}: "
             f"{str(e).splitlines()[0][:200] if str(e) else ''})")
    finally:
        manager.close()
    return dict(got["state"], config=got["config"])


def read_checkpoint(path):
    """The raw contents of a checkpoint (a workdir or its checkpoint.msgpack; an Orbax run's
    latest step) as nested dicts: its checksum verified, its weights (params, consts) finite."""
    file = os.path.join(path, CHECKPOINT) if os.path.isdir(path) else path
    if (is_remote(path) or os.path.isdir(path)) and run_format(path) == "orbax":
        file, ckpt = orbax_dir(path), read_orbax(path)
    elif not os.path.isfile(file):
        fail(f"no checkpoint at {path} (train one with `python train.py ...`, or pass --checkpoint DIR)")
    else:
        try:
            with open(file, "rb") as f:
                ckpt = serialization.msgpack_restore(f.read())
            if set(ckpt) == {"sha256", "payload"}:
                if hashlib.sha256(ckpt["payload"]).hexdigest() != ckpt["sha256"]:
                    fail(f"{file} is damaged: its contents do not match the checksum written with them")
                ckpt = serialization.msgpack_restore(ckpt["payload"])
            ckpt["config"] = json.loads(ckpt["config"])
        except Exception as e:                  # truncated, or not a checkpoint at all
            fail(f"{file} is not a readable checkpoint ({type(e).__name__}: {e})")
    bad = nonfinite({"params": ckpt.get("params", {}), "consts": ckpt.get("consts", {})})
    if bad:
        fail(f"{file} holds weights that are not finite ({bad}): the run diverged before it was saved")
    # shipped checkpoints store their weights in float16 (export); compute in float32
    return jax.tree.map(lambda x: x.astype(np.float32) if getattr(x, "dtype", None) == np.float16 else x, ckpt)


def weights(ckpt):
    """The weights a checkpoint samples with: the moving average where the run kept one
    (--ema_decay), else the trained weights."""
    return ckpt.get("ema", ckpt["params"])


def export(workdir, out):
    """`train.py export --workdir RUN --out DIR`: a checkpoint to ship, for sampling only.

    Drops the optimizer state (2/3 of a training checkpoint), keeps the EMA weights where
    the run has them (as `params`: `weights`), and stores the float32 weights
    in float16, which read_checkpoint casts back: the demo's pipeline fits in a few MB, and
    float16's 11-bit mantissa is far finer than anything visible in a sample.
    """
    if not out:
        fail("export: pass --out DIR")
    target = os.path.join(out, CHECKPOINT)
    if os.path.realpath(out) == os.path.realpath(workdir):
        fail(f"export: --out {out} is the run's own folder: the export would replace its training checkpoint")
    if os.path.exists(target):                  # a run's checkpoint, or an earlier export: never replaced
        fail(f"export: {target} exists; choose another --out (or remove it first)")
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"export: --out {out} is a file; pass a folder")
    ckpt = read_checkpoint(workdir)
    if ckpt["config"]["stage"] not in ("base", "superres"):
        fail(f"export: {workdir} is a {ckpt['config']['stage']!r} run; export base and superres runs "
             "(they hold their tokenizers)")
    half = lambda x: x.astype(np.float16) if x.dtype == np.float32 else x
    payload = {"step": ckpt["step"], "params": jax.tree.map(half, weights(ckpt)),
               "consts": jax.tree.map(half, ckpt["consts"]), "config": json.dumps(ckpt["config"])}
    os.makedirs(out, exist_ok=True)
    write_checkpoint(target, payload)
    if ckpt["config"]["tokenizer"] != "byt5":   # a pretrained T5's tokenizer files travel with it
        shutil.copytree(os.path.join(workdir, ckpt["config"]["tokenizer"]),
                        os.path.join(out, ckpt["config"]["tokenizer"]), dirs_exist_ok=True)
    size = os.path.getsize(os.path.join(out, CHECKPOINT)) / 2 ** 20
    print(f"exported {workdir} (step {int(ckpt['step'])}) to {out}: {size:.1f} MB")


def shape_mismatch(want, got):
    """The first '/'-joined name where two param trees (flax state or nested dicts; arrays or
    ShapeDtypeStructs) differ in names or shapes, else None."""
    want, got = ({name: np.shape(x) for name, x in named_leaves(tree)} for tree in (want, got))
    for name in sorted(set(want) | set(got)):
        if want.get(name) != got.get(name):
            return f"{name}: expected {want.get(name, 'nothing')}, found {got.get(name, 'nothing')}"
    return None


def read_tokenizer(path, flag, why):
    """A trained VQGAN given by `flag` (--vqgan, --vqgan_hr): a vqgan run, a tokenizer held
    inside a base or superres run (so `--vqgan checkpoints/demo/base --vqgan_hr
    checkpoints/demo/superres` trains on the shipped demo's tokenizers), or a pretrained one
    in diffusers' VQModel format (vqgan.load_diffusers). -> a vqgan checkpoint."""
    if not path:
        fail(f"{why}: pass {flag} DIR (from `python train.py vqgan ...`)")
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        if not vqgan.is_diffusers_folder(path):
            fail(f"{flag} {path}: a folder with config.json but no {vqgan.DIFFUSERS_WEIGHTS} (a diffusers VQModel)")
        try:
            cfg, params = vqgan.load_diffusers(path)
        except ValueError as e:
            fail(f"{flag} {e}")
        return {"config": {"stage": "vqgan", "vqgan": asdict(cfg)}, "params": {"vqgan": params}}
    ckpt = read_checkpoint(path)
    stage = ckpt["config"]["stage"]
    if stage in ("base", "superres"):
        key = flag.lstrip("-")                  # "vqgan" or "vqgan_hr"
        if key not in ckpt["consts"]:
            fail(f"{flag} {path}: this {stage} checkpoint holds no {key!r} tokenizer")
        return {"config": {"stage": "vqgan", "vqgan": ckpt["config"][key]},
                "params": {"vqgan": ckpt["consts"][key]}}
    if stage != "vqgan":
        fail(f"{flag} {path}: holds a {stage!r} checkpoint, not a vqgan, base or superres one")
    return dict(ckpt, params=weights(ckpt))


# -----------------------------------------------------------------------------
# Loading a trained pipeline: base -> super-resolution, each with its tokenizer and text encoder
# -----------------------------------------------------------------------------

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


def load_text_encoder(config, t5_params, folder):
    """The frozen text encoder stored in a checkpoint (tokenizer files, if any, in `folder`)."""
    if config["tokenizer"] == "byt5":
        tokenizer = muse.byte_tokenizer()
    else:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, config["tokenizer"]))
    return muse.TextEncoder(muse.T5Config(**config["t5"]), t5_params, tokenizer, config["text_length"])


def load_stage(path, stage):
    """A `train.py base` or `train.py superres` workdir (or its export) -> Stage."""
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
        stage = Stage(muse.MaskedTransformer(cfg), weights(ckpt), vqgan.VQGAN(vq_cfg), ckpt["consts"][out],
                      load_text_encoder(config, ckpt["consts"]["t5"], folder), config)
    except (KeyError, TypeError, ValueError, OSError) as e:
        fail(f"{path}: incompatible checkpoint ({type(e).__name__}: {e})")
    # the weights must be those the stored configs describe (shapes only: nothing is computed)
    rng, L = jax.random.PRNGKey(0), config["text_length"]
    ids, text = np.zeros((1, cfg.num_tokens), np.int32), np.zeros((1, L, stage.text_encoder.cfg.d_model))
    lowres = np.zeros((1, cfg.lowres_grid ** 2), np.int32) if cfg.lowres_grid else None
    S = vq_cfg.resolution
    for what, init, got in (
            ("transformer", lambda: stage.model.init(rng, ids, text, np.ones((1, L), bool), lowres), stage.params),
            (out, lambda: stage.vq.init(rng, np.zeros((1, S, S, 3))), stage.vq_params),
            ("t5", lambda: stage.text_encoder.model.init(rng, np.zeros((1, L), np.int32), np.ones((1, L), bool)),
             stage.text_encoder.params)):
        try:
            bad = shape_mismatch(jax.eval_shape(init)["params"], got)
        except Exception as e:                  # a config no model can be built from
            bad = f"{type(e).__name__}: {e}"
        if bad:
            fail(f"{path}: its {what} weights do not match the config stored with them ({bad})")
    return stage


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
