"""Reading the files that data owners bring, so that no file can hang, crash or quietly corrupt a source.

Every reader here refuses what it cannot use with a :class:`~datasets.core.DataFileError` (a
``ValueError``) or an ``OSError``, and both name the file (and the line where known):

* Only regular files are read. A FIFO, socket or device is refused (:func:`read_bytes`) or skipped
  with a warning (:func:`scan_image_folder`) from its ``stat`` before anything opens it, and the file
  is then opened non-blocking and checked again with ``fstat``: a FIFO named ``x.csv`` or ``x.png``
  cannot block the loader, ``/dev/zero`` behind a symbolic link cannot stream forever.
* Text is UTF-8 (a byte-order mark is dropped). Invalid bytes, a UTF-16 file and NUL characters are
  refused with their line.
* A CSV table has a header and at least one row, every row as many fields as the header, and
  distinct column names (:func:`read_table`).
"""

from __future__ import annotations

import codecs
import csv
import io
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .core import DataFileError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolderScan",
    "Table",
    "decode_text",
    "file_kind",
    "is_blank_row",
    "parse_table",
    "read_bytes",
    "read_table",
    "scan_image_folder",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
"""File name endings read as images (torchvision's ``ImageFolder`` list); other files are ignored."""


def file_kind(mode: int) -> str:
    """What a ``st_mode`` is, in words: ``"a FIFO"``, ``"a directory"``, ``"a regular file"``, ..."""
    for test, kind in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return "a special file"


def read_bytes(path: str | os.PathLike[str]) -> bytes:
    """The whole content of the regular file ``path`` (symbolic links followed).

    Raises:
        DataFileError: If ``path`` is not a regular file (a directory, FIFO, socket, device).
        OSError: If it cannot be opened or read (missing, broken link, permission); names the path.
    """
    kind = file_kind(os.stat(path).st_mode)  # never opens a device or FIFO
    if kind != "a regular file":
        raise DataFileError(path, f"not a regular file but {kind}; give a data file")
    # Non-blocking and checked again on the open file: the path may have been replaced since the stat.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    with open(fd, "rb") as handle:
        kind = file_kind(os.fstat(fd).st_mode)
        if kind != "a regular file":
            raise DataFileError(path, f"not a regular file but {kind}; give a data file")
        return handle.read()


def decode_text(data: bytes, path: str | os.PathLike[str]) -> str:
    """``data`` decoded as UTF-8 (an initial byte-order mark dropped).

    Raises:
        DataFileError: If ``data`` is UTF-16 or UTF-32, not valid UTF-8 (the message gives the line and
            the byte), or holds a NUL character (a binary file).
    """
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise DataFileError(path, "is UTF-16 or UTF-32 (it starts with such a byte-order mark); save it as UTF-8")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataFileError(
            path, f"is not valid UTF-8 (byte 0x{data[err.start]:02x} at byte {column} of the line); save it as UTF-8",
            line=line,
        ) from None
    nul = text.find("\x00")
    if nul >= 0:
        raise DataFileError(path, "holds a NUL character: a binary file, or text that is not UTF-8", line=text.count("\n", 0, nul) + 1)
    return text


@dataclass(frozen=True)
class Table:
    """A rectangular CSV table of strings, with the file line where each row starts.

    Attributes:
        path: The file it was read from.
        header: Column names (stripped; an empty name becomes ``"Unnamed: <i>"`` as in pandas).
        rows: One list of ``len(header)`` raw cells per data row.
        lines: The 1-based file line where each row starts.
    """

    path: Path
    header: tuple[str, ...]
    rows: list[list[str]]
    lines: list[int]

    def column(self, name: str) -> list[str]:
        """The cells of column ``name``, one per row."""
        j = self.header.index(name)
        return [row[j] for row in self.rows]


def read_table(path: str | os.PathLike[str], delimiter: str = ",") -> Table:
    """Read the CSV (or, with ``delimiter="\\t"``, TSV) file ``path`` as a :class:`Table`.

    Quoting follows RFC 4180 (Python's :mod:`csv`, as pandas); blank lines are skipped.

    Raises:
        DataFileError: If the file is empty, has a header but no row, has a row whose number of
            fields differs from the header's (the message gives the line), repeats a column name,
            is not valid CSV, or any reason of :func:`read_bytes` / :func:`decode_text`.
        OSError: If the file cannot be read.
    """
    file = Path(path)
    return parse_table(decode_text(read_bytes(file), file), file, delimiter)


def parse_table(text: str, path: str | os.PathLike[str], delimiter: str = ",") -> Table:
    """:func:`read_table` of the already decoded ``text`` of the file ``path``."""
    file = Path(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    # Python's csv refuses fields over field_size_limit() (128 KiB) characters; pandas has no such
    # limit and a text column may hold a whole document. No field is longer than the file.
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, len(text) + 1))
    try:
        parsed = [(row, reader.line_num) for row in reader]  # line_num: the row's last line
    except csv.Error as err:
        raise DataFileError(file, f"is not a valid CSV file: {err}", line=reader.line_num) from None
    finally:
        csv.field_size_limit(limit)
    # A row starts on the line after the previous row's last line; blank lines are dropped.
    starts = [1, *(end + 1 for _, end in parsed[:-1])] if parsed else []
    kept = [(row, start) for (row, _), start in zip(parsed, starts, strict=True) if not is_blank_row(row)]
    header = _header(kept[0][0], file) if kept else None
    rows = [row for row, _ in kept[1:]]
    lines = [start for _, start in kept[1:]]
    if header is not None:
        bad = next((i for i, row in enumerate(rows) if len(row) != len(header)), None)
        if bad is not None:
            problem = f"{len(rows[bad])} fields where the header has {len(header)} ({', '.join(header)})"
            raise DataFileError(file, problem, line=lines[bad])
    if header is None:
        raise DataFileError(file, "is empty: no header and no data rows")
    if not rows:
        raise DataFileError(file, f"has a header ({', '.join(header)}) but no data rows")
    return Table(path=file, header=header, rows=rows, lines=lines)


def is_blank_row(row: Sequence[str]) -> bool:
    """Whether a parsed CSV row is a blank line (no field, or one field of spaces), which readers skip."""
    return not row or (len(row) == 1 and not row[0].strip())


def _header(row: Sequence[str], path: Path) -> tuple[str, ...]:
    names = tuple(name.strip() or f"Unnamed: {i}" for i, name in enumerate(row))
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise DataFileError(path, f"column name '{name}' appears twice in the header", line=1, column=name)
        seen.add(name)
    return names


@dataclass(frozen=True)
class ImageFolderScan:
    """What :func:`scan_image_folder` found.

    Attributes:
        classes: Sorted names of the class folders (hidden folders left out).
        images: ``(file, class name)`` of every regular image file, class by class, in torchvision's
            ``ImageFolder`` order (by directory path, then file name).
        skipped: ``(path, why)`` of what was passed over: special files and broken links with an
            image name, hidden entries, directories already visited (a link loop).
    """

    classes: tuple[str, ...]
    images: tuple[tuple[Path, str], ...]
    skipped: tuple[tuple[Path, str], ...]


def scan_image_folder(root: str | os.PathLike[str]) -> ImageFolderScan:
    """Find the class folders under ``root`` and the image files in each (sub-folders searched too).

    Symbolic links are followed, each directory visited once. Only regular files with an image name
    (:data:`IMAGE_EXTENSIONS`) are kept; a FIFO, socket, device or broken link with an image name, and
    any entry whose name starts with a dot (``.DS_Store``, macOS ``._x.png``, ``.ipynb_checkpoints``),
    are skipped and listed in ``skipped``. Nothing is opened.
    """
    base = Path(root)
    classes: list[str] = []
    skipped: list[tuple[Path, str]] = []
    with os.scandir(base) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if not entry.is_dir():  # follows a link to a folder
                continue
            if entry.name.startswith("."):
                skipped.append((Path(entry.path), "a hidden folder"))
            else:
                classes.append(entry.name)
    images: list[tuple[Path, str]] = []
    visited: set[tuple[int, int]] = set()
    for name in classes:
        found: list[tuple[str, str]] = []  # (directory, file name), sorted as torchvision sorts them
        pending = [base / name]
        while pending:
            folder = pending.pop()
            info = os.stat(folder)
            if (info.st_dev, info.st_ino) in visited:
                skipped.append((folder, "a folder already searched (a link loop)"))
                continue
            visited.add((info.st_dev, info.st_ino))
            with os.scandir(folder) as entries:
                for entry in entries:
                    path = Path(entry.path)
                    if entry.name.startswith("."):  # .DS_Store, macOS's ._x.png, .ipynb_checkpoints
                        if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                            skipped.append((path, "a hidden file"))
                        continue
                    try:
                        mode = os.stat(path).st_mode
                    except OSError as err:  # a broken link, a link loop, no permission
                        if entry.name.lower().endswith(IMAGE_EXTENSIONS):
                            skipped.append((path, f"cannot be reached ({err.strerror or err})"))
                        continue
                    if stat.S_ISDIR(mode):
                        pending.append(path)
                    elif entry.name.lower().endswith(IMAGE_EXTENSIONS):
                        if stat.S_ISREG(mode):
                            found.append((str(folder), entry.name))
                        else:
                            skipped.append((path, file_kind(mode)))
        images.extend((Path(folder, file), name) for folder, file in sorted(found))
    return ImageFolderScan(classes=tuple(classes), images=tuple(images), skipped=tuple(skipped))
