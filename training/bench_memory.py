"""Memory over many sampling runs in one process: what a long ComfyUI session does to the pack's state.

    python -m training.bench_memory                  # 100 runs, every fill in turn, on the reference model

Each run samples the reference model through a Morse run (Euler, CFG, pattern D.), cycling through the Dot and
every training-free and feature fill (encoder propagation with its batched spans); after every tenth run it
prints the process's resident memory and the number of live tensors. A pack that keeps anchors, captured
features or decoded spans after a run grows here. Prints figures; asserts nothing (the tests assert that
a run leaves nothing behind).
"""
from __future__ import annotations

import argparse
import gc
import os
from pathlib import Path

import torch


def resident_mb() -> float:
    """The process's resident set now (Linux /proc; the peak from getrusage elsewhere)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if torch.is_tensor(o))


def main(argv=None) -> int:
    from tqdm.auto import tqdm

    from morse_engine import KeySteps, MorseRouter, Pattern

    from .evaluation.fills import collect_fills
    from .evaluation.samplers import GuidedDenoiser, normal_sigmas, sample
    from .evaluation.workload import load_models, reference_workload

    p = argparse.ArgumentParser(prog="python -m training.bench_memory", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--samples", type=int, default=16, help="images per run (each a CFG pair)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = load_models()
    work = reference_workload(models, args.samples, args.samples, 2.5, 0, torch.device("cpu"))
    fills = collect_fills(models, ["dot", "reuse", "extrapolate", "inherit_k1", "inherit_k2", "propagate"])
    sigmas = normal_sigmas(work.ms, args.steps)
    print(f"{'runs':>5} {'resident MiB':>13} {'live tensors':>13}")
    print(f"{0:5d} {resident_mb():13.1f} {live_tensors():13d}")
    for i in tqdm(range(1, args.runs + 1), desc="runs", dynamic_ncols=True):
        fill = fills[i % len(fills)]
        schedule = KeySteps((0, 3, 6, 9), reference_steps=12) if fill.name == "propagate" else Pattern("D.")
        router = MorseRouter(schedule, fill.filler, timestep_of=work.ms.timestep)
        with torch.no_grad(), router.run(sigmas) as run:
            sample("euler", GuidedDenoiser(work.unet, work.ms, work.cond, work.uncond, work.cfg, run=run), work.noise,
                   sigmas, work.ms)
        if i % 10 == 0:
            tqdm.write(f"{i:5d} {resident_mb():13.1f} {live_tensors():13d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
