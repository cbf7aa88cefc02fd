#!/usr/bin/env python3
"""ModelOpt's plain NVFP4 flow, as its example hf_ptq.py runs it, on token ids given in a JSON file.

What hf_ptq.py does for `--qformat nvfp4`, and nothing more: load the model in its dtype on the GPU, tokenize all
calibration samples in one call with padding=True (so every sample is padded to the longest, on the left), run
them through the model in batches of 16 under ModelOpt's own forward loop (full logits, no KV cache), call
`mtq.quantize(model, NVFP4_DEFAULT_CFG, forward_loop)`, then `export_hf_checkpoint` and save the tokenizer. The
samples are the ones quantize_nvfp4.py selected, so both calibrate on the same tokens.

    python benchmarks/modelopt_plain_flow.py --input_model M --output_model OUT --samples samples.json --json r.json
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

BATCH_SIZE = 16  # hf_ptq.py's --batch_size as the benchmark runs it


def padded_like_hf_ptq(samples: list[list[int]], tokenizer, device: str) -> dict:
    """All samples padded to the longest, left-padded as hf_ptq.py sets its tokenizer up."""
    tokenizer.padding_side = "left"
    encoded = tokenizer.pad({"input_ids": samples}, padding=True, return_tensors="pt")
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}


def batches(encoded: dict) -> list[dict]:
    count = encoded["input_ids"].shape[0]
    return [{key: value[i:i + BATCH_SIZE] for key, value in encoded.items()} for i in range(0, count, BATCH_SIZE)]


def run(args: argparse.Namespace) -> dict:
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from modelopt.torch.utils.dataset_utils import create_forward_loop
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.input_model, dtype="auto", device_map=device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.input_model)
    loaded = time.perf_counter()
    samples = json.loads(Path(args.samples).read_text())
    forward_loop = create_forward_loop(dataloader=batches(padded_like_hf_ptq(samples, tokenizer, device)))
    mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
    if device == "cuda":
        torch.cuda.synchronize()
    calibrated = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_hf_checkpoint(model, export_dir=args.output_model)
    tokenizer.save_pretrained(args.output_model)
    done = time.perf_counter()
    return {"load_s": round(loaded - start, 2), "calibration_s": round(calibrated - loaded, 2),
            "export_s": round(done - calibrated, 2), "padded_tokens": len(samples) * max(map(len, samples)),
            "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input_model", required=True)
    p.add_argument("--output_model", required=True)
    p.add_argument("--samples", required=True, help="JSON: a list of token id lists")
    p.add_argument("--json", required=True, help="where the timings go")
    args = p.parse_args(argv)
    Path(args.json).write_text(json.dumps(run(args), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
