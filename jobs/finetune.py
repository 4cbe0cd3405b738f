"""Masked sparse fine-tuning of the drafter on Ray Train + DeepSpeed ZeRO.

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/llama70b_to_llama3b.yaml

or with retries: `python jobs/submit.py jobs/specs/finetune.yaml`;
locally: `python jobs/finetune.py --config jobs/configs/llama70b_to_llama3b.yaml`.
Same flags as `sd2 finetune` (`python jobs/finetune.py --help`).
Given a pipeline YAML, it reads the `finetune:` section; flags and key=value overrides win.
"""

import sys
from pathlib import Path

# The checkout `--working-dir .` uploaded, ahead of any installed copy of sd2_ray.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd2_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
