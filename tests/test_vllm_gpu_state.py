"""The GPU suite's state comparison (tests/vllm_gpu/state.py) on the CPU: a fake worker whose tensors
live on the CPU, pools faked by address. What it reports decides the feature table, so: a changed byte
is found and put in the right category, the KV cache is never compared, a tensor reached by two paths
counts once, a tensor no path reaches any more is reported missing and one the engine made anew at its
path is reported replaced. And features.py's discard flow against a
model of vLLM 0.33's in-process engine: the pause completed before the discard, scheduling resumed after."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "vllm_gpu"))
import features  # noqa: E402
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


def test_a_tensor_no_path_reaches_any_more_is_missing(worker) -> None:
    state.capture_state(worker)
    del worker.get_model().scale
    worker.model_runner.alias.clear()
    report = state.compare_state(worker)
    assert not report["identical"] and report["missing_count"] == 1 and "scale" in report["missing"][0]
    assert report["replaced_count"] == 0


def test_a_tensor_the_engine_made_anew_at_its_path_is_replaced_not_missing(worker) -> None:
    # vLLM 0.26's V2 runner rebuilds its block-table layout tensors after a kv_cache wake: new objects at
    # new addresses under the same attribute. Not a restore to judge; named so the run says so.
    state.capture_state(worker)
    worker.get_model().scale = torch.full((4,), 0.25)  # another address (and other bytes)
    worker.model_runner.alias.clear()
    report = state.compare_state(worker)
    assert report["missing_count"] == 0 and report["replaced_count"] == 1 and "scale" in report["replaced"][0]
    assert report["identical"] and state.state_differs(report) == []


def test_a_fake_tensor_left_reachable_by_torch_compile_is_skipped(worker) -> None:
    # vLLM 0.33 with CUDA graphs (torch.compile) leaves a FakeTensor reachable from the runner; its
    # data_ptr() raises. It has no memory of its own: counted, never compared, never fatal.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        worker.model_runner.traced = torch.empty(4)
    captured = state.capture_state(worker)
    assert captured["skipped"]["no_storage"] == 1
    assert state.compare_state(worker)["identical"]


def test_compare_before_capture_is_an_error(worker) -> None:
    with pytest.raises(RuntimeError, match="before capture_state"):
        state.compare_state(worker)


# -- features.py's discard flow against vLLM 0.33's in-process engine, as far as that flow goes ----------------


class InprocEngine033:
    """Modelled on vLLM 0.33.0's in-process engine (InprocClient, no busy loop): EngineCore.pause_scheduler
    returns at once without draining; the requests the last step finished stay in scheduler.finished_req_ids
    (has_requests() true) until the next schedule(), and with async scheduling a batch may stay in
    batch_queue; release_kv_cache_memory() requires `paused and not has_requests() and not batch_queue`;
    Executor.discard puts "kv_cache" to sleep; wake_up resumes scheduling once nothing sleeps."""

    def __init__(self) -> None:
        self.finished_req_ids = {"0", "1"}  # left by the last generate
        self.batch_queue = ["in flight"]
        self.paused = False
        self.sleeping_tags: set[str] = set()
        self.steps = 0
        self.scheduler = types.SimpleNamespace(has_requests=lambda: bool(self.finished_req_ids))
        self.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(engine_core=self),
                                                step=self.step)

    def step(self) -> list:  # one step_with_batch_queue: schedule() hands the finished ids on, or a batch ends
        self.steps += 1
        if self.finished_req_ids:
            self.finished_req_ids = set()
        elif self.batch_queue:
            self.batch_queue.pop()
        return []

    def sleep(self, level: int = 1, mode: str = "abort") -> None:
        assert level == 0 and mode in ("abort", "keep")
        self.paused = True

    def release_kv_cache_memory(self) -> None:
        if not (self.paused and not self.scheduler.has_requests() and not self.batch_queue):
            raise RuntimeError("release_kv_cache_memory() requires a completed pause first")
        self.sleeping_tags.add("kv_cache")

    def wake_up(self, tags=None) -> bool:
        tags = [t for t in tags if t != "scheduling"] if tags is not None else sorted(self.sleeping_tags)
        self.sleeping_tags -= set(tags)
        if not self.sleeping_tags:
            self.paused = False
        return not self.sleeping_tags


def test_discard_flow_completes_the_pause_of_an_inprocess_engine_and_resumes_scheduling(monkeypatch) -> None:
    monkeypatch.setattr(features.e2e, "scribble", lambda tp: 0)
    llm = InprocEngine033()
    features.run_flow(llm, "discard")
    assert llm.steps == 2 and not llm.paused and not llm.sleeping_tags


def test_discard_flow_leaves_a_multiprocess_engine_to_its_busy_loop(monkeypatch) -> None:
    monkeypatch.setattr(features.e2e, "scribble", lambda tp: 0)
    llm = InprocEngine033()
    llm.finished_req_ids.clear()
    llm.batch_queue.clear()  # the engine process drained before sleep(level=0) returned
    llm.llm_engine = types.SimpleNamespace(engine_core=types.SimpleNamespace(), step=None)  # an MP client
    features.run_flow(llm, "discard")
    assert not llm.paused and not llm.sleeping_tags
