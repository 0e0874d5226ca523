"""Model configs for the real-vLLM GPU suite: built from config.json alone (load_format="dummy").

The GPU machines reach no hub, so every model here is a config and nothing else. The small ones keep
an engine's start (torch.compile and CUDA graph capture) short; "llama3-8b" is the shape the timings
are reported for.
"""

from __future__ import annotations

import json
import os
import tempfile

_LLAMA_ROPE3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192, "rope_type": "llama3"}

# Llama-3-8B's shape: the model the timings are for.
_LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001, "rope_scaling": _LLAMA_ROPE3,
}

# Qwen2.5-32B's shape (bf16, 32.8 B parameters, 65.5 GB): the largest dense model an H200 holds with room
# left for a KV cache; issue 17's first-sleep row.
_QWEN25_32B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 5120,
    "intermediate_size": 27648, "num_hidden_layers": 64, "num_attention_heads": 40,
    "num_key_value_heads": 8, "vocab_size": 152064, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645, "sliding_window": None,
    "use_sliding_window": False,
}

CONFIGS: dict[str, dict] = {
    "llama3-8b": _LLAMA3_8B,
    "qwen25-32b": _QWEN25_32B,
    # The same Llama, small, llama3 rope scaling kept (vLLM's cos_sin_cache is a buffer of the weights pool).
    "llama-tiny": {**_LLAMA3_8B, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 4,
                   "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 32000,
                   "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2},
    # Drafts for llama-tiny's speculative decoding (same vocabulary): a smaller Llama (method
    # "draft_model") and a one-layer head of llama-tiny's width (method "eagle", vLLM wraps it).
    "llama-draft-tiny": {**_LLAMA3_8B, "hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000,
                         "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2},
    "llama-eagle-tiny": {**_LLAMA3_8B, "hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 1,
                         "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 32000,
                         "max_position_embeddings": 4096, "bos_token_id": 1, "eos_token_id": 2},
    # Qwen2: qkv bias, tied embeddings.
    "qwen2-tiny": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 512,
        "intermediate_size": 1376, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "vocab_size": 32000, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": True,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2, "sliding_window": None,
        "use_sliding_window": False,
    },
    # GPT-NeoX: partial rotary, LayerNorm with bias, parallel residual.
    "gptneox-tiny": {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": 512,
        "intermediate_size": 2048, "num_hidden_layers": 4, "num_attention_heads": 8, "vocab_size": 32000,
        "max_position_embeddings": 4096, "rotary_pct": 0.25, "rotary_emb_base": 10000,
        "layer_norm_eps": 1e-05, "use_parallel_residual": True, "hidden_act": "gelu",
        "tie_word_embeddings": False, "torch_dtype": "float16", "bos_token_id": 0, "eos_token_id": 0,
    },
    # Qwen3-MoE: routed experts through vLLM's fused MoE kernels (pack with WITH_MOE=1).
    "qwen3moe-tiny": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 512,
        "intermediate_size": 1024, "moe_intermediate_size": 256, "num_hidden_layers": 4,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "num_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    },
}


def model_dir(name: str) -> str:
    """A fresh directory holding `name`'s config.json."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(CONFIGS)}")
    path = tempfile.mkdtemp(prefix=f"vse-{name}-")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(CONFIGS[name], f)
    return path
