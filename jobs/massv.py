"""MASSV drafters for a vision-language target as one job: distill the target VLM's answers,
prune the drafter's LM, run MASSV's phases (dense and sparse), tune the no-image control, and
evaluate every drafter on held-out image prompts.

    ray job submit --working-dir . -- python jobs/massv.py --config jobs/configs/massv.yaml

locally: `python jobs/massv.py --config jobs/configs/massv.yaml`. Same flags as `sd2 massv`."""

import sys
from pathlib import Path

# The checkout `--working-dir .` uploaded, ahead of any installed copy of sd2_ray.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd2_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["massv", *sys.argv[1:]]))
