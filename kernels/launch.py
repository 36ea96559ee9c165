"""Launch helpers shared by the kernels: interpreter detection and block-size heuristics."""

from __future__ import annotations

import os

# Under TRITON_INTERPRET=1 each program costs ~10 ms whatever its size, so tiles are made larger
# (fewer programs); on a GPU they are sized for occupancy.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= max(n, 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def num_warps_for(tile_elems: int) -> int:
    """Warps for a tile of `tile_elems` fp32 values: ~8 elements per thread, between 1 and 8 warps."""
    return max(1, min(8, tile_elems // 256))
