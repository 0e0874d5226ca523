"""An out-of-tree vLLM model (vLLM 0.26.0) whose layers keep constants that are neither parameters nor
buffers, built after loading: the pattern of vLLM's MoE expert objects (TrtLlmFp8ExpertsBase.gemm1_alpha /
gemm1_beta / clamp_limit, FlashInferExperts.fake_input_scale), which vLLM's worker does not save at a
level-2 sleep.

Each decoder layer carries a ``quant_method`` whose ``process_weights_after_loading`` (called by vLLM's
loader for every module that has one, inside the "weights" memory pool) derives constants from the
layer's MLP weights and stores them on an ``ExpertConstants`` object, which is not an ``nn.Module``, plus
one tensor kept as a plain module attribute. ``forward`` uses them, so the outputs depend on them; the
additive ``gemm1_beta`` dominates the tiny dummy-weight activations, so garbage there changes the tokens.
Only parameters come back from a trainer, so after a level-2 sleep these constants are as good as the
allocator kept them.

Importing this module registers ``PlainAttrLlamaForCausalLM`` with ``vllm.ModelRegistry``.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn
from vllm import ModelRegistry
from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM

ARCH = "PlainAttrLlamaForCausalLM"


class ExpertConstants:
    """Not an nn.Module: named_buffers() never sees these tensors."""

    def __init__(self, gemm1_alpha: torch.Tensor, gemm1_beta: torch.Tensor, clamp_limit: torch.Tensor) -> None:
        self.gemm1_alpha = gemm1_alpha
        self.gemm1_beta = gemm1_beta
        self.clamp_limit = clamp_limit


class DerivedConstantsMethod(QuantizeMethodBase):
    """Builds the layer's constants once its weights are loaded (as quant methods do for MoE experts)."""

    def create_weights(self, layer: nn.Module, *args, **kwargs) -> None:
        raise NotImplementedError("DerivedConstantsMethod only post-processes loaded weights")

    def apply(self, layer: nn.Module, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError("DerivedConstantsMethod only post-processes loaded weights")

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        w = layer.mlp.down_proj.weight.detach().float()  # [hidden, intermediate]
        row = w.sum(dim=1)
        beta = row / row.abs().max().clamp_min(1e-12)  # scale 1: dominates activations of ~1e-3
        alpha = 1.0 + 0.5 * torch.tanh(row * 100.0)
        dtype = layer.mlp.down_proj.weight.dtype
        layer.experts = ExpertConstants(  # a plain attribute holding a non-Module object
            gemm1_alpha=alpha.to(dtype), gemm1_beta=beta.to(dtype),
            clamp_limit=torch.tensor(7.0, dtype=torch.float32, device=w.device))
        layer.output_scale = (1.0 + row.abs() / row.abs().max()).to(dtype)  # a plain tensor attribute


class PlainAttrDecoderLayer(LlamaDecoderLayer):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.quant_method = DerivedConstantsMethod()

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, residual = super().forward(positions, hidden_states, residual)
        experts = getattr(self, "experts", None)
        if experts is None:  # before the loader ran process_weights_after_loading
            return hidden_states, residual
        h = hidden_states * experts.gemm1_alpha + experts.gemm1_beta
        limit = experts.clamp_limit.to(h.dtype)
        h = torch.minimum(torch.maximum(h, -limit), limit) * self.output_scale
        return h, residual


class PlainAttrLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=PlainAttrDecoderLayer)


ModelRegistry.register_model(ARCH, PlainAttrLlamaForCausalLM)


def write_config(directory: str) -> str:
    """A tiny Llama-shaped config.json for this architecture (2 layers, hidden 256); returns the dir."""
    os.makedirs(directory, exist_ok=True)
    config = {
        "architectures": [ARCH], "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "vocab_size": 1024, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return directory
