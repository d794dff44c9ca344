"""Probe: dense heads keep dense rows except the last R query rows, which use a VS selection.

    python evals/bench/results/smollm2_cpu_seed77/tail_rows_probe.py tail|base R FRACTION LENGTH SEED
(the logs beside it: `tail 64 0.131 4096 77` and `base 64 0.131 4096 77`; `base` runs the plan unchanged)."""
import sys, time, json, torch
from patchattn import Plan, patch_model, reset_stats, stats
from patchattn.evals.bench.calibration_quality import DEFAULT_PLAN
from patchattn.evals import synthetic
from patchattn.evals.runner import greedy_generate
from patchattn.models import load
from patchattn.methods import dense as dense_mod
from patchattn.methods.base import ColumnDiagonalSelection
from patchattn.methods.vertical_slash import estimate_vertical_slash, top_mask
from patchattn.methods.streaming import local_diagonals, sink_columns

mode = sys.argv[1]; R = int(sys.argv[2]); frac = float(sys.argv[3]); n_len = int(sys.argv[4]); seed = int(sys.argv[5])
torch.manual_seed(0)

class Tail(ColumnDiagonalSelection):
    def __init__(self, cols, diags, cut):
        super().__init__(columns=cols, diagonals=diags); self.cut = cut
    def rows(self, q_pos, k_pos):
        sparse = super().rows(q_pos, k_pos)
        return sparse | (q_pos < self.cut)[None, None, :, None]

def tail_select(self, q, k, ctx):
    n = ctx.kv_len
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v, s = estimate_vertical_slash(q, k, ctx, 64)
    b = int(round(frac * n))
    cols = sink_columns(ctx, 4) | top_mask(v, b)
    diags = local_diagonals(ctx, 64) | top_mask(s, b)
    return Tail(cols, diags, ctx.q_last - R + 1)
if mode == "tail":
    dense_mod.Dense.select = tail_select

model, tok = load("smollm2-135m", dtype=torch.float32, device="cpu")
plan = Plan.load(DEFAULT_PLAN)
samples = synthetic.generate_samples("passkey", tok, n_len, 20, seed=seed)
patch_model(model, plan); reset_stats(model)
t = time.time(); scores = []; outs = []
for i in range(0, 20, 10):
    batch = samples[i:i+10]
    texts, _ = greedy_generate(model, tok, [s.prompt for s in batch], batch[0].max_new_tokens, batch[0].stop)
    scores += [synthetic.score(s.task, s, x) for s, x in zip(batch, texts)]; outs += texts
print(mode, R, frac, n_len, seed, "acc", sum(scores)/len(scores), "density", float(stats(model).density), f"{time.time()-t:.0f}s", flush=True)
print(json.dumps([(round(getattr(s,'depth',-1),2), sc, o[:40]) for s, sc, o in zip(samples, scores, outs)]))
