"""Every code block of README.md and docs/*.md runs as written.

Each page runs in a fresh folder, its blocks in order: ``python`` blocks in one namespace (a page
reads like a session), ``bash`` blocks through bash with this environment's ``lora-inject`` and
``python`` first on PATH and ``examples/`` reachable. ``console`` blocks (installs, the test suite
itself, multi-process launches) and ``text`` blocks are not run; any other block language is an error,
so a typo cannot quietly exclude a block. Nothing is downloaded (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN, SKIP = {"python", "bash"}, {"console", "text"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def blocks(page: Path) -> list[tuple[str, str, int]]:
    """``(language, code, line)`` of each fenced block."""
    text = page.read_text()
    return [(m.group(1), m.group(2), text[:m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


def test_readme_is_short_and_every_page_is_linked():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in readme, page.name


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_block_runs(page, tmp_path, monkeypatch):
    found = blocks(page)
    odd = [(lang, line) for lang, _, line in found if lang not in RUN | SKIP]
    assert not odd, f"{page.name}: blocks without a known language (python, bash, console, text): {odd}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=str(ROOT))
    namespace = {"__name__": "__docs__"}
    for language, code, line in found:
        if language == "python":
            exec(compile(code, f"{page.name}:{line}", "exec"), namespace)  # noqa: S102
        elif language == "bash":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                                    capture_output=True, text=True, timeout=600)
            assert result.returncode == 0, f"{page.name}:{line}\n{code}\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
