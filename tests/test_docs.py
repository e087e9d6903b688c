"""The README and the docs say what is true: every command and code block of README.md and
docs/getting-started.md runs, the command pages' option tables equal the parser, and the README's
links into docs/ resolve.

The blocks run in order, the README's first, in one fresh directory that links the repository's
tracked top-level files (so `configs/example.yaml` is where a reader in the repository root finds
it), with a fresh FASTSAE_CACHE: the embedded model is pretrained once, as on a new machine. Shell
lines run through bash; a Python block runs in a fresh interpreter. The commands run at small
sizes where this file knows how (SHRINK below); what is not run is skipped with its reason, never
dropped:

- `pip install A && B` runs B: the tests run where the package and its extras are installed;
  a lone `pip install` line is skipped for that reason, and `python -m pytest` (this suite) too.
- `<!-- docs-test: skip REASON -->` on the line before a fence skips the block with REASON (a
  GPU, the hub); `<!-- docs-test: full-size REASON -->` runs it as written, unshrunk.
- A command (or Python block) that already ran, word for word, in the same directory is not run
  again: the getting-started page repeats the README's examples on purpose.
- Every fence names its language: bash and python blocks run, text blocks are not commands.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUN_FILES = ["README.md", "docs/getting-started.md"]
SHELL, PYTHON, NOT_RUN = {"bash", "sh", "shell"}, {"python"}, {"text", "yaml", "json", "toml"}
FENCE = re.compile(r"^(?P<indent> *)```(?P<language>[^`\s]*)\s*$")
MARKER = re.compile(r"^<!-- docs-test: (?P<directive>[\w-]+)(?: (?P<reason>.*?))? -->$")
DIRECTIVES = ("skip", "full-size")
README_MAX_LINES = 200

# What CI shrinks, per fastsae command: training to 32,768 tokens (16 steps of the embedded
# presets) with a 2,048-token eval; the passes over held-out tokens to 4,096 tokens.
# A fine-tune's budget is a share of its source's (already shrunk) tokens: only its evals shrink.
TRAIN_OVERRIDES = {"optim.n_tokens": "32768", "eval.n_tokens": "2048"}
FINETUNE_OVERRIDES = {"eval.n_tokens": "2048"}
MAX_TOKENS = 4096
SHRINK = {"train": TRAIN_OVERRIDES, "sweep": TRAIN_OVERRIDES, "finetune": FINETUNE_OVERRIDES, "eval": "tokens",
          "analyze": "tokens", "dashboard": "tokens"}
SHELL_SYNTAX = {"|", "||", "&&", ";", ">", ">>", "<", "&"}
COMMAND_TIMEOUT_S = 900


@dataclasses.dataclass(frozen=True)
class Block:
    file: str
    line: int          # of the opening fence, 1-based
    language: str
    code: str
    directive: str | None = None
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class Step:
    """One thing to run: a shell command (a line, with its continuations) or a Python block."""
    block: Block
    line: int
    text: str

    @property
    def id(self) -> str:
        first = re.sub(r"\s+#.*$", "", self.text.strip().splitlines()[0])  # without its comment
        return f"{self.block.file}:{self.line}:{first[:60].strip()}"


def parse(relative: str) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a Markdown file, and what is wrong with its fences and markers."""
    lines = (ROOT / relative).read_text().splitlines()
    blocks, problems = [], []
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line.strip())
        if line.strip().startswith("<!-- docs-test"):
            if not marker or marker["directive"] not in DIRECTIVES or not marker["reason"]:
                problems.append(f"{relative}:{i + 1}: not a docs-test marker: {line.strip()!r} (expected "
                                f"<!-- docs-test: skip|full-size REASON -->)")
            elif i + 1 >= len(lines) or not FENCE.match(lines[i + 1]):
                problems.append(f"{relative}:{i + 1}: a docs-test marker must stand on the line before a fence")
        fence = FENCE.match(line)
        if not fence:
            i += 1
            continue
        start, language = i, fence["language"]
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            problems.append(f"{relative}:{i + 1}: a fence that never closes")
            break
        code = "\n".join(line[len(fence["indent"]):] for line in lines[start + 1:end])
        if language not in SHELL | PYTHON | NOT_RUN:
            problems.append(f"{relative}:{start + 1}: fence language {language!r}: name one of "
                            f"{sorted(SHELL | PYTHON | NOT_RUN)}, so the test knows whether it runs")
        previous = MARKER.match(lines[start - 1].strip()) if start else None
        blocks.append(Block(relative, start + 1, language, code, previous and previous["directive"],
                            previous and previous["reason"]))
        i = end + 1
    return blocks, problems


def steps(relative: str) -> list[Step]:
    out = []
    for block in parse(relative)[0]:
        if block.language in PYTHON:
            out.append(Step(block, block.line, block.code))
        elif block.language in SHELL:
            pending, first = "", None
            for offset, line in enumerate(block.code.splitlines(), start=1):
                if not pending and (not line.strip() or line.lstrip().startswith("#")):
                    continue
                first = first if pending else block.line + offset
                if line.rstrip().endswith("\\"):
                    pending += line.rstrip()[:-1] + " "
                    continue
                out.append(Step(block, first, pending + line))
                pending = ""
    return out


STEPS = [step for relative in RUN_FILES for step in steps(relative)]


# ------------------------------------------------------------------------------------ what to run

def fastsae_command(words: list[str]) -> int | None:
    """Index of the fastsae subcommand in words (after env assignments, `python -m`, `torchrun ... -m`)."""
    i = 0
    while i < len(words) and re.match(r"^[A-Za-z_]\w*=", words[i]):
        i += 1
    if words[i:i + 1] == ["fastsae"]:
        return i + 1
    for j in range(i, len(words) - 1):
        if words[j] == "-m" and words[j + 1] == "fastsae" and words[i] in ("python", "python3", "torchrun"):
            return j + 2
    return None


def shrink(command: str) -> str:
    """command at CI's sizes, where it is a plain fastsae command this file knows (SHRINK)."""
    words = shlex.split(command, comments=True)
    at = fastsae_command(words)
    if at is None or at >= len(words) or words[at] not in SHRINK or SHELL_SYNTAX & set(words):
        return command
    if isinstance(SHRINK[words[at]], dict):
        set_keys = {words[i + 1].split("=", 1)[0] for i, word in enumerate(words[:-1]) if word == "--set"}
        for key, value in SHRINK[words[at]].items():
            if key not in set_keys:
                words += ["--set", f"{key}={value}"]
    elif "--tokens" in words:
        i = words.index("--tokens") + 1
        words[i] = str(min(int(words[i]), MAX_TOKENS))
    else:
        words += ["--tokens", str(MAX_TOKENS)]
    return shlex.join(words)


def plan(step: Step) -> tuple[str | None, str | None, str]:
    """(shell command or None for Python, reason to skip or None, a note on what changed)."""
    block = step.block
    if block.directive == "skip":
        return None, f"marked in {block.file}:{block.line - 1}: {block.reason}", ""
    if block.language in PYTHON:
        return None, None, ""
    command, note = step.text.strip(), ""
    installs = re.match(r"^pip install [^&|;]*&&\s*(?P<rest>.+)$", command)
    if installs:
        command, note = installs["rest"], "ran only the part after &&: the package is installed here"
    if re.match(r"^pip install\b", command):
        return command, "installs packages: this suite runs where fastsae and its dev and docs extras are installed", ""
    if shlex.split(command, comments=True) == ["python", "-m", "pytest"]:
        return command, "the test suite itself: .ci/run runs it (leg 1)", note
    if block.directive != "full-size":
        shrunk = shrink(command)
        if shrunk != command:
            note = (note + "; " if note else "") + f"ran at CI's size: {shrunk}"
            command = shrunk
    return command, None, note


# --------------------------------------------------------------------------------------- running

@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    """(the working directory, a fresh FASTSAE_CACHE, a directory for the Python blocks' scripts)."""
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = {path.split("/")[0] for path in tracked.splitlines()}
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but outputs
        names = {p.name for p in ROOT.iterdir() if not p.name.startswith(".") and p.name != "runs"}
    names -= {"fastsae", "kernels"}  # the package comes from the install, as for any user
    work = tmp_path_factory.mktemp("docs-commands")
    for name in sorted(names):
        if (ROOT / name).exists():
            (work / name).symlink_to(ROOT / name)
    return work, tmp_path_factory.mktemp("fastsae-cache"), tmp_path_factory.mktemp("python-blocks")


def environment(cache: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}  # a user's shell has none
    env.update(FASTSAE_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    return env


def run(step: Step, command: str | None, work: Path, cache: Path, scripts: Path) -> tuple[int | None, str]:
    """Run one step in work (command: its shell line as planned; None: a Python block): (exit status,
    None past COMMAND_TIMEOUT_S; the tail of its output)."""
    if command is None:
        script = scripts / f"{Path(step.block.file).stem}_{step.line}.py"
        script.write_text(step.text)
        argv = [sys.executable, str(script)]
    else:
        argv = ["bash", "-c", f"set -euo pipefail\n{command}"]
    try:
        done = subprocess.run(argv, cwd=work, env=environment(cache), capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None, f"still running after {COMMAND_TIMEOUT_S} s"
    return done.returncode, (done.stdout + done.stderr)[-4000:]


FAILED: list[str] = []   # the step that failed: later steps depend on what it should have made
RAN: dict[str, str] = {}  # command or Python block -> the step that ran it


@pytest.mark.parametrize("step", STEPS, ids=[step.id for step in STEPS])
def test_documented_command_runs(step, workspace):
    command, skip, note = plan(step)
    if skip:
        pytest.skip(skip)
    if FAILED:
        pytest.skip(f"an earlier step failed: {FAILED[0]}")
    key = step.text if command is None else command
    if key in RAN:
        pytest.skip(f"ran already, word for word, as {RAN[key]} in the same directory")
    RAN[key] = step.id
    start = time.perf_counter()
    status, output = run(step, command, *workspace)
    print(f"{step.id}: {time.perf_counter() - start:.1f} s{'; ' + note if note else ''}")
    if status != 0:
        FAILED.append(step.id)
        pytest.fail(f"{step.id} {'exited with ' + str(status) if status is not None else 'timed out'}"
                    f"{' (' + note + ')' if note else ''}:\n{output}")


# ------------------------------------------------------------------------------ the test itself

def test_the_files_give_steps_in_both_languages():
    """An empty collection would pass silently: each file gives steps, and both kinds run."""
    for relative in RUN_FILES:
        assert any(step.block.file == relative for step in STEPS), f"{relative}: no command collected"
    assert {step.block.language for step in STEPS} >= {"bash", "python"}
    runnable = [step for step in STEPS if plan(step)[1] is None]
    assert len(runnable) >= 10, f"only {len(runnable)} documented steps would run"


BROKEN_PAGE = """# A page

```bash
true
test -d runs || \\
  false
```

```python
raise SystemExit("a broken example")
```

<!-- docs-test: skip needs what this machine lacks -->
```bash
false
```

```console
$ false
```
"""


def test_a_broken_block_fails(tmp_path):
    """The collector and the runner, on a page with a good line, a broken shell line (continued over
    two lines), a broken Python block, a marked block and a fence without a known language."""
    page = tmp_path / "page.md"
    page.write_text(BROKEN_PAGE)
    blocks, problems = parse(str(page))
    assert [b.language for b in blocks] == ["bash", "python", "bash", "console"]
    assert len(problems) == 1 and "'console'" in problems[0]
    collected = steps(str(page))
    assert [" ".join(s.text.split()) for s in collected[:2]] == ["true", "test -d runs || false"]
    plans = [plan(s) for s in collected]
    assert plans[3][1] == f"marked in {page}:13: needs what this machine lacks"
    work, cache, scripts = (tmp_path / name for name in ("work", "cache", "scripts"))
    for folder in (work, cache, scripts):
        folder.mkdir()
    statuses = [run(s, command, work, cache, scripts)[0] for s, (command, _, _) in zip(collected[:3], plans)]
    assert statuses[0] == 0 and statuses[1] != 0 and statuses[2] != 0, statuses
    assert "a broken example" in run(collected[2], None, work, cache, scripts)[1]


def test_commands_are_shrunk_to_ci_sizes():
    assert shrink("fastsae train embedded --run-dir runs/e2e") == (
        "fastsae train embedded --run-dir runs/e2e --set optim.n_tokens=32768 --set eval.n_tokens=2048")
    assert shrink("fastsae train embedded --set optim.n_tokens=1000") == (
        "fastsae train embedded --set optim.n_tokens=1000 --set eval.n_tokens=2048")
    assert shrink("fastsae eval runs/e2e --tokens 8192") == "fastsae eval runs/e2e --tokens 4096"
    assert shrink("fastsae finetune runs/local --fraction 0.1") == (  # its budget: a share of the shrunk run's
        "fastsae finetune runs/local --fraction 0.1 --set eval.n_tokens=2048")
    assert shrink("python -m fastsae dashboard runs/e2e --out dash") == (
        "python -m fastsae dashboard runs/e2e --out dash --tokens 4096")
    assert shrink("fastsae plan gpt2-e2e --gpu-memory 80GB") == "fastsae plan gpt2-e2e --gpu-memory 80GB"
    assert shrink("fastsae train embedded | tee log") == "fastsae train embedded | tee log"  # a pipeline: as written


# ------------------------------------------------------------------------------ the files themselves

@pytest.mark.parametrize("relative", RUN_FILES)
def test_every_fence_names_its_language_and_every_marker_is_understood(relative):
    blocks, problems = parse(relative)
    assert blocks, f"{relative} has no code block"
    assert not problems, "\n".join(problems)


def test_the_readme_fits_on_a_screen():
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines < README_MAX_LINES, f"README.md has {lines} lines: move reference material into docs/"


def _slug(heading: str) -> str:
    """A heading's anchor as MkDocs' toc extension makes it."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    return re.sub(r"[\s]+", "-", re.sub(r"[^\w\s-]", "", text))


def test_the_readmes_links_resolve():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, "the README links nowhere"
    for link in links:
        if re.match(r"^[a-z]+://", link):
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README.md links to {link}, which does not exist"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {_slug(h) for h in headings}, f"README.md links to {link}: no such heading"


def _section(text: str, heading: str) -> str:
    return text.split(f"\n{heading}\n", 1)[1].split("\n## ", 1)[0]


def test_the_readmes_examples_are_the_docs_own():
    """The README repeats two things of the docs; they must stay the same words."""
    readme = (ROOT / "README.md").read_text()
    module_example = _section(readme, "## The module").split("```python\n", 1)[1].split("```", 1)[0]
    assert module_example in (ROOT / "docs" / "module.md").read_text(), "README's module example differs from docs/module.md"
    kinds_table = "\n".join(line for line in _section(readme, "## SAE kinds").splitlines() if line.startswith("|"))
    assert kinds_table and kinds_table in (ROOT / "docs" / "sae-kinds.md").read_text(), (
        "README's SAE-kind table differs from docs/sae-kinds.md")


# ------------------------------------------------------------------------------ the command pages

_spec = importlib.util.spec_from_file_location("cli_options", ROOT / "docs" / "cli_options.py")
cli_options = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli_options)


@pytest.mark.parametrize("page", [str(p.relative_to(ROOT)) for p in cli_options.pages()])
def test_option_tables_equal_the_parser(page):
    text = (ROOT / page).read_text()
    assert text == cli_options.render(text, page), (
        f"{page}'s option tables differ from fastsae/cli.py: run python docs/cli_options.py")


def test_every_command_has_a_page_with_its_options():
    for name in cli_options.subcommands():
        page = cli_options.PAGES / f"{name}.md"
        assert page.is_file(), f"fastsae {name} has no page: add docs/commands/{name}.md (and to mkdocs.yml's nav)"
        assert cli_options.SECTIONS.begin.format(name) in page.read_text(), (
            f"{page.name} does not show the options of {name}")
    index = (cli_options.PAGES / "index.md").read_text()
    assert cli_options.SECTIONS.begin.format("commands") in index, "docs/commands/index.md does not list the commands"
