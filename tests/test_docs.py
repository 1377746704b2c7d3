"""The documentation is executable: every command a reader may paste is run here (issue #12).

What is collected: every fenced block of README.md, docs/**/*.md, model_repository/README.md
and examples/images/README.md (tests/doccheck.py parses them with markdown-it-py).

What runs, in document order, each in the same sandbox:

* ``bash``/``sh``/``shell`` blocks run with ``bash -euo pipefail``; they pass when they exit 0;
* ``python`` blocks run with the venv's interpreter; they pass when they exit 0;
* ``console`` blocks hold ``$ command`` lines, each followed by the output it prints
  (stdout and stderr); the output must match, with doctest's rules: ``...`` matches
  anything (use it for scores) and runs of whitespace compare equal;
* other languages (yaml, proto, text, ...) are not run, but their names are checked.

Markers: an HTML comment on the line(s) right above a fence (GitHub does not show it):

* ``<!-- docs-test: skip REASON -->``: not run here, because it needs more than this test
  has: a GPU, a cluster, network access, minutes of training, or it starts a long-running
  server (the test runs its own gateway). The reason is required and shows in the report.
* ``<!-- docs-test: restart-gateway -->``: restart the test's gateway before this block,
  as the reader restarts theirs: a model exported while the gateway runs is served after
  a restart (docs/repository-format.md).

The sandbox stands for the repository root after ``make run``: a scratch directory with
links to the checkout's examples/, configs/, docs/, ... , ``.venv`` linked to the running
virtual environment, and ``model_repository/`` and ``runs/`` copies of what ``make run``
builds (the ``default_repository`` fixture and the training runs next to it). So commands written for the
repository root run verbatim, and what they write never touches the checkout. ``PATH``
starts with the venv's ``bin`` (what ``source .venv/bin/activate`` does). One gateway
serves the sandbox's ``model_repository/``; the documented addresses ``localhost:8500``
and ``localhost:8080`` are rewritten to its ports, and ``IMGSERVE_SERVER`` points the
client commands' default at it.

Besides running blocks, every document's names are checked against the code
(doccheck.reference_problems): imgserve subcommands and flags, ``IMGSERVE_*`` variables,
``imgserve_*`` metrics, HTTP paths, imgserve.v1 message fields and SDK result fields,
and relative links. ``test_the_checks_fail_on_a_broken_doc`` proves each check can fail.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from doccheck import Block, Doc, KnownNames, Sandbox, load_docs, parse_doc, reference_problems, run_block
from procs import GatewayProcess, run_gateway

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), ROOT / "model_repository" / "README.md",
                    ROOT / "examples" / "images" / "README.md"])
# What the sandbox links from the checkout (read-only use; model_repository/ is a copy instead).
LINKED = ("examples", "configs", "docs", "export", "serving", "clients", "scripts", "benchmarks", "k8s",
          "pyproject.toml", "Makefile", "README.md")
BLOCK_TIMEOUT_S = 300.0
# Flags of other programs that the prose names in `code`: tritonserver's (docs/triton.md) and the
# experiment scripts' (python -m export.experiments.*, docs/experiments/README.md).
FOREIGN_FLAGS = frozenset({"--exit-timeout-secs", "--backend-directory", "--backend-config", "--shm-size", "--arch",
                           "--build-arg", "--model-control-mode", "--load-model",   # buildah's and Triton's
                           "--soak", "--only"})   # benchmarks/reliability/figures.py (docs/reliability.md)


def adapter_metric_names() -> frozenset[str]:
    """The custom metrics prometheus-adapter derives from ours (k8s/monitoring): docs may name them too."""
    values = yaml.safe_load((ROOT / "k8s" / "monitoring" / "prometheus-adapter-values.yaml").read_text())
    names = set()
    for rule in values.get("rules", {}).get("custom", []):
        alias = rule.get("name", {}).get("as")
        if alias:
            names.add(alias)
    return frozenset(names)
# Subcommands whose flags live under a sub-subcommand.
EXTRA_HELP_ARGV = {"make-dataset": (["shapes", "--help"], ["scenes", "--help"]), "bench": (["--compare", "--help"],),
                   "train": (["--task", "detection", "--help"], ["--task", "segmentation", "--help"])}

DOCS: list[Doc] = load_docs(ROOT, DOC_FILES)
BLOCKS: list[Block] = [b for d in DOCS for b in d.blocks if b.lang in ("bash", "sh", "shell", "python", "console")]


# ---------------------------------------------------------------- what exists

def command_flags(name: str, module_name: str) -> frozenset[str]:
    """The --flags in ``imgserve NAME --help`` (the command's own argparse help, run in-process)."""
    import importlib

    module = importlib.import_module(module_name)
    text = io.StringIO()
    for argv in (["--help"], *EXTRA_HELP_ARGV.get(name, ())):
        with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
            module.main(list(argv))
    return frozenset(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text.getvalue()))


def env_vars_read() -> frozenset[str]:
    """IMGSERVE_* names the code reads: every Settings field, and literal names in the sources."""
    from serving.settings import ENV_PREFIX, Settings

    names = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    sources = [*ROOT.glob("serving/**/*.py"), *ROOT.glob("clients/**/*.py"), *ROOT.glob("export/**/*.py"),
               *ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.sh"), ROOT / "tests" / "conftest.py",
               ROOT / "tests" / "test_fuzz.py",
               ROOT / "Makefile"]
    for path in sources:
        names |= set(re.findall(r"\bIMGSERVE_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    return frozenset(names)


@pytest.fixture(scope="module")
def known() -> KnownNames:
    from clients import types
    from clients.cli import COMMANDS
    from clients.proto.imgserve.v1 import imgserve_pb2 as pb
    from serving.metrics import Metrics
    from serving.transports.openapi import build_openapi

    return KnownNames(
        commands={name: command_flags(name, module) for name, (module, _) in COMMANDS.items()},
        env_vars=env_vars_read(),
        metrics=frozenset(family.name for family in Metrics().registry.collect()) | adapter_metric_names(),
        http_paths=list(build_openapi("test")["paths"]),
        messages={name: frozenset(f.name for f in desc.fields)
                  for name, desc in pb.DESCRIPTOR.message_types_by_name.items()},
        dataclasses={cls.__name__: frozenset(f.name for f in dataclasses.fields(cls))
                     for cls in (types.ModelInfo, types.ClassifyResult, types.Prediction)},
        foreign_flags=FOREIGN_FLAGS,
    )


# ---------------------------------------------------------------- the sandbox and its gateway

class DocsGateway:
    """The one gateway the blocks talk to; ``restart`` stands in for the reader restarting theirs."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self._stack = ExitStack()
        self.process: GatewayProcess | None = None

    def start(self) -> None:
        self.process = self._stack.enter_context(run_gateway(self.repo, extra_args=["--backend-threads", "1"]))

    def restart(self) -> None:
        self.close()
        self.start()

    def close(self) -> None:
        self._stack.close()
        self._stack = ExitStack()
        self.process = None


@pytest.fixture(scope="module")
def sandbox_dir(default_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("docs_sandbox")
    for name in LINKED:
        (root / name).symlink_to(ROOT / name)
    (root / ".venv").symlink_to(Path(sys.executable).parent.parent)
    shutil.copytree(default_repository, root / "model_repository")
    runs = default_repository.parent / "runs"  # build-repo's training runs, next to the repository
    if runs.is_dir():
        shutil.copytree(runs, root / "runs")
    return root


@pytest.fixture(scope="module")
def docs_gateway(sandbox_dir: Path) -> Iterator[DocsGateway]:
    gateway = DocsGateway(sandbox_dir / "model_repository")
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.close()


def sandbox_for(sandbox_dir: Path, gateway: GatewayProcess) -> Sandbox:
    grpc_target = gateway.grpc_target
    http_hostport = gateway.http_url.removeprefix("http://")
    env = {**os.environ,
           "PATH": f"{sandbox_dir / '.venv' / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "IMGSERVE_SERVER": grpc_target,
           "PYTHONUNBUFFERED": "1",
           "TQDM_DISABLE": "1"}
    return Sandbox(cwd=sandbox_dir, env=env,
                   substitutions={"localhost:8500": grpc_target, "localhost:8080": http_hostport})


# ---------------------------------------------------------------- the tests

@pytest.mark.slow
@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block_runs_as_documented(block: Block, sandbox_dir: Path, docs_gateway: DocsGateway) -> None:
    if block.skip is not None:
        pytest.skip(f"marked in the doc: {block.skip}")
    if block.restart_gateway:
        docs_gateway.restart()
    assert docs_gateway.process is not None
    problems = run_block(block, sandbox_for(sandbox_dir, docs_gateway.process), BLOCK_TIMEOUT_S)
    assert not problems, "\n\n".join(problems)


@pytest.mark.parametrize("doc", DOCS, ids=[d.path for d in DOCS])
def test_doc_names_exist(doc: Doc, known: KnownNames) -> None:
    problems = reference_problems(doc, known, ROOT)
    assert not problems, "\n".join(problems)


def test_every_default_model_is_documented() -> None:
    """model_repository/README.md lists every model build-repo makes (docs may list more to come)."""
    from export.build_repo import DEFAULT_BUILDERS

    text = (ROOT / "model_repository" / "README.md").read_text()
    missing = [b.name for b in DEFAULT_BUILDERS if f"`{b.name}`" not in text]
    assert not missing, f"model_repository/README.md does not describe {missing}"


BROKEN_DOC = '''# A broken page

Run `imgserve classify --no-such-flag x.png` or `imgserve frobnicate`, set `IMGSERVE_NO_SUCH_VAR`,
watch `imgserve_no_such_metric`, call `/v1/nothing` and read `ModelInfo{name, colour}` or
`Prediction(index, confidence)`. See [the guide](no-such-guide.md). `--no-such-anything` too.

`ClassifyRequest`

| field | meaning |
|---|---|
| `model` | fine |
| `imagez` | misspelt |

```bash
echo "this block fails"; exit 3
```

```console
$ echo hello
goodbye
```

<!-- docs-test: sometimes -->
```python
print("fine")
```
'''
FIXED_DOC = '''# A good page

Run `imgserve classify --top-k 3 x.png` with `IMGSERVE_GRPC_PORT` set, watch
`imgserve_batch_size_bucket` and `/v2/models/{m}[/versions/{v}]/ready`, read `ModelInfo{name, description}`.

```bash
echo "this block works"
```

```console
$ echo "score 0.987"
score ...
```

<!-- docs-test: skip needs a GPU -->
```bash
exit 1
```
'''


@pytest.fixture()
def broken_doc(tmp_path: Path) -> Doc:
    """A page with one mistake of every kind the docs test looks for."""
    return parse_doc(BROKEN_DOC, "broken.md")


def test_the_checks_fail_on_a_broken_doc(broken_doc: Doc, known: KnownNames, tmp_path: Path) -> None:
    problems = "\n".join(reference_problems(broken_doc, known, tmp_path))
    for fragment in ("--no-such-flag", "frobnicate", "IMGSERVE_NO_SUCH_VAR", "imgserve_no_such_metric",
                     "/v1/nothing", "'colour'", "'confidence'", "no-such-guide.md", "`--no-such-anything`",
                     "'imagez'", "unknown docs-test marker 'sometimes'"):
        assert fragment in problems, f"{fragment!r} not reported in:\n{problems}"
    sandbox = Sandbox(cwd=tmp_path, env=dict(os.environ))
    failing, mismatched, fine = [b for b in broken_doc.blocks if b.lang in ("bash", "console", "python")]
    assert "exited 3" in "\n".join(run_block(failing, sandbox, 30))
    assert "goodbye" in "\n".join(run_block(mismatched, sandbox, 30))
    assert run_block(fine, sandbox, 30) == []


def test_the_checks_pass_a_correct_doc(known: KnownNames, tmp_path: Path) -> None:
    doc = parse_doc(FIXED_DOC, "fixed.md")
    assert reference_problems(doc, known, tmp_path) == []
    sandbox = Sandbox(cwd=tmp_path, env=dict(os.environ))
    runnable = [b for b in doc.blocks if b.runnable]
    assert len(runnable) == 2 and [b.skip for b in doc.blocks] == [None, None, "needs a GPU"]
    assert [run_block(b, sandbox, 30) for b in runnable] == [[], []]
