"""README.md's Python snippets run as written, and its Features table names modules that exist.

Every ```` ```python ```` block of README.md is either run or marked. A block runs as written: compiled with
README.md's line numbers (a traceback points at the README line) and executed in a fresh namespace, with a fresh
temporary folder as the working directory (snippets write shards under relative paths) and torch's global RNG
seeded. A block that needs the reader's own model, data or process group carries the line
``<!-- snippet: needs-user-objects -->`` directly before its opening fence; it is only compiled. So a new
snippet is run unless the README itself says, for every reader to see, that it cannot be.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import torch_pretrain_update

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PACKAGE = ROOT / "torch_pretrain_update"
MARK = "<!-- snippet: needs-user-objects -->"
FENCE = re.compile(r"^(`{3,}|~{3,})\s*([^\s`]*)")
#: info strings that would hide a Python block from this test
PYTHON_ALIASES = {"py", "python3", "py3", "pycon", "ipython", "Python"}


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    section: str  # the closest "## " heading above it
    code: str
    marked: bool


def _slug(heading: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", heading.lower()).strip("-")


def parse(text: str) -> tuple[list[Block], list[str]]:
    """The ```python blocks of ``text``, and the problems that would let a block escape this test: a marker
    that is not directly before a python block, a Python block under another info string, an unclosed fence."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    section = "top"
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = FENCE.match(line)
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip() == MARK:
            nxt = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            if nxt is None or nxt.group(2) != "python":
                problems.append(f"README.md:{i + 1}: {MARK} is not directly before a ```python block")
        if fence is None:
            i += 1
            continue
        ticks, info = fence.groups()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith(ticks[0] * len(ticks))
                    and not lines[j].strip(ticks[0]).strip()), None)
        if end is None:
            problems.append(f"README.md:{i + 1}: a fenced block that is never closed")
            break
        if info in PYTHON_ALIASES:
            problems.append(f"README.md:{i + 1}: a Python block labelled {info!r}: label it 'python' so that it is "
                            "run or marked")
        if info == "python":
            marked = i > 0 and lines[i - 1].strip() == MARK
            blocks.append(Block(i + 1, section, "\n".join(lines[i + 1:end]) + "\n", marked))
        i = end + 1
    return blocks, problems


BLOCKS, PROBLEMS = parse(README.read_text(encoding="utf-8"))
RUN = [b for b in BLOCKS if not b.marked]


def _compile(block: Block):
    # leading newlines put the first code line at its README line number in tracebacks
    return compile("\n" * block.line + block.code, str(README), "exec")


def test_every_python_block_is_run_or_marked() -> None:
    assert PROBLEMS == []
    assert len(BLOCKS) >= 8 and len(RUN) >= 6, [(b.line, b.section, b.marked) for b in BLOCKS]
    for b in BLOCKS:
        _compile(b)  # a marked block must still be valid Python
    assert {b.line for b in RUN} | {b.line for b in BLOCKS if b.marked} == {b.line for b in BLOCKS}


def test_parser_finds_what_would_escape() -> None:
    text = "\n".join([
        "## A", "```python", "x = 1", "```",
        MARK, "```python", "model(x)", "```",
        MARK, "", "```python", "y = 2", "```",  # a blank line between marker and block: not a marker
        "```py", "z = 3", "```",
        MARK, "```bash", "ls", "```",
        "````python", "```", "nested = True", "````",
    ])
    blocks, problems = parse(text)
    assert [(b.line, b.code, b.marked) for b in blocks] == [
        (2, "x = 1\n", False), (6, "model(x)\n", True), (11, "y = 2\n", False), (21, "```\nnested = True\n", False)]
    assert len(problems) == 3
    assert "README.md:9:" in problems[0] and "README.md:14:" in problems[1] and "README.md:17:" in problems[2]


@pytest.mark.parametrize("block", RUN, ids=[f"{_slug(b.section)}-L{b.line}" for b in RUN])
def test_snippet_runs(block: Block, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = _compile(block)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        try:
            exec(code, {"__name__": "readme_snippet"})
        except NameError as exc:
            pytest.fail(f"README.md:{block.line} ({block.section}): {exc}. Make the snippet self-contained (tiny "
                        f"random data), or put {MARK} on the line before its fence if it needs the reader's own "
                        "objects")


# ------------------------------------------------------------------------------------------ the Features table


def _features_rows() -> list[tuple[str, str, str]]:
    lines = README.read_text(encoding="utf-8").splitlines()
    start = lines.index("## Features")
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("## "):
            break
        if line.startswith("|") and not line.startswith("|---") and not line.startswith("| need |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.append((cells[0], cells[1], cells[-1]))
    return rows


def _module_file(dotted: str) -> Path | None:
    path = PACKAGE.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _row_modules(cell: str) -> list[str]:
    """The module column as dotted names relative to the package. A bare name in parentheses after a dotted one
    (``data.stream`` (+ ``stream_config``), ``data.stages`` (``weights``)) is a module beside or under it."""
    out: list[str] = []
    last = ""
    for name in re.findall(r"`([^`]+)`", cell):
        if "." in name or _module_file(name) is not None or not last:
            out.append(name)
            last = name
            continue
        beside = ".".join(last.split(".")[:-1] + [name])
        under = f"{last}.{name}"
        out.append(under if _module_file(under) is not None else beside)
    return out


def _outside_parentheses(text: str) -> str:
    """``text`` without its parenthesised remarks, where other rows' names appear (``(weights for `KDLoss`)``)."""
    while True:
        shorter = re.sub(r"\([^()]*\)", "", text)
        if shorter == text:
            return text
        text = shorter


def test_features_table_modules_match_the_package() -> None:
    rows = _features_rows()
    assert len(rows) >= 15
    public = set(torch_pretrain_update.__all__)
    for need, pieces, modules in rows:
        names = _row_modules(modules)
        assert names, need
        for name in names:
            assert _module_file(name) is not None, f"Features row {need!r}: no module torch_pretrain_update.{name}"
        for piece in re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)", _outside_parentheses(pieces)):
            if piece not in public or not hasattr(getattr(torch_pretrain_update, piece), "__module__"):
                continue
            home = getattr(torch_pretrain_update, piece).__module__.removeprefix("torch_pretrain_update.")
            assert any(home == m or home.startswith(m + ".") for m in names), (
                f"Features row {need!r}: {piece} is defined in {home}, not in the row's modules {names}")
            importlib.import_module(f"torch_pretrain_update.{home}")
