"""Helpers the benchmarks share. Torch-free and Ray-free: the fleet simulator imports it."""
from __future__ import annotations


def pct(xs: list[float], q: float) -> float:
    """The ``q`` quantile by rank (NaN for no values)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def split_configs(text: str) -> list[str]:
    """Commas separate configurations, except inside one's ``key=value`` list: a piece
    holding '=' but no ':' continues the previous configuration's options."""
    out: list[str] = []
    for piece in text.split(","):
        if out and "=" in piece and ":" not in piece and ":" in out[-1]:
            out[-1] += "," + piece
        else:
            out.append(piece)
    return out
