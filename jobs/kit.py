"""Build the embedded model kit (trained tiny target, drafters, prompts).

    ray job submit --working-dir . -- python jobs/kit.py --out /tmp/sd2-kit

locally: `python jobs/kit.py --out /tmp/sd2-kit`.
Same flags as `sd2 kit` (`python jobs/kit.py --help`).
The kit is cached by content hash, so a second run returns at once.
"""

import sys
from pathlib import Path

# The checkout `--working-dir .` uploaded, ahead of any installed copy of sd2_ray.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd2_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["kit", *sys.argv[1:]]))
