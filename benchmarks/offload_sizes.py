#!/usr/bin/env python3
"""What quantize_nvfp4_offload.py keeps on the GPU beside the weights, and its --effective_bits store, for named
model shapes on the benchmarks' synthetic lengths of the default mix: from the script's own size functions
(gpu_reserve_bytes, activation_cache_bytes, score_store_bytes, gptq_hessian_bytes) on meta-device skeletons. No
weights, no GPU: arithmetic, not a measurement.

    python benchmarks/offload_sizes.py            # prints the table
    python benchmarks/offload_sizes.py --render   # writes it into docs/offload.md
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quantize_nvfp4 as q  # noqa: E402
import quantize_nvfp4_offload as offload  # noqa: E402
from benchmarks.bench_calibration import bench_settings, make_samples  # noqa: E402

DOC = ROOT / "docs" / "offload.md"
MARKER = "offload_sizes"
SAMPLES, MEDIAN_LEN, MAX_LEN, SEED = 512, 1024, 2048, 0   # the default mix's sample count and length cap
CARD_GIB = 80                                               # the card the largest --max_gpu_memory is given for
SHAPES = {  # published configurations (bf16)
    "Llama-3-8B": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8)),
    "Llama-3-70B": ("llama", dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                  num_attention_heads=64, num_key_value_heads=8)),
    "Mistral-Large-2 (123B)": ("mistral", dict(vocab_size=32768, hidden_size=12288, intermediate_size=28672,
                                               num_hidden_layers=88, num_attention_heads=96, num_key_value_heads=8,
                                               head_dim=128)),
}


def gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def job_for(kind: str, shape: dict, samples: list[list[int]]) -> q.Job:
    from transformers import LlamaConfig, MistralConfig

    architecture = "LlamaForCausalLM" if kind == "llama" else "MistralForCausalLM"
    config = (LlamaConfig if kind == "llama" else MistralConfig)(**shape, architectures=[architecture],
                                                                 tie_word_embeddings=False)
    return q.Job(config=config, tokenizer=None, skeleton=q.empty_model(config, False), unquantized=[],
                 samples=samples, data_stats={})


def sizes(name: str, samples: list[list[int]]) -> dict:
    import torch

    kind, shape = SHAPES[name]
    job, dtype, tokens = job_for(kind, shape, samples), torch.bfloat16, q.DEFAULT_BATCH_TOKENS
    settings = dataclasses.replace(bench_settings(samples, MAX_LEN, None), algorithm="local_hessian")
    layers = offload.decoder_layer_names(job.skeleton)
    reserve = offload.gpu_reserve_bytes(job, settings, dtype, tokens)
    card = int(CARD_GIB * 2**30 * (1 - offload.GPU_RESERVE_FRACTION))
    return {
        "decoder weights": sum(q.parameter_bytes(job.skeleton.get_submodule(n), dtype) for n in layers),
        "activation cache per layer": offload.activation_cache_bytes(job, settings, dtype, tokens),
        "GPU reserve": reserve,
        "largest --max_gpu_memory": card - reserve,
        "GPU reserve, --effective_bits": offload.gpu_reserve_bytes(
            job, dataclasses.replace(settings, effective_bits=5.0), dtype, tokens),
        "GPU reserve, gptq": offload.gpu_reserve_bytes(
            job, dataclasses.replace(settings, algorithm="gptq"), dtype, tokens),
        "of which GPTQ's Hessians": offload.gptq_hessian_bytes(job),
        "--effective_bits store": offload.score_store_bytes(job, settings, dtype, tokens),
    }


def table() -> str:
    samples = make_samples(SAMPLES, MEDIAN_LEN, MAX_LEN, 1000, SEED)
    rows = {name: sizes(name, samples) for name in SHAPES}
    columns = list(next(iter(rows.values())))
    tokens = sum(len(s) for s in samples)
    lines = [f"`python benchmarks/offload_sizes.py --render`: {SAMPLES} samples of up to {MAX_LEN} tokens, median "
             f"{MEDIAN_LEN} ({tokens:,} tokens; the benchmarks' synthetic lengths), bf16, the default algorithm; "
             f"GiB; the largest `--max_gpu_memory` is for a {CARD_GIB} GiB card.", "",
             "| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(gib(row[c]) for c in columns) + " |" for name, row in rows.items()]
    return "\n".join(lines)


def block(text: str) -> str:
    return f"<!-- {MARKER} -->\n{text}\n<!-- /{MARKER} -->"


def rendered_block() -> str | None:
    """The block as docs/offload.md has it now."""
    doc = DOC.read_text()
    start, end = doc.find(f"<!-- {MARKER} -->"), doc.find(f"<!-- /{MARKER} -->")
    return None if start < 0 or end < 0 else doc[start:end + len(f"<!-- /{MARKER} -->")]


def render() -> None:
    current = rendered_block()
    if current is None:
        raise SystemExit(f"docs/offload.md has no <!-- {MARKER} --> block to replace")
    DOC.write_text(DOC.read_text().replace(current, block(table())))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--render", action="store_true", help="write the table into docs/offload.md")
    if p.parse_args(argv).render:
        render()
    else:
        print(table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
