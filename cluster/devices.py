"""Device choice in one place: CUDA with NCCL when present, else CPU with gloo."""
from __future__ import annotations

import torch


def want_gpu(requested: bool | None) -> bool:
    return torch.cuda.is_available() if requested is None else requested


def backend(gpu: bool) -> str:
    return "nccl" if gpu else "gloo"


def deepspeed_config(batch_size: int, world_size: int, zero_stage: int, clipping: float, gpu: bool) -> dict:
    """DeepSpeed's config dict; bf16 on GPU (fp16 loss scaling would also scale the fused sparse grads)."""
    return {
        "train_batch_size": batch_size * world_size,
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,  # >1 would apply sparse updates every micro-batch
        "zero_optimization": {"stage": zero_stage},
        "gradient_clipping": clipping,
        "bf16": {"enabled": gpu},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
