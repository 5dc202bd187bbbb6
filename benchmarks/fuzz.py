"""The longer fuzzing run: tests/test_fuzz.py (schemathesis against the app's own spec, a real server on
loopback, every operation, the same checks and documented exclusions) with many more examples and a seed of
its own, so each run explores inputs the CI run (25 examples per operation, derandomized) does not.

    python benchmarks/fuzz.py                            # 500 examples per operation, a random seed
    python benchmarks/fuzz.py --max-examples 2000 --seed 42

Exits with pytest's status (0: every operation answered as its spec says).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-examples", type=int, default=500)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1, 1 << 30)
    env = {**os.environ, "EMBEDLIFT_FUZZ_EXAMPLES": str(args.max_examples), "EMBEDLIFT_FUZZ_SEED": str(seed)}
    start = time.monotonic()
    code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fuzz.py"], cwd=REPO, env=env)
    print(f"seed {seed}, {args.max_examples} examples per operation, {time.monotonic() - start:.0f} s: pytest exit {code}")
    return code


if __name__ == "__main__":
    sys.exit(main())
