"""Split a radiology report into organ-level text with an abnormal flag per organ, as JSON.

Reads FILE (or stdin for '-'), strict UTF-8. Prints {organ_v1_name: {"text": ..., "abnormal": ...}} for
every TotalSegmentator-v1 organ the report speaks of, in v1 id order; organs it does not mention are
absent. An empty report, undecodable bytes or a report naming no known organ exit with status 2.

Example:  printf 'Liver: No focal lesion.\\nLeft renal cyst.\\n' | ctglip parse-report -
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

NAME = "parse-report"
HELP = "report text -> per-organ sentences and abnormal flags (JSON)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("report", help="report text file, or '-' for stdin")
    parser.add_argument("--indent", type=int, default=None, help="pretty-print the JSON with this indent")


def run(args: argparse.Namespace) -> int:
    from ctglip_jax.data import reports
    from ctglip_jax.errors import InputNotFoundError, ReportError

    if args.report == "-":
        source, raw = "<stdin>", sys.stdin.buffer.read()
    else:
        path = pathlib.Path(args.report)
        source = str(path)
        if not path.is_file():
            raise InputNotFoundError(source, "no such report file" if not path.exists() else "not a file")
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ReportError(source, f"cannot read report: {e.strerror}") from None
    parsed = reports.parse_report(reports.decode_report(raw, source), source=source)
    out = {name: {"text": f.text, "abnormal": f.abnormal} for name, f in parsed.items()}
    print(json.dumps(out, indent=args.indent))
    return 0
