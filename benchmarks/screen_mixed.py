#!/usr/bin/env python3
"""Screening for mixed precision: which per-group format choice (NVFP4 W4A4 / FP8 W8A8 / 16-bit) under a budget of
average weight bits loses least, in process, with a fast fake-quantization proxy (NVFP4 with max scales).

Choices compared at each budget, over the same linears (every decoder linear; lm_head and embeddings 16-bit and not
counted): `gradient` (ModelOpt auto_quantize's score per group and format: sum over calibration tokens of
(dLoss/dY)^2 (Y_format - Y)^2, gradients of the next-token loss of the unquantized model; then greedy upgrades by
score removed per added bit), `random` (groups upgraded to FP8 in a seeded random order while the budget allows) and,
optionally, ModelOpt's own mtq.auto_quantize choice, applied through the same fake quantization.

    python benchmarks/screen_mixed.py --model DIR --out /tmp/screen.json [--auto_quantize]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import quantize_nvfp4 as q  # noqa: E402
from benchmarks import bench_algorithms as bench  # noqa: E402

BITS = {"NVFP4": 4.5, "FP8": 8.0, "BF16": 16.0}
FP8_MAX, FP4_MAX = 448.0, 6.0


def fp8(x):
    return x.to(torch.float8_e4m3fn).to(x.dtype)


def nvfp4(x, global_amax=None):
    """x fake-quantized to NVFP4 along its last dim: blocks of 16, FP8 block scales under an FP32 global scale."""
    shape = x.shape
    blocks = x.reshape(-1, 16)
    global_amax = blocks.abs().max() if global_amax is None else global_amax
    s2 = torch.clamp(global_amax, min=1e-12) / (FP4_MAX * FP8_MAX)
    scale = fp8(blocks.abs().amax(-1, keepdim=True) / FP4_MAX / s2) * s2
    return q.rounding_error(blocks, scale).neg_().add_(blocks).reshape(shape)


def fp8_tensor(x, amax=None):
    amax = torch.clamp(x.abs().max() if amax is None else amax, min=1e-12)
    return fp8(x * (FP8_MAX / amax)) * (amax / FP8_MAX)


QUANT = {"NVFP4": nvfp4, "FP8": fp8_tensor}


def groups_of(model) -> list[list[str]]:
    """Every decoder linear, fused siblings (q/k/v, gate/up) in one group."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    groups, seen = [], set()
    for name in names:
        if name in seen:
            continue
        prefix, leaf = name.rsplit(".", 1)
        fused = next((f for f in q.FUSED_GROUPS if leaf in f), (leaf,))
        members = [f"{prefix}.{m}" for m in fused if f"{prefix}.{m}" in names]
        seen.update(members)
        groups.append(members)
    return groups


class FakeQuant:
    """Linears' forwards replaced by fake-quantized ones; `formats` (name -> format) says which."""

    def __init__(self, model):
        self.model, self.formats, self.weights, self.amax = model, {}, {}, {}
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
        for name, module in self.linears.items():
            module.forward = self.forward_for(name, module)

    def forward_for(self, name, module):
        def forward(x):
            fmt = self.formats.get(name, "BF16")
            if fmt == "BF16":
                return F.linear(x, module.weight, module.bias)
            key = (name, fmt)
            if key not in self.weights:
                self.weights[key] = QUANT[fmt](module.weight.data)
            amax = self.amax.get(name)
            xq = nvfp4(x, amax) if fmt == "NVFP4" else fp8_tensor(x, amax)
            return F.linear(xq, self.weights[key], module.bias)
        return forward


def batches(samples, size):
    for i in range(0, len(samples), size):
        yield torch.tensor(samples[i:i + size])


@torch.no_grad()
def calibrate_amax(fq: FakeQuant, samples, size):
    """Static per-tensor input amax of each linear (what a max calibration stores)."""
    hooks = [m.register_forward_pre_hook(
        lambda mod, args, n=n: fq.amax.__setitem__(n, torch.maximum(fq.amax.get(n, torch.tensor(0.0)),
                                                                    args[0].abs().max())))
        for n, m in fq.linears.items()]
    fq.formats = {}
    for ids in batches(samples, size):
        fq.model(input_ids=ids)
    for h in hooks:
        h.remove()


def gradient_scores(fq: FakeQuant, samples, size) -> dict:
    """auto_quantize's score per linear and format: sum (dL/dY)^2 (Y_f - Y)^2 over calibration tokens."""
    scores = {(n, f): 0.0 for n in fq.linears for f in QUANT}
    fq.formats = {}
    model = fq.model

    def hook(module, args, output, name):
        x = args[0].detach()
        with torch.no_grad():
            diffs = {}
            for fmt in QUANT:
                key = (name, fmt)
                if key not in fq.weights:
                    fq.weights[key] = QUANT[fmt](module.weight.data)
                xq = nvfp4(x, fq.amax[name]) if fmt == "NVFP4" else fp8_tensor(x, fq.amax[name])
                diffs[fmt] = F.linear(xq, fq.weights[key], module.bias) - output.detach()

        def on_grad(grad):
            for fmt, diff in diffs.items():
                scores[(name, fmt)] += float((grad.float() * diff).square().sum())
        output.register_hook(on_grad)

    handles = [m.register_forward_hook(lambda mod, a, o, n=n: hook(mod, a, o, n)) for n, m in fq.linears.items()]
    for p in model.parameters():
        p.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    for ids in batches(samples, size):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.get_input_embeddings().weight.grad = None
    for h in handles:
        h.remove()
    model.get_input_embeddings().weight.requires_grad_(False)
    return scores


def group_weights(fq, group):
    return sum(fq.linears[n].weight.numel() for n in group)


def greedy(fq, groups, group_scores, budget_bits) -> dict:
    """From all NVFP4: repeatedly the upgrade removing the most score per added bit that still fits."""
    total = sum(group_weights(fq, g) for g in groups)
    spare = (budget_bits - BITS["NVFP4"]) * total
    chosen = {i: "NVFP4" for i in range(len(groups))}
    while True:
        best = None
        for i, g in enumerate(groups):
            w = group_weights(fq, g)
            for fmt in ("FP8", "BF16"):
                cost = (BITS[fmt] - BITS[chosen[i]]) * w
                gain = group_scores[i][chosen[i]] - group_scores[i][fmt]
                if cost <= 0 or cost > spare or gain <= 0:
                    continue
                if best is None or gain / cost > best[0]:
                    best = (gain / cost, i, fmt, cost)
        if best is None:
            break
        _, i, fmt, cost = best
        chosen[i], spare = fmt, spare - cost
    return chosen


def random_choice(fq, groups, budget_bits, seed) -> dict:
    total = sum(group_weights(fq, g) for g in groups)
    spare = (budget_bits - BITS["NVFP4"]) * total
    chosen = {i: "NVFP4" for i in range(len(groups))}
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    for i in order:
        cost = (BITS["FP8"] - BITS["NVFP4"]) * group_weights(fq, groups[i])
        if cost <= spare:
            chosen[i], spare = "FP8", spare - cost
    return chosen


def effective_bits(fq, groups, chosen):
    total = sum(group_weights(fq, g) for g in groups)
    return sum(BITS[chosen[i]] * group_weights(fq, g) for i, g in enumerate(groups)) / total


@torch.no_grad()
def evaluate(fq: FakeQuant, samples, size, reference=None):
    """Perplexity on the held-out samples; with `reference` (the original's log-probs), mean KL and top-1."""
    nll, count, kl, top1, logps = 0.0, 0, 0.0, 0, []
    for b, ids in enumerate(batches(samples, size)):
        logits = fq.model(input_ids=ids).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1)
        nll += float(-logp.gather(-1, ids[:, 1:, None]).sum())
        count += ids[:, 1:].numel()
        if reference is None:
            logps.append(logp.to(torch.bfloat16))
        else:
            ref = reference[b].float()
            kl += float((ref.exp() * (ref - logp)).sum())
            top1 += int((ref.argmax(-1) == logp.argmax(-1)).sum())
    ppl = float(torch.exp(torch.tensor(nll / count)))
    if reference is None:
        return {"perplexity": ppl}, logps
    return {"perplexity": ppl, "mean_kl": kl / count, "top1": top1 / count}, None


def data(model_dir, tokenizer, cal, held, seq, work):
    work.mkdir(parents=True, exist_ok=True)
    mixes = bench.text_mixes(work)
    out = []
    for mix, n in zip(mixes, (cal, held)):
        rows = [json.loads(line)["text"] for line in (mix.with_suffix(".jsonl")).read_text().splitlines()]
        random.Random(0).shuffle(rows)
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in rows[: n * 3]]
        out.append([i[:seq] for i in ids if len(i) >= seq][:n])
    return out


def run_auto_quantize(model_dir, calib, groups, bits_list, size, checkpoint, head_bits=16.0) -> dict:
    """ModelOpt's mtq.auto_quantize (NVFP4_DEFAULT_CFG, FP8_DEFAULT_CFG) at each budget, converted to its counting
    (the 16-bit lm_head included); returns budget -> {linear name: format}."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization import tensor_quant
    from transformers import AutoModelForCausalLM

    cuda_op = tensor_quant.dynamic_block_quantize_op

    def on_cpu_too(inputs, block_size, amax, *rest):  # ModelOpt's NVFP4 fake quantization is CUDA-only
        if inputs.is_cuda or block_size != 16:
            return cuda_op(inputs, block_size, amax, *rest)
        return nvfp4(inputs, amax)
    tensor_quant.dynamic_block_quantize_op = on_cpu_too
    results = {}
    for bits in bits_list:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
        counted = sum(m.weight.numel() for m in linears.values())
        head = model.get_output_embeddings().weight.numel()
        # auto_quantize searches lm_head too and counts it: its budget is the one at which the decoder linears
        # average `bits` with lm_head at head_bits (what it chose for lm_head at these budgets: FP8)
        aq_bits = (bits * counted + head_bits * head) / (counted + head)
        loader = [{"input_ids": ids} for ids in batches(calib, size)]
        began = time.perf_counter()
        model, state = mtq.auto_quantize(
            model, constraints={"effective_bits": aq_bits},
            quantization_formats=[mtq.NVFP4_DEFAULT_CFG, mtq.FP8_DEFAULT_CFG], data_loader=loader,
            forward_step=lambda m, b: m(**b), loss_func=lambda out, b: F.cross_entropy(
                out.logits[:, :-1].flatten(0, 1).float(), b["input_ids"][:, 1:].flatten()),
            num_calib_steps=len(loader), num_score_steps=len(loader), verbose=False, checkpoint=checkpoint)
        formats = {}
        for name in linears:
            module = model.get_submodule(name)
            wq = module.weight_quantizer
            if not wq.is_enabled:
                formats[name] = "BF16"
            elif wq.num_bits == (2, 1):
                formats[name] = "NVFP4"
            else:
                formats[name] = "FP8"
        head_recipe = {k: str(v) for k, v in state["best"]["recipe"].items() if "lm_head" in k}
        decoder_bits = sum(m.weight.numel() * {"NVFP4": 4.5, "FP8": 8.0, "BF16": 16.0}[formats[n]]
                           for n, m in linears.items()) / counted
        results[bits] = {"formats": formats, "auto_quantize_effective_bits": aq_bits, "lm_head": head_recipe,
                         "decoder_linears_bits": round(decoder_bits, 4),
                         "auto_quantize_reported_bits": state["best"]["constraints"].get("effective_bits"),
                         "seconds": round(time.perf_counter() - began, 1)}
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--work", default="/tmp/screen-mixed")
    p.add_argument("--out", required=True)
    p.add_argument("--cal", type=int, default=32)
    p.add_argument("--heldout", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--bits", type=float, nargs="+", default=[4.75, 5.0, 5.5, 6.0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seeds_at", type=float, default=5.0, help="all seeds at this budget, one elsewhere")
    p.add_argument("--auto_quantize", action="store_true")
    p.add_argument("--resume", metavar="JSON", help="reuse this earlier output's scores and rows")
    p.add_argument("--aq_formats", metavar="JSON", help="auto_quantize's choices from an --auto_quantize_only run")
    p.add_argument("--head_bits", type=float, default=16.0, help="lm_head's bits in auto_quantize's budget")
    p.add_argument("--auto_quantize_only", action="store_true",
                   help="only auto_quantize's choices (its search state from --work when a run saved it there)")
    args = p.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    calib, held = data(args.model, tokenizer, args.cal, args.heldout, args.seq, Path(args.work))
    if args.auto_quantize_only:
        aq = run_auto_quantize(args.model, calib, [], args.bits, args.batch, str(Path(args.work) / "auto_quantize.pt"),
                               args.head_bits)
        rows = [{"choice": "auto_quantize", "budget": bits, **row} for bits, row in aq.items()]
        Path(args.out).write_text(json.dumps({"command": "python " + " ".join(sys.argv), "rows": rows}, indent=1))
        return
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    fq = FakeQuant(model)
    groups = groups_of(model)
    result = {"command": "python " + " ".join(sys.argv), "samples": [len(calib), len(held), args.seq], "rows": []}

    def record(row):
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    t = time.perf_counter()
    base, reference = evaluate(fq, held, args.batch)
    result["original"] = base
    calibrate_amax(fq, calib, args.batch)
    if args.resume:  # an earlier run's scores and rows (those within their budget); the rest is measured now
        earlier = json.loads(Path(args.resume).read_text())
        result.update({k: earlier[k] for k in ("group_scores", "score_seconds")})
        result["rows"] = [r for r in earlier["rows"] if r["effective_bits"] <= r["budget"] + 1e-3]
        result["command"] = [earlier["command"], result["command"]]
    else:
        t0 = time.perf_counter()
        scores = gradient_scores(fq, calib, args.batch)
        result["score_seconds"] = round(time.perf_counter() - t0, 1)
        result["group_scores"] = {"+".join(g): {"NVFP4": sum(scores[(n, "NVFP4")] for n in g),
                                                "FP8": sum(scores[(n, "FP8")] for n in g), "BF16": 0.0}
                                  for g in groups}
    group_scores = [result["group_scores"]["+".join(g)] for g in groups]
    done = {(r["choice"], r["budget"]) for r in result["rows"]}

    def measure(label, bits, chosen):
        if (label, bits) in done:
            return
        fq.formats = {n: chosen[i] for i, g in enumerate(groups) for n in g}
        metrics, _ = evaluate(fq, held, args.batch, reference)
        counts = {f: sum(1 for i in chosen if chosen[i] == f) for f in BITS}
        record({"choice": label, "budget": bits, "effective_bits": round(effective_bits(fq, groups, chosen), 4),
                "groups": counts, "ppl_increase_pct": round(100 * (metrics["perplexity"] / base["perplexity"] - 1), 3),
                **metrics, "predicted": sum(group_scores[i][chosen[i]] for i in chosen),
                "upgraded": sorted("+".join(groups[i]) for i in chosen if chosen[i] != "NVFP4")})

    measure("pure NVFP4", 4.5, {i: "NVFP4" for i in range(len(groups))})
    checkpoint = str(Path(args.work) / "auto_quantize.pt")
    aq = run_auto_quantize(args.model, calib, groups, args.bits, args.batch, checkpoint) if args.auto_quantize else {}
    if args.aq_formats:
        aq = {r["budget"]: r for r in json.loads(Path(args.aq_formats).read_text())["rows"]}
    for bits in args.bits:
        measure("gradient", bits, greedy(fq, groups, group_scores, bits))
        if bits == args.seeds_at:
            fp8_only = [{**s, "BF16": float("inf")} for s in group_scores]
            measure("gradient fp8-only", bits, greedy(fq, groups, fp8_only, bits))
        for seed in range(args.seeds if bits == args.seeds_at else 1):
            measure(f"random seed {seed}", bits, random_choice(fq, groups, bits, seed))
        if bits in aq:
            names = aq[bits]["formats"]
            chosen = {i: max((names[n] for n in g), key=BITS.get) for i, g in enumerate(groups)}
            measure("auto_quantize", bits, chosen)
            if result["rows"][-1]["choice"] == "auto_quantize":
                result["rows"][-1].update(aq[bits])
    result["seconds"] = round(time.perf_counter() - t, 1)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
