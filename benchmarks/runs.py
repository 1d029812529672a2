"""``run.py --runs N``: each section in N fresh processes, every figure reported as its range over the runs."""

from __future__ import annotations

import re
import subprocess
import sys

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def merge_runs(outputs: list[list[str]]) -> list[str]:
    """Lines of several runs of one section, each figure as ``low-high`` (or one value where all runs agree).

    Lines are matched by position and must have the same text around their numbers; a run whose lines do
    not match (a different number of lines, other words) is reported as such instead of being mixed in.
    """
    merged = []
    for lines in zip(*outputs):
        shapes = {NUMBER.sub("#", line) for line in lines}
        if len(shapes) != 1:
            merged.append(f"(runs disagree on this line's shape) {' | '.join(lines)}")
            continue
        figures = [NUMBER.findall(line) for line in lines]
        parts = NUMBER.split(lines[0])
        text = parts[0]
        for i, part in enumerate(parts[1:]):
            values = [run[i] for run in figures]
            low, high = min(values, key=float), max(values, key=float)
            text += (low if float(low) == float(high) else f"{low}-{high}") + part
        merged.append(text)
    if len({len(o) for o in outputs}) > 1:
        merged.append(f"(runs printed {sorted({len(o) for o in outputs})} lines; only the common ones are merged)")
    return merged


def run_sections(sections: list[str], runs: int, passthrough: list[str]) -> None:
    """Run each section ``runs`` times, each in its own process, and print the merged lines."""
    script = sys.argv[0]
    for section in sections:
        outputs, header = [], ""
        for _ in range(runs):
            done = subprocess.run([sys.executable, script, section, *passthrough], capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"section {section!r} failed:\n{done.stderr[-2000:]}")
            lines = [line for line in done.stdout.splitlines() if line]
            header = header or next((line for line in lines if line.startswith("#")), "")
            outputs.append([line for line in lines if not line.startswith("#")])
        print(f"{header}\n# {section}: {runs} runs in fresh processes, each figure low-high")
        for line in merge_runs(outputs):
            print(line, flush=True)
