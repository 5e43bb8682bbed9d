"""Compare this package against a parity fixture recorded from released code.

    python benchmarks/parity.py --fixture ../shared/reference/parity/weakclip-tiny --json

Prints one JSON object ``{"pass", "recorded", "compared", "allowed", "worst", "failed"}``: ``recorded`` and
``compared`` count the fixture's tensors and those compared (a pass needs them equal), ``allowed`` names the
label maps whose differing pixels all lie within their decision margin (with their counts), and ``worst``
gives each tensor's worst difference beside its bound (``used`` = worst difference / allowance). Exits 1
when a comparison fails.
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
            differ = f"  differ {w['differ']:g}" if "differ" in w else ""
            print(f"{name:40s} max_abs {w['max_abs']:.3g}  bound {w['bound']:.3g}  used {w['used']:.3g}{differ}")
        print(f"compared {report['compared']} of {report['recorded']} recorded tensors; "
              f"label pixels within their margin: {report['allowed'] or 'none'}")
        print("PASS" if report["pass"] else "FAIL: " + "; ".join(report["failed"]))
    sys.exit(0 if report["pass"] else 1)


if __name__ == "__main__":
    main()
