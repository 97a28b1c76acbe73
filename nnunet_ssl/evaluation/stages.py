"""Running nnU-Net's commands as logged subprocesses, with a clock and one progress line per training epoch.

Shared by the demo and the benchmark: both run the commands a user would run (``nnUNetv2_train``,
``nnUNetv2_predict``, our console scripts) with their output streamed into a log file, and turn nnU-Net's training
log lines into short status lines.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path


class CommandNotFound(Exception):
    """A console script is neither next to the running interpreter nor on PATH: one line for the user."""


class StageFailed(Exception):
    """A subprocess returned non-zero."""

    def __init__(self, stage: str, returncode: int, log: Path, tail: Sequence[str]) -> None:
        super().__init__(f"{stage} failed with exit status {returncode}")
        self.stage, self.returncode, self.log, self.tail = stage, returncode, log, list(tail)


def console_script(name: str) -> str:
    """The console script ``name`` of the running environment, so the commands work without an activated venv."""
    # sys.executable is not resolved on purpose: a venv's python is a symlink to the base interpreter
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise CommandNotFound(f"cannot find the command {name} next to {sys.executable} or on PATH; install "
                              "nnunet-ssl (pip install -e .) in this environment")
    return found


class Clock:
    """Time since the start of a command, as ``[mm:ss]`` stamps in front of its progress lines."""

    def __init__(self) -> None:
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def stamp(self) -> str:
        seconds = int(self.elapsed())
        return f"[{seconds // 60:02d}:{seconds % 60:02d}]"


def say(message: str = "") -> None:
    print(message, flush=True)


def run_stage(argv: list[str], env: dict[str, str], log_path: Path, cwd: Path,
              on_line: Callable[[str], None] | None = None) -> None:
    """Runs ``argv`` with its output (stdout and stderr) streamed into ``log_path``; each line also goes to
    ``on_line``. Raises StageFailed on a non-zero exit."""
    stage = argv[0]
    argv = [console_script(argv[0]), *argv[1:]]
    tail: deque[str] = deque(maxlen=30)
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(argv)}\n")
        log.flush()
        # text mode splits tqdm's carriage-return updates into lines, which keeps the log and the tail readable
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace", bufsize=1)
        try:
            assert proc.stdout is not None
            for raw_line in proc.stdout:
                log.write(raw_line)
                log.flush()
                line = raw_line.rstrip("\n")
                if line.strip():
                    tail.append(line)
                if on_line is not None:
                    on_line(line)
            returncode = proc.wait()
        except BaseException:
            # Ctrl-C or a bug here: do not leave a training running in the background
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if returncode != 0:
        raise StageFailed(stage, returncode, log_path, tail)


_FLOAT = r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf)"


def parse_floats(text: str) -> list[float]:
    """Numbers of an nnU-Net log value such as ``[np.float32(0.87), np.float32(0.0)]``."""
    text = re.sub(r"np\.float\d+\(", "(", text)
    return [float(x) for x in re.findall(_FLOAT, text)]


class TrainingReporter:
    """Turns nnU-Net's training log lines into one status line per epoch. ``fold`` only names the fold in the line
    announcing the final validation."""

    def __init__(self, label: str, epochs: int, clock: Clock, fold: int = 0) -> None:
        self.label, self.epochs, self.clock, self.fold = label, epochs, clock, fold
        self.epoch: int | None = None
        self.values: dict[str, str] = {}
        self.unlabeled_pool: int | None = None
        self.validating = False

    def __call__(self, line: str) -> None:
        # nnU-Net's lines read "2026-01-01 12:00:00.000000: message"
        message = line.split(": ", 1)[1].strip() if re.match(r"^\d{4}-\d\d-\d\d ", line) else line.strip()
        if m := re.fullmatch(r"Epoch (\d+)", message):
            self.epoch, self.values = int(m.group(1)), {}
        elif m := re.match(r"(train_loss|val_loss) (\S+)", message):
            self.values[m.group(1)] = f"{float(m.group(2)):+.3f}"
        elif message.startswith("Pseudo dice"):
            self.values["dice"] = " ".join(f"{v:.2f}" for v in parse_floats(message))
        elif message.startswith("ssl: "):
            pairs = dict(re.findall(r"(\w+) (" + _FLOAT + ")", message[5:]))
            if "unsup" in pairs and "lambda" in pairs:
                # MetaSSL's "unsup" includes its labeled branch; show that part so the total is not misread
                branch = f" (labeled branch {float(pairs['branch']):.4f})" if "branch" in pairs else ""
                self.values["ssl"] = f"unsup {float(pairs['unsup']):.4f}{branch} lambda {float(pairs['lambda']):.3f}"
        elif m := re.match(r"unlabeled pool: (\d+) cases", message):
            self.unlabeled_pool = int(m.group(1))
        elif m := re.match(r"Epoch time: (" + _FLOAT + ") s", message):
            self._epoch_line(float(m.group(1)))
        elif message.startswith("predicting ") and not self.validating:
            self.validating = True
            say(f"{self.clock.stamp()}   {self.label}: final validation on fold {self.fold} ...")
        elif message.startswith("Mean Validation Dice"):
            say(f"{self.clock.stamp()}   {self.label}: {message}")

    def _epoch_line(self, seconds: float) -> None:
        epoch = "?" if self.epoch is None else str(self.epoch + 1)
        parts = [f"{self.clock.stamp()}   {self.label} epoch {epoch:>3}/{self.epochs}",
                 f"loss {self.values.get('train_loss', '?')} (val {self.values.get('val_loss', '?')})",
                 f"pseudo Dice {self.values.get('dice', '?')}"]
        if "ssl" in self.values:
            parts.append(self.values["ssl"])
        parts.append(f"{seconds:.1f} s")
        say("  ".join(parts))


class EchoFilter:
    """Prints the lines of a short stage that match ``pattern``, indented."""

    def __init__(self, pattern: str) -> None:
        self.pattern = re.compile(pattern)

    def __call__(self, line: str) -> None:
        if self.pattern.search(line):
            say(f"          {line.strip()}")
