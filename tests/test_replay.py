"""The replay (the main job's block-manager part): a small chat workload through G2 and G3 with real disk files.
The replay itself raises if an onboarded block's bytes differ from what was computed for its hash."""
from __future__ import annotations

from kvbm.tools.cli import main
from kvbm.config import KvbmConfig
from kvbm.layouts import KVGeometry
from kvbm.tools.replay import format_report, replay
from kvbm.tools.workload import ChatWorkload


def test_replay_hits_both_tiers_and_verifies_bytes(tmp_path):
    geometry = KVGeometry(2, 2, 16, 2, 64, 2)  # 16 KiB blocks
    # every block cascades to G3 (filter off), G2 holds about a third of the working set
    config = KvbmConfig.from_env({"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "48",
                                  "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "400",
                                  "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "1",
                                  "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path)})
    workload = ChatWorkload(num_users=6, num_rounds=4, system_prompt_tokens=160, question_tokens=48,
                            answer_tokens=32, active_users=3)
    lines = []
    report = replay(workload, geometry, g1_blocks=40, config=config, progress_every=5, log=lines.append)
    assert report.requests == 24
    assert report.blocks["g2"] > 0 and report.blocks["g3"] > 0
    assert report.onboard_failed == 0
    assert report.onboarded_bytes_checked == (report.blocks["g2"] + report.blocks["g3"]) * geometry.block_bytes
    assert report.blocks["computed"] < sum(report.blocks.values())
    assert len(lines) == 4 and lines[0].startswith("[replay] 5/24 requests")
    assert {"g1_to_g2", "g2_to_g1", "g3_to_g1"} <= set(report.transfer)
    text = format_report(report, geometry)
    assert "g3_to_g1" in text and "onboard failures: 0" in text
    assert not list(tmp_path.iterdir())  # disk files removed on close


def test_cli_replay_writes_json(tmp_path, capsys):
    out = tmp_path / "replay.json"
    rc = main(["replay", "--users", "2", "--rounds", "2", "--system-tokens", "64", "--question-tokens", "16",
               "--answer-tokens", "16", "--g1-blocks", "32", "--layers", "2", "--kv-heads", "2", "--head-dim", "64",
               "--host-gb", "0.01", "--disk-gb", "0.01", "--disk-dir", str(tmp_path), "--cpu", "--json", str(out)])
    assert rc == 0
    assert "prompt blocks by source" in capsys.readouterr().out
    assert out.read_text().count('"requests": 4') == 1


def _numbers(pattern: str, text: str) -> list[int]:
    import re

    match = re.search(pattern, text)
    assert match, (pattern, text)
    return [int(x) for x in match.groups()]


def test_printed_counts_reconcile(tmp_path):
    """Every printed offload and onboard figure adds up: requests = stored + failed + skipped, stored = blocks
    moved out of G1 (and its bytes the table's), loaded = blocks moved into G1 = prompt hits + loaded unused."""
    import re

    geometry = KVGeometry(2, 2, 16, 2, 64, 2)
    config = KvbmConfig.from_env({"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "48",
                                  "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "400",
                                  "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "1",
                                  "DYN_KVBM_DISK_CACHE_DIR": str(tmp_path)})
    workload = ChatWorkload(num_users=6, num_rounds=4, system_prompt_tokens=160, question_tokens=48,
                            answer_tokens=32, active_users=3)
    report = replay(workload, geometry, g1_blocks=40, config=config, progress_every=0, log=lambda line: None)
    text = format_report(report, geometry)
    requested, stored, failed, skipped = _numbers(
        r"offload requests: (\d+) blocks .* = stored (\d+) \+ failed (\d+) \+ skipped (\d+) \(", text)
    assert requested == stored + failed + skipped == report.offloaded_blocks
    reasons = re.search(r"skipped \d+ \((.*)\)\n", text).group(1)
    assert sum(int(n) for n in re.findall(r": (\d+)", reasons)) == skipped
    table = {row[0]: row[1:] for row in re.findall(r"\| (g\d_to_g\d) \| (\d+) \| ([\d.]+) \|", text)}
    out_of_g1 = sum(int(table[d][0]) for d in ("g1_to_g2", "g1_to_g3") if d in table)
    assert _numbers(r"\nstored (\d+) blocks", text) == [stored] and stored == out_of_g1
    assert float(table["g1_to_g2"][1]) == round(stored * geometry.block_bytes / 1e9, 3)
    on_requested, loaded, on_failed = _numbers(r"onboard requests: (\d+) blocks = loaded (\d+) \+ failed (\d+)", text)
    assert on_requested == loaded + on_failed
    into = _numbers(r"moved into G1: g2_to_g1 (\d+) \+ g3_to_g1 (\d+)", text)
    hits = _numbers(r"prompt hits g2 (\d+) \+ g3 (\d+) \+ loaded after a failed block \(recomputed\) (\d+)", text)
    assert loaded == sum(into) == sum(hits)
    assert [int(table["g2_to_g1"][0]), int(table["g3_to_g1"][0])] == into
    assert hits[:2] == [report.blocks["g2"], report.blocks["g3"]]
