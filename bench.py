"""Speed: how fast Muse samples and trains here, in FLOPs against the device's peak (MFU).

    python bench.py sample small                      # decoding with random weights: one JSON line
    python bench.py sample medium --dtype bfloat16 --profile /tmp/prof   # + where the time goes
    python bench.py train small                       # train.py's step on random data: one JSON line
    python bench.py train base --dtype bfloat16 --attention cudnn --batch_size 256   # paper scale, on a GPU

No checkpoint, data or text encoder is needed: the transformer of a preset (muse.PRESETS)
runs with random weights on random inputs, so every figure isolates the masked transformer.
FLOPs are analytic (transformer_flops, checked against XLA's own count in test_muse.py) and
MFU is quoted against the device's bfloat16 datasheet peak (peak_flops), or on a CPU against a
measured float32 matmul. docs/results.md holds the figures this printed, with their machines.

Like nanoGPT's bench.py, this is a shorter train.py: `bench.py train` runs train.py's own
optimizer, learning-rate schedule and micro-batching (imported from it), on one device.
"""
import argparse
import collections
import functools
import glob
import json
import os
import re
import statistics
import sys
import time
from dataclasses import replace

import numpy as np

# `bench.py train PRESET --devices N` compiles for N devices; on a CPU they are faked, and XLA
# must be told how many before jax is imported (accelerators ignore this flag)
_devices = next((a.split("=", 1)[1] if "=" in a else (sys.argv[i + 1] if i + 1 < len(sys.argv) else "")
                 for i, a in enumerate(sys.argv) if a == "--devices" or a.startswith("--devices=")), None)
if __name__ == "__main__" and _devices and _devices.isdigit() and "device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_devices}"

import jax
import jax.numpy as jnp

import muse
import sharding
import train
from checkpoint import Parser, fail, finite, seed

jax.config.update("jax_threefry_partitionable", False)     # as train.py and sample.py (muse.example_keys)


# -----------------------------------------------------------------------------
# FLOPs: what a forward pass of the masked transformer costs, counted analytically
# -----------------------------------------------------------------------------

def transformer_flops(cfg: muse.MuseConfig, batch: int, text_length: int) -> int:
    """Analytic FLOPs of ONE forward pass of MaskedTransformer on `batch` examples.

    A matmul of (m, k) by (k, n) counts 2*m*n*k (one multiply and one add per term). With
    N = cfg.num_tokens image tokens, M = text_length (+ Nlo low-res tokens for super-res)
    context tokens, I = H * dh, the counted matmuls are, per example:
      - text projection                         2 * L * Dt * D
      - each of the `depth` blocks:
          self-attention  q, k, v, o            4 * 2 * N * D * I
                          scores and sum        2 * 2 * N * N * I  (QK^T, then weights @ V)
          cross-attention q, o                  2 * 2 * N * D * I
                          k, v (over the ctx)   2 * 2 * M * D * I
                          scores and sum        2 * 2 * N * M * I
          MLP             in, out               2 * 2 * N * D * (mlp_ratio * D)
      - the output head                         2 * N * D * K
      - super-res only (lowres_grid > 0): `lowres_depth` blocks of self-attention and MLP
        over the Nlo low-res tokens (no cross-attention), as above with N -> Nlo;
        with lowres_aligned, the projection of the upsampled encoding 2 * N * D * D.
    Not counted: embedding lookups (gathers), layer norms, softmax, GELU, biases, residual
    adds, masking: all elementwise, a few percent at most for these widths (test_muse.py
    checks the total against XLA's own count). A training step (forward + backward: the
    backward pass computes two matmuls per forward matmul, one for the gradient of the
    activations and one for the weights) is 3x this.
    """
    c = cfg
    D, I, F = c.width, c.heads * c.head_dim, c.mlp_ratio * c.width
    N, L = c.num_tokens, text_length

    def block(n, m):                            # n query tokens; m context tokens (0: no cross-attention)
        flops = 4 * 2 * n * D * I + 2 * 2 * n * n * I + 2 * 2 * n * D * F
        if m:
            flops += 2 * 2 * n * D * I + 2 * 2 * m * D * I + 2 * 2 * n * m * I
        return flops

    flops = 2 * L * c.text_dim * D + 2 * N * D * c.codebook_size
    M = L
    if c.lowres_grid:
        n_lo = c.lowres_grid ** 2
        flops += c.lowres_depth * block(n_lo, 0) + (2 * N * D * D if c.lowres_aligned else 0)
        M = L + n_lo
    flops += c.depth * block(N, M)
    return batch * flops


# -----------------------------------------------------------------------------
# The denominator of MFU, and a profiler that says where the time goes
# -----------------------------------------------------------------------------
# Dense bfloat16 matmul peaks (no sparsity) in TFLOP/s, by a substring of jax's device_kind,
# from the vendors' datasheets (H100 / H200 SXM: 989; A100: 312; TPU v4: 275; v5e: 197;
# v5p: 459). The same figure is used whatever --dtype is: MFU is quoted against the
# bfloat16 peak, so a float32 run shows how much it leaves on the table. First match wins,
# so "v5p" is listed before the v5e spellings.
PEAK_TFLOPS = (("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("TPU v4", 275.0),
               ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("v5e", 197.0))


@functools.lru_cache(maxsize=None)
def peak_flops():
    """-> (FLOP/s, where the figure comes from) of the first device, the denominator of MFU.

    A known accelerator gets its datasheet bfloat16 peak (PEAK_TFLOPS). Anything else (a
    CPU, an unknown GPU) gets a measurement: the median of several 2048x2048 float32
    matmuls, a practical ceiling for the dense work a training step is made of. Cached, so
    a process measures at most once.
    """
    device = jax.devices()[0]
    for name, tflops in PEAK_TFLOPS:
        if name in device.device_kind:
            return tflops * 1e12, f"datasheet bf16 dense peak of {name}"
    n = 2048
    a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32), device)
    matmul = jax.jit(lambda x: x @ x)
    jax.block_until_ready(matmul(a))            # compile
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(matmul(a))
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times), f"measured {n}x{n} float32 matmul on {device.device_kind}"


def op_category(text):
    """What kind of work an op does, from its line in the compiled HLO (or its kernel's name).

    Reads the op's own name, opcode and attributes, and the jax primitive it came from (the
    last word of its metadata's op_name): not its operands, nor the rest of the op_name path,
    which says "transpose(jvp(...))" for every op of the backward pass."""
    m = re.match(r"%?(\S+) = .*? ([\w-]+)\([^)]*\)(.*)", text)
    name, opcode, attrs = m.groups() if m else (text, "", "")
    primitive = re.search(r'op_name="[^"]*?([\w-]+)"', attrs)
    primitive = primitive.group(1) if primitive else ""
    own = f"{name} {opcode} {re.sub(r'metadata=[{][^}]*[}]', '', attrs)} {primitive}"
    if "command_buffer" in own:                # XLA ran a stretch of kernels as one CUDA graph
        return "CUDA graph (its kernels show with XLA_FLAGS=--xla_gpu_enable_command_buffer=)"
    if any(k in own for k in ("fmha", "sdpa", "flash")):
        return "attention (cuDNN fused)"
    if any(k in own for k in ("gemm", "matmul", "dot_general", "nvjet", "cutlass")) or opcode in ("dot", "convolution"):
        return "matmul"
    if name.startswith(("copy", "transpose")) or opcode in ("copy", "transpose") or primitive == "transpose":
        return "copies / transposes"
    if "kind=kInput" in own or "reduce" in own:
        return "reductions (softmax, norms, loss, grad norm)"
    if "kind=kLoop" in own or "fusion" in name:
        return "elementwise (loop fusions)"
    return "other"


def profile_report(trace_dir, hlo_text, steps):
    """Device time per step of each op of the compiled step, from a jax.profiler trace.

    Reads the trace back with jax.profiler.ProfileData (no TensorBoard needed). On a GPU the
    device's stream lines hold one event per kernel (named by its XLA op, stat `hlo_op`, or
    else by the kernel); on a TPU the "XLA Ops" line; on a CPU the host's XLA thunks. Each
    op's time is summed and put in a category from its line in the compiled HLO (`hlo_text`).
    Writes trace_dir/ops.txt (the categories, then the 60 costliest ops with their HLO) and
    returns {category: ms per step}, plus "total" (the device's busy time per step).
    """
    path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    hlo = {}                                    # op name -> its instruction line
    for line in hlo_text.splitlines():
        line = line.strip().removeprefix("ROOT ")
        if " = " in line:
            hlo.setdefault(line.split(" = ")[0].lstrip("%"), line)
    planes = list(jax.profiler.ProfileData.from_file(path).planes)
    devices = [p for p in planes if p.name.startswith("/device:")]
    per_op, lines_seen = collections.Counter(), []
    for plane in devices or planes:
        lines = list(plane.lines)
        lines_seen += [f"{plane.name} / {line.name}" for line in lines]
        if devices:                             # kernels per stream (GPU), else the op line (TPU)
            streams = [line for line in lines if line.name.startswith("Stream")]
            lines = streams or [line for line in lines if line.name == "XLA Ops"]
        for line in lines:
            for event in line.events:
                op = next((v for k, v in event.stats if k == "hlo_op"), None) or (event.name if devices else None)
                if op is not None:
                    per_op[op] += event.duration_ns / 1e6 / steps
    category = lambda op: op_category(hlo.get(op, op))
    by_category = collections.Counter()
    for op, ms in per_op.items():
        by_category[category(op)] += ms
    report = {k: round(v, 3) for k, v in by_category.most_common()}
    report["total"] = round(sum(per_op.values()), 3)
    with open(os.path.join(trace_dir, "ops.txt"), "w") as f:
        f.write(f"device time per step (ms) over {steps} traced steps, from {path}\n\n")
        f.writelines(f"{v:10.3f}  {k}\n" for k, v in report.items())
        f.write("\nthe 60 costliest ops:\n")
        f.writelines(f"{ms:10.3f}  {category(op)}  {op}  {hlo.get(op, '')[:400]}\n"
                     for op, ms in per_op.most_common(60))
        f.write("\ntrace lines:\n" + "\n".join(lines_seen) + "\n")
    return report


# -----------------------------------------------------------------------------
# Sampling: `bench.py sample PRESET`
# -----------------------------------------------------------------------------

def sample_speed(preset, batch=8, steps=24, text_length=32, repeats=5, dtype="float32", profile=None):
    """Time sampling with random weights (no checkpoint needed); returns a dict for JSON.

    Reports the time of one guided forward (conditional + unconditional as one doubled
    batch) beside the time per decoding step, so the decode loop's own overhead shows, and
    the analytic FLOPs of the work (transformer_flops: each decoding step is one
    forward over the doubled batch) against the device's peak (peak_flops). dtype: the
    transformer's compute dtype ("float32" or "bfloat16"; the weights stay float32).
    profile: a folder to trace one more decode into; adds the device time per decoding
    step of each kind of op (profile_report).
    """
    cfg = replace(muse.PRESETS[preset], dtype=dtype)
    model = muse.MaskedTransformer(cfg)
    rng = jax.random.PRNGKey(0)
    ctx = jax.random.normal(rng, (batch, text_length, cfg.text_dim))
    mask = jnp.ones((batch, text_length), bool)
    ids = jnp.full((batch, cfg.num_tokens), cfg.mask_id, jnp.int32)
    params = model.init(rng, ids, ctx, mask)["params"]           # eager: see train.py make_or_resume_run()

    def timed(fn):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        compile_s = time.perf_counter() - t0
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times.append(time.perf_counter() - t0)
        return statistics.median(times), compile_s

    forward = jax.jit(muse.guided_logits, static_argnames="model")
    t_fwd, _ = timed(lambda: forward(model, params, ids, ctx, mask, ctx, mask, 3.0))
    rngs = jax.random.split(rng, batch)
    t_batch, compile_s = timed(lambda: muse.decode_jit(model, params, ctx, mask, ctx, mask, rngs, steps=steps)[0])
    flop_step = transformer_flops(cfg, 2 * batch, text_length)     # guidance doubles the batch
    achieved = steps * flop_step / t_batch                               # FLOP/s over the whole decode
    peak, peak_source = peak_flops()
    report = {}
    if profile:
        os.makedirs(profile, exist_ok=True)
        try:                                    # (a profiler that fails costs the profile, not the timing)
            with jax.profiler.trace(profile):
                jax.block_until_ready(muse.decode_jit(model, params, ctx, mask, ctx, mask, rngs, steps=steps)[0])
            hlo = muse.decode_jit.lower(model, params, ctx, mask, ctx, mask, rngs, steps=steps).compile().as_text()
            report = {"profile": profile_report(profile, hlo, steps)}
        except Exception as e:
            report = {"profile_error": f"{type(e).__name__}: {e}"[:300]}
    return {"preset": preset, "dtype": dtype, "batch": batch, "steps": steps, "images_per_sec": batch / t_batch,
            "sec_per_batch": t_batch, "ms_per_step": 1e3 * t_batch / steps, "ms_per_forward": 1e3 * t_fwd,
            "loop_overhead": t_batch / (steps * t_fwd) - 1, "compile_s": compile_s,
            "params": sum(x.size for x in jax.tree.leaves(params)),
            "gflop_per_step": flop_step / 1e9, "gflop_per_batch": steps * flop_step / 1e9,
            "achieved_tflops": achieved / 1e12, "peak_tflops": peak / 1e12, "mfu": achieved / peak,
            "peak_source": peak_source, "backend": jax.default_backend(),
            "device_kind": jax.devices()[0].device_kind, "devices": jax.device_count(), **report}


# -----------------------------------------------------------------------------
# Training: `bench.py train PRESET`
# -----------------------------------------------------------------------------

# the batch when --batch_size is not given: 8, except for the paper-scale presets, which get
# one that keeps an H100 busy and fits its 80 GB
TRAIN_BATCH = {"base": 64, "large": 16}
PROFILE_STEPS = 3                               # traced steps of --profile


def train_speed(args):
    """Time the base model's real train step on random inputs; returns a dict for JSON.

    Random weights, random token ids (B, N) in [0, K), random text embeddings (B, L, Dt) with
    an all-true mask: no checkpoint, tokenizer, VQGAN or T5, so only the masked transformer's
    step is timed (in training, the frozen VQGAN and T5 also run inside the step). The step
    is the one train.py runs: muse.masked_token_loss, train.make_optimizer's AdamW and the
    -learning_rate(...) scaling at train.py's default flags, jitted with the state donated. It runs on the first local
    device only (no pmap: per-device speed is what MFU is about; several devices would only
    add the gradient all-reduce). The same batch is fed every step.

    FLOPs are analytic: 3 x transformer_flops (forward + backward, the backward
    costing two matmuls per forward matmul), so the MFU is that of the model's matmuls,
    not of whatever else XLA runs. sec_per_step is the median of --bench_steps steps after a
    warm-up step, each step's loss read back before the next is dispatched (as in train.py);
    sec_per_step_pipelined the mean of as many dispatched back to back; compile_s the compile
    alone.
    """
    cfg = replace(muse.PRESETS[args.preset], dtype=args.dtype, text_length=args.text_length,
                  attention=args.attention, remat=args.remat)
    train.check_attention(cfg.attention)
    model = muse.MaskedTransformer(cfg)
    B, L, N = args.batch_size, args.text_length, cfg.num_tokens
    device = jax.local_devices()[0]
    r_ids, r_emb, r_init, rng = jax.random.split(jax.random.PRNGKey(args.seed), 4)
    ids = jax.random.randint(r_ids, (B, N), 0, cfg.codebook_size, jnp.int32)                # (B, N)
    emb = jax.random.normal(r_emb, (B, L, cfg.text_dim), jnp.float32)                       # (B, L, Dt)
    mask = jnp.ones((B, L), bool)                                                           # (B, L)
    # the empty prompt of classifier-free guidance: zeros with its one </s> token unmasked
    empty_emb, empty_mask = jnp.zeros((L, cfg.text_dim)), jnp.arange(L) == 0                # (L, Dt), (L,)
    batch = jax.device_put({"ids": ids, "emb": emb, "mask": mask}, device)

    # progress on stderr (stdout stays one JSON line): a benchmark cut off by a timeout still
    # says how far it got
    t_start = time.perf_counter()
    progress = lambda what: print(f"[{time.perf_counter() - t_start:.0f}s] {what}", file=sys.stderr, flush=True)
    opt = train.parse_args(["base", "--workdir", "unused"])       # train.py's optimizer flags, at their defaults
    params = model.init(r_init, ids[:1], emb[:1], mask[:1])["params"]       # eager: see train.py
    tx = train.make_optimizer(opt, params)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0)}
    state = jax.device_put(state, device)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    progress(f"initialised {n_params / 1e6:.1f}M params on {device.device_kind}; compiling the train step")

    k = args.grad_accum or train.default_grad_accum(B, N)

    def train_step(state, batch, rng):
        step = state["step"]
        keys = train.example_keys(rng, step, 0, B)                                                  # one key per example

        def loss_fn(params, mb):
            loss, _ = muse.masked_token_loss(model, params, mb["ids"], mb["emb"], mb["mask"],
                                             empty_emb, empty_mask, mb["keys"])
            return loss.mean()

        loss, grads = train.mean_over_micro_batches(lambda mb, _: jax.value_and_grad(loss_fn)(state["params"], mb),
                                              dict(batch, keys=keys), k)
        lr = train.learning_rate(step, opt.lr, opt.warmup, opt.decay_steps)
        return train.apply_update(tx, state, grads, lr), loss

    t0 = time.perf_counter()
    step_fn = jax.jit(train_step, donate_argnums=(0,)).lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    progress(f"compiled in {compile_s:.1f}s; timing {args.bench_steps} steps after one warm-up step")
    state, loss = jax.block_until_ready(step_fn(state, batch, rng))
    # each step's loss is read back before the next step is dispatched, as train.py reads its
    # metrics (the optimizer update of one step may still run while the next is dispatched):
    # the time between two losses is what a step costs in training
    times, t0 = [], time.perf_counter()
    for _ in range(args.bench_steps):
        state, loss = step_fn(state, batch, rng)
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    # the same steps dispatched back to back, waited for once: the host's dispatch of the next
    # step then overlaps the device's work (train.py reads every step's metrics back, so it
    # runs at sec_per_step; the gap between the two is what overlapping would gain)
    t0 = time.perf_counter()
    for _ in range(args.bench_steps):
        state, loss = step_fn(state, batch, rng)
    jax.block_until_ready(loss)
    pipelined = (time.perf_counter() - t0) / args.bench_steps
    profile = {}
    if args.profile:
        # where the time goes: trace a few more steps and add up the device time of each op
        os.makedirs(args.profile, exist_ok=True)
        try:                                    # (a profiler that fails costs the profile, not the timing)
            with jax.profiler.trace(args.profile):
                for _ in range(PROFILE_STEPS):
                    state, loss = jax.block_until_ready(step_fn(state, batch, rng))
            profile = {"profile": profile_report(args.profile, step_fn.as_text(), PROFILE_STEPS)}
            progress(f"profile of {PROFILE_STEPS} steps in {args.profile}/ops.txt")
        except Exception as e:
            profile = {"profile_error": f"{type(e).__name__}: {e}"[:300]}
    if not np.isfinite(float(loss)):
        fail(f"bench.py train: loss is {float(loss)} at the last timed step")
    sec = statistics.median(times)
    flop_step = 3 * transformer_flops(cfg, B, L)
    if args.peak_tflops is not None:
        peak, peak_source = args.peak_tflops * 1e12, "--peak_tflops"
    elif args.peak_gflops is not None:
        peak, peak_source = args.peak_gflops * 1e9, "--peak_gflops"
    else:
        peak, peak_source = peak_flops()
    achieved = flop_step / sec
    return {"preset": args.preset, "dtype": args.dtype, "batch": B, "grad_accum": k, "text_length": L,
            "params": n_params,
            "sec_per_step": sec, "sec_per_step_pipelined": pipelined, "compile_s": compile_s,
            "images_per_sec": B / sec,
            "tokens_per_sec": B * N / sec, "gflop_per_step": flop_step / 1e9,
            "achieved_tflops": achieved / 1e12, "peak_tflops": peak / 1e12, "mfu": achieved / peak,
            "peak_source": peak_source, "loss": float(loss), "backend": jax.default_backend(),
            "device_kind": device.device_kind, "devices": jax.local_device_count(), **profile}


# -----------------------------------------------------------------------------
# Memory: `bench.py train PRESET --devices N`, what a device holds, before renting a pod
# -----------------------------------------------------------------------------

# Device memory (GB as the vendors count them, 1e9 bytes) of the chips the README's table names
DEVICE_MEMORY_GB = {"TPU v5e": 16, "TPU v4": 32, "H100": 80, "TPU v5p": 95}
# "fits" leaves a fifth of the chip to what the estimate does not count: XLA's own temporaries
# (fusions, collective buffers), the runtime, fragmentation
HEADROOM = 0.8


def saved_for_backward(loss, wrt, *rest):
    """Bytes the forward pass of loss(wrt, *rest) keeps for its backward pass with respect to
    `wrt` (jax.vjp's residuals, the weights it reads included), counted without running it
    (arrays or jax.ShapeDtypeStructs): what --remat shrinks, on any backend."""
    residuals = jax.eval_shape(lambda w, *r: jax.tree.leaves(jax.vjp(lambda w: loss(w, *r), w)[1]), wrt, *rest)
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in residuals)


def train_memory(args):
    """Compile train.py's pmapped step for N devices and report what each device holds.

    Nothing is allocated and no step runs: the state, batch and step are abstract
    (jax.eval_shape, jax.ShapeDtypeStruct), so `large` compiles on a laptop, with N fake CPU
    devices. The step is train.make_train_step's, with its loss on random token ids and text
    embeddings (a token folder written with --text_emb: no tokenizer or T5 on the devices),
    --shard_state's layout and --remat as given, and --grad_accum 1 unless asked (the split
    into micro-batches is a CPU speed path). --batch_size is per device here.

    The figures: the state's bytes per device by arithmetic (weights, AdamW's moments; the
    gradients and, sharded, the gathered weights that live during the step only); the
    activations the forward pass keeps for the backward one, counted by JAX
    (saved_for_backward); "estimate", their sum, which "fits" reads with HEADROOM; and XLA's
    own buffer assignment of the compiled step (compiled.memory_analysis()): arguments,
    outputs, temporaries and the peak, arguments + outputs - aliased (the donated state) +
    temporaries. XLA:CPU's assignment is not TPU's or GPU's: it does not show --remat's
    saving at all (docs/results.md, "Memory per device on a pod"), hence the estimate.
    """
    n = args.devices
    if n > jax.device_count():
        fail(f"--devices {n}: this machine has {jax.device_count()} {jax.default_backend()} device(s)"
             + (" (on a CPU, run bench.py as a script: it fakes them)" if jax.default_backend() == "cpu" else ""))
    cfg = replace(muse.PRESETS[args.preset], dtype=args.dtype, text_length=args.text_length,
                  attention=args.attention, remat=args.remat)
    model = muse.MaskedTransformer(cfg)
    B, L, N = args.batch_size, args.text_length, cfg.num_tokens                   # B per device
    opt = train.parse_args(["base", "--workdir", "unused"])                      # train.py's defaults
    opt.grad_accum, opt.ema_decay, opt.shard_state = args.grad_accum or 1, 0.0, args.shard_state
    if B % opt.grad_accum:
        fail(f"--batch_size {B} must be a multiple of --grad_accum {opt.grad_accum}")
    sds = jax.ShapeDtypeStruct
    one = (sds((1, N), jnp.int32), sds((1, L, cfg.text_dim), jnp.float32), sds((1, L), bool))
    params = jax.eval_shape(lambda *x: model.init(jax.random.PRNGKey(0), *x)["params"], *one)
    tx = train.make_optimizer(opt, params, args.shard_state)
    state = {"params": params, "opt_state": jax.eval_shape(tx.init, params), "step": sds((), jnp.int32)}
    # what pmap is handed: a leading device axis, and sharded each array's row of c numbers
    per_device = lambda x: sds((n,) + ((sharding.row_length(x.size, n),) if args.shard_state and x.shape
                                      else x.shape), x.dtype)
    state_in = jax.tree.map(per_device, state)
    consts = {"empty_emb": sds((n, L, cfg.text_dim), jnp.float32), "empty_mask": sds((n, L), bool)}
    batch = {"ids": sds((n, B, N), jnp.int32), "text_emb": sds((n, B, L, cfg.text_dim), jnp.float32),
             "text_mask": sds((n, B, L), bool)}
    scalar = sds((n,), jnp.float32)

    def loss_fn(params, consts, batch, rng, step, first):
        loss, acc = muse.masked_token_loss(model, params, batch["ids"], batch["text_emb"], batch["text_mask"],
                                           consts["empty_emb"], consts["empty_mask"],
                                           train.example_keys(rng, step, first, batch["ids"].shape[0]))
        return loss.mean(), {"loss": loss.mean(), "masked_acc": acc.mean()}

    step = train.make_train_step(loss_fn, tx, opt, B, params if args.shard_state else None, jnp.dtype(args.dtype))
    t0 = time.perf_counter()
    compiled = jax.pmap(step, axis_name="batch", devices=jax.devices()[:n], donate_argnums=(0,)).lower(
        state_in, consts, batch, sds((n, 2), jnp.uint32), scalar, scalar, scalar).compile()
    compile_s = time.perf_counter() - t0
    # what one micro-batch's forward pass keeps for the backward pass, counted by JAX whatever
    # the backend's scheduler does with it: the activations (what --remat shrinks) grow with
    # the rows, the weights it reads do not, so two batch sizes tell them apart
    one_device = lambda tree: jax.tree.map(lambda x: sds(x.shape[1:], x.dtype), tree)
    weights = jax.tree.map(lambda x: sds(x.shape, jnp.dtype(args.dtype) if args.shard_state else x.dtype), params)

    def kept(rows):
        micro = jax.tree.map(lambda x: sds((rows,) + x.shape[1:], x.dtype), one_device(batch))
        return saved_for_backward(lambda p, *rest: loss_fn(p, *rest, 0)[0], weights, one_device(consts), micro,
                                  sds((2,), jnp.uint32), sds((), jnp.int32))
    m_rows = B // opt.grad_accum
    once, twice = kept(m_rows), kept(2 * m_rows)
    activations = twice - once
    m = compiled.memory_analysis()
    nbytes = lambda tree: sum(int(np.prod(x.shape[1:])) * x.dtype.itemsize for x in jax.tree.leaves(tree))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    gb = lambda x: round(x / 1e9, 3)
    grad_dtype = jnp.dtype(args.dtype) if args.shard_state else jnp.dtype(jnp.float32)   # of the weights differentiated
    report = {"weights": nbytes(state_in["params"]), "optimizer": nbytes(state_in["opt_state"]),
              "gathered_weights": n_params * jnp.dtype(args.dtype).itemsize if args.shard_state else 0,
              "gradients": n_params * grad_dtype.itemsize, "activations": activations,
              "weights_kept_for_backward": once - activations, "batch": nbytes(batch)}
    # the step's high-water mark as JAX counts it, at the turn from the forward to the backward
    # pass: the state, the batch, the weights the backward pass reads (sharded: the gathered
    # ones; else the compute-dtype copies of the float32 ones), the activations, the gradients
    report["estimate"] = sum(report[k] for k in ("weights", "optimizer", "batch", "gradients", "activations")) \
        + max(report["gathered_weights"], report["weights_kept_for_backward"])
    report.update(xla_arguments=m.argument_size_in_bytes, xla_outputs=m.output_size_in_bytes,
                  xla_aliased=m.alias_size_in_bytes, xla_temporaries=m.temp_size_in_bytes, xla_peak=peak)
    return {"preset": args.preset, "devices": n, "batch_per_device": B, "global_batch": n * B,
            "dtype": args.dtype, "shard_state": args.shard_state, "remat": args.remat,
            "grad_accum": opt.grad_accum, "text_length": L, "params": n_params, "compile_s": compile_s,
            "bytes_per_device": report, "gb_per_device": {k: gb(v) for k, v in report.items()},
            "fits": {name: report["estimate"] <= HEADROOM * size * 1e9 for name, size in DEVICE_MEMORY_GB.items()},
            "fits_xla_peak": {name: peak <= size * 1e9 for name, size in DEVICE_MEMORY_GB.items()},
            "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind}


# -----------------------------------------------------------------------------
# The command line
# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = Parser(prog="bench.py", description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True, parser_class=Parser)
    s = sub.add_parser("sample", help="time parallel decoding (sample.py's loop) with random weights",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t = sub.add_parser("train", help="time train.py's step of the base model with random weights and data",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for q in (s, t):
        q.add_argument("preset", nargs="?", default="small", choices=sorted(muse.PRESETS), help="muse.PRESETS")
        q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                       help="the transformer's compute dtype (weights and logits stay float32)")
        q.add_argument("--profile", default=None, metavar="DIR",
                       help="also trace into DIR and add the device time per step of each kind of op (matmul, "
                            "attention, elementwise, ...) to the JSON; DIR/ops.txt lists the costliest ops")
    s.add_argument("--batch_size", type=int, default=8, help="prompts decoded at once")
    s.add_argument("--steps", type=int, default=24, help="decoding steps")
    t.add_argument("--batch_size", type=int, default=None,
                   help="examples per step (default 64 for the base preset, 16 for large, 8 otherwise)")
    t.add_argument("--grad_accum", type=int, default=0,
                   help="micro-batches per step, as train.py's (0: train.py's default for this machine)")
    t.add_argument("--text_length", type=int, default=32, help="prompt length in tokens")
    t.add_argument("--attention", default="xla", choices=["xla", "cudnn"],
                   help="the attention kernel; cudnn: cuDNN's fused flash attention (NVIDIA GPUs, bfloat16)")
    t.add_argument("--bench_steps", type=int, default=10, help="timed steps (after one warm-up step)")
    t.add_argument("--seed", type=seed, default=0, help="seeds the random weights and data")
    t.add_argument("--peak_tflops", type=finite, default=None,
                   help="the device's peak for MFU (default: the datasheet bf16 peak of a known GPU/TPU, "
                        "whatever --dtype; on a CPU or unknown device a measured float32 matmul)")
    t.add_argument("--peak_gflops", type=finite, default=None, help="the same peak in GFLOP/s")
    t.add_argument("--devices", type=int, default=None, metavar="N",
                   help="instead of timing: compile train.py's pmapped step for N devices (faked on a CPU) and "
                        "report the bytes each holds (--batch_size is then per device); no step runs")
    t.add_argument("--shard_state", action="store_true", help="with --devices: train.py --shard_state's layout")
    t.add_argument("--remat", action="store_true", help="train.py --remat: recompute each block in the backward pass")
    args = p.parse_args(argv)
    if args.what == "sample":
        if min(args.batch_size, args.steps) < 1:
            p.error("--batch_size and --steps must be at least 1")
        return args
    if args.batch_size is None:
        args.batch_size = TRAIN_BATCH.get(args.preset, 8)
    if args.peak_tflops is not None and args.peak_gflops is not None:
        p.error("give --peak_tflops or --peak_gflops, not both")
    if min(x for x in (args.peak_tflops, args.peak_gflops, 1) if x is not None) <= 0:
        p.error("--peak_tflops and --peak_gflops must be above 0")
    if min(args.batch_size, args.text_length, args.bench_steps) < 1:
        p.error("--batch_size, --text_length and --bench_steps must be at least 1")
    if args.grad_accum < 0:
        p.error("--grad_accum must be 1 or more (or 0: the default for the machine)")
    if args.grad_accum and args.batch_size % args.grad_accum:
        p.error(f"--batch_size {args.batch_size} must be a multiple of --grad_accum {args.grad_accum}")
    if args.attention == "cudnn" and args.dtype != "bfloat16":
        p.error("--attention cudnn goes with --dtype bfloat16 (cuDNN's fused attention has no float32 kernel)")
    if args.devices is not None and args.devices < 1:
        p.error(f"--devices must be at least 1, not {args.devices}")
    if args.shard_state and not args.devices:
        p.error("--shard_state goes with --devices N (the state is sharded over N devices)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.what == "sample":
        report = sample_speed(args.preset, batch=args.batch_size, steps=args.steps, dtype=args.dtype,
                              profile=args.profile)
    elif args.devices:
        report = train_memory(args)
    else:
        report = train_speed(args)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
