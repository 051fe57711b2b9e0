"""How train.py lays its training state out over the data-parallel devices: replicated, or
sharded ZeRO-style (`train.py ... --shard_state`). Used inside train.py's pmapped step.

Replicated (the default, as in Flax's imagenet example): every device holds the whole state
(float32 weights, AdamW's two moments, the EMA) and `lax.pmean` averages the gradients.
Simple, but a parameter then costs ~16 bytes on every device (weights, two moments,
gradients), so the paper's 3B model (~52 GB) fits no TPU chip.

Sharded (ZeRO stages 1-2, Rajbhandari et al. 2020, done inside pmap): each of the n devices
holds 1/n of every weight, moment and EMA array, and the step
  1. all-gathers the weights in the compute dtype (bfloat16 in mixed precision: half the
     bytes to move and to hold),
  2. computes the gradients of the full weights on its rows of the batch (in that dtype),
  3. reduce-scatters them (`lax.psum_scatter`): device i receives the sum over devices of
     slice i only, the same numbers `lax.pmean` would give it, for 1/n of the memory,
  4. updates its slice with AdamW; the next step's gather brings the updated slices together.
Per device the persistent state drops from 16 to 12/n bytes per parameter, plus the gathered
weights and gradients that live only during the step (2 + 2 bytes in bfloat16). Everything
AdamW does is elementwise except the gradient clipping's global norm, which is a psum of the
slices' squared norms (clip_by_global_norm). The weights are gathered whole at the start of
the step, not layer by layer (ZeRO stage 3, FSDP): simpler, and enough for `large` on 16 GB
chips (README, "Memory per device").

The layout: a leaf of shape S (size s) becomes, on the host, an array of n rows of
c = ceil(s / n) numbers, its flattened values zero-padded to n * c; pmap gives row i to
device i. The padding stays exactly zero (its gradient is zero, so are its moments, its
update and its weight decay). Scalars (AdamW's step count) are replicated. Checkpoints hold
the full arrays, so a run resumes on any number of devices, sharded or not.
"""
import numpy as np
import jax
import jax.numpy as jnp
import optax

AXIS = "batch"                                  # the pmap axis of train.py's step


# -----------------------------------------------------------------------------
# Replicated: one copy per device
# -----------------------------------------------------------------------------

def replicate(tree, n):
    """One copy per device along a new leading axis (pmap places copy i on device i)."""
    return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)), tree)


def unreplicate(tree):
    return jax.tree.map(lambda x: x[0], tree)


# -----------------------------------------------------------------------------
# Sharded: row i of every array on device i
# -----------------------------------------------------------------------------

def row_length(size, n):
    """c: the numbers of a size-`size` array that each of n devices holds."""
    return -(-size // n)


def to_rows(tree, n, first=0, count=None):
    """Full host arrays -> rows [first, first + count) of the sharded layout of n devices.

    A leaf of shape S becomes (count, c): its flattened values, zero-padded to n * c, in n
    rows of c; a scalar becomes (count,) copies. first/count: this host's devices (all n on
    one host; on a pod, process p feeds rows [p * local, (p + 1) * local) to its devices).
    """
    count = n if count is None else count

    def rows(x):
        x = np.asarray(x)
        if x.ndim == 0:
            return np.broadcast_to(x, (count,))
        c = row_length(x.size, n)
        flat = np.zeros(n * c, x.dtype)
        flat[:x.size] = x.reshape(-1)
        return flat.reshape(n, c)[first:first + count]                                   # (count, c)
    return jax.tree.map(rows, tree)


def from_rows(rows, like):
    """The inverse of to_rows over all n rows: (n, c) -> the full array shaped like `like`
    (arrays or jax.ShapeDtypeStructs)."""
    def full(r, x):
        r, shape = np.asarray(r), tuple(x.shape)
        return r[0] if not shape else r.reshape(-1)[:int(np.prod(shape))].reshape(shape)
    return jax.tree.map(full, rows, like)


def gather(slices, like, dtype=None):
    """Inside the step: every device's slice (c,) -> the full arrays (shaped like `like`),
    cast to `dtype` before the all-gather so that bfloat16 moves and holds half the bytes."""
    def one(x, full):
        x = x if dtype is None else x.astype(dtype)
        whole = jax.lax.all_gather(x, AXIS, tiled=True)                                  # (n * c,)
        return whole[:int(np.prod(full.shape))].reshape(full.shape)
    return jax.tree.map(one, slices, like)


def scatter_mean(grads, n):
    """Inside the step: the full gradients of this device's rows -> this device's slice of
    their mean over the n devices, in float32 (the master weights' dtype)."""
    def one(g):
        c = row_length(g.size, n)
        flat = jnp.pad(g.reshape(-1), (0, n * c - g.size))                               # (n * c,)
        return jax.lax.psum_scatter(flat, AXIS, tiled=True).astype(jnp.float32) / n      # (c,)
    return jax.tree.map(one, grads)


def global_norm(tree, sharded):
    """The l2 norm of all of `tree`: of this device's copy, or, sharded, of all slices together."""
    squares = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree))
    return jnp.sqrt(jax.lax.psum(squares, AXIS) if sharded else squares)


def clip_by_global_norm(max_norm, sharded=False):
    """optax.clip_by_global_norm (the same arithmetic and the same, empty, state, so the
    checkpoints of either load into the other) with the norm of global_norm: sharded, each
    device sees only its slice of the gradients, but all must scale by the norm of the whole."""
    def update(updates, state, params=None):
        norm = global_norm(updates, sharded)
        clip = lambda g: jax.lax.select(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm)
        return jax.tree.map(clip, updates), state
    return optax.GradientTransformation(optax.init_empty_state, update)


def host_state(device_state, like=None, devices=None):
    """The full state on the host, from the devices' copies, or with `like` (the full state's
    shapes) from their slices.

    device_state: what train.py's pmapped step returns on this process, leaves (local, ...).
    Sharded on several processes, this process holds only its own devices' rows, so each
    leaf is all-gathered across the pod first, one leaf at a time: a device then holds one
    full array at a time, never the whole state (which is what does not fit).
    """
    if like is None:
        return unreplicate(jax.device_get(device_state))
    if jax.process_count() == 1:
        return from_rows(jax.device_get(device_state), like)
    every_row = jax.pmap(lambda x: jax.lax.all_gather(x, AXIS), axis_name=AXIS, devices=devices)
    # (read from this host's first device: indexing the pod-wide result would be one more
    # computation over every host, which the others, gone on to the next leaf, never join)
    rows = jax.tree.map(lambda x: np.asarray(every_row(x).addressable_shards[0].data).reshape((-1,) + x.shape[1:]),
                        device_state)                                                    # (n, ...)
    return from_rows(rows, like)
