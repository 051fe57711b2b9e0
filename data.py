"""Data on disk: real image-caption data for train.py (WebDataset tar shards, Hugging Face-style
image folders), the token folders that `train.py tokenize` writes and train.py reads, and PNG grids.

    python train.py vqgan --data 'cc3m/{00000..00331}.tar' --workdir runs/vq ...   # img2dataset's output
    python train.py base  --data my_folder --vqgan runs/vq ...                      # my_folder/metadata.jsonl

Two layouts, the ones real text-image data sets come in:
  - WebDataset tar shards, as img2dataset writes CC3M, CC12M and LAION: each sample is a
    group of tar members sharing a key, `KEY.jpg` (or .jpeg / .png / .webp) and `KEY.txt`
    (the caption; without one, the "caption" or "text" field of `KEY.json`). `--data` takes
    brace ranges (`{00000..00123}`, `{a,b}`) and globs; a glob keeps only `.tar` files
    (img2dataset writes .parquet and _stats.json files beside its shards). Read with
    Python's `tarfile`: no extra dependency.
  - An image folder with `metadata.jsonl`: one `{"file_name": ..., "text": ...}` per line,
    file names relative to the folder (the Hugging Face `imagefolder` convention).
And one that train.py writes itself (`tokenize`, at the end of this file):
  - A token folder (`train.py tokenize`): `tokens.json` + `tokens-PPP-KKKKK.npz` files of
    token ids (and low-res ids) with their captions, so the transformer stages can train
    without running the tokenizer every step; with `--text_emb` also the captions' text
    embeddings (a memory-mapped `.text_emb.npy` per file), so they run no text encoder
    either. Read exactly like tar shards.

How the records flow, and why:
  - Sharding: process p of P reads only shards p, p + P, p + 2P, ... (an image folder is
    cut into P interleaved virtual shards), so no two hosts of a pod read the same file.
    Within a host, the host batch is split over its devices by train.py, as for shapes.
    Shards that do not divide evenly among the hosts leave some hosts one shard more than
    others, and so read those hosts' shards less often: a warning says so.
  - Order: each epoch visits this process's shards in a seeded random order and passes
    their records through a shuffle buffer (seeded by seed, process and epoch), drained at
    the epoch's end: every record comes out exactly once per epoch.
  - Only the *index* flows through the shuffle: (file, byte offset, size) of each member,
    read from the tar headers, which costs a seek per member. The bytes are read and
    decoded when a batch is built, in a thread pool (PIL decodes outside the GIL). So
    resuming at step s replays the index of the first s * b records (cheap) and decodes
    nothing it skips.
  - Fixed consumption: every step takes exactly b records (b = the host's rows), whether
    or not they decode. A record whose image is corrupt fills its row with a copy of a good
    row of the same batch, and is counted. So the position after step s is exactly s * b
    records on every host: resuming needs no saved reader state, only the step.
  - Skipped and counted, never fatal: undecodable images (`corrupt`), samples without an
    image or a caption (`incomplete`), tar files cut short or with a corrupt header part-way
    (`truncated`: the members before it are still used), unreadable files (`unreadable`).
    train.py writes these counts to metrics.jsonl as data_corrupt, data_incomplete, ... A
    batch with no good row at all repeats the previous batch (its rows counted as
    corrupt): on a pod, one host stopping alone would leave the others waiting in the
    gradient all-reduce. Only a first batch with no good row is an error.
"""
import glob
import hashlib
import io
import json
import math
import os
import re
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

import numpy as np
import jax
from flax import traverse_util
from jax.experimental import multihost_utils
from PIL import Image
from tqdm import tqdm

import vqgan
from checkpoint import write_atomically

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
SKIP_KINDS = ("corrupt", "incomplete", "truncated", "unreadable")


def expand_braces(pattern: str) -> list[str]:
    """'a/{000..002}.tar' -> ['a/000.tar', 'a/001.tar', 'a/002.tar']; '{x,y}' -> both.

    Numeric ranges are padded to the wider bound when either starts with a zero, and may
    run downwards, as in bash ('{1..010}' -> 001 ... 010; '{3..1}' -> 3, 2, 1). Several
    braces expand left to right; nested ones from the inside out.
    """
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, tail, body = pattern[:m.start()], pattern[m.end():], m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.groups()
        width = max(len(a), len(b)) if a.startswith("0") or b.startswith("0") else 0
        step = 1 if int(b) >= int(a) else -1
        options = [f"{i:0{width}d}" for i in range(int(a), int(b) + step, step)]
    else:
        options = body.split(",")
    return [s for o in options for s in expand_braces(head + o + tail)]


def find_shards(spec: str) -> list[str]:
    """The sorted tar files named by a --data pattern (braces, then globs). A glob keeps the
    .tar files only: img2dataset writes NNNNN.parquet and NNNNN_stats.json beside them."""
    files = []
    for p in expand_braces(spec):
        files += sorted(f for f in glob.glob(p) if f.endswith(".tar")) if any(c in p for c in "*?[") else [p]
    return list(dict.fromkeys(files))           # a file named twice ('{a,{a,b}}', overlapping globs) is read once


def is_real_data(spec: str) -> bool:
    return spec != "shapes"


MANIFEST = "tokens.json"


def is_token_folder(spec: str) -> bool:
    return os.path.exists(os.path.join(spec, MANIFEST))


def read_manifest(folder: str) -> dict:
    """tokens.json of a token folder (the tokenizers' configs and fingerprints) + its token files.

    The files are listed from the folder, not from the manifest: on a pod every host writes
    its own (tokens-PPP-*.npz) and only process 0 writes the manifest."""
    with open(os.path.join(folder, MANIFEST)) as f:
        manifest = json.load(f)
    manifest["files"] = sorted(os.path.basename(f) for f in glob.glob(os.path.join(folder, "tokens-*.npz")))
    return manifest


def fingerprint(params) -> str:
    """A short digest of a tokenizer's weights: token ids are only valid with the weights that made them."""
    h = hashlib.sha256()
    for path, w in sorted(traverse_util.flatten_dict(params, sep="/").items()):
        h.update(path.encode())
        h.update(np.ascontiguousarray(np.asarray(w, np.float32)).tobytes())
    return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# The index: what each shard holds, without reading any image
# -----------------------------------------------------------------------------

def index_tar(path, counts):
    """Records of one tar shard: (key, image (path, byte offset, size), caption).

    Members are grouped by key (the name up to its first dot after the last slash), in
    the order the tar stores them. A tar cut short keeps the groups whose bytes are all
    present and is counted as `truncated`; a group without an image or a caption is
    counted as `incomplete`.
    """
    groups, order = {}, []
    try:
        size = os.path.getsize(path)
        with tarfile.open(path, "r:") as tar:
            try:
                for m in tar:   # reads the headers only; the data is seeked over
                    if not m.isfile():
                        continue
                    if m.offset_data + m.size > size:
                        counts["truncated"] += 1
                        break
                    d, base = os.path.split(m.name)
                    key, _, ext = base.partition(".")
                    key = os.path.join(d, key)
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    if ext.lower() == "txt":
                        groups[key]["txt"] = tar.extractfile(m).read().decode("utf-8", "replace").strip()
                    elif ext.lower() == "json":      # img2dataset's metadata; may hold the caption
                        groups[key]["json"] = json_caption(tar.extractfile(m).read())
                    else:
                        groups[key][ext.lower()] = (path, m.offset_data, m.size)
                else:
                    # tarfile ends the iteration silently at a header cut short, or at a corrupt
                    # header part-way through; an intact tar ends with two zero blocks of 512
                    # bytes after its last member
                    tar.fileobj.seek(tar.offset)
                    end = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
                    if len(end) < 2 * tarfile.BLOCKSIZE or end.strip(b"\0"):
                        counts["truncated"] += 1
            except (tarfile.ReadError, EOFError):
                counts["truncated"] += 1
    except (OSError, tarfile.TarError):
        counts["unreadable"] += 1
        return []
    records = []
    for key in order:
        g = groups[key]
        image = next((g[e] for e in IMAGE_EXTS if e in g), None)
        caption = g.get("txt") or g.get("json")
        if image is None or not caption:
            counts["incomplete"] += 1
            continue
        records.append((key, image, caption))
    return records


def json_caption(raw):
    """The caption in a sample's KEY.json ("caption" or "text"), or None."""
    try:
        meta = json.loads(raw)
    except ValueError:
        return None
    caption = meta.get("caption") or meta.get("text") if isinstance(meta, dict) else None
    return caption.strip() if isinstance(caption, str) else None


def index_folder(folder, counts):
    """Records of an image folder's metadata.jsonl: (file name, image path, caption).

    A line that is not UTF-8, not a JSON object, or whose file_name or text is missing or not
    a string is a bad sample: skipped, counted as incomplete, and named in one warning."""
    records, bad = [], []
    path = os.path.join(folder, "metadata.jsonl")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
                name, text = row["file_name"], row["text"]
                if not isinstance(name, str) or not isinstance(text, str) or not name or not text.strip():
                    raise TypeError("file_name and text must be non-empty strings")
            except (ValueError, KeyError, TypeError) as e:   # (UnicodeDecodeError is a ValueError)
                counts["incomplete"] += 1
                bad.append(f"line {number}: {type(e).__name__}: {e}"[:120])
                continue
            records.append((name, (os.path.join(folder, name), 0, None), text))
    if bad:
        print(f"warning: {path}: {len(bad)} bad line(s) skipped (first: {bad[0]})", file=sys.stderr)
    return records


# -----------------------------------------------------------------------------
# Decoding: bytes -> a centre crop at each training resolution
# -----------------------------------------------------------------------------

def read_bytes(image):
    path, offset, size = image
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read() if size is None else f.read(size)


def center_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """The centre square of an image, resized to `resolution` (bicubic, antialiased).

    uint8 (resolution, resolution, 3). Cropped before resizing (PIL's `box`), so the sides
    that are thrown away are never resampled. A low-res copy for super-resolution is made
    from the same crop, so both resolutions show exactly the same content; sample.py crops
    --init images the same way.
    """
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    reducing_gap = 2.0 if side >= 2 * resolution else None     # large shrinks: box-reduce first (faster)
    return np.asarray(img.resize((resolution, resolution), Image.BICUBIC, box=(left, top, left + side, top + side),
                                 reducing_gap=reducing_gap))


def index_tokens(path, counts):
    """Records of one token file: (key, (arrays, row), caption); arrays = {"ids": (n, N)}, plus
    "hr_ids" (n, N_hr) and "text_emb" (n, L, Dt) / "text_mask" (n, L) where tokenize wrote them.
    The embeddings stay on disk, memory-mapped from their .npy: only the rows a batch takes
    are read."""
    try:
        with np.load(path) as f:
            arrays = {k: f[k] for k in ("ids", "hr_ids", "text_mask") if k in f}
            captions = f["captions"].tolist()
            if "ids" not in arrays:
                raise KeyError("ids")
        if "text_mask" in arrays:
            arrays["text_emb"] = np.load(path[:-len(".npz")] + ".text_emb.npy", mmap_mode="r")
            if len(arrays["text_emb"]) != len(captions):
                raise ValueError(f"{path}: {len(arrays['text_emb'])} text embeddings for {len(captions)} captions")
    except (OSError, ValueError, KeyError):
        counts["unreadable"] += 1
        return []
    return [(f"{path}:{i}", (arrays, i), c) for i, c in enumerate(captions)]


def to_rgb(img: Image.Image) -> Image.Image:
    """Any image PIL reads -> RGB with its values kept. PIL's own convert("RGB") clips 16- and
    32-bit greyscale (modes I;16, I, F) at 255, which turns most of them white: they are scaled
    from their range instead (0-65535, or 0-1 for float images in [0, 1]). Transparent pixels
    (RGBA, LA, PA, P with a transparent colour) are composited onto white, the background the
    shapes world draws on; CMYK, YCbCr, 1 and L convert as PIL does."""
    if img.mode.startswith("I") or img.mode == "F":
        a = np.asarray(img, np.float64)
        top = 1.0 if img.mode == "F" and a.max() <= 1 else 255.0 if a.max() <= 255 else 65535.0 \
            if a.max() <= 65535 else a.max()
        return Image.fromarray(np.clip(a / top * 255 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def decode(image, resolutions):
    """A record's image at each resolution, or None if it cannot be read or decoded."""
    try:
        with Image.open(io.BytesIO(read_bytes(image))) as img:
            img = to_rgb(img)
            return [center_crop(img, r) for r in resolutions]
    except Exception:   # PIL raises many types on bad bytes (OSError, SyntaxError, ValueError...)
        return None


# -----------------------------------------------------------------------------
# The stream: this process's records, epoch after epoch, shuffled
# -----------------------------------------------------------------------------

class Reader:
    """Batches of one process's share of a tar-shard, image-folder or token-folder data set.

        reader = Reader(spec, seed, process, num_processes, resolutions, start_record=0)
        images, captions = reader.next_batch(b)   # images: one uint8 (b, S, S, 3) per resolution
                                                  # (a token folder: {"ids": (b, N), ...}, index_tokens)

    `reader.counts` holds the skip counts so far and `reader.epoch` the current epoch.
    A resumed run passes start_record = step * b, and the stream continues exactly where
    the interrupted one stood (on the same number of processes).
    """

    def __init__(self, spec, seed, process, num_processes, resolutions, start_record=0,
                 shuffle_buffer=1000, threads=8):
        self.seed, self.process, self.resolutions = seed, process, tuple(resolutions)
        self.shuffle_buffer = shuffle_buffer
        self.counts = dict.fromkeys(SKIP_KINDS, 0)
        self.tokens = is_token_folder(spec)
        if self.tokens:
            files = read_manifest(spec)["files"]
            if len(files) < num_processes:
                raise ValueError(f"--data {spec}: {len(files)} token files for {num_processes} processes; "
                                 "each process needs at least one of its own")
            self.shards = [("tokens", os.path.join(spec, f)) for f in files[process::num_processes]]
        elif os.path.isdir(spec):
            if not os.path.exists(os.path.join(spec, "metadata.jsonl")):
                raise ValueError(f"--data {spec}: a folder needs a metadata.jsonl "
                                 '(one {"file_name": ..., "text": ...} per line)')
            records = index_folder(spec, self.counts)
            # P interleaved virtual shards of one folder: process p reads records p, p + P, ...
            self.shards = [("folder", records[process::num_processes])]
        else:
            files = find_shards(spec)
            missing = [f for f in files if not os.path.exists(f)]
            if not files or missing:
                raise ValueError(f"--data {spec}: no such file {missing[0] if missing else spec} "
                                 "(expected tar shards, e.g. 'data/{00000..00099}.tar', or a folder)")
            if len(files) < num_processes:
                raise ValueError(f"--data {spec}: {len(files)} shards for {num_processes} processes; "
                                 "each process needs at least one shard of its own")
            self.shards = [("tar", f) for f in files[process::num_processes]]
            if len(files) % num_processes and process == 0:
                print(f"warning: --data {spec}: {len(files)} shards over {num_processes} processes, so some "
                      f"hold one shard more and read each of theirs less often (use a multiple of "
                      f"{num_processes} shards for uniform sampling)", file=sys.stderr)
        self._index_cache = {}
        self._previous = None                    # the last batch with good rows: next_batch's fallback
        self.epoch, self._stream = 0, self._records()
        for _ in range(start_record):    # replay the index only: nothing is read or decoded
            next(self._stream)
        self.pool = ThreadPoolExecutor(threads)

    def _index(self, shard):
        kind, src = shard
        if kind == "folder":
            return src
        if src not in self._index_cache:
            # counted on the first pass only: a skipped sample is one problem, not one per epoch
            self._index_cache[src] = (index_tokens if kind == "tokens" else index_tar)(src, self.counts)
        return self._index_cache[src]

    def _records(self):
        """Every record of this process's shards once per epoch, shuffled; forever."""
        while True:
            rng = np.random.default_rng([self.seed, self.process, self.epoch])
            buffer, emitted = [], 0
            for i in rng.permutation(len(self.shards)):
                for record in self._index(self.shards[i]):
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append(record)
                        continue
                    j = int(rng.integers(len(buffer)))     # emit a random buffered record, keep the new one
                    out, buffer[j] = buffer[j], record
                    emitted += 1
                    yield out
            for j in rng.permutation(len(buffer)):
                emitted += 1
                yield buffer[j]
            if emitted == 0:
                raise ValueError("the data has no readable image-caption pair "
                                 f"(skipped so far: {self.counts})")
            self.epoch += 1

    def epoch_size(self):
        """Records in one epoch of this process (indexes every shard: headers only)."""
        return sum(len(self._index(s)) for s in self.shards)

    def next_batch(self, b, fill=True):
        """The next b records: (one uint8 (b, S, S, 3) per resolution, b captions).

        fill=False drops the rows that do not decode instead of filling them with good ones
        (fewer than b rows then; `train.py tokenize` wants each example once).
        """
        records = [next(self._stream) for _ in range(b)]
        if self.tokens:                          # token ids: nothing to decode
            # each record is (key, (arrays of its file, its row), caption); arrays: see index_tokens
            rows = [(arrays, row) for _, (arrays, row), _ in records]
            per_array = {k: np.stack([arrays[k][row] for arrays, row in rows])   # (b, ...) each
                         for k in rows[0][0]}
            return per_array, [caption for _, _, caption in records]
        decoded = list(self.pool.map(lambda r: decode(r[1], self.resolutions), records))
        good = [i for i, d in enumerate(decoded) if d is not None]
        if not good:
            if self._previous is None:
                raise ValueError(f"none of the {b} images of the first batch could be decoded "
                                 f"(e.g. {records[0][1][0]}, {records[0][0]}): is the data corrupt?")
            self.counts["corrupt"] += b          # a whole batch unreadable: train on the last good one
            if not fill:
                return [np.zeros((0, r, r, 3), np.uint8) for r in self.resolutions], []
            return self._previous
        rows = []
        for i, d in enumerate(decoded):
            if d is None:
                self.counts["corrupt"] += 1
                if not fill:
                    continue
                i = good[i % len(good)]          # a corrupt row takes a good row's place
            rows.append(i)
        images = [np.stack([decoded[i][k] for i in rows]) for k in range(len(self.resolutions))]
        self._previous = images, [records[i][2] for i in rows]
        return self._previous


# -----------------------------------------------------------------------------
# Writing a token folder: `train.py tokenize`
# -----------------------------------------------------------------------------

def tokenize(out, batches, tokenizers, rows, text_encoder=None, text_encoder_name=None, shard_size=10000,
             source="", total=None):
    """Runs the frozen tokenizer(s) over `batches` once and writes the token folder `out`.

    batches: this process's examples, each item (images, captions): one float array
    (n, S, S, 3) in [-1, 1] per tokenizer, at its resolution, and the n captions.
    tokenizers: {"vqgan": (model, params, config)} (+ "vqgan_hr": the high-res one); rows:
    the most examples of one item (every batch is padded to it: one shape, one compile).
    Writes out/tokens-PPP-KKKKK.npz (process P's K-th file of up to `shard_size` examples:
    ids int32 (n, N) of vqgan; with vqgan_hr also hr_ids (n, N_hr) of the same images;
    captions (n,)) and, last, out/tokens.json (the tokenizers' configs and weight
    fingerprints, and `source`, the data they were made from): a folder without its
    manifest is not read. `train.py base|superres --data out` then trains on the ids and
    never runs a tokenizer, and checks that its --vqgan / --vqgan_hr made them.

    With a text encoder it also encodes each caption once: text_mask bool (n, L) goes into
    the .npz, the embeddings float16 (n, L, Dt) into tokens-PPP-KKKKK.text_emb.npy beside it
    (a plain .npy, which Reader memory-maps: at T5-XXL's Dt = 4096 and L = 64 they are
    0.5 MB per example, too many to hold in memory), and the encoder's fingerprint into
    tokens.json. The transformer stages then run no frozen network at all (float16: the
    embeddings are rounded to 3 significant digits, as bfloat16 training would round them
    anyway). total: how many items `batches` yields (the progress bar's length). Returns
    (examples, files) written by this process.
    """
    p = jax.process_index()
    os.makedirs(out, exist_ok=True)
    if glob.glob(os.path.join(out, "tokens-*.npz")) or os.path.exists(os.path.join(out, MANIFEST)):
        # a token folder is read as every tokens-*.npz in it: old files would be trained on too
        raise ValueError(f"tokenize: {out} already holds token files; choose an empty --out")
    if jax.process_count() > 1:                 # every host has looked before any host writes
        multihost_utils.sync_global_devices("tokenize: --out checked")
    pending, files, count = [], 0, 0

    def flush():
        nonlocal pending, files
        if pending:
            arrays = {k: np.concatenate([o[k] for o in pending]) for k in pending[0]}
            name = os.path.join(out, f"tokens-{p:03d}-{files:05d}")
            if "text_emb" in arrays:            # first: a written .npz always has its embeddings
                buf = io.BytesIO()
                np.save(buf, arrays.pop("text_emb"))
                write_atomically(name + ".text_emb.npy", buf.getvalue())
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            write_atomically(name + ".npz", buf.getvalue())
            pending, files = [], files + 1

    for images, captions in tqdm(batches, total=total, disable=p != 0, desc="tokenize"):
        n = len(captions)
        pad = lambda x: np.concatenate([x, np.repeat(x[-1:], rows - n, 0)])                 # (rows, S, S, 3)
        ids = [np.asarray(vqgan.encode_jit(model, params, pad(x))).reshape(rows, -1)[:n].astype(np.int32)
               for (model, params, _), x in zip(tokenizers.values(), images)]               # (n, N) each
        pending.append(dict(zip(("ids", "hr_ids"), ids), captions=np.array(captions)))
        if text_encoder is not None:
            emb, mask = text_encoder(captions)                                      # (n, L, Dt), (n, L)
            pending[-1].update(text_emb=np.asarray(emb, np.float16), text_mask=np.asarray(mask))
        count += len(captions)
        if sum(len(o["captions"]) for o in pending) >= shard_size:
            flush()
    flush()
    if jax.process_count() > 1:                 # every host's files are written before the manifest
        multihost_utils.sync_global_devices("tokenize: files written")
    if p == 0:                                  # the manifest last: a folder without it is not read
        manifest = {k: {"config": config, "fingerprint": fingerprint(params)}
                    for k, (_, params, config) in tokenizers.items()}
        if text_encoder is not None:
            manifest["t5"] = {"config": asdict(text_encoder.cfg), "fingerprint": fingerprint(text_encoder.params),
                              "text_length": text_encoder.max_length, "text_encoder": text_encoder_name}
        write_atomically(os.path.join(out, MANIFEST), json.dumps(dict(manifest, data=source), indent=1).encode())
    return count, files


# -----------------------------------------------------------------------------
# Writing images: sample grids
# -----------------------------------------------------------------------------

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
