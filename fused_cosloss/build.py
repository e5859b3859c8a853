"""``python -m fused_cosloss.build``: build the native CPU kernel now instead of at its first use.

The build takes about a minute and lands in the cache that the first call would use
(``$FUSED_COSLOSS_CACHE`` or ``~/.cache/fused_cosloss``), so a later process starts at once.
Exit status 0 when the kernel is built (or already was), 1 with the cause and the fix when
it cannot be; ``--verbose`` shows the compiler's output.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_cosloss.build", description=__doc__.splitlines()[0])
    parser.add_argument("--verbose", action="store_true",
                        help="print the compiler's output as it builds (FUSED_COSLOSS_VERBOSE=1)")
    args = parser.parse_args(argv)
    if args.verbose:
        os.environ["FUSED_COSLOSS_VERBOSE"] = "1"

    from . import native

    module, error = native._load()
    if module is None:
        print(f"fused_cosloss: the native CPU kernel is not available: {error}", file=sys.stderr)
        return 1
    print(f"fused_cosloss: the native CPU kernel is built ({native.isa()}): {module.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
