"""Property-based tests: the CSV, image-folder and text loaders fed random bytes, special files and careless tables.

Every input either loads into finite tensors of consistent shapes (and, where an independent oracle below
understands the input, the right classes and counts) or is refused with ValueError / OSError naming the
file; never another exception, never a hang. Each load runs in a worker thread under a deadline; a FIFO
that a loader blocks on is then opened for writing and closed, so a hang is reported, not waited out.

Outcomes, per loader and kind of input:

* ``error``: a bad input refused with ValueError / OSError naming the file;
* ``loaded``: accepted, and right by every check (special files skipped count here);
* ``refused-valid``: an input the oracle accepts was refused;
* ``crash``: another exception, or an error that does not name the file;
* ``hang``: no answer within the deadline;
* ``wrong``: accepted although non-finite, inconsistent, or refused by the oracle.

``DATA_FUZZ_TALLY=<file.csv>`` writes the counts (the hardening issue's closing-note figures);
``DATA_FUZZ_SURVEY=1`` records every input without failing on the first bad outcome (to survey an old
version of the loaders), ``DATA_FUZZ_DEADLINE_S`` sets the deadline (30 s)::

    DATA_FUZZ_TALLY=/tmp/tally.csv python -m pytest tests/test_data_fuzz.py -q
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import socket
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from datasets import Source, SourceOptions, load_source

DEADLINE_S = float(os.environ.get("DATA_FUZZ_DEADLINE_S", "30"))
F32_MAX = float(np.finfo(np.float32).max)
SURVEY = bool(os.environ.get("DATA_FUZZ_SURVEY"))
TALLY: Counter[tuple[str, str, str]] = Counter()
# Function-scoped fixtures are fine here: `workdir` hands out a fresh directory per call.
BASE = settings(
    deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module", autouse=True)
def write_tally() -> Iterator[None]:
    yield
    target = os.environ.get("DATA_FUZZ_TALLY")
    if target:
        with open(target, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["loader", "input", "outcome", "count"])
            for (loader, kind, outcome), count in sorted(TALLY.items()):
                writer.writerow([loader, kind, outcome, count])


@pytest.fixture
def workdir() -> Iterator[Callable[[], Path]]:
    """Fresh short directories (a socket path must stay under 108 bytes), all removed afterwards."""
    made: list[Path] = []

    def make() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="fz")))
        return made[-1]

    yield make
    for directory in made:
        shutil.rmtree(directory, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# Running one input and judging the outcome
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    name: str
    detail: str


def _unblock(fifo: Path) -> None:
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a reader blocked in open() now sees EOF
    except OSError:
        pass


def attempt(
    loader: str,
    kind: str,
    load: Callable[[], Source],
    base: Path,
    valid: bool | None,
    check: Callable[[Source], list[str]],
    fifos: tuple[Path, ...] = (),
) -> Outcome:
    """Run ``load`` under the deadline, judge it, count it, and fail unless it ended as ``valid`` allows."""
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            box["source"] = load()
        except BaseException as err:  # noqa: BLE001 - judging every outcome is the point
            box["error"] = err

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    worker.join(DEADLINE_S)
    if worker.is_alive():
        for fifo in fifos:
            _unblock(fifo)
        worker.join(5.0)
        outcome = Outcome("hang", f"no answer within {DEADLINE_S} s")
    elif "error" in box:
        err = box["error"]
        if isinstance(err, (ValueError, OSError)) and str(base) in str(err):
            outcome = Outcome("refused-valid" if valid else "error", f"{type(err).__name__}: {err}")
        else:
            outcome = Outcome("crash", f"{type(err).__name__}: {err}")
    else:
        problems = check(box["source"])
        if problems:
            outcome = Outcome("wrong", "; ".join(problems))
        elif valid is False:
            outcome = Outcome("wrong", "accepted although the oracle refuses it")
        else:
            outcome = Outcome("loaded", "")
    TALLY[(loader, kind, outcome.name)] += 1
    allowed = {True: {"loaded"}, False: {"error"}, None: {"loaded", "error"}}[valid]
    if not SURVEY:
        assert outcome.name in allowed, f"{loader} / {kind}: {outcome.name}: {outcome.detail}"
    return outcome


def source_problems(source: Source) -> list[str]:
    """What is inconsistent in any loaded source: shapes, dtypes, non-finite values, label range."""
    problems = []
    for split_name, split in (("train", source.train), ("test", source.test)):
        if len(split) < 1:
            problems.append(f"empty {split_name} split")
        if tuple(split.x.shape[1:]) != tuple(source.input_shape):
            problems.append(f"{split_name} x shape {tuple(split.x.shape)} vs input_shape {source.input_shape}")
        if split.x.is_floating_point() and not bool(torch.isfinite(split.x).all()):
            problems.append(f"non-finite {split_name} features")
        if source.task == "classification":
            y = split.y
            if y.dtype != torch.int64 or y.ndim != 1:
                problems.append(f"{split_name} labels {y.dtype} {tuple(y.shape)}")
            elif len(y) and not (0 <= int(y.min()) and int(y.max()) < (source.num_classes or 0)):
                problems.append(f"{split_name} labels outside [0, {source.num_classes})")
    names = getattr(source, "class_names", None)
    if source.task == "classification" and names is not None and len(names) != source.num_classes:
        problems.append(f"{len(names)} class names for {source.num_classes} classes")
    return problems


def same_labels(source: Source, expected: Counter[str]) -> bool:
    """Whether the source holds each label as often as ``expected`` says (by class size alone where the
    source reports no class names, as before they existed)."""
    held = Counter(int(i) for i in torch.cat([source.train.y, source.test.y]))
    names = getattr(source, "class_names", None)
    if names is None:
        return sorted(held.values()) == sorted(expected.values())
    return Counter({names[i]: n for i, n in held.items()}) == expected


# ----------------------------------------------------------------------------------------------
# The oracle: what a label or a feature cell should be (the loaders' documented rules, written again)
# ----------------------------------------------------------------------------------------------

MISSING = {"", "NA", "N/A", "NaN", "nan", "null", "None"}  # the missing-value markers generated below


class Bad(Exception):
    """The oracle refuses the input."""


def oracle_label(value: object) -> str:
    if value is None or isinstance(value, (bool, list, dict)):
        raise Bad(f"label {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        text = value.strip()
        if text in MISSING:
            raise Bad("missing label")
        try:
            return str(int(text))
        except ValueError:
            pass
        try:
            number = float(text)
        except ValueError:
            return text
    else:
        number = float(value)  # type: ignore[arg-type]
    if not math.isfinite(number) or number != int(number):
        raise Bad(f"non-integer label {value!r}")
    return str(int(number))


def oracle_feature(cell: str) -> float:
    try:
        value = float(cell.strip())
    except ValueError:
        raise Bad(f"feature {cell!r}") from None
    if not math.isfinite(value) or abs(value) > F32_MAX:
        raise Bad(f"feature {cell!r}")
    return value


def oracle_classes(names: list[str]) -> list[str]:
    distinct = set(names)
    if len(distinct) < 2:
        raise Bad("a single class")
    if all(_is_int(n) for n in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _is_int(name: str) -> bool:
    try:
        return str(int(name)) == name
    except ValueError:
        return False


def decodes(data: bytes) -> bool:
    try:
        return "\x00" not in data.decode("utf-8-sig") and not data.startswith((b"\xff\xfe", b"\xfe\xff"))
    except UnicodeDecodeError:
        return False


def table_bytes(rows: list[list[str]], encoding: str, delimiter: str = ",", newline: str = "\n") -> bytes | None:
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter, lineterminator=newline).writerows(rows)
    try:
        return buffer.getvalue().encode(encoding)
    except UnicodeEncodeError:
        return None


def is_blank(row: list[str]) -> bool:
    return not row or (len(row) == 1 and not row[0].strip())


# ----------------------------------------------------------------------------------------------
# csv
# ----------------------------------------------------------------------------------------------

FEATURE_CELLS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(width=64).map(repr),  # 'nan', 'inf', '1e+308', '5e-324', ...
    st.sampled_from(
        ["", " ", "NA", "null", "nan", "-inf", "Infinity", "1e308", "-1e39", "3.4e38", "3.5e38", "abc", "1,5",
         " 2 ", "0x1p3", "1_000", "é", "\x00", '"q"', "1e-320", "١٢"]
    ),
)
LABEL_CELLS = st.sampled_from(
    ["a", "b", "c", "0", "1", "2", "10", "007", "1.0", "1.5", "", "NA", "nan", "inf", " a ", "é", "x\ny", "-3"]
)
ENCODINGS = st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "latin-1", "utf-16"])


@st.composite
def csv_tables(draw: st.DrawFn) -> tuple[list[list[str]], str, str, str]:
    """A small table with numeric-ish features and a label column, sometimes broken on purpose."""
    width = draw(st.integers(1, 3))
    header = [f"f{j}" for j in range(width)] + ["label"]
    mode = draw(st.sampled_from(["plain"] * 12 + ["no-label", "duplicate", "ragged"]))
    if mode == "no-label":
        header[-1] = "target"
    elif mode == "duplicate":
        header[0] = "label"
    # Half the tables draw from easy cells and labels, so that good tables are common too.
    easy = draw(st.booleans())
    cells = st.integers(-50, 50).map(str) if easy else FEATURE_CELLS
    labels = st.sampled_from(["a", "b", "1", "2"]) if easy else LABEL_CELLS
    rows = draw(st.lists(st.tuples(st.lists(cells, min_size=width, max_size=width), labels), max_size=8))
    body = [[*features, label] for features, label in rows]
    if mode == "ragged" and body:
        i = draw(st.integers(0, len(body) - 1))
        body[i] = body[i][:-1] if draw(st.booleans()) else [*body[i], "1"]
    return [header, *body], draw(ENCODINGS), mode, draw(st.sampled_from(["\n", "\r\n"]))


def csv_oracle(data: bytes) -> tuple[bool, list[str], np.ndarray]:
    """Whether the csv source must accept the file, and then its label names and raw features."""
    try:
        if not decodes(data):
            raise Bad("encoding")
        parsed = [r for r in csv.reader(io.StringIO(data.decode("utf-8-sig"), newline="")) if not is_blank(r)]
        if len(parsed) < 2:
            raise Bad("empty or header only")
        header, rows = [h.strip() for h in parsed[0]], parsed[1:]
        if "label" not in header or len(set(header)) != len(header):
            raise Bad("header")
        if any(len(r) != len(header) for r in rows):
            raise Bad("ragged")
        j = header.index("label")
        features = np.array([[oracle_feature(c) for k, c in enumerate(r) if k != j] for r in rows], dtype=np.float64)
        names = [oracle_label(r[j]) for r in rows]
        oracle_classes(names)
        return True, names, features
    except Bad:
        return False, [], np.empty(0)


def csv_checks(names: list[str], features: np.ndarray) -> Callable[[Source], list[str]]:
    def check(source: Source) -> list[str]:
        problems = source_problems(source)
        if problems or not names:
            return problems
        if getattr(source, "class_names", None) is not None and list(source.class_names or ()) != oracle_classes(names):
            problems.append(f"classes {source.class_names} vs {oracle_classes(names)}")
        if not same_labels(source, Counter(names)):
            problems.append("label counts differ from the file")
        x = torch.cat([source.train.x, source.test.x]).numpy().astype(np.float64)
        for j in range(features.shape[1]):
            # Standardizing is increasing and affine, so it pairs the sorted values of the file and of x.
            raw, got = np.sort(features[:, j]), np.sort(x[:, j])
            span = raw[-1] - raw[0]
            if span == 0:
                ok = bool(np.ptp(got) == 0)
            else:
                slope = (got[-1] - got[0]) / span
                ok = slope > 0 and bool(np.allclose(got[0] + slope * (raw - raw[0]), got, atol=1e-3))
            if not ok:
                problems.append(f"feature column {j} is not an increasing affine image of the file's values")
        return problems

    return check


@pytest.mark.timeout(300)
@settings(BASE, max_examples=200)
@given(table=csv_tables())
def test_csv_tables_load_right_or_are_refused_naming_the_file(
    workdir: Callable[[], Path], table: tuple[list[list[str]], str, str, str]
) -> None:
    rows, encoding, _mode, newline = table
    data = table_bytes(rows, encoding, newline=newline)
    if data is None:
        return  # a cell the encoding cannot hold
    path = workdir() / "t.csv"
    path.write_bytes(data)
    valid, names, features = csv_oracle(data)
    kind = "table-valid" if valid else "table-bad"
    attempt("csv", kind, lambda: load_source("csv", SourceOptions(path=str(path))), path, valid, csv_checks(names, features))


GOOD_CSV = b"f0,f1,label\n1,2,a\n3,4,b\n5,6,a\n7,8,b\n"


@pytest.mark.timeout(300)
@settings(BASE, max_examples=150)
@given(data=st.one_of(st.binary(max_size=300), st.tuples(st.binary(max_size=8), st.integers(0, 60)).map(
    lambda t: GOOD_CSV[: t[1]] + t[0] + GOOD_CSV[t[1]:]  # a good file with a few random bytes put in
)))
@example(data=b",,label\n\x1c0,,\n0,,\n0,,\n0,,")  # \x1c: whitespace to str.strip (the per-cell pass), not to float()
def test_csv_random_bytes_never_crash(workdir: Callable[[], Path], data: bytes) -> None:
    path = workdir() / "r.csv"
    path.write_bytes(data)
    attempt("csv", "bytes", lambda: load_source("csv", SourceOptions(path=str(path))), path, None, source_problems)


# ----------------------------------------------------------------------------------------------
# image-folder
# ----------------------------------------------------------------------------------------------

IMAGE_KINDS = [
    "png", "png", "png", "png", "png", "png", "jpg", "jpg", "bytes", "truncated", "fifo", "broken-link", "dir", "dev-null", "dev-zero",
    "socket", "hidden", "text-file",
]
IMAGES_OK = {"png", "jpg"}
UNKNOWN = {"bytes", "truncated"}  # may or may not decode; either outcome is fine if it names the file


def _png(rng: np.random.Generator, fmt: str) -> bytes:
    from PIL import Image

    h, w = (int(v) for v in rng.integers(1, 7, size=2))
    image = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def make_entry(path: Path, kind: str, rng: np.random.Generator, raw: bytes = b"", cut: int = 0) -> Path | None:
    """Create an entry of ``kind`` at ``path`` (or beside it); return it when it is a FIFO (to unblock a reader)."""
    if kind == "png":
        path.write_bytes(_png(rng, "PNG"))
    elif kind == "jpg":
        path.write_bytes(_png(rng, "JPEG"))
    elif kind == "bytes":
        path.write_bytes(raw)
    elif kind == "truncated":
        image = _png(rng, "PNG")
        path.write_bytes(image[: cut % len(image)])
    elif kind == "fifo":
        os.mkfifo(path)
        return path
    elif kind == "broken-link":
        path.symlink_to(path.parent / "nowhere")
    elif kind == "dir":
        path.mkdir()
    elif kind == "dev-null":
        path.symlink_to("/dev/null")
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(path))
    elif kind == "hidden":
        path.with_name(f"._{path.name}").write_bytes(raw)
    elif kind == "text-file":
        path.with_suffix(".txt").write_text("not an image")
    return None


@pytest.mark.timeout(300)
@settings(BASE, max_examples=60)
@given(
    layout=st.sampled_from([1, 2, 2, 3]).flatmap(
        lambda n: st.fixed_dictionaries({c: st.lists(st.sampled_from(IMAGE_KINDS), max_size=4) for c in ["cat", "dog", "owl"][:n]})
    ),
    seed=st.integers(0, 2**31),
    raw=st.binary(max_size=64),
    cut=st.integers(0, 400),
)
def test_image_folders_with_special_and_corrupt_files(
    workdir: Callable[[], Path], layout: dict[str, list[str]], seed: int, raw: bytes, cut: int
) -> None:
    root = workdir()
    rng = np.random.default_rng(seed)
    fifos = []
    for name, kinds in layout.items():
        (root / name).mkdir()
        for i, kind in enumerate(kinds):
            fifo = make_entry(root / name / f"{i}.{'jpg' if kind == 'jpg' else 'png'}", kind, rng, raw, cut)
            if fifo is not None:
                fifos.append(fifo)
    counts = {name: sum(k in IMAGES_OK for k in kinds) for name, kinds in layout.items()}
    unknown = any(k in UNKNOWN for kinds in layout.values() for k in kinds)
    valid = None if unknown else (len(counts) >= 2 and min(counts.values()) >= 1)
    special = any(k not in IMAGES_OK | UNKNOWN for kinds in layout.values() for k in kinds)
    kind = "special-files" if special else ("corrupt-files" if unknown else "images")

    def check(source: Source) -> list[str]:
        problems = source_problems(source)
        if valid and not problems:
            expected = {n: c for n, c in counts.items() if c}
            if len(source.train) + len(source.test) != sum(expected.values()):
                problems.append(f"{len(source.train) + len(source.test)} images, expected {sum(expected.values())}")
            elif not same_labels(source, Counter(expected)):
                problems.append(f"class sizes differ from {expected}")
        return problems

    options = SourceOptions(path=str(root), image_size=4)
    attempt("image-folder", kind, lambda: load_source("image-folder", options), root, valid, check, tuple(fifos))


# ----------------------------------------------------------------------------------------------
# text, text-lm
# ----------------------------------------------------------------------------------------------

TEXT_EXTENSIONS = [".txt", ".csv", ".tsv", ".jsonl", ".json"]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie", "the", "was"]


@pytest.fixture(scope="module")
def tokenizer_dir() -> Iterator[Path]:
    pytest.importorskip("transformers")
    from transformers import BertTokenizer

    directory = Path(tempfile.mkdtemp(prefix="fztok"))
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(str(directory))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def text_options(path: Path, tokenizer: Path) -> SourceOptions:
    return SourceOptions(path=str(path), tokenizer=str(tokenizer), max_length=8, test_fraction=0.3)


TEXTS = st.one_of(
    st.text(max_size=10),
    st.sampled_from(["good movie", "", " ", "a\tb", "x\ny", '"q"', "\x00", "é", "the\u2028was", "bad"]),
)
JSON_LABELS = st.one_of(LABEL_CELLS, st.sampled_from([0, 1, 2, 1.0, 1.5, None, True, [1], float("nan")]))


@st.composite
def text_tables(draw: st.DrawFn) -> tuple[str, list[tuple[Any, Any]], str, str]:
    fmt = draw(st.sampled_from(["txt", "csv", "tsv", "jsonl", "json"]))
    easy = draw(st.booleans())  # half the tables draw from easy texts and labels
    if easy:
        texts, labels = st.sampled_from(["good movie", "bad movie", "the movie was good"]), st.sampled_from(["0", "1", "b"])
    else:
        texts, labels = TEXTS, JSON_LABELS if fmt in ("jsonl", "json") else LABEL_CELLS
    rows = draw(st.lists(st.tuples(texts, labels), max_size=6))
    return fmt, rows, draw(ENCODINGS), draw(st.sampled_from(["plain"] * 10 + ["ragged", "no-label"]))


def write_text_table(fmt: str, rows: list[tuple[Any, Any]], encoding: str, mode: str) -> tuple[str, bytes | None]:
    """The file name and bytes of ``rows`` in format ``fmt`` (``mode`` breaks it on purpose)."""
    if fmt == "txt":
        lines = [f"{t}\t{lab}" + ("\textra" if mode == "ragged" and i == 0 else "") for i, (t, lab) in enumerate(rows)]
        text = "".join(line + "\n" for line in lines)
        try:
            return "a.txt", text.encode(encoding)
        except UnicodeEncodeError:
            return "a.txt", None
    if fmt in ("csv", "tsv"):
        header = ["text", "label" if mode != "no-label" else "stars"]
        body = [[str(t), str(lab)] for t, lab in rows]
        if mode == "ragged" and body:
            body[0].append("extra")
        return f"a.{fmt}", table_bytes([header, *body], encoding, "\t" if fmt == "tsv" else ",")
    key = "label" if mode != "no-label" else "stars"
    objects = [{"text": t, key: lab} for t, lab in rows]
    if mode == "ragged" and objects:
        del objects[0]["text"]
    if fmt == "json":
        return "a.json", json.dumps(objects).encode("utf-8")
    return "a.jsonl", "".join(json.dumps(o) + "\n" for o in objects).encode("utf-8")


def text_oracle(fmt: str, data: bytes) -> tuple[bool, list[str]]:
    """Whether the text source must accept the file, and then the label names it holds (independent parse)."""
    try:
        if not decodes(data):
            raise Bad("encoding")
        text = data.decode("utf-8-sig")
        records: list[tuple[Any, Any]] = []
        if fmt == "txt":
            for line in text.split("\n"):
                line = line.removesuffix("\r")
                if line.strip():
                    fields = line.split("\t")
                    if len(fields) != 2:
                        raise Bad("ragged")
                    records.append((fields[0], fields[1]))
        elif fmt in ("csv", "tsv"):
            reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
            parsed = [r for r in reader if not is_blank(r)]
            if len(parsed) < 2 or [h.strip() for h in parsed[0]] != ["text", "label"]:
                raise Bad("table")
            if any(len(r) != 2 for r in parsed[1:]):
                raise Bad("ragged")
            records = [(r[0], r[1]) for r in parsed[1:]]
        else:
            objects = json.loads(text) if fmt == "json" else [json.loads(line) for line in text.split("\n") if line.strip()]
            for obj in objects:
                if "text" not in obj or "label" not in obj:
                    raise Bad("key")
                records.append((obj["text"], obj["label"]))
        if not records:
            raise Bad("empty")
        names = []
        for value, label in records:
            if not isinstance(value, str) or not value.strip():
                raise Bad("text")
            names.append(oracle_label(label))
        oracle_classes(names)
        return True, names
    except Bad:
        return False, []


@pytest.mark.timeout(300)
@settings(BASE, max_examples=150)
@given(table=text_tables())
def test_text_tables_load_right_or_are_refused_naming_the_file(
    workdir: Callable[[], Path], tokenizer_dir: Path, table: tuple[str, list[tuple[Any, Any]], str, str]
) -> None:
    fmt, rows, encoding, mode = table
    name, data = write_text_table(fmt, rows, encoding, mode)
    if data is None:
        return
    path = workdir() / name
    path.write_bytes(data)
    valid, names = text_oracle(fmt, data)

    def check(source: Source) -> list[str]:
        problems = source_problems(source)
        if not problems and valid:
            if source.train.x.dtype != torch.int64 or tuple(source.input_shape) != (8,):
                problems.append(f"token ids {source.train.x.dtype} {source.input_shape}")
            if not same_labels(source, Counter(names)):
                problems.append(f"labels differ from {Counter(names)}")
        return problems

    kind = "table-valid" if valid else "table-bad"
    attempt("text", kind, lambda: load_source("text", text_options(path, tokenizer_dir)), path, valid, check)


@pytest.mark.timeout(300)
@settings(BASE, max_examples=100)
@given(data=st.binary(max_size=200), extension=st.sampled_from(TEXT_EXTENSIONS), name=st.sampled_from(["text", "text-lm"]))
def test_text_random_bytes_never_crash(
    workdir: Callable[[], Path], tokenizer_dir: Path, data: bytes, extension: str, name: str
) -> None:
    path = workdir() / f"r{extension}"
    path.write_bytes(data)
    attempt(name, "bytes", lambda: load_source(name, text_options(path, tokenizer_dir)), path, None, source_problems)


@pytest.mark.timeout(120)
@settings(BASE, max_examples=30)
@given(kinds=st.lists(st.sampled_from(["fifo", "broken-link", "dir", "dev-null", "dev-zero", "socket", "good"]), min_size=1, max_size=4))
def test_text_globs_over_special_files(workdir: Callable[[], Path], tokenizer_dir: Path, kinds: list[str]) -> None:
    folder = workdir()
    fifos = []
    for i, kind in enumerate(kinds):
        path = folder / f"{i}.txt"
        if kind == "good":
            path.write_text("good movie\t1\nbad movie\t0\n" * 3)
        elif make_entry(path, kind, np.random.default_rng(0)) is not None:
            fifos.append(path)
    valid = "good" in kinds
    options = text_options(folder / "*.txt", tokenizer_dir)
    attempt("text", "special-files", lambda: load_source("text", options), folder, valid, source_problems, tuple(fifos))


# instructions (prompt/response files for instruction tuning)
INSTRUCTION_VALUES = st.one_of(TEXTS, st.sampled_from([None, 3, 1.5, ["yes"], {"a": 1}, True]))


@pytest.mark.timeout(300)
@settings(BASE, max_examples=60)
@given(data=st.binary(max_size=200), extension=st.sampled_from([".jsonl", ".json", ".csv", ".tsv"]))
def test_instruction_random_bytes_never_crash(workdir: Callable[[], Path], tokenizer_dir: Path, data: bytes, extension: str) -> None:
    path = workdir() / f"r{extension}"
    path.write_bytes(data)
    attempt("instructions", "bytes", lambda: load_source("instructions", text_options(path, tokenizer_dir)), path, None,
            source_problems)


@pytest.mark.timeout(300)
@settings(BASE, max_examples=60)
@given(records=st.lists(st.fixed_dictionaries(
    {"prompt": INSTRUCTION_VALUES, "response": INSTRUCTION_VALUES},
    optional={"candidates": st.one_of(INSTRUCTION_VALUES, st.lists(TEXTS, max_size=3)), "task": INSTRUCTION_VALUES},
), max_size=6))
def test_instruction_records_load_or_are_refused_naming_the_file(
    workdir: Callable[[], Path], tokenizer_dir: Path, records: list[dict[str, Any]]
) -> None:
    path = workdir() / "i.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    attempt("instructions", "records", lambda: load_source("instructions", text_options(path, tokenizer_dir)), path, None,
            source_problems)
