"""Faults injected from outside the product: a run killed after an offload layer, a data-parallel rank failing.

In process, pass a MonkeyPatch's setattr; in a subprocess, run this file in place of a script:
    python tests/faults.py --fail_after_layer 1 quantize_nvfp4_offload.py ARGS...
    torchrun ... tests/faults.py --fail_rank 1 quantize_nvfp4.py ARGS...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fail_after_layer(layer: int, setattr=setattr) -> None:
    """The offload layer loop fails once the resume point of `layer` (or a later one) is committed."""
    import quantize_nvfp4_offload as offload

    submit = offload.ResumeWriter.submit

    def submit_then_fail(writer, index, quantizers, next_inputs):
        submit(writer, index, quantizers, next_inputs)
        if index >= layer:
            writer.wait()
            raise RuntimeError(f"simulated failure after layer {index}")

    setattr(offload.ResumeWriter, "submit", submit_then_fail)


def fail_rank(rank: int, setattr=setattr) -> None:
    """Data-parallel rank `rank` fails during calibration, once every rank has planned its batches."""
    import quantize_nvfp4 as q

    plan = q.plan_batches

    def plan_then_fail(*args, **kwargs):
        plan(*args, **kwargs)
        if q.current_ranks().rank == rank:
            raise RuntimeError(f"simulated failure on rank {rank}")

    setattr(q, "plan_batches", plan_then_fail)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail_after_layer", type=int)
    parser.add_argument("--fail_rank", type=int)
    parser.add_argument("script")
    faults, argv = parser.parse_known_args()
    if faults.fail_after_layer is not None:
        fail_after_layer(faults.fail_after_layer)
    if faults.fail_rank is not None:
        fail_rank(faults.fail_rank)
    module = __import__(Path(faults.script).stem)
    sys.exit(module.main(argv))
