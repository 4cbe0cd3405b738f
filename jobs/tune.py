"""Ray Tune (ASHA) search over sparsity x learning rate, scored by measured acceptance.

    ray job submit --working-dir . -- python jobs/tune.py --config jobs/configs/llama70b_to_llama3b.yaml

or with retries: `python jobs/submit.py jobs/specs/tune.yaml`;
locally: `python jobs/tune.py --config jobs/configs/llama70b_to_llama3b.yaml`.
Same flags as `sd2 tune` (`python jobs/tune.py --help`).
Given a pipeline YAML, it reads the `tune:` section; flags and key=value overrides win.
"""

import sys
from pathlib import Path

# The checkout `--working-dir .` uploaded, ahead of any installed copy of sd2_ray.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd2_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
