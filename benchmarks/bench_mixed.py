#!/usr/bin/env python3
"""--effective_bits at equal bits: the Hessian proxy's choice against random and first/last-layer choices.

    python benchmarks/bench_mixed.py --input_model DIR --dataset_yaml Datasets/Local_Example.yaml \\
        --bits 4.75 5.0 5.5 --work /tmp/bench-mixed [--max_samples 64 --max_seq_len 256 --eval_samples 32]

Each variant is one quantize_nvfp4.py run with --eval in its own process, all on the same calibration: `proxy` (the
product), `proxy_weights_only` (its score without the input-error term), `proxy_relative` (each group's score
divided by its output's energy), and two that replace only the choice
(quantize_nvfp4.choose_formats), upgrading groups to FP8 while the budget allows in a seeded random order (`random`)
or from the outermost decoder layers inwards (`first_last`). Writes results.json and a
Markdown table to --work.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def layer_index(group) -> int:
    match = re.search(r"\.(\d+)\.", group.names[0])
    return int(match.group(1)) if match else 0


def random_order(groups) -> list:
    return sorted(groups, key=lambda g: random.Random(f"{g.names[0]}").random())


def outermost_first(groups) -> list:
    last = max(layer_index(g) for g in groups)
    return sorted(groups, key=lambda g: (min(layer_index(g), last - layer_index(g)), g.names))


ORDERS = {"random": random_order, "first_last": outermost_first}


def upgrade_in_order(order):
    """A choose_formats replacement: each group in `order` to FP8 while the budget allows."""
    import quantize_nvfp4 as q

    def choose(groups, budget_bits: float) -> None:
        spare = budget_bits * sum(g.weights for g in groups) - sum(g.weights * q.WEIGHT_BITS[g.algo] for g in groups)
        for group in order(groups):
            if group.upgrade_cost("FP8") <= spare:
                spare -= group.upgrade_cost("FP8")
                group.algo = "FP8"
    return choose


def run_variant(variant: str, argv: list[str]) -> int:
    """In a child process: quantize_nvfp4.main with the variant's choice."""
    import quantize_nvfp4 as q

    if variant in ORDERS:
        q.choose_formats = upgrade_in_order(ORDERS[variant])
    if variant == "proxy_weights_only":  # the score without its input-error term
        q.input_error_loss = lambda weight, total, algo: 0.0
    if variant == "proxy_relative":  # each group's score over its output's energy Σ wᵀ H w
        q.scored = relative(q.scored)
    return q.main(argv)


def relative(scored):
    import quantize_nvfp4 as q

    def score(names, members, hessians, input_errors):
        group = scored(names, members, hessians, input_errors)
        energy = sum(q.hessian_loss(m.weight.float().reshape(m.weight.shape[0], -1, q.HESSIAN_BLOCK), hessians[n])
                     for n, m in zip(names, members))
        group.loss = {algo: loss / max(energy, 1e-30) for algo, loss in group.loss.items()}
        return group
    return score


def measure(args, variant: str, bits: float | None) -> dict:
    out = args.work / f"{variant}-{bits}"
    argv = ["--input_model", args.input_model, "--output_model", str(out), "--dataset_yaml", args.dataset_yaml,
            "--max_samples", str(args.max_samples), "--max_seq_len", str(args.max_seq_len), "--eval",
            "--eval_samples", str(args.eval_samples), "--overwrite"]
    argv += ["--effective_bits", str(bits)] if bits is not None else []
    result = subprocess.run([sys.executable, __file__, "--child", variant, *argv], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{variant} at {bits} bits failed:\n{result.stderr[-3000:]}")
    manifest = json.loads((out / "nvfp4_manifest.json").read_text())
    mixed = manifest["calibration_run"].get("mixed_precision") or {}
    quality = manifest["quality"]
    return {"variant": variant, "budget_bits": bits, "effective_bits": mixed.get("effective_bits", 4.5),
            "formats": manifest["validation"]["formats"], "ppl_increase_pct": quality["perplexity_increase_pct"],
            "mean_kl": quality["mean_kl"], "top1": quality["top1_agreement"],
            "perplexity_original": quality["perplexity_original"],
            "predicted_loss": mixed.get("predicted_loss"), "seconds": manifest["timings"]["total_s"]}


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return run_variant(sys.argv[2], sys.argv[3:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input_model", required=True)
    p.add_argument("--dataset_yaml", default=str(ROOT / "Datasets" / "Local_Example.yaml"))
    p.add_argument("--bits", type=float, nargs="+", default=[4.75, 5.0, 5.5, 6.0])
    p.add_argument("--variants", nargs="+", default=["proxy", "proxy_weights_only", *ORDERS])
    p.add_argument("--max_samples", type=int, default=64)
    p.add_argument("--max_seq_len", type=int, default=256)
    p.add_argument("--eval_samples", type=int, default=32)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--no_baseline", dest="baseline", action="store_false", help="skip the pure NVFP4 run")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [measure(args, "proxy", None)] if args.baseline else []  # pure NVFP4, the default

    for bits in args.bits:
        rows += [measure(args, variant, bits) for variant in args.variants]
        (args.work / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| budget | variant | effective bits | formats | ppl increase | mean KL | top-1 |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['budget_bits'] or 'none (pure NVFP4)'} | {r['variant']} | {r['effective_bits']} | "
              f"{', '.join(f'{n} {a}' for a, n in r['formats'].items())} | {r['ppl_increase_pct']}% | {r['mean_kl']} | "
              f"{r['top1']} |" for r in rows]
    (args.work / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
