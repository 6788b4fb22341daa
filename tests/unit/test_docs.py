"""The documentation cannot drift from the code.

* every relative link in README.md, docs/*.md and docs/guide/*.md names a file that exists, and
  a ``#fragment`` into a Markdown file names one of its headings (GitHub's anchor rules);
* every error message quoted in docs/guide/troubleshooting.md (its ```text blocks) is produced
  by a message template in moe_dist/ (a string literal, f-string or ``%`` format, where each
  formatted value may stand for any text), or is a file-system error line whose OS wording and
  fix are those ``describe_os_error`` gives;
* every ``--flag`` in docs/guide/quickstart.md is a flag of ``moe-dist train``, and every flag
  of ``moe-dist train`` is explained there.
"""

from __future__ import annotations

import argparse
import ast
import functools
import re
from pathlib import Path

import pytest

from moe_dist.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
GUIDE = ROOT / "docs" / "guide"
TROUBLESHOOTING = GUIDE / "troubleshooting.md"
QUICKSTART = GUIDE / "quickstart.md"

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)
TEXT_BLOCK = re.compile(r"^```text[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)

# What the command line and the logging setup put in front of a message.
WRAPPERS = (
    re.compile(r"^moe-dist: (config|launch|checkpoint) error: "),
    re.compile(r"^\[moe_dist watchdog\] "),
    re.compile(r"^\[rank\d+\]: "),
    re.compile(r"^\[rank \d+\] \S+ \S+ (INFO|WARNING|ERROR) [\w.]+: "),
    re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception): "),
)
MIN_LITERAL_CHARS = 15  # a template with less fixed text than this proves nothing
PERCENT_FORMAT = re.compile(r"%[-+ #0]*\d*(?:\.\d+)?[sdrfgi]")
ANY_TEXT = "\x00"  # stands for a formatted value while a template is assembled


def markdown_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted(GUIDE.glob("*.md"))]
    return [f for f in files if f.is_file()]


def relative_links(text: str) -> list[str]:
    """Link targets outside code, without URLs and mail links."""
    prose = INLINE_CODE.sub("", FENCE.sub("", text))
    targets = LINK.findall(prose) + REFERENCE_LINK.findall(prose)
    return [t for t in targets if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", t)]


def test_guide_pages_exist():
    expected = {"quickstart.md", "parallelism-and-launching.md", "routing.md", "architectures.md",
                "monitoring.md", "checkpoints.md", "troubleshooting.md"}
    assert expected <= {p.name for p in GUIDE.glob("*.md")}
    assert (ROOT / "docs" / "index.md").is_file()


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors: lower case, punctuation but '-' and '_' removed, spaces to '-',
    repeats numbered -1, -2, ..."""
    anchors: set[str] = set()
    for title in re.findall(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", FENCE.sub("", text), re.M):
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        candidate, n = slug, 0
        while candidate in anchors:
            n += 1
            candidate = f"{slug}-{n}"
        anchors.add(candidate)
    return anchors


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_existing_files(path: Path):
    broken = []
    for target in relative_links(path.read_text()):
        file_part, _, fragment = target.partition("#")
        linked = (path.parent / file_part) if file_part else path
        if not linked.exists():
            broken.append(target)
        elif fragment and linked.suffix == ".md" and fragment not in heading_anchors(linked.read_text()):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.relative_to(ROOT)} has broken links: {broken}"


def test_heading_anchors_follow_github():
    text = "# A `b.c` (d)\n## 5. Does it pay off? (measured)\n## Use\n## Use\n```\n# not a heading\n```\n"
    assert heading_anchors(text) == {"a-bc-d", "5-does-it-pay-off-measured", "use", "use-1"}


def test_link_extraction_sees_links_and_skips_code():
    text = ("See [a](guide/a.md#x), ![img](img/p.png) and [web](https://x.org).\n"
            "`[not](code.md)`\n```\n[nor](block.md)\n```\n[ref]: other.md\n[top](#here)\n")
    assert relative_links(text) == ["guide/a.md#x", "img/p.png", "#here", "other.md"]


def test_index_links_every_doc():
    index = ROOT / "docs" / "index.md"
    linked = {(index.parent / t.split("#", 1)[0]).resolve() for t in relative_links(index.read_text())
              if not t.startswith("#")}
    docs = [p for p in [*(ROOT / "docs").glob("*.md"), *GUIDE.glob("*.md")] if p != index]
    missing = sorted(str(p.relative_to(ROOT)) for p in docs if p.resolve() not in linked)
    assert not missing, f"docs/index.md does not link {missing}"


# --------------------------------------------------------------------------------------------
# Error messages of the troubleshooting page
# --------------------------------------------------------------------------------------------

def _template_parts(node: ast.AST) -> list[str] | None:
    """Literal text and ANY_TEXT markers of a string expression, or None if it is not one."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [ANY_TEXT if i % 2 else piece for i, piece in enumerate(_split_percent(node.value))]
    if isinstance(node, ast.JoinedStr):
        return [v.value if isinstance(v, ast.Constant) else ANY_TEXT for v in node.values]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _template_parts(node.left), _template_parts(node.right)
        if left is None and right is None:
            return None
        return (left or [ANY_TEXT]) + (right or [ANY_TEXT])
    return None


def _split_percent(text: str) -> list[str]:
    """'a %d b' -> ['a ', '%d', ' b'] (odd items are the placeholders)."""
    pieces: list[str] = []
    last = 0
    for match in PERCENT_FORMAT.finditer(text):
        pieces += [text[last:match.start()], match.group()]
        last = match.end()
    return pieces + [text[last:]]


def _compile(parts: list[str]) -> re.Pattern | None:
    literal = "".join(p for p in parts if p != ANY_TEXT)
    if len(literal.strip()) < MIN_LITERAL_CHARS:
        return None
    return re.compile("".join(".*?" if p == ANY_TEXT else re.escape(p) for p in parts), re.S)


@functools.cache
def source_templates() -> tuple[re.Pattern, ...]:
    """Every message template in moe_dist/, outermost expressions first."""
    templates = []
    for path in sorted((ROOT / "moe_dist").rglob("*.py")):
        seen: set[int] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if id(node) in seen:
                continue
            parts = _template_parts(node)
            if parts is None:
                continue
            seen.update(id(child) for child in ast.walk(node))  # keep the whole concatenation
            pattern = _compile(parts)
            if pattern is not None:
                templates.append(pattern)
    return tuple(templates)


def unwrap(message: str) -> str:
    """The message without the prefixes that the CLI, logging and tracebacks add."""
    message = message.strip()
    changed = True
    while changed:
        changed = False
        for wrapper in WRAPPERS:
            stripped = wrapper.sub("", message, count=1)
            if stripped != message:
                message, changed = stripped, True
    return message


# moe_dist.config.errors.describe_os_error: "[what: ]<the OS's reason> [ENAME] (<path>); <fix>".
FILE_SYSTEM_ERROR = re.compile(r"moe-dist: file-system error: (?:.+: )?(?P<reason>[^:\[]+) \[(?P<name>E[A-Z]+)\]"
                               r"(?: \([^)]*\))?(?:; (?P<fix>.+))?", re.S)


def produced_by_source(message: str) -> bool:
    text = unwrap(message)
    return any(t.fullmatch(text) for t in source_templates()) or os_error_described(message.strip())


def os_error_described(message: str) -> bool:
    """A file-system error line holds the OS's own wording, so no template in moe_dist/ has it:
    check that the reason is the OS's text for that errno and the fix is the one moe_dist gives."""
    import errno
    import os

    from moe_dist.config.errors import _OS_ERROR_FIXES

    match = FILE_SYSTEM_ERROR.fullmatch(message)
    if match is None or not hasattr(errno, match["name"]):
        return False
    code = getattr(errno, match["name"])
    return os.strerror(code) == match["reason"] and match["fix"] in (None, _OS_ERROR_FIXES.get(code))


def quoted_messages() -> list[str]:
    return [block.rstrip("\n") for block in TEXT_BLOCK.findall(TROUBLESHOOTING.read_text())]


def test_troubleshooting_quotes_many_messages():
    assert len(quoted_messages()) >= 15


@pytest.mark.parametrize("message", quoted_messages() if TROUBLESHOOTING.is_file() else [],
                         ids=lambda m: unwrap(m)[:40])
def test_quoted_error_message_occurs_in_source(message: str):
    assert produced_by_source(message), (
        f"this message from troubleshooting.md is not produced by any string in moe_dist/ "
        f"(changed or removed?):\n{message}")


def test_message_check_rejects_a_changed_message():
    # A real message passes; the same message with one fixed word changed does not.
    real = ("moe-dist: config error: moe.num_experts (6) must be divisible by parallel.ep (4); "
            "use ep in [1, 2] or num_experts=8")
    assert produced_by_source(real)
    assert not produced_by_source(real.replace("divisible", "divided"))
    assert unwrap("[rank 0] 2026-11-23 14:49:31,554 WARNING moe_dist.train.trainer: x") == "x"
    full = ("moe-dist: file-system error: cannot write metrics.jsonl: No space left on device [ENOSPC] (r/m.jsonl); "
            "the file system is full: free space (older runs, fewer checkpoints with checkpoint.keep_last) or "
            "point --run-dir / data.cache_dir at another file system")
    assert produced_by_source(full)
    assert not produced_by_source(full.replace("No space left", "No room left"))
    assert not produced_by_source(full.replace("free space", "buy disks"))


# --------------------------------------------------------------------------------------------
# Flags of the quick start
# --------------------------------------------------------------------------------------------

def train_flags() -> set[str]:
    """The long options that `moe-dist train --help` lists (hidden ones excluded)."""
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = subparsers.choices["train"]
    usage = train.format_help()
    flags = {flag for action in train._actions if action.help is not argparse.SUPPRESS
             for flag in action.option_strings if flag.startswith("--")}
    assert all(flag in usage for flag in flags)
    return flags


def test_quickstart_flags_exist_in_train_help():
    text = QUICKSTART.read_text()
    mentioned = set(re.findall(r"(?<![\w/-])--[a-z][a-z0-9-]*", text))
    assert mentioned, "the quick start mentions no flag"
    unknown = sorted(mentioned - train_flags())
    assert not unknown, f"quickstart.md mentions flags that `moe-dist train --help` lacks: {unknown}"


def test_every_train_flag_is_in_the_quickstart():
    text = QUICKSTART.read_text()
    missing = sorted(f for f in train_flags() - {"--help"} if f not in text)
    assert not missing, f"quickstart.md does not explain {missing}"
