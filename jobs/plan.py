"""Plan a run on a cluster: every stage's Ray resources and per-GPU memory, checked against the
cluster's node types (exits 2 naming a stage that cannot fit). Runs anywhere, no Ray needed:

    python jobs/plan.py --config jobs/configs/llama70b_to_llama3b.yaml --cluster clusters/aws-gpu.yaml

or as the cluster's first job:

    ray job submit --working-dir . -- python jobs/plan.py --config jobs/configs/llama70b_to_llama3b.yaml

Same flags as `sd2 plan` (`python jobs/plan.py --help`).
"""

import sys
from pathlib import Path

# The checkout, ahead of any installed copy of sd2_ray.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd2_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
