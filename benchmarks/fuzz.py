"""Long schemathesis run against the live local stack (Triton + API on loopback).

Every operation of /openapi.json gets up to ``--max-examples`` generated
requests, checked for 5xx answers and for answers that contradict the
document. The inference routes (/v1/converse, /v1/audio/*) get their
documented examples (real synthesis) and generated invalid bodies: generated
valid bodies may carry the spec's maximum (64 turns x 8,000 characters), which
2 CPU cores cannot voice within the deadline (a correct 504). Prints
schemathesis' summaries; JUnit reports go to ``--report-dir``.

    python benchmarks/fuzz.py --max-examples 1000
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.isolated import isolate
from devtools import REPOSITORY
from devtools.local_stack import LocalStack

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--report-dir", type=Path, default=Path(tempfile.mkdtemp(prefix="fuzz-")))
    args = parser.parse_args()
    isolate("converse-fuzz-")
    inference = "^/v1/(converse|audio/.*)$"
    parts = {
        "other": ["--exclude-path-regex", inference, "--phases", "examples,coverage,fuzzing"],
        "inference": ["--include-path-regex", inference, "--mode", "negative",
                      "--phases", "examples,fuzzing"],
    }
    with LocalStack(REPOSITORY) as stack:
        codes = []
        for name, selection in parts.items():
            command = [
                str(Path(sys.executable).parent / "st"), "run", f"{stack.base_url}/openapi.json",
                "--checks", CHECKS, "--max-examples", str(args.max_examples),
                "--seed", str(args.seed), "--header", f"Authorization: Bearer {stack.api_key}",
                "--continue-on-failure", "--report", "junit",
                "--report-junit-path", str(args.report_dir / f"{name}.xml"),
                "--suppress-health-check", "all", "--request-timeout", "60", *selection,
            ]
            print(f"== {name}:", " ".join(command[1:3]), *selection, flush=True)
            codes.append(subprocess.run(command, check=False).returncode)
        return max(codes)


if __name__ == "__main__":
    raise SystemExit(main())
