"""Executable documentation: collect the fenced blocks of the Markdown docs, run them, check what they name.

Used by tests/test_docs.py (which explains the marker syntax); kept free of pytest so a
deliberately broken document can be fed through the same functions.

* ``collect_blocks`` parses a Markdown file with markdown-it-py and returns every fenced
  block with its language, first line and the ``<!-- docs-test: ... -->`` markers above it.
* ``reference_problems`` checks the names a document uses (imgserve subcommands and
  their flags, ``IMGSERVE_*`` variables, ``imgserve_*`` metrics, HTTP paths, imgserve.v1
  message fields, SDK dataclass fields, relative links) against a ``KnownNames``.
* ``run_block`` runs a ``bash``/``sh``/``python`` block, or the ``$ command`` lines of a
  ``console`` block compared with the output printed under them (doctest's ELLIPSIS and
  NORMALIZE_WHITESPACE rules, so ``...`` stands for varying scores).
"""
from __future__ import annotations

import doctest
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from markdown_it import MarkdownIt

SHELL_LANGS = frozenset({"bash", "sh", "shell"})
RUNNABLE_LANGS = SHELL_LANGS | {"python", "console"}
MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*([a-z-]+)\s*(.*?)\s*-->\s*$")
MARKERS = ("skip", "restart-gateway")
OUTPUT_OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language and code, and what its markers ask."""

    doc: str               # path relative to the repository root
    line: int              # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None = None          # the reason, when marked "skip"
    restart_gateway: bool = False

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.lang in RUNNABLE_LANGS and self.skip is None


@dataclass(frozen=True)
class Doc:
    path: str              # relative to the repository root
    text: str
    blocks: tuple[Block, ...]
    inline_code: tuple[str, ...]     # `code spans` of the prose
    problems: tuple[str, ...] = ()   # malformed markers


def parse_doc(text: str, rel_path: str) -> Doc:
    """Blocks (with markers) and inline code spans of one Markdown text."""
    tokens = MarkdownIt("commonmark").parse(text)
    lines = text.splitlines()
    blocks, inline, problems = [], [], []
    for token in tokens:
        if token.type == "inline":
            inline += [child.content for child in token.children or () if child.type == "code_inline"]
        if token.type not in ("fence", "code_block") or token.map is None:
            continue
        start = token.map[0]
        markers: dict[str, str] = {}
        above = start - 1
        while above >= 0 and (not lines[above].strip() or MARKER.match(lines[above])):
            match = MARKER.match(lines[above])
            if match:
                if match.group(1) not in MARKERS:
                    problems.append(f"{rel_path}:{above + 1}: unknown docs-test marker {match.group(1)!r} "
                                    f"(known: {', '.join(MARKERS)})")
                elif match.group(1) == "skip" and not match.group(2):
                    problems.append(f"{rel_path}:{above + 1}: a skip marker must say why")
                markers[match.group(1)] = match.group(2)
            above -= 1
        lang = token.info.split()[0].lower() if token.type == "fence" and token.info.strip() else ""
        blocks.append(Block(rel_path, start + 1, lang, token.content, markers.get("skip"),
                            "restart-gateway" in markers))
    return Doc(rel_path, text, tuple(blocks), tuple(inline), tuple(problems))


def load_docs(root: Path, paths: Iterable[Path]) -> list[Doc]:
    return [parse_doc(p.read_text(), p.relative_to(root).as_posix()) for p in paths]


# ---------------------------------------------------------------- names the docs may use

@dataclass
class KnownNames:
    """What exists, to check documented names against."""

    commands: Mapping[str, frozenset[str]]          # imgserve subcommand -> its --flags
    env_vars: frozenset[str]
    metrics: frozenset[str]                         # metric family names (counters without _total)
    http_paths: Sequence[str]                       # route templates such as /v2/models/{model}/ready
    messages: Mapping[str, frozenset[str]]          # imgserve.v1 message -> field names
    dataclasses: Mapping[str, frozenset[str]]       # SDK result type -> field names
    top_level_flags: frozenset[str] = frozenset({"--version", "--help", "-h", "-V"})
    foreign_flags: frozenset[str] = frozenset()     # flags of other tools that prose may name

    @property
    def all_flags(self) -> frozenset[str]:
        return frozenset().union(*self.commands.values()) | self.top_level_flags


METRIC_SUFFIXES = ("", "_total", "_bucket", "_sum", "_count", "_created")
_ENV = re.compile(r"\bIMGSERVE_[A-Z0-9_]*[A-Z0-9]\b")
_METRIC = re.compile(r"\bimgserve_[a-z_]*[a-z]\b(?![\w<])")
_FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
_INVOCATION = re.compile(r"(?:^|[\s;(&|`\"'])(?:[\w./-]*/)?imgserve\s+(--?[a-zA-Z][\w-]*|[a-z][a-z-]*)(.*)$")
# URLs of a gateway (other sites' URLs are not ours to check)
_URL_PATH = re.compile(r"https?://(?:localhost|127\.0\.0\.1|0\.0\.0\.0|host|HOST)?(?::\w+)?(/[^\s`'\"<>)]*)")
_BARE_PATH = re.compile(r"(?<![\w.:/-])(/(?:v1|v2|metrics|healthz|readyz|openapi\.json)(?![\w.])[^\s`'\"<>),|]*)")
_MESSAGE_FIELDS = re.compile(r"\b([A-Z]\w+)\{([^{}]*)\}")
_DATACLASS_FIELDS = re.compile(r"\b([A-Z]\w+)\(([^()]*)\)")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _logical_lines(text: str) -> list[str]:
    """Lines with shell continuations (trailing backslash) joined."""
    return text.replace("\\\n", " ").splitlines()


def _command_text(block: Block) -> str:
    """The text of a block that holds commands or code (a console block's output lines excluded)."""
    if block.lang != "console":
        return block.code
    return "\n".join(cmd for cmd, _ in console_steps(block.code))


def invocations(text: str) -> list[tuple[str, list[str]]]:
    """(subcommand, --flags) of every ``imgserve SUBCOMMAND ...`` in ``text``."""
    found = []
    for line in _logical_lines(text):
        line = re.sub(r"(?:-n|--namespace)(?:\s+|=)imgserve\b", "-n NAMESPACE", line)  # kubectl's namespace
        match = _INVOCATION.search(line)
        if not match:
            continue
        rest = re.split(r"\s#\s|&&|;|\$\(", match.group(2))[0]
        found.append((match.group(1), _FLAG.findall(rest)))
    return found


def http_paths_in(text: str) -> list[str]:
    paths = [m.group(1) for m in _URL_PATH.finditer(text)]
    paths += [m.group(1) for m in _BARE_PATH.finditer(text)]
    return [p.rstrip(".,:;") for p in paths]


def _expand_optional(path: str) -> list[str]:
    """``/a[/b]/c`` -> ``/a/c`` and ``/a/b/c``."""
    match = re.search(r"\[([^\[\]]*)\]", path)
    if not match:
        return [path]
    head, tail = path[:match.start()], path[match.end():]
    return _expand_optional(head + tail) + _expand_optional(head + match.group(1) + tail)


def _route_matches(path: str, templates: Sequence[str]) -> bool:
    concrete = re.sub(r"\{[^}]*\}", "x", path.split("?")[0]).rstrip("/") or "/"
    if concrete in ("/v1", "/v2") and any(t.startswith(concrete + "/") for t in templates):
        return True  # the API's prefix, named on its own
    for template in templates:
        pattern = "^" + re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, concrete):
            return True
    return False


def reference_problems(doc: Doc, known: KnownNames, root: Path) -> list[str]:
    """Every name in ``doc`` that does not exist (one line each, with the document's path)."""
    problems = list(doc.problems)
    where = doc.path
    code_texts = [_command_text(b) for b in doc.blocks]
    everything = doc.text

    # imgserve subcommands and their flags, in code blocks and in inline code
    for text in [*code_texts, *doc.inline_code]:
        for command, flags in invocations(text):
            if command.startswith("-"):
                if command not in known.top_level_flags:
                    problems.append(f"{where}: `imgserve {command}`: no such option of imgserve")
                continue
            if command not in known.commands:
                problems.append(f"{where}: `imgserve {command}`: no such subcommand "
                                f"(known: {', '.join(sorted(known.commands))})")
                continue
            for flag in flags:
                if flag not in known.commands[command] | {"--help"}:
                    problems.append(f"{where}: `imgserve {command} {flag}`: no such flag")
    # a flag named on its own in the prose must belong to some command
    for span in doc.inline_code:
        if span.startswith("--") and not _INVOCATION.search(span):
            flag = _FLAG.match(span)
            if flag and flag.group(1) not in known.all_flags | known.foreign_flags:
                problems.append(f"{where}: `{flag.group(1)}` is no flag of any imgserve command")

    for name in sorted(set(_ENV.findall(everything))):
        if name not in known.env_vars:
            problems.append(f"{where}: environment variable {name} is read nowhere")
    metric_names = {m + s for m in known.metrics for s in METRIC_SUFFIXES}
    for name in sorted(set(_METRIC.findall(everything))):
        if name not in metric_names:
            problems.append(f"{where}: metric {name} does not exist")
    for path in sorted(set(http_paths_in(everything))):
        if "..." in path:
            continue
        for variant in _expand_optional(path):
            if not _route_matches(variant, known.http_paths):
                problems.append(f"{where}: HTTP path {variant} is not served")
    for message, body in _MESSAGE_FIELDS.findall(everything):
        if message in known.messages:
            for name in (part.strip() for part in body.split(",")):
                if name and name not in known.messages[message]:
                    problems.append(f"{where}: {message} has no field {name!r}")
    for cls, body in _DATACLASS_FIELDS.findall(everything):
        if cls in known.dataclasses:
            for part in body.split(","):
                name = part.split("=")[0].strip()
                if re.fullmatch(r"[a-z_]+", name) and name not in known.dataclasses[cls]:
                    problems.append(f"{where}: {cls} has no field {name!r}")
    problems += _field_table_problems(doc, known)
    for target in _LINK.findall(everything):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (root / Path(doc.path).parent / target.split("#")[0]).exists():
            problems.append(f"{where}: link target {target} does not exist")
    return problems


def _field_table_problems(doc: Doc, known: KnownNames) -> list[str]:
    """A table right under a line that is only `MessageName` lists that message's fields."""
    problems = []
    lines = doc.text.splitlines()
    for i, line in enumerate(lines):
        match = re.fullmatch(r"`(\w+)`", line.strip())
        if not match or match.group(1) not in known.messages:
            continue
        for row in lines[i + 1:]:
            if not row.strip():
                if any(r.strip().startswith("|") for r in lines[i + 1:i + 3]):
                    continue
                break
            if not row.strip().startswith("|"):
                break
            cell = re.match(r"\|\s*`(\w+)`", row.strip())
            if cell and cell.group(1) not in known.messages[match.group(1)]:
                problems.append(f"{doc.path}: {match.group(1)} has no field {cell.group(1)!r}")
    return problems


# ---------------------------------------------------------------- running blocks

@dataclass
class Sandbox:
    """Where blocks run: a working directory, the environment, and text substitutions.

    ``substitutions`` map documented addresses (localhost:8500) to the test gateway's.
    """

    cwd: Path
    env: dict[str, str]
    substitutions: dict[str, str] = field(default_factory=dict)

    def localize(self, text: str) -> str:
        for old, new in self.substitutions.items():
            text = text.replace(old, new)
        return text


def console_steps(code: str) -> list[tuple[str, str]]:
    """(command, expected output) pairs of a console block: ``$ cmd`` lines and what follows them."""
    steps: list[tuple[str, list[str]]] = []
    continuing = False
    for line in code.splitlines():
        if line.startswith("$ ") or (continuing and steps):
            if continuing:
                steps[-1] = (steps[-1][0] + "\n" + line, steps[-1][1])
            else:
                steps.append((line[2:], []))
            continuing = line.endswith("\\")
        elif steps:
            steps[-1][1].append(line)
    return [(cmd, "\n".join(out).strip("\n") + "\n" if any(o.strip() for o in out) else "")
            for cmd, out in steps]


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_block(block: Block, sandbox: Sandbox, timeout_s: float) -> list[str]:
    """Run one block; the problems found (empty when it worked and printed what the doc says)."""
    code = sandbox.localize(block.code)
    if block.lang in SHELL_LANGS:
        return _expect_success(block, ["bash", "-euo", "pipefail", "-c", code], sandbox, timeout_s)
    if block.lang == "python":
        return _expect_success(block, [sys.executable, "-c", code], sandbox, timeout_s)
    if block.lang == "console":
        problems = []
        for command, want in console_steps(code):
            got = _run(["bash", "-o", "pipefail", "-c", command], sandbox, timeout_s, merge_stderr=True)
            if isinstance(got, str):
                problems.append(f"{block.id}: `{command}` {got}")
                continue
            if want and not doctest.OutputChecker().check_output(want, got.stdout, OUTPUT_OPTIONS):
                problems.append(f"{block.id}: `{command}` printed\n{got.stdout}\nbut the doc shows\n{want}")
        return problems
    return []


def _run(argv: list[str], sandbox: Sandbox, timeout_s: float,
         merge_stderr: bool = False) -> subprocess.CompletedProcess[str] | str:
    try:
        return subprocess.run(argv, cwd=sandbox.cwd, env=sandbox.env, text=True, timeout=timeout_s,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"did not finish within {timeout_s:.0f} s"


def _expect_success(block: Block, argv: list[str], sandbox: Sandbox, timeout_s: float) -> list[str]:
    result = _run(argv, sandbox, timeout_s)
    if isinstance(result, str):
        return [f"{block.id}: {result}"]
    if result.returncode != 0:
        return [f"{block.id}: exited {result.returncode}\n--- stdout\n{_tail(result.stdout)}\n"
                f"--- stderr\n{_tail(result.stderr)}"]
    return []
