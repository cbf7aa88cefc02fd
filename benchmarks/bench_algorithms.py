"""Quality and calibration time of each --algorithm and --kv_cache choice, measured on one model.

Without --model it first trains a reference model on this machine (no hub needed): a GQA Llama
(8 layers, hidden 512, 33M parameters) trained for --train_seconds on the Python standard library's source, so its
weights and activations have a trained model's structure. Held-out stdlib files (never trained on)
are the calibration mix; the quality report's held-out samples come from the same files.

    python benchmarks/bench_algorithms.py --work /tmp/bench-algos --out bench_algorithms.json
    python benchmarks/bench_algorithms.py --model ./my-model --dataset_yaml Datasets/SWRP_Default.yaml ...

Each variant runs quantize_nvfp4.py in its own process with --eval; times are calibration only.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quantize_nvfp4 as q  # noqa: E402

VARIANTS = {  # name -> extra flags
    "max": [],
    "awq_lite": ["--algorithm", "awq_lite"],
    "awq_clip": ["--algorithm", "awq_clip"],
    "mse": ["--algorithm", "mse"],
    "max + FP8 KV cache": ["--kv_cache", "fp8"],
    "max + NVFP4 KV cache": ["--kv_cache", "nvfp4"],
    "weight_only max": ["--weight_only"],
    "weight_only awq_clip": ["--weight_only", "--algorithm", "awq_clip"],
}


def stdlib_files() -> list[Path]:
    return sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py") if "test" not in p.parts)


def train_reference(folder: Path, files: list[Path], seconds: float) -> dict:
    """A small GQA Llama trained on `files` for `seconds` on the GPU; saved to `folder` with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [f.read_text(errors="ignore") for f in files]
    tokenizer = q.build_tiny_tokenizer(folder, texts, vocab_size=8192)
    ids = [i for t in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in t + [tokenizer.eos_token_id]]
    seq = 512
    data = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq).cuda()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=1,
                         eos_token_id=2, pad_token_id=3, architectures=["LlamaForCausalLM"], tie_word_embeddings=False)
    model = LlamaForCausalLM(config).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    start, step, loss = time.perf_counter(), 0, None
    while time.perf_counter() - start < seconds:
        lr = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * max(0.0, 1 - (time.perf_counter() - start) / seconds))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = data[torch.randint(0, data.shape[0], (64,), device="cuda")]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
    model.to(torch.bfloat16).save_pretrained(str(folder))
    return {"steps": step, "tokens": step * 64 * seq, "final_loss": round(loss.item(), 3),
            "parameters": sum(p.numel() for p in model.parameters()), "train_tokens_available": len(ids),
            "epochs": round(step * 64 * seq / len(ids), 2)}


def heldout_yaml(folder: Path, files: list[Path]) -> Path:
    """Held-out stdlib files as a raw_text mix: ~4000-character chunks, one per row."""
    rows = []
    for f in files:
        text = f.read_text(errors="ignore")
        rows += [{"text": text[i:i + 4000]} for i in range(0, len(text), 4000) if len(text[i:i + 4000]) > 500]
    (folder / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "heldout.yaml").write_text(f"datasets:\n  - name: stdlib_heldout\n    path: {folder / 'heldout.jsonl'}\n")
    return folder / "heldout.yaml"


def run_variant(name: str, flags: list[str], model: Path, yaml_path: Path, work: Path, args) -> dict:
    out = work / ("out-" + "".join(c if c.isalnum() else "_" for c in name))
    command = [sys.executable, str(ROOT / "quantize_nvfp4.py"), "--input_model", str(model), "--output_model",
               str(out), "--dataset_yaml", str(yaml_path), "--max_samples", str(args.max_samples), "--max_seq_len",
               str(args.max_seq_len), "--eval", "--eval_samples", str(args.eval_samples), "--overwrite", *flags]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"variant": name, "error": result.stderr.strip().splitlines()[-1:]}
    manifest = json.loads((out / q.MANIFEST_NAME).read_text())
    quality = manifest["quality"]
    return {"variant": name, "flags": " ".join(flags), "calibration_s": manifest["calibration_run"]["seconds"],
            "quant_algo": manifest["validation"]["quant_algo"],
            "kv_cache": manifest["validation"].get("kv_cache_quant_algo"),
            "perplexity_original": quality["perplexity_original"], "perplexity_quantized": quality["perplexity_quantized"],
            "perplexity_increase_pct": quality["perplexity_increase_pct"], "mean_kl": quality["mean_kl"],
            "top1_agreement": quality["top1_agreement"],
            "modelopt_in_process_kl": quality.get("modelopt_in_process", {}).get("mean_kl")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model to measure instead of training the reference one")
    parser.add_argument("--dataset_yaml", help="with --model: the calibration mix (default: held-out stdlib files)")
    parser.add_argument("--work", required=True, help="scratch dir for the model and checkpoints")
    parser.add_argument("--out", required=True, help="JSON results")
    parser.add_argument("--train_seconds", type=float, default=12.0,
                        help="about 3 epochs of the stdlib on an H100: longer only memorizes it")
    parser.add_argument("--max_samples", type=int, default=128)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--eval_samples", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    import torch

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = stdlib_files()
    heldout = files[::10]  # every tenth file never trained on
    results = {"device": torch.cuda.get_device_name(0), "versions": q.library_versions(), "variants": []}
    if args.model:
        model = Path(args.model)
    else:
        model = work / "reference-model"
        model.mkdir(exist_ok=True)
        training = [f for f in files if f not in set(heldout)]
        results["reference_model"] = train_reference(model, training, args.train_seconds)
        print(json.dumps(results["reference_model"]), flush=True)
    yaml_path = Path(args.dataset_yaml) if args.dataset_yaml else heldout_yaml(work, heldout)
    for name in args.variants:
        row = run_variant(name, VARIANTS[name], model, yaml_path, work, args)
        print(json.dumps(row), flush=True)
        results["variants"].append(row)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"perplexity of the original model on held-out text: "
          f"{next((r['perplexity_original'] for r in results['variants'] if 'error' not in r), math.nan)}")


if __name__ == "__main__":
    main()
