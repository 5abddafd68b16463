#!/usr/bin/env python
"""Write the `## GPU` section of docs/PERFORMANCE.md from what `scripts/gpu_check.sh` left in its log folder.

    python scripts/gpu_check_report.py --log_dir runs/gpu_check --docs docs/PERFORMANCE.md

Reads `parts.tsv` (one `name<TAB>exit status<TAB>seconds` line per part of the check), every `gpu_tests*.xml`
(pytest's JUnit reports of the `pytest -m gpu` parts) and every `benchmark_*.md` (the blocks `benchmark_speed.py --write_docs` wrote), and
replaces the `## GPU` section (up to the next `## ` heading; appended when there is none) with the date, the device,
the library versions, each part's status and time, each GPU test's outcome (the FSDP run among them) and the speed
tables. A part that failed or timed out is reported as such; its missing output is named, not invented.
"""

from __future__ import annotations

import argparse
import re
import time
import xml.etree.ElementTree as ET
from pathlib import Path

SECTION = "## GPU"
FSDP_CONFIG = "configs/accelerate/fsdp_1gpu.yaml"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log_dir", required=True, help="The folder scripts/gpu_check.sh wrote into.")
    parser.add_argument("--docs", default="docs/PERFORMANCE.md", help="The markdown file whose GPU section is replaced.")
    args = parser.parse_args(argv)
    if not Path(args.log_dir).is_dir():
        parser.error(f"--log_dir {args.log_dir} is not a folder.")
    return args


def machine_description() -> str:
    """Device, memory and library versions of this machine (the one the check ran on)."""
    import accelerate
    import diffusers
    import torch

    versions = f"torch {torch.__version__} (CUDA {torch.version.cuda}), accelerate {accelerate.__version__}, " + (
        f"diffusers {diffusers.__version__}"
    )
    if not torch.cuda.is_available():
        return f"no CUDA device; {versions}"
    props = torch.cuda.get_device_properties(0)
    return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), {torch.cuda.device_count()} visible; {versions}"


def read_parts(path: Path) -> list[tuple[str, int, float]]:
    parts = []
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                name, status, seconds = line.split("\t")
                parts.append((name, int(status), float(seconds)))
    return parts


def status_word(status: int) -> str:
    return {0: "passed", 124: "timed out", 137: "killed (time or memory)"}.get(status, f"failed (exit {status})")


def read_tests(path: Path) -> list[dict]:
    """Each test case of a JUnit XML report: name, outcome (passed, failed, error, skipped), seconds, message."""
    if not path.exists():
        return []
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for kind in ("failure", "error", "skipped"):
            child = case.find(kind)
            if child is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[kind]
                message = (child.get("message") or child.text or "").strip().splitlines()
                message = message[0][:160] if message else ""
                break
        module = case.get("classname", "").rsplit(".", 1)[-1]
        tests.append(
            {"name": f"{module}::{case.get('name')}", "outcome": outcome, "seconds": float(case.get("time", 0)),
             "message": message}
        )  # fmt: skip
    return tests


def case_id(name: str) -> str:
    """The parameter id of a parametrized test (`test_x[dsm]` -> `dsm`), else the name."""
    match = re.search(r"\[(.*)\]$", name)
    return match.group(1) if match else name


def section_text(log_dir: Path, machine: str, date: str) -> str:
    parts = read_parts(log_dir / "parts.tsv")
    tests = [test for path in sorted(log_dir.glob("gpu_tests*.xml")) for test in read_tests(path)]
    lines = [
        SECTION,
        "",
        "Written by `bash scripts/gpu_check.sh` (this whole section is replaced on every run; see \"Running the GPU "
        "check\" above).",
        "",
        f"Run: {date}; {machine}; {sum(p[2] for p in parts):.0f} s in all.",
        "",
        "| part | result | seconds |",
        "|---|---|---|",
        *[f"| {name} | {status_word(status)} | {seconds:.0f} |" for name, status, seconds in parts],
        "",
    ]
    fsdp = [t for t in tests if "fsdp" in t["name"]]
    if not fsdp:
        lines += ["FSDP: no result (the fsdp part wrote no test report; see its log).", ""]
    else:
        results = "; ".join(
            f"{case_id(t['name'])} {t['outcome']}" + (f" ({t['message']})" if t["message"] else "") for t in fsdp
        )
        lines += [
            f"FSDP (one process, accelerate's FSDP plugin, `{FSDP_CONFIG}`: train, checkpoint with the gathered full "
            f"state dict, resume, export, sample): {results}.",
            "",
        ]
    lines += ["### Tests marked `gpu`", ""]
    if tests:
        lines += ["| test | outcome | seconds |", "|---|---|---|"]
        for t in tests:
            note = f": {t['message']}" if t["message"] and t["outcome"] != "passed" else ""
            lines.append(f"| `{t['name']}` | {t['outcome']}{note} | {t['seconds']:.1f} |")
    else:
        lines.append("No test report (no gpu_tests*.xml: the pytest parts did not finish).")
    lines += ["", "### Training speed (`benchmark_speed.py`, bf16)", ""]
    fragments = sorted(log_dir.glob("benchmark_*.md"))
    if not fragments:
        lines.append("No speed results (no benchmark part finished).")
    for fragment in fragments:
        text = fragment.read_text()
        inner = re.sub(r"<!--.*?-->\n?", "", text, flags=re.S).strip()
        inner = inner.removeprefix("# Performance").strip()
        lines += [inner, ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def replace_section(text: str, section: str) -> str:
    """`text` with its `## GPU` section (heading to the next `## ` heading) replaced by `section`, or appended."""
    match = re.search(r"^## GPU[^\n]*\n", text, flags=re.M)
    if match is None:
        return text.rstrip("\n") + "\n\n" + section
    following = re.search(r"^## ", text[match.end() :], flags=re.M)
    end = match.end() + following.start() if following else len(text)
    return text[: match.start()] + section + ("\n" + text[end:] if following else "")


def main(args: argparse.Namespace) -> None:
    docs = Path(args.docs)
    section = section_text(Path(args.log_dir), machine_description(), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    docs.write_text(replace_section(docs.read_text() if docs.exists() else "# Performance\n", section))
    print(section)


if __name__ == "__main__":
    main(parse_args())
