"""The whole SD2 pipeline (distill -> prune -> finetune -> eval, with baselines) as one job.

    ray job submit --working-dir . -- python jobs/run.py --config jobs/configs/llama70b_to_llama3b.yaml

or with retries: `python jobs/submit.py jobs/specs/run.yaml`;
locally: `python jobs/run.py --config jobs/configs/llama70b_to_llama3b.yaml`.
Same flags as `sd2 run` (`python jobs/run.py --help`)."""

import sys
from pathlib import Path

# The checkout `--working-dir .` uploaded, ahead of any installed copy of sd2_ray.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd2_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
