"""The README and the guides under docs/ stay true: links and anchors resolve, every `make` target and
`authsvc` command a code line shows exists, and every setting, ErrorInfo reason and metric of the
contract (docs/design.md) is explained in a guide. No server is started."""

from __future__ import annotations

import argparse
import importlib.util
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from authsvc.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
CONTRACT = DOCS / "design.md"
MAX_README_LINES = 350

FENCE = re.compile(r"^\s*(`{3,}|~{3,})")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# [text](target) and ![alt](target), with an optional "title"; the text may hold one level of brackets.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)(?<!`)\1(?!`)", re.S)
# `make TARGET` where a command may start: the line's start, a prompt, or after ; && || | ( $( or a backtick.
COMMAND_START = r"(?:^|[;&|(`]|\$\(|\$ )\s*(?:[A-Z_][A-Z0-9_]*=\S*\s+)*"
MAKE = re.compile(COMMAND_START + r"make\s+([a-z][\w.-]*)", re.M)
AUTHSVC = re.compile(COMMAND_START + r"authsvc\s+((?:--)?[a-z][\w-]*)([^\n;|&)#`]*)", re.M)
OPTION = re.compile(r"(?<![\w-])(--[a-z][\w-]*)")


def pages() -> list[Path]:
    """The README and every guide, the contract included."""
    return [README, *sorted(DOCS.glob("*.md"))]


def guides() -> list[Path]:
    """The guides that explain the contract to readers: every docs/*.md but the contract itself."""
    return [path for path in sorted(DOCS.glob("*.md")) if path != CONTRACT]


def rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


@dataclass(frozen=True)
class Parsed:
    prose: list[tuple[int, str]]  # (line number, text) outside fenced code blocks
    fenced: list[tuple[int, str]]  # (line number, text) inside fenced code blocks


def parse(path: Path) -> Parsed:
    prose: list[tuple[int, str]] = []
    fenced: list[tuple[int, str]] = []
    fence: str | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
        elif fence is not None and match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence):
            fence = None
        elif fence is not None:
            fenced.append((number, line))
        else:
            prose.append((number, line))
    return Parsed(prose, fenced)


def paragraphs(lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """Runs of adjacent non-blank prose lines, joined, so that a code span or link broken over two lines is one."""
    start = 0
    chunk: list[str] = []
    for number, line in [*lines, (0, "")]:
        if line.strip() and (not chunk or number == start + len(chunk)):
            start = number if not chunk else start
            chunk.append(line)
            continue
        if chunk:
            yield start, "\n".join(chunk)
        start, chunk = number, ([line] if line.strip() else [])


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation but - and _ dropped, each space a -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found: set[str] = set()
    for _, line in parse(path).prose:
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def code_texts(path: Path) -> Iterator[tuple[int, str]]:
    """Every code line: each line of a fenced block, and each inline code span of the prose."""
    parsed = parse(path)
    yield from parsed.fenced
    for number, paragraph in paragraphs(parsed.prose):
        for match in CODE_SPAN.finditer(paragraph):
            yield number + paragraph.count("\n", 0, match.start()), match.group(2).replace("\n", " ")


def links(path: Path) -> Iterator[tuple[int, str]]:
    for number, paragraph in paragraphs(parse(path).prose):
        # Code spans hold no links, but a link's text may be a code span: blank the span, keep its place.
        text = CODE_SPAN.sub(
            lambda m: "x" * len(m.group(0).replace("\n", "")) + "\n" * m.group(0).count("\n"), paragraph
        )
        for match in LINK.finditer(text):
            yield number + text.count("\n", 0, match.start()), match.group(1)


def broken_links() -> list[str]:
    broken: list[str] = []
    for page in pages():
        for number, target in links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            where = f"{rel(page)}:{number}: {target}"
            file_part, _, anchor = target.partition("#")
            dest = (page.parent / file_part).resolve() if file_part else page
            if ROOT not in dest.parents and dest != ROOT:
                broken.append(f"{where} (outside the repository)")
            elif not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
                broken.append(f"{where} (no heading #{anchor} in {rel(dest)})")
    return broken


def makefile_targets() -> set[str]:
    targets: set[str] = set()
    for line in (ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\- ]+?)\s*::?(?!=)", line)
        if match:
            targets.update(name for name in match.group(1).split() if not name.startswith("."))
    return targets


def subcommands() -> dict[str, set[str]]:
    """The real CLI: each subcommand of `authsvc` with its option strings; '' holds the top-level options."""
    parser = build_parser()
    found = {"": {opt for action in parser._actions for opt in action.option_strings}}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = set(sub._option_string_actions)
    return found


def table_rows(section: str) -> list[list[str]]:
    """The cells of each row of the tables in ``section``, header rows included, stripped."""
    rows = [row for row in section.splitlines() if row.startswith("| ") and not row.startswith("| ---")]
    return [[cell.strip() for cell in row.split("|")[1:-1]] for row in rows]


def table_first_cells(section: str) -> list[str]:
    return [row[0] for row in table_rows(section)]


def contract_section(title: str) -> str:
    text = CONTRACT.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.M | re.S)
    assert match, f"docs/design.md has no section '## {title}'"
    return match.group(1)


def contract_setting_rows() -> list[list[str]]:
    """The rows of the contract's settings table (name, default, meaning), without its header."""
    return table_rows(contract_section("Settings"))[1:]


def contract_settings() -> list[str]:
    names: list[str] = []
    for row in contract_setting_rows():
        names += re.findall(r"`([A-Z][A-Z0-9_]+)`", row[0])
    return names


def contract_reasons() -> list[str]:
    match = re.search(r"ErrorInfo` detail \(domain\s+`authsvc`, a reason:(.*?)\):", contract_section("gRPC API"), re.S)
    assert match, (
        "docs/design.md's gRPC API no longer lists the ErrorInfo reasons as '(domain `authsvc`, a reason: …):'"
    )
    return re.findall(r"`([A-Z][A-Z0-9_]+)`", match.group(1))


def contract_metrics() -> list[str]:
    names = set(re.findall(r"\b((?:authsvc|grpc_server)_[a-z0-9_]+)", CONTRACT.read_text(encoding="utf-8")))
    # authsvc_client is the client package, not a metric: drop every name that is an importable module.
    return sorted(name for name in names if importlib.util.find_spec(name) is None)


def missing_from_guides(names: list[str]) -> list[str]:
    text = "\n".join(path.read_text(encoding="utf-8") for path in guides())
    return [name for name in names if not re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text)]


def test_every_relative_link_and_anchor_resolves() -> None:
    assert sum(1 for page in pages() for _ in links(page)) > 50, "the link parser found almost no links"
    broken = broken_links()
    assert not broken, "broken links and anchors:\n" + "\n".join(broken)


def test_slugs_follow_githubs_rules() -> None:
    assert slug("Availability: outages, failovers, rollouts") == "availability-outages-failovers-rollouts"
    assert slug("`authsvc sync`") == "authsvc-sync"
    assert slug("Compose: the production shape on one machine") == "compose-the-production-shape-on-one-machine"
    assert slug("Step-up for SetRole") == "step-up-for-setrole"
    assert slug("AUTHSVC_DRAIN_S and the 5 s grace") == "authsvc_drain_s-and-the-5-s-grace"


def test_every_make_target_shown_exists() -> None:
    targets = makefile_targets()
    assert {"install", "run", "test", "check", "proto", "bench", "deploy-check"} <= targets
    shown = [
        (f"{rel(page)}:{number}", match.group(1))
        for page in pages()
        for number, code in code_texts(page)
        for match in MAKE.finditer(code)
    ]
    assert len(shown) > 10, "the make parser found almost no make commands"
    unknown = [f"{where}: make {target}" for where, target in shown if target not in targets]
    assert not unknown, "make targets the Makefile does not define:\n" + "\n".join(unknown)


def test_every_authsvc_command_and_option_shown_exists() -> None:
    commands = subcommands()
    assert {"grpc", "webhook", "dev", "dev-token", "dev-webhook", "sync"} <= commands.keys()
    offenders: list[str] = []
    shown = 0
    for page in pages():
        for number, code in code_texts(page):
            for match in AUTHSVC.finditer(code):
                shown += 1
                word, rest = match.group(1), match.group(2)
                where = f"{rel(page)}:{number}: authsvc {word}{rest.rstrip()}"
                if word.startswith("--"):
                    if word not in commands[""]:
                        offenders.append(f"{where} (no option {word})")
                elif word not in commands:
                    offenders.append(f"{where} (no command {word})")
                else:
                    offenders += [
                        f"{where} (no option {opt})" for opt in OPTION.findall(rest) if opt not in commands[word]
                    ]
    assert shown > 20, "the command parser found almost no authsvc commands"
    assert not offenders, "authsvc commands or options the CLI does not have:\n" + "\n".join(offenders)


def test_every_setting_reason_and_metric_of_the_contract_is_in_a_guide() -> None:
    settings, reasons, metrics = contract_settings(), contract_reasons(), contract_metrics()
    # Parsed from the contract, never listed here: sizes guard against a parser that finds nothing.
    assert len(settings) >= 35 and {"MONGODB_URI", "CLERK_WEBHOOK_SECRET", "AUTHSVC_LOG_RPCS"} <= set(settings)
    assert len(reasons) >= 25 and {"TOKEN_EXPIRED", "CALLER_NOT_ALLOWED"} <= set(reasons)
    assert len(metrics) >= 15 and {"authsvc_database_up", "grpc_server_handled_total"} <= set(metrics)
    assert len(guides()) >= 6
    missing = {
        "settings": missing_from_guides(settings),
        "reasons": missing_from_guides(reasons),
        "metrics": missing_from_guides(metrics),
    }
    gaps = [f"{kind}: {name}" for kind, names in missing.items() for name in names]
    assert not gaps, "named in docs/design.md but in no guide:\n" + "\n".join(gaps)


def test_the_readme_is_short_and_self_contained() -> None:
    text = README.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines, over {MAX_README_LINES}: move detail into a guide"
    assert "../shared" not in text
    for guide in guides():
        assert f"docs/{guide.name}" in text, f"README.md does not link docs/{guide.name}"
