"""Loss backends. Each module registers one backend; import order does not matter."""
from smskd_fast.backends.native import CompiledOpBackend
from smskd_fast.backends.gpu_choice import choose_gpu_backend
from smskd_fast.backends.reference import ReferenceBackend
from smskd_fast.backends.registry import available_backends, register_auto_chooser, register_backend, resolve_backend
from smskd_fast.backends.triton.backend import TritonBackend

register_backend(CompiledOpBackend("cpu", device_type="cpu", dispatch_key="CPU"), rank=10)
register_backend(TritonBackend(), rank=15)
register_backend(CompiledOpBackend("cuda", device_type="cuda", dispatch_key="CUDA", float64=False), rank=20)
register_backend(ReferenceBackend(), rank=1000)
register_auto_chooser("cuda", choose_gpu_backend)

__all__ = ["available_backends", "register_backend", "resolve_backend"]
