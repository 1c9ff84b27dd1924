"""What a Dot file records of its training (its ``training`` metadata), for either layout."""
from __future__ import annotations

import datetime
import platform

import torch


def training_record(args, result, config_flat: dict, dot_params: int, dash_params: int, speed: dict, rt, **extra) -> dict:
    """The run's figures, settings, machine and loss curves; ``extra`` adds what one layout has of its own."""
    return {
        **extra,
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "seconds": round(result.seconds, 1),
        "final_loss": result.final_loss,
        "final_reuse_loss": result.final_reuse_loss,
        "data": f"prompts {args.prompts}" if args.prompts else f"images {args.images}" if args.images else args.data,
        "config": config_flat,
        "dot_params": dot_params,
        "dash_params": dash_params,
        "latency": speed,
        "machine": (torch.cuda.get_device_name(rt.device) if rt.device.type == "cuda"
                    else f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip()),
        "device": str(rt.device),
        "precision": rt.precision,
        "date": datetime.date.today().isoformat(),
        "loss_history": result.summary["history"],
        "reuse_loss_history": result.summary["reuse_history"],
        "fixed_set_history": result.summary["fixed_history"],
    }
