#!/usr/bin/env python3
"""local_hessian's per-block Hessian sums for one linear input: block_hessian against the masked fp32 copy it
replaced, on 8B-shaped inputs (65,536 rows of 4,096 and of 14,336 features, bf16, a tenth of the rows padding).

    python benchmarks/bench_hessian.py --json benchmarks/results/hessian_h100.json        # CUDA
    python benchmarks/bench_hessian.py --render benchmarks/results/hessian_h100.json      # into docs/benchmarks.md
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_cli import NEXT_SECTION, paragraph, write_section  # noqa: E402

import quantize_nvfp4 as q  # noqa: E402

TITLE = "## Hessian sums"
SHAPES = ((8, 8192, 4096), (8, 8192, 14336))  # batch, tokens, features: 65,536 rows


def masked_copy(x, mask):
    """The sums as first written: an fp32 copy of every row, padding multiplied to zero, then the block products."""
    rows = x.reshape(-1, x.shape[-1]).float() * mask.reshape(-1, 1).to(x.dtype)
    blocks = rows.view(rows.shape[0], -1, q.HESSIAN_BLOCK)
    return torch.einsum("tbi,tbj->bij", blocks, blocks), mask.to(x.dtype).sum()


def milliseconds(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def case(batch: int, tokens: int, features: int) -> dict:
    x = torch.randn(batch, tokens, features, device="cuda", dtype=torch.bfloat16)
    mask = (torch.arange(tokens, device="cuda")[None, :] < tokens - torch.arange(batch, device="cuda")[:, None]
            * tokens // 40).long()
    new, old = q.block_hessian(x, mask)[0], masked_copy(x, mask)[0]
    relative = ((new - old).norm() / old.norm()).item()
    gigabytes = x.numel() * x.element_size() / 1e9
    ms = milliseconds(lambda: q.block_hessian(x, mask))
    return {"rows": batch * tokens, "features": features, "masked_copy_ms": round(milliseconds(
        lambda: masked_copy(x, mask)), 3), "block_hessian_ms": round(ms, 3), "read_gb_per_s": round(gigabytes / ms
            * 1e3, 1), "relative_difference": relative}


def versions(results: dict) -> str:
    """The library versions the results record; older results files recorded none: the end-to-end section's."""
    return f"; torch {results['torch']}" if "torch" in results else " (the image of the end-to-end runs above)"


def render(results: dict, results_path: str) -> str:
    lines = [TITLE, "", "```bash", f"python benchmarks/bench_hessian.py --json {results_path}",
             f"python benchmarks/bench_hessian.py --render {results_path}", "```", "",
             paragraph(f"Machine: {results['gpu']}{versions(results)}. local_hessian's per-block sums Σ x_b x_bᵀ of "
                       "one linear input (bf16, up to a sixth of a row's tokens padding), as `block_hessian` computes "
                       "them in the calibration hooks, against the masked fp32 copy they replaced:"), "",
             "| rows × features | masked fp32 copy (ms) | `block_hessian` (ms) | input read at | relative difference |",
             "|---|---|---|---|---|"]
    for c in results["cases"]:
        lines.append(f"| {c['rows']:,} × {c['features']:,} | {c['masked_copy_ms']} | {c['block_hessian_ms']} | "
                     f"{c['read_gb_per_s']} GB/s | {c['relative_difference']:.1e} |")
    return "\n".join(lines + ["", ""])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="bench_hessian.json")
    p.add_argument("--render", metavar="RESULTS_JSON", help="write RESULTS_JSON's table into docs/benchmarks.md")
    args = p.parse_args(argv)
    if args.render:
        write_section(render(json.loads(Path(args.render).read_text()), args.render), TITLE, NEXT_SECTION)
        return 0
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__.split("+")[0],
               "cases": [case(*shape) for shape in SHAPES]}
    print(json.dumps(results, indent=2))
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
