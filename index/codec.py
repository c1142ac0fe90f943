"""How a plugin is kept at rest: float16 (2 bytes a number) or float8 e4m3 (1 byte, twice the numbers in 16 KB).

Compositions, similarity and norms are always computed in float32 from the decoded values. float8 is the OCP
E4M3 ("e4m3fn") format of recent accelerators: 3 mantissa bits (relative steps of 1/16 to 1/8), range +-448,
no infinities; numpy has no such type, so it is a 256-entry table here.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

PluginFormat = Literal["float16", "float8"]
FORMATS: tuple[PluginFormat, ...] = ("float16", "float8")


def _e4m3_table() -> np.ndarray:
    """The value of every byte: sign, 4 exponent bits (bias 7), 3 mantissa bits; S.1111.111 is NaN."""
    codes = np.arange(256)
    exp, mant = (codes >> 3) & 0xF, (codes & 7) / 8
    magnitude = np.where(exp == 0, mant * 2.0**-6, (1 + mant) * 2.0 ** (exp - 7))  # exp 0: subnormal
    magnitude[(exp == 15) & (codes & 7 == 7)] = np.nan
    return np.where(codes >> 7, -magnitude, magnitude).astype(np.float32)


E4M3 = _e4m3_table()  # (256,)
_POSITIVE = E4M3[:127]  # codes 0x00-0x7E, ascending from 0 to 448
MAX_VALUE: dict[PluginFormat, float] = {"float16": float(np.finfo(np.float16).max), "float8": float(_POSITIVE[-1])}
ITEMSIZE: dict[PluginFormat, int] = {"float16": 2, "float8": 1}


def _to_e4m3(values: np.ndarray) -> np.ndarray:
    """Round to the nearest float8 value (values within +-448): uint8 codes."""
    magnitude = np.abs(values)
    upper = np.clip(np.searchsorted(_POSITIVE, magnitude), 1, len(_POSITIVE) - 1)
    below, above = magnitude - _POSITIVE[upper - 1], _POSITIVE[upper] - magnitude
    nearer_lower = (below < above) | ((below == above) & (upper % 2 == 1))  # a tie goes to the even code
    code = np.where(nearer_lower, upper - 1, upper).astype(np.uint8)
    return code | (np.signbit(values).astype(np.uint8) << 7)


def encode(plugin: np.ndarray, fmt: PluginFormat) -> bytes:
    values = np.ascontiguousarray(plugin, dtype=np.float32).reshape(-1)
    if fmt == "float8":
        return _to_e4m3(values).tobytes()
    return values.astype(np.float16).tobytes()


def decode(blob: bytes, fmt: PluginFormat) -> np.ndarray:
    """A stored plugin as a flat float32 vector (M*r,)."""
    if fmt == "float8":
        return E4M3[np.frombuffer(blob, dtype=np.uint8)]
    return np.frombuffer(blob, dtype=np.float16).astype(np.float32)
