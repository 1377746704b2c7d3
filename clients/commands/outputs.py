"""Input files and output picture paths shared by ``imgserve detect`` and ``imgserve segment``."""
from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def read_inputs(parser: argparse.ArgumentParser, paths: Sequence[str]) -> list[tuple[str, bytes]]:
    """(name, bytes) per argument; an unreadable or empty file is a usage error (exit 2) naming it."""
    inputs = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            parser.error(f"{path}: cannot read image file: {exc.strerror or exc}")
        if not data:
            parser.error(f"{path}: the file is empty")
        inputs.append((path, data))
    return inputs


def output_paths(parser: argparse.ArgumentParser, target: str | None, names: Sequence[str],
                 option: str) -> list[Path]:
    """Where each input's picture goes: ``target`` itself for one input, ``target/<stem>.png`` for several."""
    if target is None:
        return []
    path = Path(target)
    if len(names) == 1 and not path.is_dir():
        return [path]
    if path.exists() and not path.is_dir():
        parser.error(f"{option} {target}: with several images it must be a directory")
    path.mkdir(parents=True, exist_ok=True)
    stems = [Path(n).stem for n in names]
    if len(set(stems)) != len(stems):  # same file names from different directories: number them
        stems = [f"{i:03d}_{s}" for i, s in enumerate(stems)]
    return [path / f"{stem}.png" for stem in stems]
