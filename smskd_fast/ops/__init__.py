"""The compiled operators: loading smskd_fast._C (extension), and what PyTorch needs around them
(registration: fake kernels for torch.compile and the autograd formula)."""
