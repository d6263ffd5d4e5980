"""The docs site builds with ``mkdocs build --strict`` (warnings are errors: broken links and anchors, pages
missing from the nav), and every page under docs/ is in the nav of mkdocs.yml.

A new page must be added to ``nav`` in mkdocs.yml; these tests say which.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
yaml = pytest.importorskip("yaml")  # mkdocs depends on PyYAML


def _nav_pages(entry: Any) -> list[str]:
    """The page paths of a mkdocs nav (nested lists of {title: path-or-list} or plain paths)."""
    if isinstance(entry, str):
        return [] if "://" in entry else [entry]
    if isinstance(entry, list):
        return [p for e in entry for p in _nav_pages(e)]
    if isinstance(entry, dict):
        return [p for v in entry.values() for p in _nav_pages(v)]
    return []


def _config() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))


def test_every_docs_page_is_in_the_nav_and_every_nav_entry_exists() -> None:
    config = _config()
    docs = ROOT / config.get("docs_dir", "docs")
    pages = {p.relative_to(docs).as_posix() for p in docs.rglob("*.md")}
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), f"pages listed twice in mkdocs.yml nav: {sorted(p for p in nav if nav.count(p) > 1)}"
    missing = sorted(pages - set(nav))
    assert not missing, f"add these pages to nav in mkdocs.yml: {missing}"
    unknown = sorted(set(nav) - pages)
    assert not unknown, f"mkdocs.yml nav lists pages that do not exist under {docs.name}/: {unknown}"


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    # no --quiet: it hides warnings from strict mode's count, and the build would pass with broken links
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                          "-d", str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stdout}\n{out.stderr}"
    assert (tmp_path / "site" / "index.html").is_file() and (tmp_path / "site" / "cli" / "index.html").is_file()
