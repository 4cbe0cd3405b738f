"""Config of ``sd2 kit``: where the kit goes and how much data / training each model gets."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from sd2_ray.config import StageConfig
from sd2_ray.kit import shapes
from sd2_ray.kit.tasks import TASKS

# Fields that only say *where* or *whether* to build: they don't change the kit's content,
# so they stay out of its content hash.
PLACEMENT_FIELDS = ("out", "overwrite", "reuse_trained")


class KitConfig(StageConfig):
    """Build the embedded model kit: a byte-level BPE tokenizer, a small trained Llama target,
    a smaller poorly aligned Llama drafter (same tokenizer), a Qwen2 drafter with its own
    tokenizer (cross-tokenizer drafting), and train/eval prompt sets, all from the local Python
    standard library's source. Deterministic for a seed; cached by a content hash."""

    out: str | None = Field(None, description="Kit directory (default: $SD2_KIT_DIR, else <cache>/kit/<content-hash>)")
    overwrite: bool = Field(False, description="Rebuild even when a complete, up-to-date kit is there")
    reuse_trained: bool = Field(
        True,
        description="Reuse a model trained earlier with identical settings "
        "(cached per model, so changing one model's steps retrains only that one)",
    )
    seed: int = Field(0, description="Seed for file split, data order and model init")
    corpus_chars: int = Field(3_000_000, ge=20_000, description="Characters of stdlib source to train on")
    heldout_fraction: float = Field(
        0.08, gt=0.0, lt=0.5, description="Share of stdlib files held out (held-out loss, eval prompts)"
    )
    vocab_size: int = Field(2048, ge=300, le=65536, description="BPE vocab of the target/drafter tokenizer")
    uag_vocab_size: int = Field(1536, ge=300, le=65536, description="BPE vocab of the cross-family drafter's tokenizer")
    seq_len: int = Field(256, ge=32, le=1024, description="Training window length in tokens")
    batch_size: int = Field(8, ge=1, description="Windows per training step")
    lr: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (linear warmup, cosine decay)")
    target_steps: int = Field(600, ge=1, description="Training steps of the target")
    drafter_steps: int = Field(
        1600, ge=1, description="Training steps of the same-family drafter (no chat data: it starts poorly aligned)"
    )
    drafter_hidden: int = Field(
        shapes.DRAFTER.hidden,
        ge=shapes.HEAD_DIM,
        description="Width of the same-family drafter (a multiple of 64: heads of 64)",
    )
    drafter_layers: int = Field(
        shapes.DRAFTER.layers,
        ge=2,
        description="Decoder blocks of the same-family "
        "drafter (enough for the layer baseline to match SD²'s MACs finely)",
    )
    drafter_intermediate: int = Field(
        shapes.DRAFTER.intermediate, ge=1, description="MLP width of the same-family drafter"
    )
    uag_steps: int = Field(80, ge=1, description="Training steps of the cross-family drafter")
    chat_share: float = Field(
        0.375, ge=0.0, le=1.0, description="Share of the target's windows drawn from chat-formatted examples"
    )
    drafter_chat_share: float = Field(
        0.25,
        ge=0.0,
        le=1.0,
        description="Share of the same-family drafter's windows drawn from the "
        "same chat examples (the reference answers, not the target's): it knows every task, "
        "not the target's way of answering",
    )
    tasks: list[str] = Field(
        default_factory=lambda: list(TASKS),
        min_length=1,
        description=f"Tasks (prompt categories) of the chat examples and prompt sets: {', '.join(TASKS)}",
    )
    train_prompts: int = Field(768, ge=1, description="Rows in prompts/train.jsonl (round-robin over the tasks)")
    eval_prompts: int = Field(96, ge=1, description="Rows in prompts/eval.jsonl (round-robin over the tasks)")
    heldout_windows: int = Field(32, ge=1, description="Held-out windows for the reported losses")
    num_threads: int = Field(1, ge=1, description="Torch threads while building (fixed for determinism)")
    measure_mal: bool = Field(True, description="Measure the drafter's greedy MAL at K=4 into kit.json")
    vision: bool = Field(
        True,
        description="Also build the vision-language target (kit:vlm, a LLaVA model over the text target) and "
        "its scene prompts (kit:vision_train_prompts, kit:vision_eval_prompts, kit:vision_captions)",
    )
    vision_tower_steps: int = Field(
        300, ge=1, description="Steps of the VLM's vision-tower pretraining (a patch probe)"
    )
    vision_steps: int = Field(250, ge=1, description="Steps of the VLM's visual instruction tuning (tower frozen)")
    vision_train_prompts: int = Field(1024, ge=1, description="Scene question rows to train the VLM on and distill")
    vision_eval_prompts: int = Field(64, ge=1, description="Held-out scene question rows (eval)")
    vision_captions: int = Field(1024, ge=1, description="Image–caption rows (a MASSV projector's phase-1 data)")

    @field_validator("out")
    @classmethod
    def _out_not_s3(cls, value: str | None) -> str | None:
        if value is not None and value.startswith("s3://"):
            raise ValueError("the kit is built locally; copy it to S3 afterwards")
        return value or None

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, value: list[str]) -> list[str]:
        unknown = [t for t in value if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(TASKS)}")
        return list(dict.fromkeys(value))

    @field_validator("drafter_hidden")
    @classmethod
    def _whole_heads(cls, value: int) -> int:
        if value % shapes.HEAD_DIM:
            raise ValueError(f"must be a multiple of {shapes.HEAD_DIM} (vLLM's CPU attention needs heads of 64)")
        return value

    @model_validator(mode="after")
    def _vocabs_differ(self) -> KitConfig:
        if self.vocab_size == self.uag_vocab_size:
            raise ValueError("vocab_size and uag_vocab_size must differ (the UAG drafter needs its own tokenizer)")
        return self

    def drafter_shape(self) -> shapes.Shape:
        return shapes.drafter_shape(self.drafter_hidden, self.drafter_layers, self.drafter_intermediate)

    def all_shapes(self) -> dict:
        """Every model's shape (part of the content hash)."""
        out = shapes.all_shapes(self.drafter_shape())
        if self.vision:
            from sd2_ray.vision.model import VISION, shape_of

            out["vlm"] = {"text": out["target"], "vision": shape_of(VISION)}
        return out

    def training_fields(self, name: str) -> dict:
        """The fields that decide one model's weights (its part of the cache)."""
        if name == "vlm":  # the text target's weights, then its own training and prompt sets
            return {
                "target": self.training_fields("target"),
                **{f: getattr(self, f) for f in type(self).model_fields if f.startswith("vision_")},
            }
        steps = {"target": self.target_steps, "drafter": self.drafter_steps, "drafter-uag": self.uag_steps}
        vocab = self.uag_vocab_size if name == "drafter-uag" else self.vocab_size
        fields: dict[str, Any] = {
            "seed": self.seed,
            "corpus_chars": self.corpus_chars,
            "heldout_fraction": self.heldout_fraction,
            "vocab_size": vocab,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "steps": steps[name],
            "num_threads": self.num_threads,
        }
        if name == "target":
            fields["chat_share"] = self.chat_share
        elif name == "drafter" and self.drafter_chat_share:  # absent when 0: older drafter parts stay valid
            fields["chat_share"] = self.drafter_chat_share
        # the tokenizer learns from the tasks' texts too, so every model depends on them
        fields["tasks"] = self.tasks
        return fields

    def content_fields(self) -> dict:
        """The fields that decide what the kit contains (hashed)."""
        return {k: v for k, v in self.to_dict().items() if k not in PLACEMENT_FIELDS}
