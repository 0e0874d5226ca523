"""A LoRA adapter for one of models.py's configs, made on the spot (the GPU machines reach no hub).

With peft (on the GPU machines): a transformers model built from the config on the CPU, wrapped by
``get_peft_model`` with random, non-zero A and B (``init_lora_weights=False``, so the adapter changes
the outputs), saved with ``save_pretrained``. Where peft or transformers cannot do it, the same files
are written directly (PEFT's layout: adapter_config.json, adapter_model.safetensors with
``base_model.model.<module>.lora_{A,B}.weight``); ``make_adapter`` says which way it went.
"""

from __future__ import annotations

import json
import os
import tempfile

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK = 8


def _with_peft(config: dict, path: str, seed: int) -> None:
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    hf_config = transformers.AutoConfig.for_model(config["model_type"], **{
        k: v for k, v in config.items() if k not in ("model_type", "architectures")})
    model = transformers.AutoModelForCausalLM.from_config(hf_config)  # float32, on the CPU
    lora = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGET_MODULES), lora_dropout=0.0,
                      bias="none", task_type="CAUSAL_LM", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(path)


def _by_hand(config: dict, path: str, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    kv = config.get("num_key_value_heads", heads) * head_dim
    shapes = {"q_proj": (hidden, heads * head_dim), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (heads * head_dim, hidden)}
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for name, (fan_in, fan_out) in shapes.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=g) / fan_in ** 0.5
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=g) / RANK ** 0.5
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": 2 * RANK,
                   "lora_dropout": 0.0, "bias": "none", "target_modules": list(TARGET_MODULES),
                   "base_model_name_or_path": None, "fan_in_fan_out": False, "modules_to_save": None}, f)


def make_adapter(config: dict, seed: int = 0) -> tuple[str, str]:
    """A fresh directory holding a LoRA adapter for ``config``, and how it was made ("peft X.Y" or
    "by hand (peft: <why not>)")."""
    path = tempfile.mkdtemp(prefix="vse-lora-")
    try:
        import peft

        _with_peft(config, path, seed)
        return path, f"peft {peft.__version__}"
    except Exception as e:  # noqa: BLE001 - no peft, or one that does not work with this torch/transformers
        why = f"{type(e).__name__}: {e}"[:200]
    _by_hand(config, path, seed)
    return path, f"by hand (peft: {why})"
