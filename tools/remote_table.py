"""Write (or with --check, verify) the supported / refused accessor table in docs/remote.md from unilens.remote."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "remote.md"
BEGIN, END = "<!-- remote-table: begin (tools/remote_table.py) -->", "<!-- remote-table: end -->"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/remote.md is not current")
    args = parser.parse_args(argv)
    from unilens.conformance.support import support_table
    from unilens.testing import ZOO_REQUIRED

    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    if not rest or END not in rest:
        print(f"{DOC}: markers {BEGIN!r} / {END!r} not found", file=sys.stderr)
        return 1
    new = f"{head}{BEGIN}\n{support_table(ZOO_REQUIRED)}\n{END}{tail}"
    if args.check:
        if new != text:
            print("docs/remote.md is out of date: run `python tools/remote_table.py`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
