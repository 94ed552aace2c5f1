"""Where the CLI's output goes: data on stdout, diagnostics on stderr, and CI integrations.

- stdout carries data only: the human report (verdict line first) or, with --json, exactly one JSON
  object, also when the command fails (an `error` member: message, hint, exit_code).
- stderr carries progress, `warning:` lines and the one-line `error:` / `hint:` pair.
- A closed stdout (`repfuse … | head -1`) is not an error: the rest of the data is dropped and the
  exit code is the work's own (0 when it succeeded).
- GitHub Actions: with GITHUB_STEP_SUMMARY set, a Markdown summary is appended to that file; with
  GITHUB_ACTIONS=true, errors and warnings are also printed (on stderr) as `::error::` /
  `::warning::` workflow commands, which the runner turns into annotations.
"""

from __future__ import annotations

import errno
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text
from typer._click import exceptions as click_exceptions
from typer.core import TyperGroup

from . import report as rpt
from .types import Report

__all__ = ["MAX_ANNOTATIONS", "Ui", "UsageErrorGroup", "annotation", "one_line"]

_EXIT_OK, _EXIT_USAGE = 0, 2  # as in cli_common (which this module does not import)
MAX_ANNOTATIONS = 10  # GitHub shows at most 10 per step and type


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def _escape_data(text: str) -> str:
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def annotation(kind: str, message: str, title: str = "repfuse", file: str | None = None) -> str:
    """A GitHub Actions workflow command (`::error title=…::message`), escaped."""
    props = [f"title={_escape_property(title)}"]
    if file:
        props.insert(0, f"file={_escape_property(file)}")
    return f"::{kind} {','.join(props)}::{_escape_data(message)}"


class _Stdout(Console):
    """rich's Console, but a closed stdout is remembered instead of ending the process (rich's own
    `on_broken_pipe` raises SystemExit(1))."""

    closed = False

    def on_broken_pipe(self) -> None:
        self.closed = True
        _to_devnull()


def _to_devnull() -> None:
    """Point stdout at /dev/null, so that nothing more (nor Python's flush at exit) fails."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


class Ui:
    """The output of one command run (see the module docstring)."""

    def __init__(self, command: str, *, as_json: bool = False, quiet: bool = False, verbose: bool = False,
                 out: Console | None = None, err: Console | None = None) -> None:
        self.command = command
        self.as_json = as_json
        self.quiet = quiet
        self.verbose = verbose
        self.out = out or _Stdout(highlight=False)
        self.err = err or Console(stderr=True, highlight=False)
        self.stdout_closed = False
        self.github = os.environ.get("GITHUB_ACTIONS", "").lower() == "true"
        self.step_summary = os.environ.get("GITHUB_STEP_SUMMARY") or None
        self._json_done = False
        self._annotations = 0

    # ---------------------------------------------------------------- stdout (data)

    def _stdout(self, write: Callable[[], None]) -> None:
        if self.stdout_closed:
            return
        try:
            write()
            self.out.file.flush()
        except BrokenPipeError:
            self._close_stdout()
        except OSError as exc:  # EPIPE surfacing as a plain OSError
            if getattr(exc, "errno", None) != errno.EPIPE:
                raise
            self._close_stdout()
        if getattr(self.out, "closed", False):
            self.stdout_closed = True

    def _close_stdout(self) -> None:
        """The reader went away: drop the rest and keep Python from complaining at exit."""
        self.stdout_closed = True
        _to_devnull()

    def json_document(self, document: Mapping[str, Any]) -> None:
        if self._json_done:
            return
        self._json_done = True
        text = json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)
        self._stdout(lambda: self.out.file.write(text + "\n"))

    # ---------------------------------------------------------------- stderr (diagnostics)

    def _annotate(self, kind: str, message: str) -> None:
        if self.github and self._annotations < 2 * MAX_ANNOTATIONS:
            self._annotations += 1
            self.err.file.write(annotation(kind, message, f"repfuse {self.command}") + "\n")
            self.err.file.flush()

    def error_lines(self, message: str, hint: str) -> None:
        self.err.print(Text("error: ", style="bold red") + Text(one_line(message)), soft_wrap=True)
        if hint:
            self.err.print(Text("hint: ", style="bold") + Text(one_line(hint)), soft_wrap=True)
        self._annotate("error", one_line(message) + (f"\n{one_line(hint)}" if hint else ""))

    def warning(self, message: str, code: str = "") -> None:
        suffix = f" [{code}]" if code else ""
        self.err.print(Text("warning: ", style="bold yellow") + Text(one_line(message) + suffix), soft_wrap=True)
        self._annotate("warning", one_line(message))

    def note(self, message: str) -> None:
        if not self.quiet:
            self.err.print(Text(message, style="dim"), soft_wrap=True)

    def _append_summary(self, text: str) -> None:
        if not self.step_summary:
            return
        try:
            with open(self.step_summary, "a", encoding="utf-8") as f:
                f.write(text if text.endswith("\n") else text + "\n")
        except OSError as exc:
            self.err.print(Text(f"warning: could not append to GITHUB_STEP_SUMMARY ({exc.strerror or exc})",
                                style="yellow"), soft_wrap=True)

    # ---------------------------------------------------------------- whole results

    def fail(self, message: str, hint: str, exit_code: int) -> None:
        """A command that failed before there was a report (bad input, interrupt, internal error)."""
        self.error_lines(message, hint)
        if self.as_json:
            self.json_document(rpt.error_document(self.command, one_line(message), one_line(hint), exit_code))
        self._append_summary(rpt.error_markdown(self.command, one_line(message), one_line(hint), exit_code))

    def result(self, report: Report, exit_code: int, *, error: tuple[str, str] | None = None,
               report_path: Path | None = None, depth: int | None = None, all_modules: bool = False) -> None:
        """Write --report (it is the evidence, also of a failure), then stdout, then warnings and
        the error lines on stderr, the annotations and the step summary."""
        err_doc = None
        if error is not None:
            err_doc = {"message": one_line(error[0]), "hint": one_line(error[1]), "exit_code": exit_code}
        if report_path is not None:
            rpt.write_report(report, report_path, err_doc)
        if self.as_json:
            self.json_document(rpt.to_dict(report, err_doc))
        elif self.quiet:
            self._stdout(lambda: self.out.print(rpt.verdict_text(report, exit_code), soft_wrap=True))
        else:
            self._stdout(lambda: rpt.render(report, self.out, verbose=self.verbose, exit_code=exit_code,
                                            depth=depth, all_modules=all_modules))
        self._warnings(report)
        if error is not None:
            self.error_lines(*error)
        self._append_summary(rpt.summary_markdown(report, err_doc))
        if report_path is not None and not self.quiet:
            self.note(f"report written to {report_path}")

    def _warnings(self, report: Report) -> None:
        for w in report.warnings:
            self.warning(w)
        for d in report.diagnostics:
            if d.level == "warning":
                self.warning(d.message, d.code)
            elif self.verbose:
                self.note(f"note: {d.message} [{d.code}]")
        gaps = rpt.deployment_gaps(report)
        if gaps and not report.strict and self.github:  # visible in the PR even when the step passes
            self._annotate("warning", f"not fully deployed: {'; '.join(gaps[:5])}"
                           + (f"; … {len(gaps) - 5} more" if len(gaps) > 5 else ""))


class UsageErrorGroup(TyperGroup):
    """Usage errors (a bad flag, a missing argument) become the CLI's own one-line error and hint,
    and with --json also a JSON error object on stdout."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,  # type: ignore[override]
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        try:
            rv = super().main(args=argv, prog_name=prog_name or "repfuse", complete_var=complete_var,
                              standalone_mode=False, **extra)
            code = rv if isinstance(rv, int) else _EXIT_OK
        except click_exceptions.NoArgsIsHelpError as e:
            e.show()
            code = _EXIT_USAGE
        except click_exceptions.UsageError as e:
            command = next((a for a in argv if a in self.commands), "")
            options = [a for a in argv[: argv.index("--")] if a.startswith("-")] if "--" in argv else argv
            ui = Ui(command, as_json="--json" in options)
            ui.fail(e.format_message(), f"run 'repfuse {command} --help' for usage".replace("  ", " "), _EXIT_USAGE)
            code = _EXIT_USAGE
        except typer.Abort:
            code = _EXIT_USAGE
        if standalone_mode:
            sys.exit(code)
        return code
