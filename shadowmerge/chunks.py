"""How a stored tensor is cut into pieces: flat element ranges, bounded by a number of elements.

Every piece is either a run of whole rows (slices along dim 0) or a segment of one row, so that
work that needs rows (a LoRA product, a DoRA norm, a vocabulary boundary) still sees them, while a
tensor whose single row is huge (fused MoE experts `[E, 8192, 8192]`) is cut inside the row. The
bound is what keeps memory flat: no piece has more than `chunk` elements, whatever the shape.
"""

from __future__ import annotations

from collections.abc import Iterator

CHUNK_ELEMENTS = 1 << 22    # 4 Mi elements: 16 MiB of float32 per operand (graft, extract, train's checks)
#: the analyzer's pieces: 4 MiB of float32 per operand stays in cache through its reductions. (Its float64 sums
#: are taken per piece, so this size is part of the summation order: changing it changes σ's last bits.)
SUM_CHUNK_ELEMENTS = 1 << 20


def ranges(start: int, stop: int, row: int, chunk: int = CHUNK_ELEMENTS,
           tile: int | None = None, align: int | None = None) -> Iterator[tuple[int, int]]:
    """Pieces [e0, e1) of the flat elements [start, stop) of a tensor with `row` elements per row.

    start and stop are row-aligned. A piece has at most `chunk` elements and, when `tile` is given, at most
    `tile` rows (the caller reads other operands that scale with the rows: a LoRA piece reads `rows x rank` of
    B). A row longer than `chunk` is cut into segments. With `align`, every piece is whole bands of `align` rows
    (an FP8 block row: a block's scale needs all of it), one band even where a band exceeds `chunk`.
    """
    if row <= 0 or stop <= start:
        return
    if align:
        rows = max(1, chunk // row // align) * align
        for e in range(start, stop, rows * row):
            yield e, min(e + rows * row, stop)
        return
    if row <= chunk:
        rows = max(1, chunk // row)
        if tile:
            rows = max(1, min(rows, tile))
        step = rows * row
        for e in range(start, stop, step):
            yield e, min(e + step, stop)
        return
    for r0 in range(start, stop, row):
        for c in range(0, row, chunk):
            yield r0 + c, r0 + min(c + chunk, row)


def geometry(e0: int, e1: int, row: int) -> tuple[int, int, int, int]:
    """A piece as (row0, row1, col0, col1): whole rows [row0, row1) x [0, row), or one row's segment."""
    r0 = e0 // row
    if e0 % row == 0 and e1 % row == 0:
        return r0, e1 // row, 0, row
    return r0, r0 + 1, e0 - r0 * row, e1 - r0 * row
