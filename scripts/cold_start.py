"""Where the cold start of `python sample.py "prompt"` goes: each stage of sample.py's own
path, timed in one fresh process, printed as one JSON line (seconds).

    python scripts/cold_start.py ["a red circle above a blue square"]

The stages are the calls sample.main makes for one prompt with the shipped demo pipeline
(checkpoints/demo): importing, reading both checkpoints, the base model's decoding loop
(T5 encoder included; compiling and running), the super-res loop, the 64 px VQGAN decoder,
then the same prompt again in the same process (everything compiled: what a second prompt
costs). Python's own start-up and the PNG write are not in it; `/usr/bin/time python
sample.py "..."` gives the whole wall time.
"""
import json
import os
import sys
import time

t0 = time.perf_counter()
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import jax  # noqa: E402
import checkpoint  # noqa: E402
import sample  # noqa: E402
import vqgan  # noqa: E402

times = {"imports": time.perf_counter() - t0}


def timed(name, fn):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    times[name] = time.perf_counter() - t
    return out


prompt = sys.argv[1] if len(sys.argv) > 1 else "a red circle above a blue square"
args = sample.parse_args([prompt])
base, sr = timed("read_checkpoints", lambda: checkpoint.load_pipeline(args.checkpoint, args.superres))
lo_ids = timed("base_decode", lambda: sample.base_ids(args, base, [prompt], args.seed))
hr_ids = timed("superres_decode", lambda: sample.superres_ids(args, sr, [prompt], lo_ids, args.seed))
timed("vqgan_decode", lambda: vqgan.decode_ids(sr.vq, sr.vq_params, hr_ids))
timed("second_prompt_all_stages", lambda: sample.run(args, base, sr, [prompt], args.seed)[0])
times["total_first_prompt"] = time.perf_counter() - t0 - times["second_prompt_all_stages"]
print(json.dumps({k: round(v, 2) for k, v in times.items()}))
