"""The GPU suite's state comparison (tests/vllm_gpu/state.py) on the CPU: a fake worker whose tensors
live on the CPU, pools faked by address. What it reports decides the feature table, so: a changed byte
is found and put in the right category, the KV cache is never compared, a tensor reached by two paths
counts once, and a tensor gone from its address is reported missing."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vllm_gpu"))
import state  # noqa: E402


class LoRALayer(nn.Module):  # as vLLM's LoRA layers: slots are plain attributes, tuples of tensors
    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(4, 4)
        self.lora_a_stacked = (torch.zeros(1, 1, 2, 4),)
        self.lora_b_stacked = (torch.zeros(1, 1, 4, 2),)


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = LoRALayer()
        self.register_buffer("cos_sin_cache", torch.arange(8.0))
        self.scale = torch.full((4,), 0.5)  # a plain-attribute constant built after loading


@pytest.fixture
def worker(monkeypatch: pytest.MonkeyPatch) -> types.SimpleNamespace:
    monkeypatch.setattr(state, "DEVICE_TYPE", "cpu")
    model = Model()
    kv_cache = torch.zeros(64)
    runner = types.SimpleNamespace(model=model, kv_caches=[kv_cache], input_ids=torch.zeros(8, dtype=torch.int32),
                                   alias={"again": model.scale}, get_draft_model=lambda: None)
    w = types.SimpleNamespace(model_runner=runner, get_model=lambda: model, kv_cache=kv_cache)
    spans = sorted([(kv_cache.data_ptr(), kv_cache.data_ptr() + kv_cache.nbytes, "kv_cache")] +
                   [(t.data_ptr(), t.data_ptr() + t.nbytes, "weights")
                    for t in (*model.parameters(), *model.buffers(), model.scale,
                              *model.layer.lora_a_stacked, *model.layer.lora_b_stacked)])
    monkeypatch.setattr(state, "_pool_spans", lambda: spans)
    return w


def test_untouched_state_compares_identical(worker) -> None:
    captured = state.capture_state(worker)
    assert set(captured["categories"]) == {"params", "buffers", "lora", "other:weights", "other:none"}
    report = state.compare_state(worker)
    assert report["identical"] and state.state_differs(report) == []


def test_a_changed_lora_slot_is_found_and_named(worker) -> None:
    state.capture_state(worker)
    worker.get_model().layer.lora_b_stacked[0][0, 0, 1, 1] = 3.0
    report = state.compare_state(worker)
    assert not report["identical"] and state.state_differs(report) == ["lora"]
    lora = report["categories"]["lora"]
    assert lora["differing_tensors"] == 1 and 1 <= lora["differing_bytes"] <= 4
    assert "lora_b_stacked" in lora["examples"][0]


def test_each_owner_has_its_category(worker) -> None:
    model = worker.get_model()
    state.capture_state(worker)
    with torch.no_grad():
        model.layer.base.weight.add_(1)
    model.cos_sin_cache.mul_(2)
    model.scale.fill_(7)  # reached twice (model.scale, runner.alias): compared once
    worker.model_runner.input_ids.fill_(1)
    report = state.compare_state(worker)
    assert state.state_differs(report) == ["buffers", "other:none", "other:weights", "params"]
    assert report["categories"]["other:weights"]["differing_tensors"] == 1
    assert state.state_differs(report, ("other",)) == ["other:none", "other:weights"]


def test_kv_cache_is_never_compared(worker) -> None:
    captured = state.capture_state(worker)
    worker.kv_cache.fill_(9)
    assert state.compare_state(worker)["identical"]
    assert captured["skipped"]["not_state_tensors"] == 1 and captured["skipped"]["not_state_bytes"] == 256


def test_a_tensor_gone_from_its_address_is_missing(worker) -> None:
    state.capture_state(worker)
    worker.get_model().scale = torch.full((4,), 0.5)  # same bytes, another address
    worker.model_runner.alias.clear()
    report = state.compare_state(worker)
    assert not report["identical"] and report["missing_count"] == 1 and "scale" in report["missing"][0]


def test_compare_before_capture_is_an_error(worker) -> None:
    with pytest.raises(RuntimeError, match="before capture_state"):
        state.compare_state(worker)
