"""Model shapes of the kit (kept free of heavy imports: they are part of the content hash).

head_dim is 64 everywhere: vLLM's CPU attention supports only standard head sizes.

Why the same-family drafter is deep and narrow (10 blocks of width 64, MLP 192; docs/kit.md,
and for what it gives over seeds docs/results.md): SD²'s
claim is that fine-grained sparsity keeps more of a pretrained drafter than dropping whole
blocks *at equal MACs*, so

- the layer baseline must be able to match the sparse drafter's MACs: with 10 equal blocks,
  50 % (and 2:4) sparsity of every block equals dropping 5 blocks and 70 % equals dropping 7,
  exactly (a 2-block drafter could only drop "half the network");
- the blocks must dominate the drafter's MACs, as in the paper's 3B drafter (LM head 12 %): here
  the tied 2048×64 head is 20 %, so 50 % sparse blocks cut ~40 % of the MACs (paper: 43.87 %);
- drafting must still pay: c = drafter / target MACs stays ~0.18 (≤ 0.2) against the
  4 × 256 target, so the target did not have to grow in shape (it trains 600 steps instead of
  240, side by side with the drafters: the build's wall time is about the target's);
- it is pretrained for longer than the old drafter (``drafter_steps``), so what it knows is more
  than a short fine-tune on a few hundred distilled rows could teach a half-depth network again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

HEAD_DIM = 64


@dataclass(frozen=True)
class Shape:
    arch: str  # "llama" | "qwen2"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


TARGET = Shape("llama", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768)
DRAFTER = Shape("llama", hidden=64, layers=10, heads=1, kv_heads=1, intermediate=192)
UAG_DRAFTER = Shape("qwen2", hidden=128, layers=2, heads=2, kv_heads=1, intermediate=384)
MAX_POSITIONS = 1024


def drafter_shape(hidden: int, layers: int, intermediate: int) -> Shape:
    """A same-family (llama) drafter of this size: heads of 64, grouped K/V (half the heads)."""
    heads = hidden // HEAD_DIM
    return Shape(
        "llama", hidden=hidden, layers=layers, heads=heads, kv_heads=max(1, heads // 2), intermediate=intermediate
    )


def all_shapes(drafter: Shape = DRAFTER) -> dict:
    return {
        "target": asdict(TARGET),
        "drafter": asdict(drafter),
        "drafter-uag": asdict(UAG_DRAFTER),
        "max_positions": MAX_POSITIONS,
    }
