"""What every program prints besides its results: one progress line, and one line per user error.

    step 40/300  3.1 steps/s  ETA 1m24s  loss -2.4153 harm_nll 6.0121 ...    `Progress`
    train.py: error: data.jsonl:3: unknown kind 'harmfull'; ...               `exit_on_user_error`, exit status 2

`--help` of every program states every default (`HelpFormatter`).

On a terminal the progress line is rewritten in place; elsewhere (a log file, CI) a plain line is printed every
`every` updates (at most one per `min_seconds`) and at the end, so logs stay readable. Both go to stderr: stdout is
kept for results (eval.py's table).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import signal
import sys
import time


def format_seconds(seconds: float) -> str:
    """12s, 3m05s, 2h07m: short enough for a progress line."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """done/total, the rate since the start, the time left at that rate, and whatever the caller adds."""

    def __init__(self, label: str, total: int, unit: str = "items", every: int = 1, done: int = 0,
                 min_seconds: float = 0.0, stream=None):
        self.label, self.total, self.unit, self.every, self.min_seconds = label, total, unit, max(1, every), min_seconds
        self.done = self.start_done = done  # a resumed run starts part-way
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.start = self.last_print = time.perf_counter()
        self.updates = 0

    def line(self, info: str = "", now: float | None = None) -> str:
        elapsed = (time.perf_counter() if now is None else now) - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = format_seconds((self.total - self.done) / rate) if rate > 0 else "?"
        text = f"{self.label} {self.done}/{self.total}  {rate:.3g} {self.unit}/s  ETA {eta}"
        return text + (f"  {info}" if info else "")

    def update(self, n: int = 1, info: str = "") -> None:
        self.done += n
        self.updates += 1
        now = time.perf_counter()
        if self.tty:
            print("\r" + self.line(info, now) + " " * 4, end="", file=self.stream, flush=True)
            return
        due = self.updates % self.every == 0 and now - self.last_print >= self.min_seconds
        if due or self.done >= self.total:
            print(self.line(info, now), file=self.stream, flush=True)
            self.last_print = now

    def close(self) -> None:
        if self.tty:
            print(file=self.stream, flush=True)


@contextlib.contextmanager
def exit_on_user_error(prog: str, debug: bool = False):
    """The user's errors become one line on stderr and exit status 2, as argparse reports bad options. Every error
    this project raises for bad input is a ValueError whose message names the file, key, line or option, and an
    OSError names the path it failed on; anything else is a bug and keeps its traceback. `debug` (every program's
    --debug) keeps the traceback of user errors too."""
    try:
        yield
    except (ValueError, OSError) as err:
        if debug:
            raise
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


@contextlib.contextmanager
def exit_quietly_on_interrupt(prog: str):
    """Ctrl-C inside the block ends the program with one line and exit status 130 (128 + SIGINT, what a shell reports
    for a program Ctrl-C stopped), not a KeyboardInterrupt traceback. A program wraps its imports in it: an interrupt
    can arrive while `import torch` runs, before any function of the program does. (A program started with SIGINT
    ignored, as a shell starts a background job, never sees one.)"""
    try:
        yield
    except KeyboardInterrupt:
        print(f"{prog}: interrupted while starting; nothing was written", file=sys.stderr)
        raise SystemExit(128 + signal.SIGINT) from None


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="on an error, show its traceback instead of one line")


# ---------------------------------------------------------------------------------------------------------------------
# Option types: a number out of range is refused by argparse, naming the option, before anything runs


def _number(kind: type, low: float | None, low_open: bool, high: float | None = None, high_open: bool = True,
            what: str = ""):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        # an int's isfinite would turn it into a float: 10**400 raises OverflowError, which argparse does not catch
        if (isinstance(value, float) and not math.isfinite(value)) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
        return value
    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, 0, True, what="must be an integer > 0")
non_negative_int = _number(int, 0, False, what="must be an integer >= 0")
positive_float = _number(float, 0.0, True, what="must be a finite number > 0")
non_negative_float = _number(float, 0.0, False, what="must be a finite number >= 0")
finite_float = _number(float, None, False, what="must be a finite number")
probability = _number(float, 0.0, False, 1.0, True, what="must be a number in [0, 1)")
fraction = _number(float, 0.0, True, 1.0, False, what="must be a number in (0, 1]")


def int_in(low: int, high: int):
    """An integer option in [low, high], both included: what the code downstream (torch, a buffer, a loop) can take."""
    return _number(int, low, False, high, False, what=f"must be an integer in [{low}, {high}]")


def float_in(low: float, high: float, low_open: bool = False):
    """An argparse type: a finite number in [low, high] (or (low, high] with `low_open`); nan and inf are refused."""
    what = f"must be a number in {'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None
        if not math.isfinite(value) or not (low < value if low_open else low <= value) or value > high:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}")
        return value
    parse.__name__ = what
    return parse


class HelpFormatter(argparse.RawTextHelpFormatter):
    """Help as written (line breaks kept), each option's default stated after it unless its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if "default" in help_text.lower() or action.default is argparse.SUPPRESS or action.nargs == 0:
            return help_text  # a flag's default is off; a help that names its default says it best
        default = action.default
        if isinstance(default, list):
            default = " ".join(map(str, default)) or None
        shown = "none" if default is None else default
        separator = "\n" if "\n" in help_text else (" " if help_text else "")
        return f"{help_text}{separator}(default: {str(shown).replace('%', '%%')})"


class LoadProgressLine:
    """ref.weights' loading progress as one line on stderr: tensors and bytes read, rate, time left."""

    def __init__(self):
        self.line, self.bytes = None, 0

    def start(self, folder, n_tensors: int) -> None:
        self.line, self.bytes = Progress(f"loading {folder}", n_tensors, "tensors", min_seconds=2.0), 0

    def update(self, tensor) -> None:
        self.bytes += tensor.numel() * tensor.element_size()
        self.line.update(1, f"{self.bytes / 2**20:,.0f} MiB read")

    def close(self) -> None:
        self.line.close()
