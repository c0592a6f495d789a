"""The benchmark's results as text and a plot: the markdown table of the rows, the models' notes under it, and the
PNG of TTFT against prefix length with the QA means."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .model import BLOCK_SIZE
from .modes import LOWER_BOUND


def note_lines(notes: dict[str, Any]) -> str:
    """Per model, as text under the table: how its forwards ran, the layer-wise onboard's per-layer delay beside a
    prefill and the layer-wise stores' times."""
    lines = []
    for model, model_notes in notes.items():
        if not isinstance(model_notes, dict):  # (the run's notes that are not a model's)
            continue
        if "forward" in model_notes:
            lines.append(f"- {model}, forwards: {model_notes['forward']}")
        w = model_notes.get("layer_waits")
        if w and "max_delay_us" in w:
            lines.append(f"- {model}, layer-wise onboard of {w['prefix_tokens']} tokens beside a "
                         f"{w['busy_prefill_tokens']}-token prefill: layer groups finish at most "
                         f"{w['max_delay_us']:.0f} us "
                         f"(median {w['median_delay_us']:.0f} us) later than alone ({w['per_group_alone_us']:.0f} us "
                         f"per layer group alone); {w['scatter_kernels']} scatter kernels, each from its bytes "
                         f"landing to its end at most {w['max_scatter_wait_us']:.0f} us (median "
                         f"{w['median_scatter_wait_us']:.0f} us) longer than alone")
        elif w:
            lines.append(f"- {model}, layer waits: {w.get('note')}")
        stores = model_notes.get("layer_stores")
        if stores:
            blocks = next(iter(stores.values()))["blocks"]
            lines.append(f"- {model}, stores of a {blocks * BLOCK_SIZE}-token prefill into G2: " + "; ".join(
                f"started {mode}: TTFT {v['ttft_ms']:.1f} ms, done {v['tail_ms']:.1f} ms after the first token"
                for mode, v in stores.items()))
    return "\n\n" + "\n".join(lines) if lines else ""


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the rows."""
    head = ("| model | workload | prefix | new | mode | TTFT ms | load ms | forward ms | requests | G1 / loaded / "
            "computed tokens | bytes | note |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        def ms(v: float | None) -> str:
            return "" if v is None else f"{v:.1f}"
        ok = {None: "", True: "ok", False: "WRONG"}[r["bytes_ok"]]
        tokens = f"{r['g1_hit_tokens']} / {r['loaded_tokens']} / {r['computed_tokens']}" if r["requests"] else ""
        lines.append(f"| {r['model']} | {r['workload']} | {r['prefix_tokens'] or ''} | {r['new_tokens'] or ''} | "
                     f"{r['mode']} | {ms(r['ttft_ms'])} | {ms(r['load_ms'])} | {ms(r['forward_ms'])} | "
                     f"{r['requests'] or ''} | {tokens} | {ok} | {r['note']} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> str | None:
    """TTFT against prefix length per mode (one panel per model; where the cost rule recomputed, its point is
    ringed), and the QA mean TTFT (the cost rule's bar says how it decided); why not drawn, or None."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["ttft_ms"] is not None]
    models = list(dict.fromkeys(r["model"] for r in rows))
    if not models:
        return "no timed rows"
    fig, axes = plt.subplots(2, len(models), figsize=(5.5 * len(models), 8), squeeze=False)
    for j, model in enumerate(models):
        ax = axes[0][j]
        prefix_rows = [r for r in rows if r["model"] == model and r["workload"] == "prefix"]
        for mode in dict.fromkeys(r["mode"] for r in prefix_rows):
            pts = sorted((r["prefix_tokens"], r["ttft_ms"]) for r in prefix_rows if r["mode"] == mode)
            line, = ax.plot(*zip(*pts), marker="o", label=mode, linestyle="--" if mode == LOWER_BOUND else "-")
            recomputed = [(r["prefix_tokens"], r["ttft_ms"]) for r in prefix_rows
                          if r["mode"] == mode and (r.get("rule") or {}).get("recomputes")]
            if recomputed:  # the cost rule's points where it chose to recompute: ringed
                ax.scatter(*zip(*recomputed), s=110, facecolors="none", edgecolors=line.get_color(),
                           label=f"{mode}: rule recomputed")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("cached prefix tokens")
        ax.set_ylabel("TTFT ms (median)")
        ax.set_title(f"{model}: prefix + {result['meta']['new_tokens']} new tokens", fontsize=9)
        ax.legend(fontsize=7)
        ax = axes[1][j]
        qa_rows = [r for r in rows if r["model"] == model and r["workload"] != "prefix"]
        bars = ax.bar([r["mode"] for r in qa_rows], [r["ttft_ms"] for r in qa_rows], color="tab:blue")
        for bar, r in zip(bars, qa_rows):
            if r.get("rule"):  # how the cost rule decided the requests that found G3 blocks
                ax.annotate(f"load {r['rule']['loads']}\nrecompute {r['rule']['recomputes']}",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                            fontsize=6)
        ax.set_ylabel("mean TTFT ms")
        ax.set_title(f"{model}: multi-round QA" if qa_rows else f"{model}: no QA run", fontsize=9)
        ax.tick_params(axis="x", labelsize=7, rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
