"""Compare this package against a parity fixture recorded from released code.

    python benchmarks/parity.py --fixture ../shared/reference/parity/weakclip-tiny --json

Prints one JSON object whose last line is ``{"pass": ..., "worst": {...}, "failed": [...]}``; exits 1 when
a comparison fails.
"""

from __future__ import annotations

import argparse
import json
import sys

from weakclip.errors import WeakclipError
from weakclip.parity import check_fixture


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", required=True, help="folder with config.json and safetensors files")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON line")
    args = parser.parse_args()
    try:
        report = check_fixture(args.fixture).to_json()
    except WeakclipError as exc:
        sys.exit(f"parity: error: {exc}")
    if args.json:
        print(json.dumps(report))
    else:
        for name, w in report["worst"].items():
            print(f"{name:40s} max_abs {w['max_abs']:.3g}  max_rel {w['max_rel']:.3g}")
        print("PASS" if report["pass"] else "FAIL: " + "; ".join(report["failed"]))
    sys.exit(0 if report["pass"] else 1)


if __name__ == "__main__":
    main()
