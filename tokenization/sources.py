"""Resolve the corpus paths of a DataConfig into a sorted list of source files.

    files = resolve_sources(["data/*.jsonl", "more/", "stdlib:"])
    files[0].path, files[0].rel, files[0].fmt      # absolute path, stable id prefix, reader format

A path may be a file, a directory (searched recursively for known formats), a glob, or `stdlib:`,
the running Python's standard library sources (*.py; test/ and site-packages left out), which is
real text on every machine and the quick start's corpus. Every path is checked before any work
starts: one that matches nothing raises `CorpusError` naming it (and, for a relative path, the
current directory it was read from: relative paths do not follow the config file).
"""

from __future__ import annotations

import glob
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

STDLIB = "stdlib:"
# Suffix -> reader format. Longest suffix wins (".jsonl.zst" before ".zst").
FORMATS: dict[str, str] = {
    ".jsonl.zst": "jsonl.zst",
    ".json.zst": "jsonl.zst",
    ".jsonl.gz": "jsonl.gz",
    ".json.gz": "jsonl.gz",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".txt": "txt",
    ".py": "txt",
    ".md": "txt",
}
_STDLIB_SKIP = {"test", "site-packages", "dist-packages", "__pycache__"}


class CorpusError(ValueError):
    """The corpus cannot be read as configured (missing path, unknown format, missing column)."""

    retryable = False  # the config or the files are wrong: another attempt fails the same way (orchestration/dag.py)


@dataclass(frozen=True, order=True)
class SourceFile:
    rel: str  # stable id prefix: path relative to the corpus root ("stdlib:" prefix for the stdlib)
    path: str  # absolute path
    fmt: str  # reader format, a value of FORMATS
    size: int  # bytes on disk


def format_of(path: str) -> str | None:
    name = path.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


def stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = []
    for folder, subfolders, names in os.walk(root):
        # prune instead of filtering afterwards: site-packages alone can hold ten times the stdlib's files,
        # and walking them made planning ~9 % of a single-process tokenize run
        subfolders[:] = [name for name in subfolders if name not in _STDLIB_SKIP]
        files.extend(Path(folder, name) for name in names if name.endswith(".py"))
    return root, sorted(files)


def _corpus_files_under(folder: Path) -> list[Path]:
    """The corpus files under `folder`, resolved; hidden files and folders (.git, .cache, editor
    backups) are not corpus, and symlinked folders are not entered (as Path.rglob in Python 3.11).

    os.walk from the folder resolved once, not rglob and a resolve per file: that took 0.25 s for the
    stdlib copied four times (3,456 files), 4 % of tokenizing it on two cores, all before any work."""
    found = []
    for parent, subfolders, names in os.walk(folder.resolve()):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for name in names:
            path = os.path.join(parent, name)
            if not name.startswith(".") and format_of(name) and os.path.isfile(path):
                found.append(Path(os.path.realpath(path) if os.path.islink(path) else path))
    return sorted(found)


def _expand(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path.resolve()]
    if path.is_dir():
        return _corpus_files_under(path)
    folders: dict[str, str] = {}  # each matched folder resolved once: 2.5x faster than per match on 13k

    def resolved(match: str) -> Path:
        if os.path.islink(match):
            return Path(os.path.realpath(match))
        folder, name = os.path.split(os.path.abspath(match))
        if folder not in folders:
            folders[folder] = os.path.realpath(folder)
        return Path(folders[folder], name)

    return sorted(resolved(match) for match in glob.glob(str(path), recursive=True) if os.path.isfile(match))


def resolve_sources(paths: list[str], root: str | None = None) -> list[SourceFile]:
    """All corpus files in a deterministic order; raises CorpusError before any work starts."""
    if not paths:
        raise CorpusError("data.paths is empty: name at least one file, directory, glob or 'stdlib:'")
    files: dict[str, SourceFile] = {}
    plain: list[Path] = []
    for spec in paths:
        if spec.strip() == STDLIB:
            stdlib_root, found = stdlib_files()
            for path in found:
                rel = STDLIB + path.relative_to(stdlib_root).as_posix()
                files[rel] = SourceFile(rel, str(path), "txt", path.stat().st_size)
            continue
        found = _expand(spec)
        if not found and Path(spec).expanduser().is_dir():
            raise CorpusError(
                f"data.paths: the folder '{spec}' holds no corpus file (known suffixes: {', '.join(FORMATS)})"
            )
        if not found:
            raise CorpusError(
                f"data.paths: '{spec}' does not exist or matches no file{_relative_hint(spec)}{_list_hint(spec)}"
            )
        plain.extend(found)
    base = Path(root).resolve() if root else _common_parent(plain)
    for path in plain:
        fmt = format_of(path.name)
        if fmt is None:
            raise CorpusError(f"{path}: unknown corpus format (known suffixes: {', '.join(FORMATS)})")
        try:
            rel = path.relative_to(base).as_posix()
        except ValueError:
            raise CorpusError(f"{path} is outside data.root {base}") from None
        files[rel] = SourceFile(rel, str(path), fmt, path.stat().st_size)
    return [files[rel] for rel in sorted(files)]


def _relative_hint(spec: str) -> str:
    """Where a relative path was looked for: the current directory, not the config file's folder."""
    if Path(spec).expanduser().is_absolute():
        return ""
    return f" (relative paths are read from the current directory, {os.getcwd()})"


def _list_hint(spec: str) -> str:
    """A comma in a missing path is most likely several paths written as one string (an override)."""
    if "," not in spec:
        return ""
    parts = ", ".join(part.strip() for part in spec.split(","))
    return f"; several paths are a YAML list: data.paths='[{parts}]'"


def _common_parent(paths: list[Path]) -> Path:
    if not paths:
        return Path("/")
    if len(paths) == 1:
        return paths[0].parent
    return Path(os.path.commonpath([str(p.parent) for p in paths]))
