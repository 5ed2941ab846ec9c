"""The loss API users call: smskd_loss / kd_loss (functional), the fused LM-head loss
(fused_linear), the nn.Module wrappers (nn) and the argument checks (validation).
It computes through a backend (smskd_fast.backends) and never imports training code."""
