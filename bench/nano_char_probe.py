"""Probe: does the nano vision tower learn characters, read at the patch (2 chars / 128 d), the merged
features (32 chars / 2048 d) or the aligner output (32 chars / 128 d)?"""
import random, sys, time, json
import numpy as np
import torch, torch.nn.functional as F
sys.path.insert(0, "/work/wt/nano-char/src")
torch.set_num_threads(1)
from vist2.modeling import VIST2ForCausalLM, merge_patches
from vist2.processing import VIST2Processor
from vist2.training.char_loss import page_cells, char_class, region_map, N_CLASSES, IGNORE

mode, lr, steps, bs, init = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
torch.manual_seed(0)
model = VIST2ForCausalLM.from_pretrained(init).train()
proc = VIST2Processor.from_pretrained(init)
cfg = model.config
p, m = cfg.patch_size, cfg.merge
words = []
with open("/work/main/runs/nano/data/text_en.jsonl") as f:
    for line in f:
        words += json.loads(line)["text"].split()
        if len(words) > 200000: break
rng = random.Random(0)
def page():
    out = ""
    while True:
        w = rng.choice(words)
        nxt = out + " " + w if out else w
        if len(nxt) > 230 or not proc.renderer.fits(nxt): return out
        out = nxt
r = proc.renderer
cw, ch, cols, rows = r.grid(r.config.min_font_size)
gh, gw = cfg.patch_grid
if mode == "patch":
    # cells of each patch (p x p px): p/ch rows x p/cw cols
    rm = region_map(r.config.width, r.config.height, r.config.margin, cw, ch, rows, cols, p)
    dim = cfg.vision_config.hidden_size
else:
    rm = region_map(r.config.width, r.config.height, r.config.margin, cw, ch, rows, cols, p * m)
    dim = cfg.vision_config.hidden_size * m * m if mode == "merged" else cfg.text_config.hidden_size
slots = rm.slots
head = torch.nn.Linear(dim, slots * N_CLASSES)
params = list(model.model.vision.parameters()) + list(head.parameters())
if mode == "aligner": params += list(model.model.aligner.parameters())
opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
print(mode, "slots", slots, "dim", dim, flush=True)
t0 = time.time()
for s in range(1, steps + 1):
    texts = [page() for _ in range(bs)]
    pixels = proc.pixels_from_texts(texts)
    tg = []
    for t in texts:
        _, codes = page_cells(r, t)
        flat = np.append(char_class(codes).reshape(-1), IGNORE)
        tg.append(flat[rm.slot_cell])
    target = torch.from_numpy(np.stack(tg))
    N = len(texts)
    x = (pixels * 2 - 1).expand(N, 3, 128, 128)
    patches = x.reshape(N, 3, gh, p, gw, p).permute(0, 2, 4, 3, 5, 1).reshape(N, gh * gw, p * p * 3)
    feats = model.model.vision(pixel_values=patches, pixel_attention_mask=torch.ones(N, gh * gw, dtype=torch.long),
                               spatial_shapes=torch.tensor([[gh, gw]]).expand(N, 2)).last_hidden_state
    if mode != "patch":
        feats = merge_patches(feats, gh, gw, m)
        if mode == "aligner":
            feats = model.model.aligner(feats)
    logits = head(feats).view(N, -1, slots, N_CLASSES)
    loss = F.cross_entropy(logits.reshape(-1, N_CLASSES), target.reshape(-1), ignore_index=IGNORE)
    loss.backward(); opt.step(); opt.zero_grad()
    if s % 25 == 0:
        ink = target > 0
        acc = float((logits.argmax(-1)[ink] == target[ink]).float().mean())
        print(f"{mode} lr {lr} step {s} loss {loss.item():.3f} acc {acc:.3f} {time.time()-t0:.0f}s", flush=True)
