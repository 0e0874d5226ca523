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


@pytest.mark.parametrize("mode", ["bytes", "digest"])
def test_both_modes_find_one_changed_byte_and_its_owner(worker, mode: str) -> None:
    captured = state.capture_state(worker, mode=mode)
    assert captured["mode"] == mode and captured["categories"]["lora"]["bytes"] == 64
    assert state.compare_state(worker)["identical"]
    worker.get_model().layer.lora_a_stacked[0].view(-1).view(torch.uint8)[5] ^= 1
    report = state.compare_state(worker)
    assert report["mode"] == mode and state.state_differs(report) == ["lora"]
    lora = report["categories"]["lora"]
    assert lora["differing_tensors"] == 1
    assert lora["differing_bytes"] == (1 if mode == "bytes" else 32)  # a digest names the tensor, not the bytes


def test_digest_sees_one_flipped_bit_anywhere_in_a_tensor_of_many_chunks(monkeypatch) -> None:
    monkeypatch.setattr(state, "DIGEST_CHUNK", 64)  # 4099 B: 65 chunks, the last one padded
    t = torch.randint(0, 256, (4099,), dtype=torch.uint8)
    before = state._digest(t)
    assert state._digest(t.clone()) == before
    for i in (0, 63, 64, 2048, 4098):
        for bit in (0, 7):
            t[i] ^= 1 << bit
            assert state._digest(t) != before, (i, bit)
            t[i] ^= 1 << bit
    assert state._digest(t) == before
    swapped = t.clone()
    swapped[0], swapped[4] = t[4].item(), t[0].item()  # the same words in another order
    assert t[0] == t[4] or state._digest(swapped) != before
    assert state._digest(torch.cat([t, t.new_zeros(1)])) != before  # a zero byte appended


def test_digest_of_views_at_odd_offsets_and_strided_views() -> None:
    base = torch.arange(64, dtype=torch.uint8)
    assert state._digest(base[3:19]) == state._digest(base[3:19].clone())
    m = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    assert state._digest(m.t()) == state._digest(m.t().contiguous())
    assert state._digest(m.t()) != state._digest(m)


def test_capture_mode_must_be_known(worker) -> None:
    with pytest.raises(ValueError, match="mode 'hash'"):
        state.capture_state(worker, mode="hash")


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


# -- e2e.py's judge: the state across each sleep-wake, outputs reported only ---------------------------------------


class FakeEngine:
    """An LLM with one worker (the fixture's): sleep/wake run `on_wake` on the worker; generate gives
    `outputs` (tokens, logprobs) for e2e.generate."""

    def __init__(self, worker, on_wake=lambda w: None, logprob: float = -1.0) -> None:
        self.worker, self.on_wake, self.logprob = worker, on_wake, logprob

    def collective_rpc(self, fn, args=()):
        return [fn(self.worker, *args)]

    def sleep(self, level: int) -> None:
        pass

    def wake_up(self, tags=None) -> None:
        if tags != ["weights"]:
            self.on_wake(self.worker)

    def reset_prefix_cache(self) -> None:
        pass


class RecordingEngine(FakeEngine):
    """A FakeEngine that appends each sleep ("sleep1", "sleep2") and wake ("wake") to `events`."""

    def __init__(self, worker, events: list[str]) -> None:
        super().__init__(worker)
        self.events = events

    def sleep(self, level: int) -> None:
        self.events.append(f"sleep{level}")

    def wake_up(self, tags=None) -> None:
        self.events.append("wake")
        super().wake_up(tags)


def make_run(monkeypatch, worker, engine: FakeEngine, ours: bool):
    import e2e

    monkeypatch.setattr(e2e, "scribble", lambda tp: 0)
    monkeypatch.setattr(e2e, "load_params", lambda w: 0)
    monkeypatch.setattr(e2e, "generate", lambda llm: [([1, 2], [llm.logprob, llm.logprob])])
    run = object.__new__(e2e.Run)
    run.args = types.SimpleNamespace(tp=1)
    run.llm, run.ours, run.failed, run.flows_since_check = engine, ours, False, []
    run.result = {"checks": {}, "state": {}, "outputs": {}}
    run.reference = [([1, 2], [-1.0, -1.0])]
    return run


@pytest.mark.parametrize("ours", [True, False])
def test_e2e_a_weights_pool_tensor_changed_by_a_sleep_fails_ours_and_is_reported_for_stock(
        monkeypatch, worker, ours: bool, capsys) -> None:
    def lose_the_constant(w) -> None:
        w.get_model().scale.fill_(0)

    run = make_run(monkeypatch, worker, FakeEngine(worker, lose_the_constant), ours)
    run.level1()
    assert run.check("level1") is False
    assert run.result["state"]["level1"]["lost"] == ["other:weights"]
    assert run.failed is ours
    assert ("FAIL level1: state DIFFERS in other:weights" if ours else "INFO level1") in capsys.readouterr().out


def test_e2e_logprobs_that_move_with_the_state_intact_pass_and_are_reported(monkeypatch, worker, capsys) -> None:
    run = make_run(monkeypatch, worker, FakeEngine(worker, logprob=-1.001), ours=True)
    run.level2()
    assert run.check("level2_rlhf") is True and not run.failed
    outputs = run.result["outputs"]["level2_rlhf"]
    assert outputs["tokens_same"] and not outputs["identical"] and outputs["max_logprob_diff"] == pytest.approx(1e-3)
    assert "PASS level2_rlhf: state identical; tokens identical" in capsys.readouterr().out


def test_e2e_a_changed_tensor_outside_the_pools_is_not_the_allocators(monkeypatch, worker) -> None:
    def touch_input_ids(w) -> None:  # runner scratch, in no sleep-mode pool ("other:none")
        w.model_runner.input_ids.fill_(3)

    run = make_run(monkeypatch, worker, FakeEngine(worker, touch_input_ids), ours=True)
    run.level1()
    assert run.check("level1") is True and run.result["state"]["level1"]["flows"][0]["changed"] == ["other:none"]


def test_e2e_cycles_measure_while_asleep_and_judge_every_sleep(monkeypatch, worker) -> None:
    import e2e

    events: list[str] = []

    run = make_run(monkeypatch, worker, RecordingEngine(worker, events), ours=True)
    run.args.cycles = 10
    monkeypatch.setattr(e2e, "save_params", lambda w: 0)
    monkeypatch.setattr(e2e, "pool_bytes", lambda w: {"weights": 64})
    monkeypatch.setattr(e2e, "gpu_used_mib", lambda: (events.append("measured"), [900])[1])
    e2e.cmd_cycles(run)
    assert events[:7] == ["sleep1", "measured", "wake", "sleep2", "measured", "wake", "wake"]  # level 2: 2 wakes
    assert run.result["checks"] == {"cycle10": True, "memory_flat": True}
    assert len(run.result["state"]["cycle10"]["flows"]) == 10 and not run.failed


def test_e2e_timing_times_wakes_at_once_and_after_a_while_asleep(monkeypatch, worker, capsys) -> None:
    import e2e

    events: list[str] = []

    run = make_run(monkeypatch, worker, RecordingEngine(worker, events), ours=False)
    run.args.asleep_s = 2.0
    run.workers = [{"allocator": "vllm.device_allocator.cumem.CuMemAllocator"}]  # stock: no ours-only steps
    monkeypatch.setattr(e2e, "save_params", lambda w: 1_000_000_000)
    monkeypatch.setattr(e2e, "pool_bytes", lambda w: {"weights": 10**9, "kv_cache": 10**10})
    monkeypatch.setattr(e2e, "weights_pool_nonparams", lambda w: {})
    monkeypatch.setattr(e2e, "gpu_used_mib", lambda: [900])
    monkeypatch.setattr(e2e, "level2_driver_floor", lambda w: {"total_s": 0.1, "handles": 3, "bytes": 1 << 30})
    monkeypatch.setattr(e2e.time, "sleep", lambda s: events.append(f"asleep {s:g}"))
    e2e.cmd_timing(run)
    level1 = [i for i, e in enumerate(events) if e == "sleep1"]
    # the first and three warm cycles wake at once, the next three stay asleep 2 s, then level 2 (1 s pauses)
    assert [events[i + 1] for i in level1[:7]] == ["wake"] * 4 + ["asleep 2"] * 3
    r = run.result
    assert r["level1_rested_asleep_s"] == 2.0 and r["level1_rested_wake_s"] >= 0
    assert set(r["checks"]) >= {"level1_warm", "level1_rested", "level2_rlhf"} and all(r["checks"].values())
    assert "wake after 2 s asleep" in capsys.readouterr().out


def test_e2e_host_pages_reads_anonymous_huge_and_locked_memory(tmp_path) -> None:
    import e2e

    rollup = tmp_path / "smaps_rollup"
    rollup.write_text("55d0c0a00000-7ffd0e1f2000 ---p 00000000 00:00 0  [rollup]\n"
                      "Rss:            70254080 kB\nAnonymous:      65011712 kB\nAnonHugePages:  62914560 kB\n"
                      "Locked:         65011712 kB\n")
    assert e2e.host_pages(rollup=str(rollup)) == {"anon_gib": 62.0, "anon_huge_gib": 60.0, "locked_gib": 62.0}
    assert e2e.host_pages(rollup=str(tmp_path / "missing")) == {}
    here = e2e.host_pages()  # this process, where the kernel has the file
    if os.path.exists("/proc/self/smaps_rollup"):
        assert here["anon_gib"] > 0 and 0 <= here["anon_huge_gib"] <= here["anon_gib"]


def test_e2e_level2_collects_the_allocators_own_seconds_of_each_step(monkeypatch, worker) -> None:
    import e2e

    events: list[str] = []
    own = iter([{"sleep": 0.072}, {"sleep": 0.072, "wake": 0.046}, {"sleep": 0.072, "wake": 0.006}])

    def core_seconds(w) -> dict:
        events.append("core_seconds")
        return next(own)

    monkeypatch.setattr(e2e, "core_seconds", core_seconds)
    run = make_run(monkeypatch, worker, RecordingEngine(worker, events), ours=True)
    core: list = []
    run.level2(overwrite=False, core=core)
    assert core == [(0.072, 0.046, 0.006)]
    # read after each step, never inside a timed call
    assert events == ["sleep2", "core_seconds", "wake", "core_seconds", "wake", "core_seconds"]
    before = len(events)
    run.level2(overwrite=False)
    assert "core_seconds" not in events[before:]  # without `core`, nothing is asked
