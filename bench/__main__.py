"""`python -m bench ...`: the same commands as `alto bench ...`."""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    # stage functions ('package.module:fn') resolve from the working directory, as in `alto`
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    from bench.cli import app

    app()
