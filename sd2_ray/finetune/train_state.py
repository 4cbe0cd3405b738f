"""Where training stands (pure): the state saved with every checkpoint, so a restart continues.

Rank 0 writes it as ``train_state.json`` next to the DeepSpeed files of an intermediate
checkpoint and next to the HF model dir of the final one; the driver reads the final one's
history and held-out selection to publish. The file's format is what a resumed run and the
publishing driver read back: a field added here needs a default.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Where training stands; saved with every checkpoint so a restart continues, not restarts."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # global batches of this epoch already trained on
    samples: int = 0  # rows consumed over all workers
    finished: bool = False
    restarts: int = 0  # how many times this run resumed from a checkpoint
    history: list[dict] = field(default_factory=list)  # per-step metrics (rank 0)
    best: dict | None = None  # held-out selection: {"step", "metric", "value"} of the best eval so far

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(asdict(self), f)

    @classmethod
    def load(cls, directory: str) -> TrainState:
        with open(os.path.join(directory, STATE_FILE)) as f:
            return cls(**json.load(f))
