"""The layer-wise rows of saved TTFT results, their hidden share split in two: ``python -m bench.ttft.shares
FILE.json...`` prints, per file, model and prefix that has a bulk and a layer-wise G2 row, the G1 hit's TTFT (its
forward, host-bound at 256 new tokens, shows how fast the host ran), the load times of both rows, the hidden share
(`bench.hidden_share`) and the share the layer-wise row's time before its forward leaves (`bench.share_bound`, at
equal forwards). Their difference is what waits for layer groups and the forwards' drift between turns took, or
gave.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

from .bench import Row, hidden_share, share_bound
from .modes import G1_HIT, G2, G2_LAYERWISE

_ROW_FIELDS = {f.name for f in dataclasses.fields(Row)}


def rows_of(path: Path) -> list[Row]:
    """The rows of one result file (``ttft.json``), fields it lacks at their defaults; ValueError when it has none."""
    data = json.loads(path.read_text())
    rows = data.get("rows") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: no 'rows' list (not a TTFT result file)")
    return [Row(**{k: v for k, v in row.items() if k in _ROW_FIELDS}) for row in rows]


def splits(rows: Sequence[Row]) -> Iterator[tuple[str, int, Row | None, Row, Row, float | None, float | None]]:
    """``(model, prefix, G1 hit row or None, bulk row, layer-wise row, hidden share, share left by the time before
    the forward)`` for each model and prefix whose bulk and layer-wise rows both ran."""
    by_prefix: dict[tuple[str, int], dict[str, Row]] = {}
    for row in rows:
        if row.workload == "prefix" and row.prefix_tokens is not None:
            by_prefix.setdefault((row.model, row.prefix_tokens), {})[row.mode] = row
    for (model, prefix), modes in by_prefix.items():
        bulk, layerwise = modes.get(G2), modes.get(G2_LAYERWISE)
        if bulk is not None and layerwise is not None:
            yield (model, prefix, modes.get(G1_HIT), bulk, layerwise, hidden_share(bulk, layerwise),
                   share_bound(bulk, layerwise))


def table(paths: Sequence[Path]) -> str:
    """The markdown table of `splits` over ``paths``, in their order."""
    def pct(value: float | None) -> str:
        return "" if value is None else f"{100 * value:.0f}%"

    def ms(value: float | None) -> str:
        return "" if value is None else f"{value:.2f}"

    lines = ["| file | model | prefix | G1 hit TTFT ms | bulk load ms | layer-wise load ms | hidden | left at equal "
             "forwards |", "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        for model, prefix, g1, bulk, layerwise, share, bound in splits(rows_of(path)):
            g1_ms = g1.ttft_ms if g1 else None
            lines.append(f"| {_name(path)} | {model} | {prefix} | {ms(g1_ms)} | {ms(bulk.load_ms)} "
                         f"| {ms(layerwise.load_ms)} | {pct(share)} | {pct(bound)} |")
    return "\n".join(lines)


def _name(path: Path) -> str:
    """A result file's name, with its folder's where the name is the bench's own (``run/ttft.json``)."""
    return f"{path.parent.name}/{path.name}" if path.name == "ttft.json" and path.parent.name else path.name


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table for the files given."""
    ap = argparse.ArgumentParser(prog="python -m bench.ttft.shares", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="ttft.json files written by python -m bench.ttft")
    print(table(ap.parse_args(argv).files))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
