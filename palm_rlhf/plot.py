"""A dependency-free line chart written as PNG (zlib + struct), for the demo's curves.

Each series gets its own panel, stacked vertically, scaled to its own min..max, with a light
zero line when zero lies in range. Titles and numbers go in the JSON summary beside the plot:
drawing text would need a font, and the point is to see the shape of the curves.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from .checkpoint import write_bytes_atomic

COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def _png(width: int, height: int, pixels: bytearray) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    raw = b"".join(
        b"\x00" + bytes(pixels[y * width * 3 : (y + 1) * width * 3]) for y in range(height)
    )
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def line_chart_png(
    series: Sequence[Sequence[float]], path: str | Path, width: int = 640, panel_height: int = 180
) -> None:
    """Write one panel per series (e.g. score and KL over PPO iterations) to a PNG file."""
    if not series or any(len(s) == 0 for s in series):
        raise ValueError("line_chart_png needs at least one non-empty series")
    height = panel_height * len(series)
    pixels = bytearray([255] * (width * height * 3))

    def put(x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            pixels[i : i + 3] = bytes(color)

    def line(x0: float, y0: float, x1: float, y1: float, color: tuple[int, int, int]) -> None:
        steps = int(max(abs(x1 - x0), abs(y1 - y0), 1))
        for t in range(steps + 1):
            x, y = x0 + (x1 - x0) * t / steps, y0 + (y1 - y0) * t / steps
            for dy in (0, 1):
                put(round(x), round(y) + dy, color)

    margin = 12
    for index, values in enumerate(series):
        top, bottom = index * panel_height + margin, (index + 1) * panel_height - margin
        low, high = min(values), max(values)
        span = (high - low) or 1.0

        def to_y(
            v: float, top: int = top, bottom: int = bottom, low: float = low, span: float = span
        ) -> float:
            return bottom - (v - low) / span * (bottom - top)

        line(margin, bottom, width - margin, bottom, (160, 160, 160))  # x axis
        line(margin, top, margin, bottom, (160, 160, 160))  # y axis
        if low < 0 < high:
            line(margin, to_y(0.0), width - margin, to_y(0.0), (220, 220, 220))
        xs = [
            margin + (width - 2 * margin) * i / max(1, len(values) - 1) for i in range(len(values))
        ]
        color = COLORS[index % len(COLORS)]
        for i in range(len(values) - 1):
            line(xs[i], to_y(values[i]), xs[i + 1], to_y(values[i + 1]), color)
        if len(values) == 1:
            put(round(xs[0]), round(to_y(values[0])), color)
    write_bytes_atomic(path, _png(width, height, pixels))
