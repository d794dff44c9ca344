"""Probe: the shipped budget plan with the dense heads of chosen layers turned into vertical_slash.

    python evals/bench/results/smollm2_cpu_seed77/dense_heads_as_vs_probe.py LAYERS FRACTION LENGTH SEED [WINDOW] [MAX_PPL]
WINDOW: the local band of the vertical_slash heads (default 64); MAX_PPL: skip passkey when the
perplexity is above it. Prints wikitext perplexity (8192 tokens, windows of 4096) and then passkey accuracy (20 samples).
Logs beside it: `0 0.16 4096 77` (dense_heads_as_vs_layer0_cpu.log) and
`0,6,7,14,17,18,20,21,23 0.16 4096 77` (dense_heads_as_vs_all_cpu.log; stopped after perplexity)."""
import sys, time, json, copy, tempfile, torch
from pathlib import Path
from patchattn import Plan, patch_model, reset_stats, stats
from patchattn.evals.bench.calibration_quality import DEFAULT_PLAN, DEFAULT_TEXT
from patchattn.evals import synthetic
from patchattn.evals.runner import greedy_generate
from patchattn.evals.perplexity import perplexity, read_text
from patchattn.models import load

layers = [int(x) for x in sys.argv[1].split(",") if x]; frac = float(sys.argv[2]); n_len = int(sys.argv[3]); seed = int(sys.argv[4])
window = int(sys.argv[5]) if len(sys.argv) > 5 else 64
max_ppl = float(sys.argv[6]) if len(sys.argv) > 6 else float("inf")
raw = json.load(open(DEFAULT_PLAN))
vs = {"method": "vertical_slash", "params": {"vertical": {"scale": frac}, "slash": {"scale": frac}, "last_q": 64, "sink": 4, "window": window}}
for li in layers:
    L = raw["layers"][li]
    if L["method"] == "dense":
        L["method"], L["params"] = vs["method"], vs["params"]
    for h, spec in list(L["q_heads"].items()):
        if spec["method"] == "dense":
            L["q_heads"][h] = copy.deepcopy(vs)
edited = Path(tempfile.mkdtemp()) / "plan.json"
edited.write_text(json.dumps(raw))
model, tok = load("smollm2-135m", dtype=torch.float32, device="cpu")
plan = Plan.load(edited)
patch_model(model, plan); reset_stats(model)
t = time.time()
ppl = perplexity(model, tok, read_text(DEFAULT_TEXT), 8192, 4096, progress=False)
print("ppl", ppl["ppl"], "density", float(stats(model).density), f"{time.time()-t:.0f}s", flush=True)
if ppl["ppl"] > max_ppl:
    sys.exit(0)
samples = synthetic.generate_samples("passkey", tok, n_len, 20, seed=seed)
scores = []; outs = []
for i in range(0, 20, 10):
    batch = samples[i:i+10]
    texts, _ = greedy_generate(model, tok, [s.prompt for s in batch], batch[0].max_new_tokens, batch[0].stop)
    scores += [synthetic.score(s.task, s, x) for s, x in zip(batch, texts)]; outs += texts
print(layers, frac, n_len, seed, "acc", sum(scores)/len(scores), "density", float(stats(model).density), f"{time.time()-t:.0f}s", flush=True)
print(json.dumps([(round(s.depth,2), sc, o[:40]) for s, sc, o in zip(samples, scores, outs)]))
