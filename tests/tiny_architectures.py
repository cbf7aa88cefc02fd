"""Tiny random-weight models of the architectures people quantize today, built from transformers configs.

Each entry is (config class name, config kwargs). Sizes are the smallest that keep every quantized
linear's input a multiple of 32 (NVFP4 blocks of 16, W4A8 blocks of 32). `save_tiny_architecture`
writes the model with `architectures` set, as export_hf_checkpoint needs, plus the shared tokenizer.
"""
from __future__ import annotations

import shutil
from pathlib import Path

VOCAB = 512
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
            pad_token_id=3, tie_word_embeddings=False)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)
VISION_SIGLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                     patch_size=16)

ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "LlamaForCausalLM": ("LlamaConfig", TEXT),
    "MistralForCausalLM": ("MistralConfig", TEXT),
    "Qwen2ForCausalLM": ("Qwen2Config", TEXT),
    "Qwen3ForCausalLM": ("Qwen3Config", TEXT),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", {**TEXT, **MOE, "decoder_sparse_step": 1, "mlp_only_layers": []}),
    "Qwen3NextForCausalLM": ("Qwen3NextConfig", {**TEXT, **MOE, "num_hidden_layers": 4, "full_attention_interval": 2,
                                                "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                                                "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                                                "shared_expert_intermediate_size": 64}),
    "Gemma2ForCausalLM": ("Gemma2Config", {**TEXT, "tie_word_embeddings": True}),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", {**TEXT, "tie_word_embeddings": True, "sliding_window": 64}),
    "Phi3ForCausalLM": ("Phi3Config", TEXT),
    "DeepseekV3ForCausalLM": ("DeepseekV3Config", {**TEXT, "n_routed_experts": 4, "num_experts_per_tok": 2,
                                                  "moe_intermediate_size": 64, "n_shared_experts": 1,
                                                  "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                                                  "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 16,
                                                  "qk_nope_head_dim": 16, "v_head_dim": 16,
                                                  "num_key_value_heads": 4}),
    "Glm4MoeForCausalLM": ("Glm4MoeConfig", {**TEXT, "n_routed_experts": 4, "num_experts_per_tok": 2,
                                            "moe_intermediate_size": 64, "n_shared_experts": 1,
                                            "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}),
    "GraniteForCausalLM": ("GraniteConfig", TEXT),
    "Olmo2ForCausalLM": ("Olmo2Config", TEXT),
    "Cohere2ForCausalLM": ("Cohere2Config", {**TEXT, "tie_word_embeddings": True, "sliding_window": 64}),
    "Starcoder2ForCausalLM": ("Starcoder2Config", TEXT),
    "MixtralForCausalLM": ("MixtralConfig", {**TEXT, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "GptOssForCausalLM": ("GptOssConfig", {**TEXT, "num_local_experts": 4, "num_experts_per_tok": 2,
                                          "intermediate_size": 64, "sliding_window": 64,
                                          "layer_types": ["sliding_attention", "full_attention"]}),
    "Ernie4_5_MoeForCausalLM": ("Ernie4_5_MoeConfig", {**TEXT, "moe_num_experts": 4, "moe_k": 2,
                                                       "moe_intermediate_size": 64, "moe_layer_start_index": 1,
                                                       "moe_num_shared_experts": 0}),
    "GraniteMoeHybridForCausalLM": ("GraniteMoeHybridConfig", {
        **TEXT, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64,
        "shared_intermediate_size": 64, "layer_types": ["mamba", "attention"], "mamba_n_heads": 4,
        "mamba_d_head": 32, "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_expand": 2}),
    "NemotronHForCausalLM": ("NemotronHConfig", {
        **TEXT, "num_hidden_layers": 4, "layers_block_type": ["mamba", "attention", "mlp", "moe"],
        "mamba_num_heads": 4, "mamba_head_dim": 32, "ssm_state_size": 16, "n_groups": 1, "expand": 2,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "moe_shared_expert_intermediate_size": 64, "n_group": 1, "topk_group": 1}),
    "Gemma3ForConditionalGeneration": ("Gemma3Config", {
        "text_config": {**TEXT, "sliding_window": 64}, "vision_config": VISION_SIGLIP, "mm_tokens_per_image": 4,
        "image_token_index": 5, "boi_token_index": 6, "eoi_token_index": 7}),
    "Mistral3ForConditionalGeneration": ("Mistral3Config", {
        "text_config": {"model_type": "mistral", **TEXT},
        "vision_config": {"model_type": "pixtral", "hidden_size": 64, "intermediate_size": 128,
                          "num_hidden_layers": 1, "num_attention_heads": 4, "head_dim": 16, "image_size": 32,
                          "patch_size": 16}, "image_token_index": 5, "spatial_merge_size": 2}),
    "Qwen2_5_VLForConditionalGeneration": ("Qwen2_5_VLConfig", {
        "text_config": {**TEXT, "rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 4],
                                                      "rope_theta": 10000.0}},
        "vision_config": {"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                          "out_hidden_size": 64, "fullatt_block_indexes": [0], "window_size": 32},
        "image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 7}),
    "Qwen3VLMoeForConditionalGeneration": ("Qwen3VLMoeConfig", {
        "text_config": {**TEXT, **MOE, "moe_intermediate_size": 96, "decoder_sparse_step": 1, "mlp_only_layers": [],
                        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 2, 4], "rope_theta": 10000.0}},
        "vision_config": {"depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4,
                          "out_hidden_size": 64, "deepstack_visual_indexes": [0], "num_position_embeddings": 16,
                          "patch_size": 16},
        "image_token_id": 5, "video_token_id": 6, "vision_start_token_id": 7}),
    "Llama4ForConditionalGeneration": ("Llama4Config", {
        "text_config": {**TEXT, "intermediate_size_mlp": 128, "num_local_experts": 4, "num_experts_per_tok": 1,
                        "interleave_moe_layer_step": 1, "attention_chunk_size": 64, "no_rope_layers": [1, 1]},
        "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                          "num_attention_heads": 4, "image_size": 32, "patch_size": 16,
                          "projector_input_dim": 64, "projector_output_dim": 64, "vision_output_dim": 64},
        "image_token_index": 5}),
}

# Fused expert stacks the hub checkpoints store as [experts, in, out] and transformers as [experts, out, in]: its
# save_pretrained keeps the in-memory orientation, so the tiny source is rewritten the way the hub ships it
HUB_TRANSPOSED_STACKS = {"Qwen3VLMoeForConditionalGeneration": (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")}


def build_config(architecture: str):
    import transformers

    config_class, kwargs = ARCHITECTURES[architecture]
    config = getattr(transformers, config_class)(**kwargs)
    config.architectures = [architecture]
    return config


def save_tiny_architecture(architecture: str, folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random bf16 model of `architecture` in `folder`, with the tokenizer files of `tokenizer_dir`."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(build_config(architecture)).to(torch.bfloat16)
    model.save_pretrained(str(folder))
    transpose_hub_stacks(folder, HUB_TRANSPOSED_STACKS.get(architecture, ()))
    for f in tokenizer_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, folder / f.name)
    return folder


def transpose_hub_stacks(folder: Path, suffixes: tuple[str, ...]) -> None:
    from safetensors.torch import load_file, save_file

    if not suffixes:
        return
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    save_file({k: v.transpose(1, 2).contiguous() if k.endswith(suffixes) else v for k, v in tensors.items()},
              str(path), metadata={"format": "pt"})
