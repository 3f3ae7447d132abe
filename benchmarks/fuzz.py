"""Long schemathesis run against the live local stack (Triton + API on loopback).

Every operation of /openapi.json gets up to ``--max-examples`` generated
requests (positive and negative), checked for 5xx answers and for answers
that contradict the document. Prints schemathesis' summary; the report (JUnit)
goes to ``--report-dir``.

    python benchmarks/fuzz.py --max-examples 1000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from local_stack import LocalStack  # noqa: E402

CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_schema_conformance,response_headers_conformance")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-examples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--report-dir", type=Path, default=Path(tempfile.mkdtemp(prefix="fuzz-")))
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="converse-fuzz-"))
    # A rate limit the run never reaches, and storage of its own.
    os.environ.update(CONVERSE_RATE_LIMIT_CAPACITY="100000000",
                      CONVERSE_SQLITE_PATH=str(state / "converse.db"),
                      CONVERSE_BLOB_DIR=str(state / "blobs"),
                      CONVERSE_LOG_REQUESTS="false")
    with LocalStack(ROOT / "model_repository") as stack:
        command = [
            str(Path(sys.executable).parent / "st"), "run", f"{stack.base_url}/openapi.json",
            "--checks", CHECKS, "--max-examples", str(args.max_examples),
            "--seed", str(args.seed), "--header", f"Authorization: Bearer {stack.api_key}",
            "--continue-on-failure", "--phases", "examples,coverage,fuzzing",
            "--report", "junit", "--report-dir", str(args.report_dir),
            "--suppress-health-check", "all", "--request-timeout", "60",
        ]
        print(" ".join(command[:4]), "...", flush=True)
        return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
