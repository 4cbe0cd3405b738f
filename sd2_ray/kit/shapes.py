"""Model shapes of the kit (kept free of heavy imports: they are part of the content hash).

head_dim is 64 everywhere: vLLM's CPU attention supports only standard head sizes.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Shape:
    arch: str  # "llama" | "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


TARGET = Shape("llama", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768)
DRAFTER = Shape("llama", hidden=128, layers=2, heads=2, kv_heads=1, intermediate=384)
UAG_DRAFTER = Shape("qwen2", hidden=128, layers=2, heads=2, kv_heads=1, intermediate=384)
MAX_POSITIONS = 1024


def all_shapes() -> dict:
    return {"target": asdict(TARGET), "drafter": asdict(DRAFTER), "drafter-uag": asdict(UAG_DRAFTER),
            "max_positions": MAX_POSITIONS}
