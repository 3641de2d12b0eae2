"""cpu_offload_gb: whole decoder layers, from layer 0 on, kept in pinned CPU memory and copied to the
device each forward, one layer ahead on a side stream, so the copy overlaps the compute.

Layout. Each offloaded layer's tensors (4-bit buffers or dense weights, norms, biases) lie back to
back, 256-byte aligned, in one region of a single host buffer (registered with CUDA: exact bytes,
where torch's pinned allocator would round every block up to a power of two). Two device staging
buffers, each the size of the largest region, take turns: layer i computes from buffer i % 2, and
its module tensors are views of that buffer, set once. A forward copies each region in one memcpy.

Ordering, with CUDA events (the compute stream is whatever stream is current, the runner's):
- before layer i computes, the compute stream waits for the event of layer i's copy;
- after layer i has been queued, an event on the compute stream marks its buffer free, and the copy
  of the next layer in cyclic order (i + 2 while i + 2 < k, then layers 0 and 1 for the next step)
  waits for that event on the side stream before it overwrites the buffer.
On the CPU the same bookkeeping runs with plain synchronous copies, so tests cover it there.
CUDA graphs are off with offload (launcher/engine_config.py): the hooks run on the host.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from pagedeploy.launcher.plan import layers_to_offload
from pagedeploy.quant.formats import INT4_GROUP_SIZE, bnb_weight_bytes, int4_group_size, int4_weight_bytes

ALIGN = 256   # bytes: every tensor starts aligned, as the allocator's own tensors do


def planned_layer_bytes(layer: nn.Module, quantization: str | None, int4_group: int = INT4_GROUP_SIZE) -> int:
    """The bytes `layer` will hold once loaded (and 4-bit when `quantization` is set), computed from
    its shapes alone (it may still be on the meta device): the plan's per-layer figure. `int4_group`:
    the preferred int4 group (ModelSpec.int4_group), as the plan and the loader take it."""
    from pagedeploy.runtime.model import Linear

    total = 0
    for module in layer.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, Linear) and name == "weight" and quantization is not None:
                out, inp = param.shape
                total += bnb_weight_bytes(out * inp) if quantization != "int4" \
                    else int4_weight_bytes(out, inp, int4_group_size(inp, int4_group))
            else:
                total += param.numel() * param.element_size()
    return total


def offloaded_tensors(layer: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(module, name, tensor) of what an offloaded layer keeps on the host: every parameter and
    persistent buffer. A QuantLinear's 64-byte NF4/FP4 codebook (not a weight: the plan does not
    count it) stays on the device."""
    found = []
    for module in layer.modules():
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None and name not in module._non_persistent_buffers_set:
                found.append((module, name, tensor))
    return found


@dataclass
class Slot:
    """Where one tensor of an offloaded layer lives inside its layer's region."""
    module: nn.Module
    name: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size
    stride: tuple[int, ...]

    def view(self, region: torch.Tensor) -> torch.Tensor:
        """This tensor as a view of `region` (uint8), strides kept (the CPU's input-major layout)."""
        flat = region[self.offset:self.offset + self.nbytes].view(self.dtype)
        return flat.as_strided(self.shape, self.stride)

    def point_at(self, tensor: torch.Tensor) -> None:
        if self.name in self.module._parameters:
            self.module._parameters[self.name].data = tensor
        else:
            self.module._buffers[self.name] = tensor


@dataclass
class OffloadedLayer:
    region: torch.Tensor          # uint8 view of the host buffer: the layer's tensors, aligned
    slots: list[Slot]

    @property
    def tensor_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots)


def _dense(t: torch.Tensor) -> bool:
    """Whether `t` fills its storage span exactly, in some dimension order (its bytes can move
    as one block and be viewed with the same strides)."""
    order = sorted(range(t.dim()), key=t.stride, reverse=True)
    return t.permute(order).is_contiguous()


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class HostBuffer:
    """One flat uint8 CPU buffer, page-locked on CUDA, handed out front to back."""

    def __init__(self, nbytes: int, pin: bool):
        self.data = torch.empty(nbytes, dtype=torch.uint8)
        self.used = 0
        self.pinned = pin and nbytes > 0
        if self.pinned:
            ptr = self.data.data_ptr()
            error = int(torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0))
            if error:
                raise RuntimeError(f"cudaHostRegister of {nbytes:,} bytes failed (cudaError {error})")
            # Unregister before the memory goes back to the OS (the callback runs while the
            # buffer is still alive: at collection of this object or at exit).
            weakref.finalize(self, torch.cuda.cudart().cudaHostUnregister, ptr)

    def take(self, nbytes: int) -> torch.Tensor:
        start, self.used = self.used, self.used + _aligned(nbytes)
        if self.used > self.data.numel():
            raise AssertionError(f"offload: the layers need more than the planned "
                                 f"{self.data.numel():,} host bytes")
        return self.data[start:start + nbytes]


class LayerOffloader:
    """Layers 0..num_layers-1 of a model in host memory, streamed to the device each forward."""

    def __init__(self, num_layers: int, planned_bytes: int, device: torch.device):
        self.num_layers, self.planned_bytes, self.device = num_layers, planned_bytes, device
        # Region padding: at most ALIGN - 1 bytes per tensor; 64 tensors per layer is generous.
        self.host = HostBuffer(planned_bytes + num_layers * 64 * ALIGN, pin=device.type == "cuda")
        self.layers: dict[int, OffloadedLayer] = {}
        self.staging: list[torch.Tensor] = []
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @classmethod
    def for_model(cls, model: nn.Module, cpu_offload_bytes: int, quantization: str | None,
                  device: torch.device, int4_group: int = INT4_GROUP_SIZE) -> "LayerOffloader":
        """The offloader that moves exactly `cpu_offload_bytes` (the plan's cpu_bytes), choosing
        the layers with the plan's own rule."""
        sizes = [planned_layer_bytes(layer, quantization, int4_group) for layer in model.model.layers]
        count, moved = layers_to_offload(sizes, cpu_offload_bytes)
        if moved != cpu_offload_bytes:
            raise AssertionError(f"offload: whole layers give {moved:,} bytes, the plan says "
                                 f"{cpu_offload_bytes:,}")
        return cls(count, moved, device)

    # ---- loading: each finished layer moves to the host --------------------------------------

    @torch.no_grad()
    def store(self, index: int, layer: nn.Module) -> None:
        """Copy finished layer `index` into its host region and point its tensors there (its
        device memory is released)."""
        tensors = offloaded_tensors(layer)
        assert all(_dense(t) for _, _, t in tensors), "offload copies dense tensors byte for byte"
        sizes = [t.numel() * t.element_size() for _, _, t in tensors]
        region = self.host.take(sum(_aligned(n) for n in sizes))
        slots, offset = [], 0
        for (module, name, t), nbytes in zip(tensors, sizes):
            slot = Slot(module, name, offset, nbytes, t.dtype, t.shape, t.stride())
            host_view = slot.view(region)
            host_view.copy_(t)
            slot.point_at(host_view)
            slots.append(slot)
            offset += _aligned(nbytes)
        self.layers[index] = OffloadedLayer(region, slots)

    # ---- serving: staging buffers and the hooks ----------------------------------------------

    def install(self, model: nn.Module) -> None:
        """Store the layers the loader did not (all of them on the CPU, after the CPU weight
        layout), allocate the staging buffers, point each layer at its buffer, hook the layers."""
        for index, layer in enumerate(model.model.layers[:self.num_layers]):
            if index not in self.layers:
                self.store(index, layer)
        assert self.offloaded_bytes == self.planned_bytes, (self.offloaded_bytes, self.planned_bytes)
        size = max(layer.region.numel() for layer in self.layers.values())
        self.staging = [torch.empty(size, dtype=torch.uint8, device=self.device)
                        for _ in range(min(2, self.num_layers))]
        for index, layer in self.layers.items():
            buffer = self.staging[index % len(self.staging)]
            for slot in layer.slots:
                slot.point_at(slot.view(buffer))
        n = len(self.staging)
        self.holder = [-1] * n          # layer whose copy was last issued into each buffer
        self.free = [True] * n          # its compute is queued: the buffer may be overwritten
        self.released: list[torch.cuda.Event | None] = [None] * n
        self.copied: list[torch.cuda.Event | None] = [None] * n
        self.next_copy = 0
        for index, layer in enumerate(model.model.layers[:self.num_layers]):
            layer.register_forward_pre_hook(partial(self._before_layer, index))
            layer.register_forward_hook(partial(self._after_layer, index))
        self._prefetch()

    @property
    def offloaded_bytes(self) -> int:
        """Bytes of the offloaded tensors themselves: what the plan calls weights.cpu_bytes."""
        return sum(layer.tensor_bytes for layer in self.layers.values())

    @property
    def host_bytes(self) -> int:
        """The host buffer as allocated (pinned on CUDA): offloaded bytes plus alignment slack."""
        return self.host.data.numel()

    @property
    def staging_bytes(self) -> int:
        return sum(b.numel() for b in self.staging)

    def _buffer(self, index: int) -> int:
        return index % len(self.staging)

    def _before_layer(self, index: int, module, args) -> None:
        b = self._buffer(index)
        if self.holder[b] != index:     # not prefetched (first step, or a step that failed)
            self.free[b] = True
            self.next_copy = index
        self._prefetch()
        if self.copied[b] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied[b])

    def _after_layer(self, index: int, module, args, output) -> None:
        b = self._buffer(index)
        if self.stream is not None:
            self.released[b] = torch.cuda.current_stream(self.device).record_event()
        self.free[b] = True
        self._prefetch()

    def _prefetch(self) -> None:
        """Issue the copies of the next layers, in cyclic order, into the buffers that are free."""
        while self.free[self._buffer(self.next_copy)]:
            index, b = self.next_copy, self._buffer(self.next_copy)
            if self.holder[b] != index:     # with one or two offloaded layers they stay put
                self._copy(index, b)
            self.holder[b], self.free[b] = index, False
            self.next_copy = (index + 1) % self.num_layers

    def _copy(self, index: int, b: int) -> None:
        region = self.layers[index].region
        target = self.staging[b][:region.numel()]
        if self.stream is None:
            target.copy_(region)
            return
        with torch.cuda.stream(self.stream):
            if self.released[b] is not None:
                self.stream.wait_event(self.released[b])
            target.copy_(region, non_blocking=True)
            self.copied[b] = self.stream.record_event()
