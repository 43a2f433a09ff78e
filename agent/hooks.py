"""Pre and post hooks of a backup: commands from a signed plan, bounded in time and output.

A hook is a string (run by /bin/sh -c) or an argv list. It runs in its own session, so a
timeout (or a stop request) kills its whole process group: a `sleep` started by a shell
script dies with it. Output (stdout and stderr together) goes to a private temporary file,
never a pipe, so a grandchild that keeps the descriptor open cannot hang the agent; it is
then truncated to its head and tail and scrubbed of anything that looks like a secret.

Hooks only ever come from plans whose signature checked out: the daemon has no other source
of commands.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence

from broker.messages import HookResult
from broker.plan import Hook

OUTPUT_LIMIT = 4096  # characters kept of a hook's output: the head and the tail
KILL_GRACE = 2.0  # seconds between SIGTERM and SIGKILL of a hook's process group
POLL = 0.05

_SECRETS = [
    (re.compile(r"AGE-SECRET-KEY-1[0-9A-Z]+"), "AGE-SECRET-KEY-1[redacted]"),
    (
        re.compile(
            r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(-----END [A-Z ]*PRIVATE KEY-----|\Z)", re.S
        ),
        "[redacted private key]",
    ),
    (re.compile(r"(?<=://)[^/\s:@]+:[^/\s@]+(?=@)"), "[redacted]"),  # user:password@ in URLs
    (
        re.compile(
            r"(?i)\b([\w-]*(?:password|passwd|secret|token|api[_-]?key|access[_-]?key|"
            r"credential)s?[\w-]*)(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|\S+)"
        ),
        r"\1\2[redacted]",
    ),
]


def redact(text: str) -> str:
    """Blank out what looks like key material or a credential: age identities, PEM private
    keys, passwords in URLs, and `password=...`/`token: ...`-style assignments."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def truncate(text: str, limit: int = OUTPUT_LIMIT) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n[... {len(text) - 2 * half} characters cut ...]\n{text[-half:]}"


def run_hook(
    hook: Hook,
    env: Mapping[str, str] | None = None,
    stop: threading.Event | None = None,
) -> HookResult:
    """Run one hook to its end, its timeout, or until `stop` is set. `exit_code` is None
    when the hook was killed (timeout or stop)."""
    argv: Sequence[str] = (
        ["/bin/sh", "-c", hook.command] if isinstance(hook.command, str) else hook.command
    )
    began = time.monotonic()
    with tempfile.TemporaryFile(prefix="muster-hook-") as output:
        try:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd="/",
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        except OSError as error:
            return HookResult(
                command=hook.command,
                exit_code=127,
                duration=time.monotonic() - began,
                output=redact(f"cannot start: {error.strerror or error}"),
            )
        deadline = began + hook.timeout
        why = None
        while process.poll() is None:
            if time.monotonic() >= deadline:
                why = f"timed out after {hook.timeout} s: process group killed"
            elif stop is not None and stop.is_set():
                why = "stopped: the agent is shutting down; process group killed"
            if why:
                _kill_group(process)
                break
            time.sleep(POLL)
        duration = time.monotonic() - began
        output.seek(0)
        data = output.read(OUTPUT_LIMIT * 8 + 1)
        if len(data) > OUTPUT_LIMIT * 8:  # keep the tail too: it usually says what failed
            output.seek(-OUTPUT_LIMIT, os.SEEK_END)
            data = data[: OUTPUT_LIMIT * 4] + b"\n[...]\n" + output.read()
    text = truncate(redact(data.decode("utf-8", "replace")))
    if why:
        text = (text + "\n" if text else "") + why
    return HookResult(
        command=hook.command,
        exit_code=None if why else process.returncode,
        duration=round(duration, 3),
        output=text,
    )


def run_hooks(
    hooks: Sequence[Hook],
    env: Mapping[str, str] | None = None,
    stop: threading.Event | None = None,
    stop_on_failure: bool = True,
) -> tuple[list[HookResult], str | None]:
    """Run hooks in order. Returns their results and the first failure, described (None
    when all succeeded). Pre hooks stop at the first failure; post hooks all run."""
    results: list[HookResult] = []
    failure = None
    for hook in hooks:
        result = run_hook(hook, env, stop)
        results.append(result)
        if result.exit_code != 0 and failure is None:
            failure = describe_failure(result)
            if stop_on_failure:
                break
    return results, failure


def describe_failure(result: HookResult) -> str:
    command = result.command if isinstance(result.command, str) else " ".join(result.command)
    command = redact(command)[:200]
    if result.exit_code is None:
        last = result.output.rsplit("\n", 1)[-1]
        return f"hook `{command}` {last}"
    return f"hook `{command}` exited with status {result.exit_code}"


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(KILL_GRACE)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # also whatever the leader left behind
    process.wait()
