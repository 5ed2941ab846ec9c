"""Time of one fused fwd+bwd step against the chunk size (CPU, tokens 1024, hidden 512, vocab 128256, fp32)."""
import time

import torch

import smskd_fast
from smskd_fast.provenance import git_commit
g = torch.Generator().manual_seed(0)
N, H, V = 1024, 512, 128256
h_s, h_t, h_r = (torch.randn(N, H, generator=g) for _ in range(3))
w_s, w_t, w_r = (torch.randn(V, H, generator=g) * H ** -0.5 for _ in range(3))
target = torch.randint(0, V, (N,), generator=g)
h_s.requires_grad_(True); w_s.requires_grad_(True)
def step(chunk):
    h_s.grad = w_s.grad = None
    if chunk is None:
        s, t, r = h_s @ w_s.t(), h_t @ w_t.t(), h_r @ w_r.t()
        smskd_fast.smskd_loss(s, target, t, r, temperature=2.0).loss.backward()
    else:
        smskd_fast.fused_linear_smskd_loss(h_s, w_s, target, h_t, w_t, None, h_r, w_r, temperature=2.0,
                                           chunk_size=chunk).loss.backward()
commit = git_commit()
print(f"commit {commit}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, threads {torch.get_num_threads()}")
print("chunk rows (None = unfused), then seconds of 2 steps after a warm-up, interleaved rounds")
chunks = [None, 130, 256, 512]
for c in chunks: step(c)
results = {c: [] for c in chunks}
for _ in range(2):
    for c in chunks:
        t = time.perf_counter(); step(c); results[c].append(time.perf_counter() - t)
for c in chunks:
    print(c, [round(x, 2) for x in results[c]], f"ratio to unfused {min(results[c]) / min(results[None]):.2f}")
