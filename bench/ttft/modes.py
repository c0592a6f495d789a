"""The benchmark's row modes: what each row measures (its label in the tables), the ``--modes`` names, and which kvbm
side a mode loads from."""
from __future__ import annotations

RECOMPUTE, G1_HIT, G2, G2_LAYERWISE, G3_POSIX, G3_AUTO, G3_GDS, LOWER_BOUND = (
    "recompute", "G1 hit (prefix on GPU)", "G2 hit, bulk onboard", "G2 hit, layer-wise", "G3 hit, posix",
    "G3 hit, cost rule", "G3 hit, gds", "lower bound (PCIe + compute)")
#: --modes names -> row mode
MODES = {"recompute": RECOMPUTE, "g2": G2, "g2-layerwise": G2_LAYERWISE, "g3-posix": G3_POSIX, "g3-auto": G3_AUTO,
         "g3-gds": G3_GDS}
KVBM_MODES = (G2, G2_LAYERWISE, G3_POSIX, G3_AUTO, G3_GDS)


def side_mode(mode: str) -> str:
    """The kvbm side a mode loads from: layer-wise G2 hits use the G2 side."""
    return G2 if mode == G2_LAYERWISE else mode
