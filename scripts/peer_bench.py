"""The peer's side of README's performance table: lucidrains' muse-maskgit-pytorch (PyTorch, CPU).

Not part of the project (it needs torch and the peer's package, which the project never imports);
it exists so that the peer's figures can be re-measured on the same machine, at the same time,
as ours. Setup, in a separate environment:

    python -m venv /tmp/peer --system-site-packages
    /tmp/peer/bin/pip install muse-maskgit-pytorch==0.3.5 && /tmp/peer/bin/pip install torch==2.13.0
    /tmp/peer/bin/pip uninstall -y torchvision      # no build for torch 2.13 here; stubbed below
    /tmp/peer/bin/python scripts/peer_bench.py small     # one JSON line; medium takes ~4 min

The `small` and `medium` configurations of bench.py: random weights, batch 8, text embeddings 32 x 256 given directly (the
peer's T5 call is replaced), codebook 512, 24 decoding steps with guidance 3 through the peer's own
MaskGit.generate (conditional and unconditional passes run separately there), no VQ decode. The
train step is MaskGit.forward (its masking and loss) + backward + AdamW. Medians of 5 runs
(2 for medium) after a warm-up run.
"""
import json, statistics, sys, time
import types
import torch
import transformers.utils.import_utils
transformers.utils.import_utils.is_torchvision_available()   # decided ("no") before the stub below exists
# The package imports torchvision for image transforms and VGG, neither used here, and the local
# index has no torchvision build for torch 2.13: a stub stands in.
for name in ("torchvision", "torchvision.transforms", "torchvision.models", "torchvision.datasets", "torchvision.utils"):
    sys.modules[name] = types.ModuleType(name)
    sys.modules[name].__path__ = []
sys.modules["torchvision.datasets"].ImageFolder = object
sys.modules["torchvision.utils"].make_grid = sys.modules["torchvision.utils"].save_image = None
import muse_maskgit_pytorch.muse_maskgit_pytorch as mm
from muse_maskgit_pytorch import MaskGit, MaskGitTransformer, VQGanVAE

preset = sys.argv[1]
dim, depth, grid = {"small": (256, 4, 8), "medium": (512, 8, 16)}[preset]
B, L, Dt, K, steps = 8, 32, 256, 512, 24
mm.get_encoded_dim = lambda name: Dt             # no hub access: the text width is given
torch.manual_seed(0)
net = MaskGitTransformer(num_tokens=K, seq_len=grid * grid, dim=dim, depth=depth, dim_head=64, heads=4, ff_mult=4)
text = torch.randn(B, L, Dt)
net.encode_text = lambda texts: text
vae = VQGanVAE(dim=32, codebook_size=K)
maskgit = MaskGit(image_size=grid * 8, transformer=net, vae=vae)
class NoDecode(torch.nn.Module):                  # generate() ends with vae.decode_from_ids: skip the VQ decode
    def get_encoded_fmap_size(self, size): return grid
    def decode_from_ids(self, ids): return ids
maskgit.vae = NoDecode()
torch.set_num_threads(torch.get_num_threads())

def timed(fn, n):
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

reps = 5 if preset == "small" else 2                 # medium: ~1 min per sampled batch
sample_s = timed(lambda: maskgit.generate(["x"] * B, fmap_size=grid, timesteps=steps, cond_scale=3), reps)
ids = torch.randint(0, K, (B, grid * grid))
with torch.no_grad():
    fwd_s = timed(lambda: net(ids, text_embeds=text), reps)
opt = torch.optim.AdamW(maskgit.parameters(), lr=1e-4)
def train_step():
    loss = maskgit(ids, text_embeds=text)
    opt.zero_grad(); loss.backward(); opt.step()
train_s = timed(train_step, reps)
print(json.dumps({"impl": "muse-maskgit-pytorch 0.3.5", "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "preset": preset, "sec_per_batch": sample_s, "ms_per_step": 1000 * sample_s / steps,
                  "ms_per_forward": 1000 * fwd_s, "sec_per_train_step": train_s}))
