"""Moving the actor's weights into a vLLM engine: three transports, one loading protocol.

Loading follows vLLM's layer-wise reload (``vllm.model_executor.model_loader.reload``), which vLLM's
own weight-transfer engines use too: ``initialize_layerwise_reload`` once, ``model.load_weights`` for
every bucket, ``finalize_layerwise_reload`` once. It works where a backend post-processes weights
after loading (the CPU backend repacks linear weights and drops their ``weight_loader``, so a plain
``load_weights`` into the live model fails); finalising after each bucket instead corrupts layers
that were only half loaded (measured, ``../shared/notes/vllm-cpu.md``).

Transports, chosen by where the engine core runs (:func:`choose_transport`):

* ``in_process`` (``distributed_executor_backend="external_launcher"``): the engine lives in this
  process; buckets are lists of ``(name, tensor)`` handed over as they are (device tensors, no copy).
* ``bytes`` (vLLM's default multiprocess executor, CPU): the engine core decodes utility-call
  arguments without type information, so a tensor arrives as a ``[dtype, shape, index]`` list and
  tensors under 256 bytes fail to pickle. A bucket travels instead as one flat byte string plus its
  names, dtypes, shapes and (16-byte aligned) offsets, which msgpack carries intact. vLLM's own
  packed layout has no alignment: a bf16 tensor of odd length followed by an fp32 one cannot be
  viewed back, so ours pads.
* ``cuda_ipc`` (multiprocess executor, CUDA): the same packed layout in one reusable device buffer
  shared once through a CUDA IPC handle (``torch.multiprocessing.reductions``; the worker maps it
  with vLLM's ``PackedBufferImporter``), so the weights never visit host memory.

With ``verify`` the worker returns a fingerprint (``weights.fingerprint``) of every tensor it
received, before loading it, and the sender compares it with its own.
"""

from __future__ import annotations

import base64
import pickle
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import torch

from atpo_megatron.weights.fingerprint import Fingerprint, fingerprint

Transport = Literal["in_process", "bytes", "cuda_ipc"]
Pairs = list[tuple[str, torch.Tensor]]


def choose_transport(in_process: bool, device_type: str) -> Transport:
    """in-process engines take tensors as they are; out-of-process ones get bytes (CPU) or CUDA IPC."""
    if in_process:
        return "in_process"
    return "cuda_ipc" if device_type == "cuda" else "bytes"


def buckets(weights: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Pairs]:
    """Group ``(name, tensor)`` pairs into lists of about ``bucket_bytes`` (a tensor is never split)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: Pairs = []
    size = 0
    for name, tensor in weights:
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


# ------------------------------------------------------------------------------- packed layout
ALIGN = 16
"""Byte alignment of every tensor in a packed bucket (so any dtype can be viewed in place)."""


def pack_layout(bucket: Pairs) -> dict[str, Any]:
    """Names, dtypes, shapes and aligned byte offsets of a bucket's tensors in one flat buffer."""
    offsets, end = [], 0
    for _, t in bucket:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    return {"names": [n for n, _ in bucket], "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket], "offsets": offsets, "nbytes": end}


def pack_into(buffer: torch.Tensor, bucket: Pairs, layout: dict[str, Any]) -> None:
    for (_, t), offset in zip(bucket, layout["offsets"]):
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[offset:offset + raw.numel()].copy_(raw)


def unpack(flat: torch.Tensor, layout: dict[str, Any]) -> Pairs:
    """Views of ``flat`` (uint8) as the bucket's tensors."""
    out = []
    for name, dtype_name, shape, offset in zip(layout["names"], layout["dtype_names"], layout["shapes"],
                                              layout["offsets"]):
        dtype = getattr(torch, dtype_name)
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        out.append((name, flat[offset:offset + nbytes].view(dtype).view(shape)))
    return out


# ------------------------------------------------------------------------------- sender side
def encode(weights: Iterable[tuple[str, torch.Tensor]], transport: Transport, bucket_bytes: int,
           verify: bool) -> Iterator[tuple[Any, list[tuple[str, Fingerprint]]]]:
    """Yield ``(payload for atpo_load_bucket, [(name, fingerprint)] if verify)`` bucket by bucket.

    The caller must finish with a payload (the worker has loaded it) before asking for the next:
    ``cuda_ipc`` reuses one device buffer for every bucket.
    """
    ipc = _IpcBuffer() if transport == "cuda_ipc" else None
    for bucket in buckets(weights, bucket_bytes):
        sent = [(name, fingerprint(t)) for name, t in bucket] if verify else []
        if transport == "in_process":
            yield bucket, sent
            continue
        layout = pack_layout(bucket)
        if ipc is not None:
            yield ipc.fill(bucket, layout), sent
        else:
            flat = torch.zeros(layout["nbytes"], dtype=torch.uint8)
            pack_into(flat, bucket, layout)
            yield {**layout, "data": flat.numpy().tobytes()}, sent


class _IpcBuffer:
    """One device buffer shared with the engine's workers through a CUDA IPC handle, reused for every
    bucket (re-exported only when a bucket needs more room)."""

    def __init__(self):
        self.buffer: torch.Tensor | None = None
        self.handle = ""

    def fill(self, bucket: Pairs, layout: dict[str, Any]) -> dict[str, Any]:
        from torch.multiprocessing.reductions import reduce_tensor

        if self.buffer is None or self.buffer.numel() < layout["nbytes"]:
            device = torch.cuda.current_device()
            self.buffer = torch.empty(layout["nbytes"], dtype=torch.uint8, device=device)
            uuid = str(torch.cuda.get_device_properties(device).uuid)
            self.handle = base64.b64encode(pickle.dumps({uuid: reduce_tensor(self.buffer)[1]})).decode("ascii")
        pack_into(self.buffer, bucket, layout)
        torch.cuda.current_stream().synchronize()  # the worker reads it from another process
        return {**layout, "ipc": self.handle}


# ------------------------------------------------------------------------------- worker side
def decode(payload: Any, device: torch.device, importer: Any = None) -> Pairs:
    """A bucket as ``(name, tensor)`` pairs the model's ``load_weights`` takes."""
    if isinstance(payload, list):
        return [(name, tensor) for name, tensor in payload]
    if "ipc" in payload:
        from vllm.distributed.weight_transfer.packed_tensor import PackedBufferImporter

        handles = pickle.loads(base64.b64decode(payload["ipc"]))
        uuid = str(torch.cuda.get_device_properties(device.index).uuid)
        if uuid not in handles:
            raise ValueError(f"the weight buffer was shared from GPU {list(handles)}, not this worker's {uuid}; "
                             f"CUDA IPC needs the engine on the actor's device")
        args = list(handles[uuid])
        args[6] = device.index  # rebuild on this worker's device index
        flat = (importer or PackedBufferImporter()).rebuild(args)
        # clones: the buffer is refilled for the next bucket while the layer-wise reload still holds these
        return [(name, t.clone()) for name, t in unpack(flat, payload)]
    return unpack(torch.frombuffer(bytearray(payload["data"]), dtype=torch.uint8), payload)


class AtpoWorkerExtension:
    """Mixed into vLLM's ``Worker`` (``worker_extension_cls``); ``self`` is the worker.

    Method names must not exist on ``Worker`` (vLLM asserts that), hence the ``atpo_`` prefix.
    """

    def atpo_begin_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.distributed.weight_transfer.packed_tensor import PackedBufferImporter
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        self._atpo_importer = PackedBufferImporter()  # one mapping of the sender's IPC buffer per update
        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.get_model())

    def atpo_load_bucket(self, payload: Any, verify: bool) -> list[list]:
        """Load one bucket; with ``verify``, return ``[name, *fingerprint]`` of what arrived."""
        from vllm.config import set_current_vllm_config

        pairs = decode(payload, torch.device(self.device), self._atpo_importer)
        received = [[name, *fingerprint(t)] for name, t in pairs] if verify else []
        with set_current_vllm_config(self.vllm_config):
            self.get_model().load_weights(pairs)
        return received

    def atpo_finish_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.get_model(), self.vllm_config.model_config)
        self._atpo_importer.close()  # releases the sender's IPC buffer mapping once per update
