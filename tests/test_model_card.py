"""The model card written beside every checkpoint."""
import json
from pathlib import Path

import pytest

import quantize_nvfp4 as q

pytestmark = pytest.mark.slow
ATTN = "model.layers.1.self_attn"


def test_model_card(kv_runs, tiny_model):
    card = (kv_runs["fp8"] / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")  # a local source names no hub model page
    manifest = json.loads((kv_runs["fp8"] / q.MANIFEST_NAME).read_text())
    assert manifest["source_model"] == str(Path(tiny_model).resolve())
    hub_card = q.model_card({**manifest, "source_model": "org/base-model"}, "fp8")
    assert hub_card.startswith("---\nbase_model: org/base-model\nlibrary_name: transformers\n")
    for fragment in ("| calibration algorithm | `smooth_hessian` |", "| smoothed norms | 4 of 4: ",
                     "| KV cache | FP8 |", "| local_stories |",
                     "## Quality", "perplexity increase", 'quantization="modelopt_fp4"', "trtllm-serve ./fp8",
                     "`--kv-cache-dtype auto`"):
        assert fragment in card, fragment
    plain = (kv_runs["nvfp4"] / "README.md").read_text()
    assert "Not measured (run with `--eval`" in plain and "| KV cache | NVFP4 |" in plain
