"""Loss backends. Each module registers one backend; import order does not matter."""
from .compiled import CompiledOpBackend
from .gpu_choice import choose_gpu_backend
from .reference import ReferenceBackend
from .registry import available_backends, register_auto_chooser, register_backend, resolve_backend
from .triton_backend import TritonBackend

register_backend(CompiledOpBackend("cpu", device_type="cpu", dispatch_key="CPU"), rank=10)
register_backend(TritonBackend(), rank=15)
register_backend(CompiledOpBackend("cuda", device_type="cuda", dispatch_key="CUDA", float64=False), rank=20)
register_backend(ReferenceBackend(), rank=1000)
register_auto_chooser("cuda", choose_gpu_backend)

__all__ = ["available_backends", "register_backend", "resolve_backend"]
