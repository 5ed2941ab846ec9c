"""The multi-stage trainer and everything only training needs: configs, data, models, KD
methods, frozen teacher/reference logits and their caches, checkpoints, distributed runs,
the study harness and plots. Built on the loss API (smskd_fast.loss)."""
