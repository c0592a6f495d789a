"""Proves the vLLM 0.33 harness is faithful: real Scheduler, real connectors, vLLM's tensor layouts.

Needs vLLM 0.33 light (``bash tests/install_vllm_light.sh``); imported plainly so a missing install
fails loudly instead of skipping.
"""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
import vllm_harness as H  # first: imports vLLM for the CPU platform, clear of the repo's kernels/ folder

import safetensors.torch
import vllm
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.offloading_connector import OffloadingConnector

LAYERS = H.TinyModelSpec().num_layers


def test_installed_vllm_is_033() -> None:
    assert vllm.__version__ == "0.33.0"


# --------------------------------------------------------------------------------------------------
# A connector that matches nothing and records what reaches it
# --------------------------------------------------------------------------------------------------


class RecordingMetadata(KVConnectorMetadata):
    """Empty per-step metadata."""


class RecordingConnector(KVConnectorBase_V1):
    """Minimal connector: no external hits, records worker-side calls and the registered tensors.

    ``kv_connector_extra_config["layout"]`` is returned by ``get_required_kvcache_layout``.
    """

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.calls: list[str] = []
        self.registered: dict[str, torch.Tensor] = {}

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: Any) -> str | None:
        return vllm_config.kv_transfer_config.kv_connector_extra_config.get("layout")

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        assert num_external_tokens == 0

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return RecordingMetadata()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.calls.append("register_kv_caches")
        self.registered = dict(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        self.calls.append("handle_preemptions")

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        self.calls.append("bind_connector_metadata")
        super().bind_connector_metadata(connector_metadata)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self.calls.append("start_load_kv")

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.calls.append("wait_for_layer_load")

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        assert kv_layer is self.registered[layer_name]
        self.calls.append("save_kv_layer")

    def finish_forward(self) -> None:
        self.calls.append("finish_forward")

    def wait_for_save(self) -> None:
        assert self.has_connector_metadata()
        self.calls.append("wait_for_save")

    def get_finished(self, finished_req_ids: set[str]) -> tuple[None, None]:
        self.calls.append("get_finished")
        return None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        self.calls.append("get_block_ids_with_load_errors")
        return set()

    def clear_connector_metadata(self) -> None:
        self.calls.append("clear_connector_metadata")
        super().clear_connector_metadata()


RECORDING = f"{__name__}:RecordingConnector"


def recording_harness(**overrides: Any) -> H.VllmHarness:
    """Harness with the recording connector (extra config key ``layout`` optional)."""
    layout = overrides.pop("layout", None)
    extra = {"layout": layout} if layout is not None else {}
    return H.VllmHarness(H.HarnessConfig(connector=RECORDING, connector_extra_config=extra, **overrides))


def shared_prefix_prompts(prefix_len: int, suffix_len: int, count: int, seed: int = 1) -> list[list[int]]:
    """``count`` prompts sharing a random prefix, each with its own random suffix."""
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(H.FIRST_REGULAR_TOKEN, 4096, (prefix_len,), generator=gen).tolist()
    return [prefix + torch.randint(H.FIRST_REGULAR_TOKEN, 4096, (suffix_len,), generator=gen).tolist() for _ in range(count)]


# --------------------------------------------------------------------------------------------------
# Tensors: what register_kv_caches receives
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requested", "resolved", "stride_order"),
    [(None, "LBNHC", (0, 2, 1, 3)), ("NHD", "LBNHC", (0, 2, 1, 3)), ("HND", "LBHNC", (0, 1, 2, 3))],
)
def test_register_kv_caches_gets_standardized_views(requested: str | None, resolved: str, stride_order: tuple[int, ...]) -> None:
    """vLLM 0.33 hands per-layer [B, H, N, 2D] views strided into one int8 buffer, in the resolved layout."""
    model = H.TinyModelSpec()
    with recording_harness(layout=requested, num_gpu_blocks=24) as h:
        assert h.vllm_config.cache_config.kv_cache_layout == resolved
        registered = h.worker.connector.registered
        assert list(registered) == model.layer_names()
        views = list(registered.values())
        shape = (24, model.num_kv_heads, 16, 2 * model.head_dim)
        storage = views[0].untyped_storage()
        page = model.num_kv_heads * 16 * 2 * model.head_dim
        for layer, view in enumerate(views):
            assert tuple(view.shape) == shape and view.dtype == torch.bfloat16
            assert view.untyped_storage().data_ptr() == storage.data_ptr()
            assert storage.nbytes() == len(views) * 24 * page * 2  # one backing buffer for all layers
            assert view.storage_offset() == layer * 24 * page  # layer-outermost (L first)
            physical = sorted(range(4), key=lambda d: -view.stride(d))
            assert tuple(physical) == stride_order
            assert view.stride(3) == 1


@pytest.mark.parametrize("layout", ["LBNHC", "LBHNC", "LHBNC", "BLNHC", "BLHNC", "BHLNC"])
def test_every_standardized_layout(layout: str) -> None:
    """Views strided as the layout name says (block-outermost ones are vLLM 0.33's cross-layer blocks)."""
    blocks, model = 12, H.TinyModelSpec()
    sizes = {"L": model.num_layers, "B": blocks, "H": model.num_kv_heads, "N": 16, "C": 2 * model.head_dim}
    strides, step = {}, 1
    for dim in reversed(layout):
        strides[dim] = step
        step *= sizes[dim]
    with recording_harness(layout=layout, num_gpu_blocks=blocks) as h:
        views = list(h.worker.connector.registered.values())
        for layer, view in enumerate(views):
            assert view.stride() == tuple(strides[d] for d in "BHNC")
            assert view.storage_offset() == layer * strides["L"]
        first, second = shared_prefix_prompts(32, 5, 2)
        h.add_request("a", first, 2)
        h.run_until_idle()
        h.add_request("b", second, 2)
        verified = 0
        while h.busy():
            h.step()
            verified += h.worker.last_report.verified_tokens
        assert verified == LAYERS * 32


def test_harness_kv_placement_matches_flash_attention_reading() -> None:
    """K and V sit side by side in C (K first): FlashAttention reads kv.transpose(1, 2).split(D, -1)."""
    model = H.TinyModelSpec()
    with recording_harness(num_gpu_blocks=24) as h:
        prompt = shared_prefix_prompts(40, 0, 1)[0]
        h.add_request("r", prompt, 2)
        h.step()
        state = h.worker.requests["r"]
        for layer, name in enumerate(model.layer_names()):
            key_cache, value_cache = h.worker.kv_caches[name].transpose(1, 2).split(model.head_dim, dim=-1)
            expected = h.worker.expected_kv("r", layer, 0, 40)
            for position in range(40):
                block, offset = state.block_ids[0][position // 16], position % 16
                assert torch.equal(key_cache[block, offset].view(torch.int16), expected[position, :, 0].view(torch.int16))
                assert torch.equal(value_cache[block, offset].view(torch.int16), expected[position, :, 1].view(torch.int16))


@pytest.mark.parametrize(("kv_format", "shape"), [("flash5d", (2, 24, 16, 2, 16)), ("flashinfer5d", (24, 2, 16, 2, 16))])
def test_classic_5d_tensors(kv_format: str, shape: tuple[int, ...]) -> None:
    """The classic 5-D per-layer tensors are registered, written and verified (prefix hits re-read)."""
    with recording_harness(num_gpu_blocks=24, kv_format=kv_format) as h:
        for tensor in h.worker.connector.registered.values():
            assert tuple(tensor.shape) == shape
        first, second = shared_prefix_prompts(64, 8, 2)
        h.add_request("a", first, 3)
        h.run_until_idle()
        h.add_request("b", second, 3)
        verified = 0
        while h.busy():
            h.step()
            verified += h.worker.last_report.verified_tokens
        assert verified == LAYERS * 64  # the 4 shared blocks came from vLLM's prefix cache
        layer0 = h.worker.kv_caches["model.layers.0.self_attn.attn"]
        keys = layer0[0] if kv_format == "flash5d" else layer0[:, 0]  # [B, N, H, D]: K is index 0
        expected = H.KVOracle(H.TinyModelSpec()).kv(_hashes(second, 16), 0)[:, :, 0]
        assert any(torch.equal(keys[b].view(torch.int16), expected.view(torch.int16)) for b in range(24))


def _hashes(tokens: list[int], count: int) -> list[int]:
    """Prefix hashes of the first ``count`` tokens of an unsalted request."""
    hashes: list[int] = []
    H.KVOracle.extend_prefix_hashes(hashes, H.request_seed(None, None), tokens[:count])
    return hashes


# --------------------------------------------------------------------------------------------------
# Call order of the worker side
# --------------------------------------------------------------------------------------------------

V1_AFTER_FORWARD = ["start_load_kv", "wait_for_save", "get_finished", "get_block_ids_with_load_errors", "clear_connector_metadata"]


def expected_step(runner: str, forward: bool) -> list[str]:
    """Worker-side calls of one step without sync loads, transcribed from the 0.33 runners."""
    layers = ["wait_for_layer_load", "save_kv_layer"] * LAYERS if forward else []
    head = ["handle_preemptions", "bind_connector_metadata", *layers]
    return head + V1_AFTER_FORWARD if runner == "v1" else head + ["finish_forward", *V1_AFTER_FORWARD]


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_worker_call_order(runner: str) -> None:
    with recording_harness(num_gpu_blocks=32, runner=runner) as h:
        connector = h.worker.connector
        assert connector.calls == ["register_kv_caches"]
        for i, prompt in enumerate(shared_prefix_prompts(20, 10, 3)):
            h.add_request(f"r{i}", prompt, 4)
        steps: list[tuple[bool, list[str]]] = []
        while h.busy():
            before = len(connector.calls)
            result = h.step()
            if result.scheduler_output is None:  # async loop only processed a queued batch
                assert connector.calls[before:] == []
                continue
            steps.append((result.scheduled_tokens > 0, connector.calls[before:]))
        assert all(h.finish_reasons[f"r{i}"] == "length" for i in range(3))
        for scheduled, calls in steps:
            assert calls == expected_step(runner, scheduled)
        assert {scheduled for scheduled, _ in steps} == {True, False}  # forward steps and no-forward steps


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_async_scheduling_overlaps_steps(runner: str) -> None:
    """V2 (async): step N+1 is scheduled and executed before step N's output is processed."""
    with recording_harness(num_gpu_blocks=32, runner=runner) as h:
        events: list[str] = []
        schedule, update = h.scheduler.schedule, h.scheduler.update_from_output
        h.scheduler.schedule = lambda *a: events.append("S") or schedule(*a)
        h.scheduler.update_from_output = lambda *a: events.append("U") or update(*a)
        h.add_request("r", shared_prefix_prompts(8, 8, 1)[0], 3)
        h.run_until_idle()
        trace = "".join(events)
        assert h.scheduler.__class__.__name__ == ("Scheduler" if runner == "v1" else "AsyncScheduler")
        assert trace.startswith("SUSU" if runner == "v1" else "SSUSU")
        assert len(h.outputs["r"]) == 3


# --------------------------------------------------------------------------------------------------
# vLLM's own connectors through the harness
# --------------------------------------------------------------------------------------------------


def offloading_harness(runner: str, **overrides: Any) -> H.VllmHarness:
    extra = H.offloading_connector_config(8 << 20, completion_delay=overrides.pop("completion_delay", 1))
    return H.VllmHarness(
        H.HarnessConfig(connector="OffloadingConnector", connector_extra_config=extra, runner=runner, num_gpu_blocks=40, **overrides)
    )


def chat_workload() -> H.MultiTurnChatWorkload:
    """8 users x 4 rounds, all active: their histories (~16 blocks each) do not fit in 39 GPU blocks."""
    return H.MultiTurnChatWorkload(num_users=8, num_rounds=4, system_prompt_tokens=64, seed=3)


def run_counting_loads(h: H.VllmHarness, workload: H.MultiTurnChatWorkload) -> Counter:
    counts: Counter = Counter()
    execute = h.worker.execute

    def counting_execute(so, new_blocks):
        counts["load_jobs"] += len(so.kv_connector_metadata.load_jobs)
        counts["store_jobs"] += len(so.kv_connector_metadata.store_jobs)
        counts["preempted"] += len(so.preempted_req_ids or ())
        out = execute(so, new_blocks)
        counts["verified"] += h.worker.last_report.verified_tokens
        counts["poisoned"] += h.worker.last_report.poisoned_blocks
        return out

    h.worker.execute = counting_execute
    counts["steps"] = h.run_workload(workload)
    return counts


_OFFLOAD_OUTPUTS: dict[str, dict[str, list[int]]] = {}


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_offloading_connector_multi_turn(runner: str) -> None:
    """vLLM's OffloadingConnector, both sides real: later turns onboard from CPU with the original bytes."""
    workload = chat_workload()
    with offloading_harness(runner) as h:
        counts = run_counting_loads(h, workload)
        assert h.vllm_config.cache_config.kv_cache_layout == "LBHNC"  # the connector asks for HND
        assert workload.done and len(workload.completed) == 32
        assert {h.finish_reasons[t.request_id] for t in workload.completed} == {"length"}
        assert all(len(h.outputs[t.request_id]) == t.max_tokens for t in workload.completed)
        assert counts["load_jobs"] > 0 and counts["store_jobs"] > 0
        assert counts["verified"] > 0 and counts["poisoned"] > 0
        assert h.free_block_count() == 39 and not h.scheduler.requests  # nothing leaked
        assert "finish_forward" in h.worker.call_log if runner == "v2" else "finish_forward" not in h.worker.call_log
    _OFFLOAD_OUTPUTS[runner] = {t.request_id: h.outputs[t.request_id] for t in workload.completed}
    if len(_OFFLOAD_OUTPUTS) == 2:
        assert _OFFLOAD_OUTPUTS["v1"] == _OFFLOAD_OUTPUTS["v2"]  # same answers whatever the call order


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_corrupted_onboarding_is_detected(runner: str) -> None:
    """A data mover that drops loads leaves poisoned blocks: the emulated attention must refuse them."""
    with offloading_harness(runner) as h:
        mover = h.worker.connector.connector_worker.worker
        assert isinstance(mover, H.HarnessCPUOffloadWorker)
        submit_store = mover.submit_store

        def dropping_load(job_id, src_spec, dst_spec, expedited=False):
            return submit_store(job_id, dst_spec, src_spec.__class__(list(range(len(src_spec.block_ids)))))

        mover.submit_load = dropping_load  # "loads" by storing elsewhere: GPU blocks stay poisoned
        with pytest.raises(H.KVMismatchError, match="wrong KV"):
            h.run_workload(chat_workload())


class FlakyOffloadingConnector(OffloadingConnector):
    """vLLM's OffloadingConnector whose first ``fail_loads`` load jobs lose their bytes and are reported.

    The lost blocks are overwritten with NaN after the load and returned by
    ``get_block_ids_with_load_errors``, so vLLM must recompute them.
    """

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.fail_budget = int(self._kv_transfer_config.kv_connector_extra_config["fail_loads"])
        self.reported: set[int] = set()
        self._errors: set[int] = set()
        self._views: list[torch.Tensor] = []

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        super().register_kv_caches(kv_caches)
        self._views = list(kv_caches.values())

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        jobs = list(self._get_connector_metadata().load_jobs.values())
        super().start_load_kv(forward_context, **kwargs)
        for job in jobs[: self.fail_budget]:
            self.fail_budget -= 1
            lost = job.dst_spec.block_ids.tolist()
            for view in self._views:
                view[lost] = float("nan")
            self._errors.update(lost)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._errors = self._errors, set()
        self.reported |= errors
        return errors


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_failed_loads_are_recomputed(runner: str) -> None:
    """Reported load failures are tolerated by the verifier and recomputed by vLLM; nothing leaks."""
    extra = H.offloading_connector_config(8 << 20, completion_delay=1, fail_loads=3)
    config = H.HarnessConfig(connector=f"{__name__}:FlakyOffloadingConnector", connector_extra_config=extra,
                             runner=runner, num_gpu_blocks=40)
    workload = chat_workload()
    with H.VllmHarness(config) as h:
        counts = run_counting_loads(h, workload)
        assert h.worker.connector.fail_budget == 0 and h.worker.connector.reported
        assert counts["load_jobs"] > 3 and counts["verified"] > 0
        assert workload.done and all(len(h.outputs[t.request_id]) == t.max_tokens for t in workload.completed)
        assert h.free_block_count() == 39 and not h.scheduler.requests


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_example_connector_sync_load(runner: str, tmp_path: Path) -> None:
    """vLLM's ExampleConnector: saves through save_kv_layer, loads synchronously before the forward."""
    extra = {"shared_storage_path": str(tmp_path)}
    config = H.HarnessConfig(connector="ExampleConnector", connector_extra_config=extra, num_gpu_blocks=40, runner=runner)
    prompt = shared_prefix_prompts(100, 0, 1)[0]
    with H.VllmHarness(config) as h:
        h.add_request("first", prompt, 4)
        h.run_until_idle()
        assert h.scheduler.reset_prefix_cache()  # the second request must come from the connector
        h.add_request("second", prompt, 4)
        sync_steps, verified = [], 0
        while h.busy():
            before = len(h.worker.call_log)
            result = h.step()
            verified += h.worker.last_report.verified_tokens
            if result.scheduler_output is not None and result.scheduler_output.has_sync_kv_loads:
                sync_steps.append(h.worker.call_log[before:])
        assert verified == LAYERS * 96  # 6 full blocks loaded from disk, byte-exact
        assert len(sync_steps) == 1
        calls = sync_steps[0]
        assert calls.index("start_load_kv") < calls.index("wait_for_layer_load")
        assert len(h.outputs["second"]) == 4
    saved = list(tmp_path.rglob("*.safetensors"))
    assert len(saved) == LAYERS
    oracle = H.KVOracle(H.TinyModelSpec())
    hashes: list[int] = []
    H.KVOracle.extend_prefix_hashes(hashes, H.request_seed(None, None), prompt[:96])
    for path in saved:
        layer = 0 if "layers.0." in str(path) else 1
        stored = safetensors.torch.load_file(str(path))["kv_cache"]  # ExampleConnector's own indexing
        expected = oracle.kv(hashes, layer).reshape(96, 2, 32)
        assert torch.equal(stored.view(torch.int16), expected.view(torch.int16))


# --------------------------------------------------------------------------------------------------
# The verifier itself
# --------------------------------------------------------------------------------------------------


def test_corrupted_prefix_cache_block_is_detected() -> None:
    prompts = shared_prefix_prompts(48, 8, 3)
    with H.VllmHarness(H.HarnessConfig(num_gpu_blocks=32)) as h:  # no connector: vLLM's prefix cache only
        h.add_request("a", prompts[0], 2)
        h.run_until_idle()
        h.add_request("b", prompts[1], 2)  # control: clean prefix hit passes
        h.run_until_idle()
        cached = h.scheduler.kv_cache_manager.block_pool
        block_ids = [b.block_id for b in cached.blocks if b.block_hash is not None]
        assert block_ids
        view = h.worker.token_views["model.layers.1.self_attn.attn"]
        view[block_ids[0], 5, 1, 0, 3] += 1  # one element of one cached block
        h.add_request("c", prompts[2], 2)
        with pytest.raises(H.KVMismatchError, match="layer 1"):
            h.run_until_idle()


def test_salt_and_lora_isolate_prefix_cache_and_kv() -> None:
    """Cache salt and LoRA name reach vLLM's block hashes (no cross-hit) and the KV oracle."""
    seeds = {H.request_seed(s, l) for s, l in itertools.product([None, "s1", "s2"], [None, "a"])}
    assert len(seeds) == 6
    prompt = shared_prefix_prompts(40, 0, 1)[0]
    with H.VllmHarness(H.HarnessConfig(num_gpu_blocks=32)) as h:
        h.add_request("plain", prompt, 2)
        h.run_until_idle()
        verified = {}
        for request_id, salt, lora in [("again", None, None), ("salted", "s1", None), ("lora", None, "adapter")]:
            request = h.add_request(request_id, prompt, 2, cache_salt=salt, lora_name=lora)
            assert (request.cache_salt, request.lora_request and request.lora_request.lora_name) == (salt, lora)
            verified[request_id] = 0
            while h.busy():
                h.step()
                verified[request_id] += h.worker.last_report.verified_tokens
        assert verified == {"again": LAYERS * 32, "salted": 0, "lora": 0}
        assert all(len(h.outputs[r]) == 2 for r in ("plain", "again", "salted", "lora"))


# --------------------------------------------------------------------------------------------------
# Workload generator and input checks
# --------------------------------------------------------------------------------------------------


def test_workload_history_grows_with_answers() -> None:
    workload = H.MultiTurnChatWorkload(num_users=3, num_rounds=2, system_prompt_tokens=10, max_active_users=2, salts=["x", None])
    first = workload.start()
    assert [t.user for t in first] == [0, 1]
    assert all(t.prompt_token_ids[:10] == tuple(workload.system_prompt) for t in first)
    assert first[0].cache_salt == "x" and first[1].cache_salt is None
    answer = list(range(100, 100 + first[0].max_tokens))
    (second,) = workload.complete(first[0].request_id, answer)
    assert second.user == 0 and second.round == 1
    assert second.prompt_token_ids[: len(first[0].prompt_token_ids) + len(answer)] == first[0].prompt_token_ids + tuple(answer)
    (third_user,) = workload.complete(second.request_id, list(range(second.max_tokens)))
    assert third_user.user == 2 and third_user.round == 0
    with pytest.raises(ValueError, match="not an open turn"):
        workload.complete(second.request_id, [])
    with pytest.raises(ValueError, match="answer tokens"):
        workload.complete(first[1].request_id, [5])
    assert workload.pending == 2 and not workload.done


def test_bad_input_is_refused() -> None:
    assert H.parse_connector("a.b:C") == ("C", "a.b")
    assert H.parse_connector("OffloadingConnector") == ("OffloadingConnector", None)
    for bad in ("", ":C", "a.b:", "a:b:c"):
        with pytest.raises(ValueError, match="connector"):
            H.parse_connector(bad)
    with pytest.raises(ValueError, match="runner"):
        H.HarnessConfig(runner="v3")
    with pytest.raises(ValueError, match="num_gpu_blocks"):
        H.HarnessConfig(num_gpu_blocks=1)
    with pytest.raises(ValueError, match="kv_layout"):
        H.HarnessConfig(kv_format="flash5d", kv_layout="LBNHC")
    with pytest.raises(ValueError, match="num_kv_heads"):
        H.TinyModelSpec(num_attention_heads=3, num_kv_heads=2)
    with H.VllmHarness(H.HarnessConfig(num_gpu_blocks=16)) as h:
        with pytest.raises(ValueError, match="token ids"):
            h.add_request("x", [1, 5000], 2)
        with pytest.raises(ValueError, match="max_tokens"):
            h.add_request("y", [5, 6], 0)
        h.add_request("z", [5, 6], 1)
        with pytest.raises(ValueError, match="already used"):
            h.add_request("z", [5, 6], 1)
