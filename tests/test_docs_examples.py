"""The code on docs/pass-authoring.md and docs/debugging.md runs: each page's ```python blocks, top to bottom in one
namespace (their asserts are the checks), plus the doctests of the pass-authoring, debugging and accuracy-pass
modules."""

from __future__ import annotations

import doctest
import importlib
import os
import re
import sys
import types
import warnings

import pytest
import torch

DOCS = os.path.join(os.path.dirname(__file__), "..", "docs")
BLOCK = re.compile(r"(?:<!-- example: (?P<name>[\w-]+) -->\n)?```python\n(?P<code>.*?)```", re.S)


def blocks(page: str) -> list[tuple[str, str]]:
    """``(name, code)`` of every python block of a docs page (name from a preceding ``<!-- example: x -->``)."""
    with open(os.path.join(DOCS, page)) as f:
        return [(m.group("name") or "", m.group("code")) for m in BLOCK.finditer(f.read())]


@pytest.fixture
def one_thread():
    """The examples train and quantize small models: one thread is faster on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("page", ["pass-authoring.md", "debugging.md"])
def test_docs_page_code_runs(page, one_thread, capsys):
    found = blocks(page)
    assert len(found) >= 4, f"{page}: expected its examples, found {len(found)} python blocks"
    module = types.ModuleType(f"docs_{page.replace('-', '_').replace('.', '_')}")  # a real module: dataclasses
    sys.modules[module.__name__] = module                                             # look their module up
    namespace = module.__dict__
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's quantized-tensor deprecation warnings
        for i, (name, code) in enumerate(found):
            try:
                exec(compile(code, f"{page}[block {i}{' ' + name if name else ''}]", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{page}: python block {i} ({name or 'unnamed'}) failed: {exc!r}") from exc
            finally:
                if i == len(found) - 1:
                    del sys.modules[module.__name__]


def test_the_fusion_pass_example_is_under_60_lines():
    code = dict(blocks("pass-authoring.md"))["fusion"]
    lines = [line for line in code.splitlines() if line.strip()]
    assert 10 < len(lines) < 60
    assert {"lowering", "backend"} <= set(dict(blocks("pass-authoring.md")))


@pytest.mark.parametrize("module", ["fxquant.passes.base", "fxquant.passes.matching", "fxquant.passes.rewrite",
                                    "fxquant.passes.pipelines", "fxquant.numeric", "fxquant.graphviz",
                                    "fxquant.sensitivity", "fxquant.passes.bias_correction",
                                    "fxquant.passes.adaround"])
def test_module_doctests(module, one_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
