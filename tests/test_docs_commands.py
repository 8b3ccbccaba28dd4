"""Every shell block of README.md and docs/*.md runs as pasted against a fresh embedded install.

What is run: each fenced block labelled ``bash``, ``sh`` or ``shell``, exactly as written (no
rewriting), in a clean environment whose ``PATH`` does not contain ``.venv/bin``, so the docs must
say ``.venv/bin/can`` (the one form they use). The blocks of one file run in order, in one session:
exported variables and files made by a block are there for the next blocks of the same file, as
for a reader pasting top to bottom. A block fails the test when it exits non-zero (each runs under
``set -eo pipefail``, and ``curl`` runs with ``--fail-with-body`` from the session's ``~/.curlrc``,
so an HTTP error is a failure too).

The session starts where the README's ``make run`` leaves a new operator: a fresh SQLite database
(``CHITTYCAN_VAR_DIR`` is a temporary directory, ``var/`` in the session's working directory),
migrated, with the ``make run`` quickstart done (demo tenant, ``admin`` user, ``var/demo-key.txt``),
``CHITTYCAN_MODE=dev``, no Redis. The working directory holds the repository's ``.venv``,
``examples``, ``docker`` and ``manage.py`` (symlinks); files the blocks write stay in it. When a
file's blocks name ``127.0.0.1:8080`` or ``localhost:8080`` and run ``curl``, the session runs ``can serve --port
8080`` in the background first, as ``make run`` does, inside a private network namespace
(``unshare``) so that the port is the session's own even when a real gateway runs on this machine.

Opting a block out: put an HTML comment on the line(s) just before its opening fence, with a reason:

    <!-- not-tested: needs Docker -->
    ```bash
    docker compose -f docker/compose.yaml up -d
    ```

Use it for what cannot run here (Docker, ``make``, the project's own test suite, servers that run
until stopped, real providers, Stripe, Redis tools, a third-party CLI), not to hide a command that
fails: fix the command (or the code) instead. A block that is not meant to be pasted as commands
(an output sample, a file's contents) should not be labelled ``bash``/``sh``; ``text`` or no label.
``test_shell_blocks_are_labelled_and_use_one_can_form`` checks that no unlabelled block holds
commands and that no block writes a bare ``can``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_LANGS = {"bash", "sh", "shell"}
OPT_OUT = re.compile(r"<!--\s*not-tested:\s*(?P<reason>\S.*?)\s*-->")
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[A-Za-z0-9_+-]*)\s*$")
GATEWAY = re.compile(r"(127\.0\.0\.1|localhost):8080")
LINKED = (".venv", "examples", "docker", "manage.py")
SESSION_TIMEOUT = 600
SESSION_WORKERS = 3


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    skip_reason: str | None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks_of(doc: Path) -> list[Block]:
    lines = doc.read_text(encoding="utf-8").split("\n")
    out: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith("```"):
            end += 1
        reason = None
        k = i - 1
        while k >= 0 and lines[k].strip().startswith("<!--"):
            found = OPT_OUT.search(lines[k])
            if found:
                reason = found.group("reason")
            k -= 1
        indent = len(match.group("indent"))
        body = "\n".join(line[indent:] for line in lines[i + 1 : end])
        out.append(Block(doc, i + 1, match.group("lang").lower(), body, reason))
        i = end + 1
    return out


def all_blocks() -> list[Block]:
    return [b for doc in DOCS for b in blocks_of(doc)]


COMMAND_LINE = re.compile(r"^\s*(\$ )?(\.venv/bin/can|can|curl|export|make|docker|bash) ")
BARE_CAN = re.compile(r"(^|[;&|(]\s*|\$\(\s*)can\s+[a-z]")


def test_shell_blocks_are_labelled_and_use_one_can_form() -> None:
    problems = []
    for block in all_blocks():
        lines = [ln for ln in block.text.split("\n") if not ln.lstrip().startswith("#")]
        if block.lang not in SHELL_LANGS:
            if block.lang in ("", "text", "console") and any(COMMAND_LINE.match(ln) for ln in lines):
                problems.append(f"{block.where}: commands in a block not labelled bash")
            continue
        in_container = any("docker" in ln for ln in lines)
        for ln in lines:
            code = ln.split(" #")[0]
            if BARE_CAN.search(code) and not in_container:
                problems.append(f"{block.where}: bare `can` (the docs write .venv/bin/can): {ln.strip()}")
    assert problems == []


def test_opt_outs_give_a_reason() -> None:
    for doc in DOCS:
        for n, line in enumerate(doc.read_text(encoding="utf-8").split("\n"), 1):
            if "not-tested" in line:
                assert OPT_OUT.search(line), f"{doc.relative_to(ROOT)}:{n}: write <!-- not-tested: reason -->"


LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
REPO_PATH = re.compile(
    r"`(?P<path>(?:docker|scripts|tests|examples|docs|bench|requirements|chittycan|control|gateway|budgets|ledger"
    r"|tenants|billing_export|core|templates)/[A-Za-z0-9_./*-]*)`"
)


def test_links_and_repository_paths_exist() -> None:
    """Relative links, and `dir/file` paths of this repository in backticks, point at something."""
    missing = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in LINK.finditer(text):
            target = match.group("target").split("#")[0]
            if not target or re.match(r"^[a-z]+:", target):
                continue
            if not (doc.parent / target).exists():
                missing.append(f"{doc.relative_to(ROOT)}: link to {target}")
        for match in REPO_PATH.finditer(text):
            path = match.group("path").rstrip(".")
            if "<" in path or "..." in path:
                continue
            if not list(ROOT.glob(path.rstrip("/"))):
                missing.append(f"{doc.relative_to(ROOT)}: `{path}` does not exist")
    assert missing == []


# --- running them --------------------------------------------------------------------------------


@dataclass
class Outcome:
    block: Block
    returncode: int
    output: str


@dataclass
class Session:
    doc: Path
    blocks: list[Block]
    outcomes: list[Outcome] = field(default_factory=list)
    gateway_log: str = ""


def clean_env(workdir: Path) -> dict[str, str]:
    venv_bin = str(ROOT / ".venv" / "bin")
    path = ":".join(p for p in os.environ.get("PATH", "/usr/bin:/bin").split(":") if p and p != venv_bin)
    return {
        "PATH": path,
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "CHITTYCAN_VAR_DIR": str(workdir / "var"),
        "CHITTYCAN_MODE": "dev",
        "CHITTYCAN_ADMIN_REQUIRE_OTP": "false",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """``make run``'s install, once: migrate and quickstart into a template var/ directory."""
    template = Path(tempfile.mkdtemp(prefix="chittycan-docs-template-"))
    env = clean_env(template)
    can = str(ROOT / ".venv" / "bin" / "can")
    for args in (["migrate", "--no-input", "-v", "0"], ["quickstart", "--port", "8080"]):
        res = subprocess.run(
            [can, *args], cwd=template, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert res.returncode == 0, f"can {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}"
    assert (template / "var" / "demo-key.txt").exists()
    yield template / "var"
    shutil.rmtree(template, ignore_errors=True)


def can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    res = subprocess.run(
        ["unshare", "-rn", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30, check=False
    )
    return res.returncode == 0


def session_script(session: Session, workdir: Path, gateway: bool) -> str:
    """One bash process per file: each block is sourced in it in turn, so variables (exported or
    not) and the working directory carry over as in one terminal; the first failure ends it."""
    parts = [f"cd {workdir}", "exec 2>&1"]
    if gateway:
        parts += [
            "ip link set lo up 2>/dev/null || true",
            ".venv/bin/can serve --port 8080 > gateway.log 2>&1 &",
            "GW=$!; echo $GW > gateway.pid",
            # -q: not the session's ~/.curlrc (its fail-with-body excludes -f)
            "health() { curl -q -sf -o /dev/null http://127.0.0.1:8080/healthz; }",
            "for i in $(seq 1 1200); do health && break; sleep 0.1; done",
            "health || { echo 'gateway did not start'; exit 99; }",
        ]
    parts += [
        """trap 'rc=$?; [ -n "${GW:-}" ] && kill $GW 2>/dev/null; printf "\\n@@@ exit %s\\n" "$rc"' EXIT""",
        "set -eo pipefail",
    ]
    for n, block in enumerate(session.blocks):
        script = workdir / f".block{n}.sh"
        script.write_text(block.text + "\n", encoding="utf-8")
        parts += [f"printf '\\n@@@ block {n}\\n'", f"source {script} </dev/null", f"printf '\\n@@@ done {n}\\n'"]
    return "\n".join(parts) + "\n"


def parse_outcomes(session: Session, output: str) -> None:
    chunks = re.split(r"\n@@@ block (\d+)\n", output)
    texts = {int(chunks[i]): chunks[i + 1] for i in range(1, len(chunks) - 1, 2)}
    exit_code = re.search(r"\n@@@ exit (\d+)\n", output)
    for n, block in enumerate(session.blocks):
        if n not in texts:
            break
        text = texts[n]
        if f"\n@@@ done {n}\n" in text:
            session.outcomes.append(Outcome(block, 0, text.split(f"\n@@@ done {n}\n")[0]))
        else:
            rc = int(exit_code.group(1)) if exit_code else -1
            session.outcomes.append(Outcome(block, rc or -1, text.split("\n@@@ exit")[0]))
    if not session.outcomes and session.blocks:  # the prelude failed (the gateway did not start)
        session.outcomes.append(Outcome(session.blocks[0], -1, output))


def run_session(session: Session, template_var: Path, isolated: bool) -> Session:
    workdir = Path(tempfile.mkdtemp(prefix="chittycan-docs-"))
    try:
        for name in LINKED:
            (workdir / name).symlink_to(ROOT / name)
        shutil.copytree(template_var, workdir / "var")
        (workdir / ".curlrc").write_text("fail-with-body\n", encoding="utf-8")
        # A gateway for the files whose blocks call one (not for a mere export of its URL).
        gateway = any(GATEWAY.search(b.text) for b in session.blocks) and any("curl" in b.text for b in session.blocks)
        command = ["timeout", "-k", "5", str(SESSION_TIMEOUT), "bash", "-c", session_script(session, workdir, gateway)]
        if gateway and isolated:
            command = ["unshare", "-rn", *command]
        res = subprocess.run(command, cwd=workdir, env=clean_env(workdir), capture_output=True, text=True, check=False)
        parse_outcomes(session, res.stdout + res.stderr)
        if (workdir / "gateway.log").exists():
            session.gateway_log = (workdir / "gateway.log").read_text(encoding="utf-8", errors="replace")
    finally:
        pid_file = workdir / "gateway.pid"
        if pid_file.exists():  # the session's own gateway, if the session was cut short
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ValueError, ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(workdir, ignore_errors=True)
    return session


def test_every_shell_block_runs_as_pasted(installed: Path) -> None:
    sessions = []
    for doc in DOCS:
        runnable = [b for b in blocks_of(doc) if b.lang in SHELL_LANGS and b.skip_reason is None]
        if runnable:
            sessions.append(Session(doc, runnable))
    assert sum(len(s.blocks) for s in sessions) >= 20  # the extraction itself works
    isolated = can_unshare()
    if not isolated:
        # Without a private network namespace the sessions share this machine's port 8080.
        busy = subprocess.run(["curl", "-s", "-o", "/dev/null", "http://127.0.0.1:8080/"], check=False)
        if busy.returncode != 7:  # 7: could not connect, i.e. the port is free
            pytest.skip("no unshare here and something already listens on 127.0.0.1:8080")
    started = time.monotonic()
    workers = SESSION_WORKERS if isolated else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        done = list(pool.map(lambda s: run_session(s, installed, isolated), sessions))
    failures = []
    for session in done:
        ran = len(session.outcomes)
        for outcome in session.outcomes:
            if outcome.returncode != 0:
                tail = "\n".join(outcome.output.rstrip().split("\n")[-25:])
                failures.append(
                    f"--- {outcome.block.where} exited {outcome.returncode}:\n{outcome.block.text}\n--- output:\n{tail}"
                    + (f"\n--- gateway log (tail):\n{session.gateway_log[-1500:]}" if session.gateway_log else "")
                )
        if ran < len(session.blocks) and all(o.returncode == 0 for o in session.outcomes):
            failures.append(f"--- {session.doc.relative_to(ROOT)}: only {ran} of {len(session.blocks)} blocks ran")
    elapsed = time.monotonic() - started
    print(f"ran {sum(len(s.outcomes) for s in done)} blocks of {len(done)} files in {elapsed:.0f} s", file=sys.stderr)
    assert not failures, "\n\n".join(failures)


def test_the_runner_reports_a_failing_block(tmp_path: Path) -> None:
    """The harness itself: state carries over between blocks, and a failing command is reported
    with its exit status (also inside a pipeline and a command substitution), ending the session."""
    doc = ROOT / "README.md"
    texts = ["X=1; cd var", 'test "$X" = 1 && test -f demo-key.txt', "echo ok | false | cat", "echo never ran"]
    session = Session(doc, [Block(doc, n + 1, "bash", t, None) for n, t in enumerate(texts)])
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "demo-key.txt").write_text("chitty_x\n")
    run_session(session, tmp_path / "var", isolated=False)
    assert [o.returncode for o in session.outcomes] == [0, 0, 1]
    again = Session(doc, [Block(doc, 1, "bash", 'K=$(.venv/bin/can no-such-command)\necho "got $K"', None)])
    run_session(again, tmp_path / "var", isolated=False)
    [outcome] = again.outcomes
    assert outcome.returncode == 1 and "Unknown command: 'no-such-command'" in outcome.output
    assert "got" not in outcome.output


def test_config_docs_show_the_example_file_as_it_is() -> None:
    """docs/config.md's complete example is examples/chittycan.yaml, byte for byte."""
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    example = (ROOT / "examples" / "chittycan.yaml").read_text(encoding="utf-8")
    assert example in re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
