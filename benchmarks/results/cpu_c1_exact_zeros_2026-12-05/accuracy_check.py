"""Max |error| of the cpu op against the float64 reference backend (per-row values, gradient), dense and top-k (k = 32),
float32 and bfloat16, T in (1, 2.5, 4), n x C = 256 x 3000: run from each checkout (accuracy_before/after.txt)."""
# max |error| vs the float64 reference backend, dense and top-k, float32/bf16, T in (1, 2.5, 4)
import torch, smskd_fast
from smskd_fast.backends.topk import TopKTeacher
torch.set_num_threads(1)
g = torch.Generator().manual_seed(1)
n, c = 256, 3000
s0, t0, r0 = (torch.randn(n, c, generator=g, dtype=torch.float64) * 3 for _ in range(3))
y = torch.randint(0, c, (n,), generator=g)
def run(backend, dtype, T, topk):
    s = s0.to(dtype).to(torch.float64 if backend == "reference" else dtype).detach().requires_grad_(True)
    t = t0.to(dtype); r = r0.to(dtype)
    if backend == "reference": t, r = t.double(), r.double()
    kw = dict(temperature=T, backend=backend, reduction="none")
    if topk:
        tk = TopKTeacher.from_logits(t0.to(dtype).to(torch.float64 if backend == "reference" else torch.float32), y, 32, T)
        out = smskd_fast.smskd_loss(s, y, None, r, teacher_topk=tk, **kw)
    else:
        out = smskd_fast.smskd_loss(s, y, t, r, **kw)
    (gr,) = torch.autograd.grad(out.loss.sum(), s)
    return out, gr.double()
for topk in (False, True):
    for dtype in (torch.float32, torch.bfloat16):
        for T in (1.0, 2.5, 4.0):
            a, ga = run("cpu", dtype, T, topk); b, gb = run("reference", dtype, T, topk)
            errs = {f: (getattr(a, f).double() - getattr(b, f)).abs().max().item() for f in ("loss", "ce", "kd", "ref", "tcp")}
            errs["grad"] = (ga - gb).abs().max().item()
            print(("topk " if topk else "dense"), str(dtype)[6:], T, " ".join(f"{k}={v:.2e}" for k, v in errs.items()))
