"""A CUDA device on a machine without one, for tests of device discipline.

Inside `fake_cuda()`, `torch.cuda.is_available()` is True and anything put on "cuda" (`.to("cuda")`,
`.cuda()`, `device="cuda"` in a factory, a module moved there) becomes a `CudaTensor`: a CPU tensor that
says it lives on cuda:0 and, as a real CUDA tensor does, refuses to meet a CPU tensor in one operation
("Expected all tensors to be on the same device"), to be read by numpy, or to index a CPU tensor. The
values are computed on the CPU as usual, so a whole pipeline (scoring, probing, patching) runs, and any
place where it mixes devices fails as it would on a GPU.

What CUDA allows stays allowed: 0-dim CPU tensors beside CUDA ones (scalars), CPU indices into a CUDA
tensor, `copy_` across devices, `.item()` and `.tolist()`.
"""
from __future__ import annotations

import contextlib
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

CUDA = torch.device("cuda", 0)
_RealGenerator = torch.Generator


class CudaTensor(torch.Tensor):
    """A CPU tensor that stands for one on cuda:0 (only inside `fake_cuda()`)."""

    @property
    def device(self):
        return CUDA

    @property
    def is_cuda(self):
        return True

    def __repr__(self, **kwargs):
        with torch._C.DisableTorchFunctionSubclass():
            return f"CudaTensor({torch.Tensor.__repr__(self.as_subclass(torch.Tensor))})"


def _is_cuda(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int) and not isinstance(device, bool):
        return True                                  # a CUDA device index
    return torch.device(device).type == "cuda"


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, CudaTensor) else t


def _wrap(out):
    def one(t):
        if isinstance(t, torch.Tensor) and not isinstance(t, CudaTensor):
            return t.as_subclass(CudaTensor)
        return t
    return tree_map(one, out)


def _unwrap(out):
    return tree_map(_plain, out)


class DeviceMixError(RuntimeError):
    pass


def _mixed(what: str):
    raise DeviceMixError(f"Expected all tensors to be on the same device, but found at least two devices, "
                         f"cuda:0 and cpu! (fake CUDA, in {what})")


def _to_target(args, kwargs):
    """The device a Tensor.to(...) call asks for: 'cuda', 'cpu' or None (unchanged)."""
    dev = kwargs.get("device")
    for a in args[1:]:
        if isinstance(a, torch.Tensor):
            dev = a.device
        elif isinstance(a, (str, torch.device, int)) and not isinstance(a, bool):   # not non_blocking
            dev = a
    if dev is None:
        return None
    return "cuda" if _is_cuda(dev) else torch.device(dev).type


_FAKE_GENERATORS: set[int] = set()
_NO_CHECK = {"copy_", "__get__", "__set__", "_has_compatible_shallow_copy_type", "is_same_size"}


class _Generator(_RealGenerator):
    """torch.Generator, with device="cuda" giving a CPU generator that stands for a CUDA one."""

    def __new__(cls, device="cpu"):
        g = _RealGenerator.__new__(cls, "cpu" if _is_cuda(device) else device)
        if _is_cuda(device):
            _FAKE_GENERATORS.add(id(g))
        return g

    def __init__(self, device="cpu"):
        pass


class _Mode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", str(func))
        first = args[0] if args else None

        if func is torch.Tensor.as_subclass:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        if func in (torch.Tensor.numpy, torch.Tensor.__array__) and isinstance(first, CudaTensor):
            raise TypeError("can't convert cuda:0 device type tensor to numpy. Use Tensor.cpu() to copy the "
                            "tensor to host memory first. (fake CUDA)")
        if func is torch.Tensor.__format__ and isinstance(first, CudaTensor) and first.dim() == 0:
            return first.item().__format__(*args[1:])          # a CUDA scalar formats as a number
        if func is torch.Tensor.pin_memory:
            return first
        if func is torch.Tensor.cuda:
            with torch._C.DisableTorchFunctionSubclass():
                return _wrap(_plain(first).clone() if not isinstance(first, CudaTensor) else first)
        if func is torch.Tensor.cpu:
            with torch._C.DisableTorchFunctionSubclass():
                return _plain(first)
        if func is torch.Tensor.to:
            target = _to_target(args, kwargs)
            kw = {k: v for k, v in kwargs.items() if k != "device"}
            flags = iter(("non_blocking", "copy"))
            for a in args[1:]:                       # (device?, dtype?, non_blocking?, copy?) or (tensor, ...)
                if isinstance(a, torch.dtype):
                    kw["dtype"] = a
                elif isinstance(a, torch.Tensor):
                    kw.setdefault("dtype", a.dtype)
                elif isinstance(a, bool):
                    kw[next(flags)] = a
            with torch._C.DisableTorchFunctionSubclass():
                out = _plain(first).to(**kw)
            if target == "cuda" or (target is None and isinstance(first, CudaTensor)):
                return _wrap(out)
            return out

        want = kwargs.get("device", "unset")
        if want != "unset":
            kwargs["device"] = "cpu" if _is_cuda(want) else want
        gen = kwargs.get("generator")
        if gen is not None:
            on_cuda = _is_cuda(want) if want != "unset" else any(
                isinstance(t, CudaTensor) for t in tree_flatten(args)[0])
            if on_cuda != (id(gen) in _FAKE_GENERATORS):
                raise DeviceMixError(f"Expected a '{'cuda' if on_cuda else 'cpu'}' device type for generator but "
                                     f"found '{'cpu' if on_cuda else 'cuda'}' (fake CUDA, in {name})")

        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        fakes = [t for t in tensors if isinstance(t, CudaTensor)]
        plain = [t for t in tensors if not isinstance(t, CudaTensor) and t.dim() > 0]
        if name in _NO_CHECK:
            pass                                             # copies cross devices; attributes, type checks
        elif func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__):
            if isinstance(first, CudaTensor):
                if func is torch.Tensor.__setitem__ and len(args) > 2 and isinstance(args[2], torch.Tensor) \
                        and not isinstance(args[2], CudaTensor) and args[2].dim() > 0:
                    _mixed("assigning CPU values into a CUDA tensor")
            elif fakes:
                raise DeviceMixError("indices should be either on cpu or on the same device as the indexed tensor "
                                     "(cpu) (fake CUDA)")
        elif fakes and plain:
            _mixed(name)

        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        if want != "unset":
            return _wrap(out) if _is_cuda(want) else out
        if fakes and func not in (torch.Tensor.tolist, torch.Tensor.item):
            return _wrap(out)
        return out


class _Props:
    total_memory = 16 * 2**30
    name = "Fake CUDA"
    major, minor = 8, 0
    multi_processor_count = 80


@contextlib.contextmanager
def fake_cuda():
    """Run the body as if on a machine with one CUDA GPU (see the module's docstring)."""
    patches = [
        mock.patch("torch.cuda.is_available", lambda: True),
        mock.patch("torch.cuda.device_count", lambda: 1),
        mock.patch("torch.cuda.current_device", lambda: 0),
        mock.patch("torch.cuda.synchronize", lambda *a, **k: None),
        mock.patch("torch.cuda.empty_cache", lambda: None),
        mock.patch("torch.cuda.is_bf16_supported", lambda *a, **k: True),
        mock.patch("torch.cuda.get_device_name", lambda *a, **k: _Props.name),
        mock.patch("torch.cuda.get_device_capability", lambda *a, **k: (8, 0)),
        mock.patch("torch.cuda.get_device_properties", lambda *a, **k: _Props()),
        mock.patch("torch.cuda.mem_get_info", lambda *a, **k: (_Props.total_memory, _Props.total_memory)),
        mock.patch("torch.cuda.memory_allocated", lambda *a, **k: 0),
        mock.patch("torch.cuda.max_memory_allocated", lambda *a, **k: 0),
        mock.patch("torch.cuda.reset_peak_memory_stats", lambda *a, **k: None),
        mock.patch("torch.Generator", _Generator),
    ]
    overwrite = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(True)   # module.to() builds new parameters
    try:
        with contextlib.ExitStack() as stack:
            for p in patches:
                stack.enter_context(p)
            with _Mode():
                yield
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
        _FAKE_GENERATORS.clear()
