"""Small shared pieces: the user-facing error type, value checks, device/dtype choice, rank-0
printing, atomic writes, JSON and JSON Lines files. Nothing here knows about the model; every other
module may import it."""

import argparse
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager

import torch

# -----------------------------------------------------------------------------
# errors

class UserError(Exception):
    """Bad input from a user (a file, a flag, a line of data). Scripts catch it and print
    `error: <message>` as one line on stderr, then exit non-zero: a user's mistake never produces a
    traceback. The message must name the file, line, key or flag."""


def check_values(rules: dict, values, error=UserError):
    """rules {name: (test, what it must be)} -> `error` naming the first value that breaks its rule
    in one line: '--flag v: ...' (values: parsed args) or 'keyword=v: ...' (values: a dict)."""
    for name, (ok, what) in rules.items():
        if isinstance(values, dict):
            v, shown = values[name], f"{name}={values[name]!r}"
        else:
            v = getattr(values, name[2:].replace("-", "_"))
            shown = f"{name} {v}"
        if isinstance(v, bool) or not ok(v):
            raise error(f"{shown}: must be {what}")


def die(msg: str, code: int = 2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes read like every other error: one line, exit code 2 (the usage
    summary stays in --help)."""

    def error(self, message):
        die(f"{message} (see {self.prog} --help)")


@contextmanager
def user_errors():
    """`with user_errors(): main()` turns UserError (and Ctrl-C) into one clean line on stderr.
    Ctrl-C exits 130 with 'interrupted', or the line the script put in the KeyboardInterrupt
    (training.Session: where it stopped and how to resume)."""
    try:
        yield
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt as e:
        print(str(e) or "interrupted", file=sys.stderr)
        sys.exit(130)


# -----------------------------------------------------------------------------
# device / dtype

def pick_device(name: str | None = None) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:1' | None (= cuda when present, else cpu)."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device: unknown device '{name}' (use cpu, cuda or cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device: '{name}' asked for, but CUDA is not available on this machine")
    return dev


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """None/'auto' = bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow on most laptops)."""
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise UserError(f"--dtype: unknown dtype '{name}' (use one of {', '.join(DTYPES)})")
    return DTYPES[name]


# -----------------------------------------------------------------------------
# printing and files

def rank() -> int:
    return int(os.environ.get("RANK", 0))


def print0(*args, **kwargs):
    """print on rank 0 only (torchrun sets RANK)."""
    if rank() == 0:
        print(*args, **kwargs)


def eprint(*args, **kwargs):
    """diagnostics go to stderr so stdout stays clean (sample.py prints only the answer there)."""
    print(*args, file=sys.stderr, **kwargs)


@contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block finishes: a
    crash or Ctrl-C mid-write leaves the old file (or nothing) in place, never half a file. Works
    for files and for directories."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    tmp_target = os.path.join(tmp, "x")
    try:
        yield tmp_target
        if os.path.isdir(path) and os.path.isdir(tmp_target):
            # directories cannot be replaced by rename in one step: move the old one aside first
            os.rename(path, os.path.join(tmp, "old"))
            os.rename(tmp_target, path)
        else:
            os.replace(tmp_target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json(path, obj):
    with atomic_path(str(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")


def write_jsonl(path, rows):
    """Write one JSON object per line, atomically (the project's one JSONL writer)."""
    with atomic_path(str(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def parse_json(data: bytes, path: str, lineno: int | None = None):
    """JSON bytes -> the value, or one UserError naming file and line (lineno: a JSONL line's)."""
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path}{f':{lineno}' if lineno else ''}: not UTF-8 text")
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{lineno or e.lineno}: malformed JSON: {e.msg} (column {e.colno})")


def read_json(path, what: str = "file"):
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such {what}")
    with open(path, "rb") as f:
        return parse_json(f.read(), path)


def read_jsonl(path, bad: list | None = None) -> list[tuple[int, dict]]:
    """-> [(line number (1-based), object)]; blank lines are skipped. A line that is not a JSON
    object raises a UserError naming file and line, or, when a `bad` list is given
    (--skip-bad-samples), is skipped and its message appended to `bad`."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such file")
    rows = []
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                if not isinstance(obj := parse_json(line, path, lineno), dict):
                    raise UserError(f"{path}:{lineno}: expected a JSON object, got "
                                    f"{type(obj).__name__}")
            except UserError as e:
                if bad is None:
                    raise
                bad.append(str(e))
                continue
            rows.append((lineno, obj))
    return rows
