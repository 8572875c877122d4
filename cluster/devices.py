"""Device, precision and process groups in one place: CUDA with NCCL when present,
else CPU with gloo; bf16 on CUDA, fp32 on CPU, unless the config says otherwise."""
from __future__ import annotations

import torch
import torch.distributed as dist


def want_gpu(requested: bool | None) -> bool:
    return torch.cuda.is_available() if requested is None else requested


def backend(gpu: bool) -> str:
    """The default process group's backend. On CUDA it is NCCL for device tensors plus gloo
    for host tensors: TorchRec's planner and DeepSpeed also exchange CPU tensors, and a
    NCCL-only group fails those with "No backend type associated with device type cpu"."""
    return "cpu:gloo,cuda:nccl" if gpu else "gloo"


def control_group() -> dist.ProcessGroup:
    """A gloo group for the loop's own host-side collectives (the per-iteration agreement,
    object gathers at publication), so they never depend on the default group's backends.
    Every rank must call this at the same point."""
    return dist.new_group(backend="gloo")


def precision(requested: str | None, gpu: bool) -> str:
    """bf16 on CUDA and fp32 on CPU by default; either can be asked for on either device."""
    return requested or ("bf16" if gpu else "fp32")


def deepspeed_config(batch_size: int, world_size: int, zero_stage: int, clipping: float, bf16: bool) -> dict:
    """DeepSpeed's config dict. bf16 keeps fp32 master weights in the optimizer; fp16 is not
    offered, because its loss scaling would also scale the fused sparse gradients."""
    return {
        "train_batch_size": batch_size * world_size,
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,  # >1 would apply sparse updates every micro-batch
        "zero_optimization": {"stage": zero_stage},
        "gradient_clipping": clipping,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
