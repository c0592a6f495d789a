"""kvbm as an `OffloadingSpec` of vLLM's native `OffloadingConnector`.

`spec.KvbmOffloadingSpec` is loaded by vLLM through the connector's extra config
(``"spec_name": "KvbmOffloadingSpec", "spec_module_path": "kvbm.vllm_offloading.spec"``). Its scheduler-side manager
(`manager`) keeps vLLM's offloaded blocks in kvbm's block index; its worker (`worker`) moves them through kvbm's
transfer library. `connector.KvbmOffloadingConnector` is vLLM's connector plus the failure channel vLLM 0.33's own
lacks (failed loads recomputed, failed stores discarded). Nothing is imported here, so the modules load lazily.
"""
