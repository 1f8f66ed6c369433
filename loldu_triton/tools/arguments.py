"""The argument types of the command line: each parses one value or raises argparse.ArgumentTypeError with a
line that says what is allowed, so a bad value ends in argparse's one-line error and exit code 2."""
from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:  # what torch.manual_seed takes
        raise argparse.ArgumentTypeError(f"expected an integer from 0 to 2**64 - 1, got {text!r}")
    return value


def comma_list(item, expected: str):
    """A type for comma-separated values of `item` (which raises ValueError on a bad one)."""

    def parse(text: str):
        try:
            return [item(v.strip()) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None

    return parse


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def dims(count: int):
    def parse(text: str):
        values = tuple(positive(v) for v in text.lower().split("x"))
        if len(values) != count:
            raise ValueError(text)
        return values

    return parse


def rank(text: str):
    return "full" if text == "full" else positive(text)


def name(text: str) -> str:
    if not text:
        raise ValueError(text)
    return text


shapes = comma_list(dims(3), "comma-separated MxKxN (tokens x in x out, positive integers, e.g. 2048x1024x1024)")
ranks = comma_list(rank, "comma-separated positive integers or 'full'")
counts = comma_list(positive, "comma-separated positive integers, e.g. 1,10,100")
names = comma_list(name, "comma-separated method names")


def batch(text: str):
    try:
        return dims(2)(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected BxS (batch x sequence length, positive integers, e.g. 16x128), "
                                         f"got {text!r}") from None


def device_name(text: str) -> str:
    if text not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def arch(text: str) -> int:
    if text not in ("90", "80"):
        raise argparse.ArgumentTypeError(f"expected 90 (sm_90) or 80 (sm_80), got {text!r}")
    return int(text)


def writable_dir(text: str) -> str:
    """A folder that exists and takes a new file, or that can be made. Tried for real, with a temporary folder
    in the nearest existing one, removed at once: os.access says yes to root where the filesystem says no."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder, got ''")
    path = Path(text)
    try:
        there = path
        while not there.exists():
            there = there.parent  # ends at "." or "/", which exist
        if not there.is_dir():
            raise argparse.ArgumentTypeError(f"{str(there)!r} is a file, not a folder")
        os.rmdir(tempfile.mkdtemp(dir=there))
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot write into {text!r}: {e.strerror or e}") from None
    return text


def writable_file(text: str) -> str:
    if Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file")
    writable_dir(str(Path(text).parent))
    return text


# ---------------------------------------------------------------------------------------------------------------
# What depends on other arguments or on the machine: each subcommand's check, before any work.
# ---------------------------------------------------------------------------------------------------------------
