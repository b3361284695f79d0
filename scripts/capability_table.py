"""Write the README's backbone-family table (clipadapt.backbones.families) between its markers.

    python scripts/capability_table.py           # rewrite README.md
    python scripts/capability_table.py --check   # exit 1 if README.md differs

tests/test_families.py asserts the README block equals the generated one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from clipadapt.backbones.families import TABLE_BEGIN, TABLE_END, readme_block

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    args = p.parse_args()
    text = README.read_text()
    begin, end = text.find(TABLE_BEGIN), text.find(TABLE_END)
    if not 0 <= begin < end:
        print(f"{README}: expected the markers {TABLE_BEGIN!r} ... {TABLE_END!r}", file=sys.stderr)
        return 2
    new = text[:begin] + readme_block() + text[end + len(TABLE_END) :]
    if args.check:
        return 0 if new == text else 1
    README.write_text(new)
    print(f"{README}: capability table written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
