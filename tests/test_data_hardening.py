"""Regression tests for bad data (hardening issue, section 5): one test per class of careless or hostile input.

Every data error names the file (and the line where one is to blame) and is a ValueError or OSError, which
the ClientApp turns into the node's error that the server logs. Special files never hang a loader.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets import Source, SourceOptions, TensorData, load_source
from datasets.core import DataFileError
from datasets.labels import (
    check_class_names,
    check_held_out,
    compare_class_names,
    label_name,
    parse_class_names,
    present_class_names,
)

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a socket's path must stay under 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="hd"))
    yield directory
    for path in sorted(directory.rglob("*"), key=lambda p: -len(p.parts)):
        if path.is_dir() and not path.is_symlink():
            path.rmdir()
        else:
            path.unlink()
    directory.rmdir()


def csv_file(tmp_path: Path, content: str | bytes, name: str = "site.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


GOOD_ROWS = "1,2,a\n3,4,b\n5,6,a\n7,8,b\n"


def load_csv(path: Path, **kw: object) -> Source:
    return load_source("csv", SourceOptions(path=str(path), **kw))  # type: ignore[arg-type]


def png(path: Path, value: int = 100) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (5, 5), (value, value, 0)).save(path)


def image_root(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 2) -> Path:
    for c, name in enumerate(classes):
        for i in range(per_class):
            png(root / name / f"{i}.png", 40 * c + i)
    return root


def load_images(root: Path, **kw: object) -> Source:
    return load_source("image-folder", SourceOptions(path=str(root), image_size=4, **kw))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# csv: non-finite and out-of-range values
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cell", "problem"),
    [
        ("inf", "non-finite value 'inf'"),
        ("-inf", "non-finite value '-inf'"),
        ("nan", "non-finite value 'nan'"),
        ("NaN", "non-finite value 'NaN'"),
        ("1e400", "non-finite value '1e400'"),  # overflows float64 itself
        ("1e308", "'1e308', beyond the float32 range"),
        ("-3.5e38", "'-3.5e38', beyond the float32 range"),
    ],
)
def test_csv_non_finite_or_float32_overflow_is_refused_with_file_line_column(tmp_path: Path, cell: str, problem: str) -> None:
    path = csv_file(tmp_path, f"a,b,label\n1,2,x\n3,{cell},y\n5,6,x\n")
    with pytest.raises(DataFileError, match=rf"{re.escape(str(path))}, line 3: feature column 'b' holds the {problem}|{re.escape(str(path))}, line 3: feature column 'b' holds {problem}") as info:
        load_csv(path)
    assert (info.value.path, info.value.line, info.value.column) == (str(path), 3, "b")


def test_csv_largest_float32_values_load_and_stay_finite(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "a,label\n3.4e38,x\n-3.4e38,y\n0,x\n1,y\n")
    source = load_csv(path)
    x = torch.cat([source.train.x, source.test.x])
    assert bool(torch.isfinite(x).all()) and float(x.abs().max()) > 0.5  # not collapsed to a constant column


@pytest.mark.parametrize(("cell", "what"), [("", "an empty cell"), ("NA", "'NA'"), ("null", "'null'")])
def test_csv_missing_feature_names_line_and_column(tmp_path: Path, cell: str, what: str) -> None:
    path = csv_file(tmp_path, f"a,b,label\n1,2,x\n3,4,y\n5,{cell},x\n")
    with pytest.raises(DataFileError, match=rf"{re.escape(str(path))}, line 4: feature column 'b' has missing values \({what}\)"):
        load_csv(path)


def test_csv_non_numeric_feature_names_the_value(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "a,colour,label\n1,red,x\n2,blue,y\n")
    with pytest.raises(DataFileError, match=rf"{re.escape(str(path))}, line 2: feature column 'colour' is not numeric: 'red'"):
        load_csv(path)


# ----------------------------------------------------------------------------------------------
# csv: empty, header-only, encoding, ragged, header problems
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r": is empty: no header and no data rows"),
        (b"\n  \n\n", r": is empty: no header and no data rows"),
        (b"a,b,label\n", r": has a header \(a, b, label\) but no data rows"),
        (b"a,b,label\n\n\n", r": has a header \(a, b, label\) but no data rows"),
        (b"a,b,label\n1,2,x\n3,\xff4,y\n", r", line 3: is not valid UTF-8 \(byte 0xff at byte 3 of the line\)"),
        ("a,label\n1,x\n2,y\n".encode("utf-16"), r": is UTF-16 or UTF-32"),
        (b"a,label\n1,x\n2\x00,y\n", r", line 3: holds a NUL character"),
        (b"a,b,label\n1,2,x\n3,4,5,y\n5,6,x\n", r", line 3: 4 fields where the header has 3 \(a, b, label\)"),
        (b"a,b,label\n1,2,x\n3,y\n5,6,x\n", r", line 3: 2 fields where the header has 3"),
        (b'a,b,label\n1,"2\n2",x\n3,4\n', r", line 4: 2 fields where the header has 3"),  # a quoted newline counts
        (b"a,a,label\n1,2,x\n3,4,y\n", r", line 1: column name 'a' appears twice in the header"),
        (b"a,b,target\n1,2,x\n3,4,y\n", r": label column 'label' not in the header; available columns: a, b, target"),
        (b"label\nx\ny\n", r": no feature column besides the label column 'label'"),
    ],
)
def test_csv_file_problems_name_the_file_and_the_problem(tmp_path: Path, content: bytes, message: str) -> None:
    path = csv_file(tmp_path, content)
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(path))}{message}"):
        load_csv(path)


@pytest.mark.parametrize(
    "content",
    [b"a,b,label\n1,2,x,5\n3,4,y,6\n", b"a,b,label\n1,2,x,\n3,4,y,\n"],
    ids=["extra-field-every-row", "trailing-comma"],
)
def test_csv_rows_longer_than_the_header_are_refused_not_shifted(tmp_path: Path, content: bytes) -> None:
    """pandas took the first field of such rows for an index and shifted every value one column left."""
    path = csv_file(tmp_path, content)
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(path))}, line 2: 4 fields where the header has 3"):
        load_csv(path)


def test_csv_boolean_column_is_not_numeric(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "a,flag,label\n1,True,x\n2,False,y\n")
    with pytest.raises(DataFileError, match=r"line 2: feature column 'flag' is not numeric: 'True'"):
        load_csv(path)


def test_quoted_csv_reads_exactly_as_the_plain_one(tmp_path: Path) -> None:
    """Quotes send a file through the exact reader, plain files through pandas: both give the same tensors."""
    import csv as csv_module

    rng = np.random.default_rng(0)
    rows = [[f"{v:.6g}" for v in rng.normal(size=3)] + [str(rng.choice(["cat", "dog", "7", "10"]))] for _ in range(40)]
    plain, quoted = tmp_path / "plain.csv", tmp_path / "quoted.csv"
    for path, quoting in ((plain, csv_module.QUOTE_MINIMAL), (quoted, csv_module.QUOTE_ALL)):
        with open(path, "w", newline="") as handle:
            writer = csv_module.writer(handle, quoting=quoting)
            writer.writerow(["a", "b", "c", "label"])
            writer.writerows(rows)
    assert b'"' not in plain.read_bytes() and b'"' in quoted.read_bytes()
    a, b = load_csv(plain), load_csv(quoted)
    assert a.class_names == b.class_names == ("10", "7", "cat", "dog")
    for split_a, split_b in ((a.train, b.train), (a.test, b.test)):
        assert torch.equal(split_a.x, split_b.x) and torch.equal(split_a.y, split_b.y)


def test_csv_header_only_is_not_reported_as_not_numeric(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "a,b,label\n")
    with pytest.raises(DataFileError) as info:
        load_csv(path)
    assert "numeric" not in str(info.value)


def test_csv_bom_blank_lines_and_spaces_are_fine(tmp_path: Path) -> None:
    path = csv_file(tmp_path, b"\xef\xbb\xbf a , label \r\n 1 , x\r\n\r\n2,y\r\n3, x \r\n4,y\r\n")
    source = load_csv(path)
    assert source.class_names == ("x", "y") and len(source.train) + len(source.test) == 4


# ----------------------------------------------------------------------------------------------
# csv and text: labels
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("1.5", r"line 3: label column 'label': label 1.5 is a number but not an integer"),
        ("inf", r"line 3: label column 'label': label inf is a number but not an integer"),
        ("", r"line 3: label column 'label' has missing values"),
        ("NA", r"line 3: label column 'label' has missing values"),
    ],
)
def test_csv_bad_label_names_line(tmp_path: Path, label: str, message: str) -> None:
    path = csv_file(tmp_path, f"a,label\n1,0\n2,{label}\n3,1\n")
    with pytest.raises(DataFileError, match=rf"{re.escape(str(path))}, {message}"):
        load_csv(path)


def test_integer_labels_are_one_class_however_written_and_sort_by_value(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "a,label\n1,7\n2,07\n3,7.0\n4,10\n5,2\n6,2\n")
    source = load_csv(path)
    assert source.class_names == ("2", "7", "10")  # by value, not as text ("10" < "2")
    assert sorted(torch.cat([source.train.y, source.test.y]).tolist()) == [0, 0, 1, 1, 1, 2]


@pytest.mark.parametrize(
    ("value", "name"),
    [(" cat ", "cat"), ("7", "7"), ("+7", "7"), ("7.0", "7"), (7, "7"), (7.0, "7"), ("-3", "-3"), ("NA", None),
     ("", None), (None, None), ("é", "é")],
)
def test_label_name(value: object, name: str | None) -> None:
    assert label_name(value) == name


@pytest.mark.parametrize("value", ["1.5", "inf", "-Infinity", "1e400", 1.5, float("nan"), True, [1], {"a": 1}])
def test_label_name_refuses_non_integer_numbers_and_other_types(value: object) -> None:
    with pytest.raises(ValueError, match="not an integer|a name or an integer"):
        label_name(value)


def test_single_class_without_class_names_is_refused(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "a,label\n1,x\n2,x\n3,x\n")
    with pytest.raises(DataFileError, match=rf"{re.escape(str(path))}: holds a single class \('x'\).*sets class-names to the full list"):
        load_csv(path)


def test_one_class_of_an_agreed_list_is_a_legitimate_data_owner(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = csv_file(tmp_path, "a,label\n1,x\n2,x\n3,x\n")
    with caplog.at_level(logging.INFO, logger="datasets.labels"):
        source = load_csv(path, class_names="x,y,z")
    assert source.num_classes == 3 and source.class_names == ("x", "y", "z")
    assert present_class_names(source) == ("x",)
    assert "holds 1 of the 3 classes (none of: y, z)" in caplog.text


@pytest.mark.parametrize(("names", "message"), [("x", "a single class"), ("x,,y", "distinct, non-empty"), ("x,y,x", "distinct")])
def test_class_names_of_fewer_than_two_or_repeated_names_are_refused(tmp_path: Path, names: str, message: str) -> None:
    path = csv_file(tmp_path, "a,label\n1,x\n2,y\n")
    with pytest.raises(ValueError, match=message):
        load_csv(path, class_names=names)
    with pytest.raises(ValueError, match=message):
        parse_class_names(names)


def test_csv_label_outside_class_names_is_refused_naming_label_and_line(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "a,label\n1,x\n2,y\n3,zebra\n4,x\n")
    with pytest.raises(DataFileError, match=rf"{re.escape(str(path))}: labels not in class_names \(x, y\): zebra \(first: 'zebra' at line 4\)"):
        load_csv(path, class_names="x,y")


# ----------------------------------------------------------------------------------------------
# special files as the data path: refused, never a hang
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_csv_data_path_that_is_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / "site.csv"
    os.mkfifo(path)
    with pytest.raises(DataFileError, match=rf"{re.escape(str(path))}: not a regular file but a FIFO"):
        load_csv(path)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("target", "kind"), [("/dev/zero", "a character device"), ("/dev/null", "a character device")])
def test_csv_data_path_linked_to_a_device_is_refused(tmp_path: Path, target: str, kind: str) -> None:
    path = tmp_path / "site.csv"
    path.symlink_to(target)
    with pytest.raises(DataFileError, match=rf"{re.escape(str(path))}: not a regular file but {kind}"):
        load_csv(path)


def test_csv_data_path_that_is_a_directory_or_broken_link(tmp_path: Path) -> None:
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(DataFileError, match="dir.csv: not a regular file but a directory"):
        load_csv(tmp_path / "dir.csv")
    (tmp_path / "gone.csv").symlink_to(tmp_path / "nowhere.csv")
    with pytest.raises(FileNotFoundError, match="gone.csv"):
        load_csv(tmp_path / "gone.csv")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_csv_names_the_file(tmp_path: Path) -> None:
    path = csv_file(tmp_path, "a,label\n1,x\n2,y\n")
    path.chmod(0)
    with pytest.raises(PermissionError, match="site.csv"):
        load_csv(path)


def test_data_file_error_is_a_value_error_that_pickles_with_its_fields(tmp_path: Path) -> None:
    err = DataFileError(tmp_path / "a.csv", "bad cell", line=3, column="b")
    again = pickle.loads(pickle.dumps(err))
    assert isinstance(again, ValueError)
    assert (str(again), again.path, again.line, again.column) == (str(err), str(tmp_path / "a.csv"), 3, "b")


# ----------------------------------------------------------------------------------------------
# image-folder: special, hidden, corrupt and unreadable files
# ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_image_folder_skips_special_files_with_a_warning_and_never_hangs(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = image_root(short_dir)
    cat = root / "cat"
    os.mkfifo(cat / "x.png")  # would block open() forever
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(cat / "s.png"))
    (cat / "broken.png").symlink_to(cat / "nowhere.png")
    (cat / "zero.png").symlink_to("/dev/zero")  # would stream forever
    (cat / "folder.png").mkdir()  # a directory with an image name: searched, holds nothing
    (root / "dog" / "loop").symlink_to(root / "dog")  # a link loop
    with caplog.at_level(logging.WARNING, logger="datasets.sources"):
        source = load_images(root)
    assert len(source.train) + len(source.test) == 4 and source.class_names == ("cat", "dog")
    for name, why in [("x.png", "a FIFO"), ("s.png", "a socket"), ("broken.png", "cannot be reached"),
                      ("zero.png", "a character device"), ("loop", "a link loop")]:
        assert name in caplog.text and why in caplog.text, (name, why)


def test_image_folder_skips_hidden_entries(tmp_path: Path) -> None:
    root = image_root(tmp_path)
    (root / "cat" / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS metadata, not an image
    png(root / ".ipynb_checkpoints" / "0.png")  # not a class
    source = load_images(root)
    assert source.class_names == ("cat", "dog") and len(source.train) + len(source.test) == 4


@pytest.mark.parametrize(
    "content", [b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 20, "truncate"], ids=["garbage", "bad-png", "truncated"]
)
def test_corrupt_image_names_the_file(tmp_path: Path, content: bytes | str) -> None:
    root = image_root(tmp_path)
    bad = root / "dog" / "bad.png"
    if content == "truncate":
        png(bad)
        bad.write_bytes(bad.read_bytes()[:40])
    else:
        bad.write_bytes(content)  # type: ignore[arg-type]
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(bad))}: cannot be read as an image"):
        load_images(root)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_image_names_the_file(tmp_path: Path) -> None:
    root = image_root(tmp_path)
    (root / "cat" / "0.png").chmod(0)
    with pytest.raises(PermissionError, match="0.png"):
        load_images(root)


def test_image_folder_single_class_and_empty_class_folders(tmp_path: Path) -> None:
    root = image_root(tmp_path, classes=("cat",), per_class=3)
    with pytest.raises(DataFileError, match=rf"{re.escape(str(root))}: holds a single class \('cat'\)"):
        load_images(root)
    assert load_images(root, class_names="cat,dog").num_classes == 2  # one owner's share of an agreed list
    (root / "dog").mkdir()
    with pytest.raises(FileNotFoundError, match=r"class folder\(s\) dog hold no image"):
        load_images(root)


def test_image_folder_class_outside_class_names_is_refused(tmp_path: Path) -> None:
    root = image_root(tmp_path, classes=("cat", "dog", "emu"))
    with pytest.raises(DataFileError, match=r"labels not in class_names \(cat, dog\): emu \(first: 'emu' at .*emu/0.png\)"):
        load_images(root, class_names="cat,dog")


def test_image_folder_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="not a directory of class folders"):
        load_images(tmp_path / "x.png")


# ----------------------------------------------------------------------------------------------
# text loaders
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from transformers import BertTokenizer

    directory = tmp_path_factory.mktemp("tok")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "movie"]
    (directory / "vocab.txt").write_text("".join(f"{word}\n" for word in vocab))
    BertTokenizer(str(directory / "vocab.txt")).save_pretrained(str(directory))
    return directory


def load_text(path: Path, tokenizer: Path, name: str = "text", **kw: object) -> Source:
    options = SourceOptions(path=str(path), tokenizer=str(tokenizer), max_length=6, **kw)  # type: ignore[arg-type]
    return load_source(name, options)


def jsonl(*objects: object) -> str:
    return "".join(json.dumps(o) + "\n" for o in objects)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.txt", b"good movie\t1\nbad \xc3(movie\t0\n", r"line 2: is not valid UTF-8"),
        ("a.csv", b"text,label\ngood,1\nbad\xff,0\n", r"line 3: is not valid UTF-8"),
        ("a.tsv", b"text\tlabel\ngood\t1\nbad\t0\xfe\n", r"line 3: is not valid UTF-8"),
        ("a.jsonl", b'{"text": "good", "label": 1}\n{"text": "bad\xff", "label": 0}\n', r"line 2: is not valid UTF-8"),
        ("a.txt", b"good movie\t1\nbad\tmovie\t0\n", r"line 2: a labelled .txt file has lines 'text<TAB>label'; found 3 fields"),
        ("a.csv", b"text,label\ngood,1\nbad,0,extra\n", r"line 3: 3 fields where the header has 2"),
        ("a.jsonl", jsonl({"text": "good", "label": 1}, {"label": 0}).encode(), r"line 2: column\(s\) text not found .*available: label"),
        ("a.jsonl", b'{"text": "good", "label": 1}\n{"text": "bad", "label": 0\n', r"line 2: is not valid JSON"),
        ("a.jsonl", b'{"text": "good", "label": 1}\n[1, 2]\n', r"line 2: a JSON object is expected, found list"),
        ("a.jsonl", jsonl({"text": "good", "label": 1}, {"text": None, "label": 0}).encode(), r"line 2: text in column 'text' is missing"),
        ("a.jsonl", jsonl({"text": "good", "label": 1}, {"text": 5, "label": 0}).encode(), r"line 2: text in column 'text' is int 5, not a string"),
        ("a.json", json.dumps([{"text": "good", "label": 1}, {"text": "bad", "label": True}]).encode(), r"row 2: label column 'label': a label is a name or an integer, got bool"),
        ("a.txt", b"", r"holds no example"),
        ("a.csv", b"", r": is empty: no header and no data rows"),
        ("a.csv", b"text,label\n", r"has a header \(text, label\) but no data rows"),
        ("a.jsonl", b"\n\n", r"holds no example"),
        ("a.txt", b"good movie\t1\nbad movie\t1.5\n", r"line 2: label column 'label': label 1.5 is a number but not an integer"),
        ("a.txt", b"good movie\tnan\nbad movie\t0\n", r"line 1: missing label in column 'label'"),
        ("a.txt", b"good movie\t1\n  \t0\n", r"line 2: empty text in column 'text'"),
        ("a.txt", b"good movie\t1\nbad movie\t1\n", r"holds a single class \('1'\)"),
    ],
)
def test_text_file_problems_name_file_and_line(
    tmp_path: Path, tokenizer_dir: Path, name: str, content: bytes, message: str
) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(path))}.*{message}"):
        load_text(path, tokenizer_dir)


def test_text_class_names_fix_indices_and_refuse_outsiders(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("good movie\tpos\nbad movie\tneg\ngood\tpos\nbad\tneg\n")
    source = load_text(path, tokenizer_dir, class_names="pos,neu,neg")
    assert source.class_names == ("pos", "neu", "neg") and source.num_classes == 3
    assert sorted(torch.cat([source.train.y, source.test.y]).tolist()) == [0, 0, 2, 2]
    with pytest.raises(DataFileError, match=rf"labels not in class_names \(pos, neg\): meh \(first: 'meh' at {re.escape(str(path))}, line 3\)"):
        path.write_text("good movie\tpos\nbad movie\tneg\nok\tmeh\n")
        load_text(path, tokenizer_dir, class_names="pos,neg")


def test_text_json_array_file(tmp_path: Path, tokenizer_dir: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"text": "good movie", "label": 1}, {"text": "bad movie", "label": 0}] * 2))
    source = load_text(path, tokenizer_dir)
    assert source.class_names == ("0", "1") and len(source.train) + len(source.test) == 4


@pytest.mark.timeout(30)
def test_text_glob_skips_a_fifo_with_a_warning(tmp_path: Path, tokenizer_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "a.txt").write_text("good movie\t1\nbad movie\t0\n" * 2)
    os.mkfifo(tmp_path / "b.txt")
    with caplog.at_level(logging.WARNING, logger="datasets.text"):
        source = load_text(tmp_path / "*.txt", tokenizer_dir)
    assert len(source.train) + len(source.test) == 4
    assert "b.txt (a FIFO (named pipe))" in caplog.text
    with pytest.raises(FileNotFoundError, match=r"no text file matches .*b.txt'.*skipped: .*b.txt \(a FIFO"):
        load_text(tmp_path / "b.txt", tokenizer_dir)


def test_text_lm_empty_or_too_short_file_names_it(tmp_path: Path, tokenizer_dir: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(empty))}: holds no text to learn from"):
        load_text(empty, tokenizer_dir, name="text-lm")
    short = tmp_path / "short.txt"
    short.write_text("good movie")
    with pytest.raises(DataFileError, match=rf"^{re.escape(str(short))}: holds a single block of max_length=6 tokens"):
        load_text(short, tokenizer_dir, name="text-lm")


# ----------------------------------------------------------------------------------------------
# Label agreement between data owners
# ----------------------------------------------------------------------------------------------


def test_compare_class_names_by_hand() -> None:
    same = compare_class_names(["a", "b", "c"], ["a", "b", "c"])
    assert same.agrees and (same.extra, same.missing, same.reordered) == ((), (), False)
    subset = compare_class_names(["a", "c"], ["a", "b", "c"])
    assert (subset.extra, subset.missing, subset.reordered, subset.agrees) == ((), ("b",), False, False)
    extra = compare_class_names(["d", "a", "e"], ["a", "b"])
    assert (extra.extra, extra.missing) == (("d", "e"), ("b",))
    swapped = compare_class_names(["b", "a"], ["a", "b"])
    assert (swapped.extra, swapped.missing, swapped.reordered) == ((), (), True)


def test_check_class_names_under_an_agreed_list_allows_a_subset_only() -> None:
    assert check_class_names(["a"], ["a", "b", "c"], where="node 7", allow_missing=True).missing == ("b", "c")
    with pytest.raises(ValueError, match=r"^node 7: labels not in class_names \(a, b, c\): d, e$"):
        check_class_names(["a", "d", "e"], ["a", "b", "c"], where="node 7", allow_missing=True)


def test_check_class_names_without_an_agreed_list_needs_the_same_list() -> None:
    with pytest.raises(ValueError, match=r"^node 7: lacks the labels b of \(a, b, c\); set class-names to the full list"):
        check_class_names(["a", "c"], ["a", "b", "c"], where="node 7")
    with pytest.raises(ValueError, match=r"node 7: orders its labels as \(b, a\), not \(a, b\)"):
        check_class_names(["b", "a"], ["a", "b"], where="node 7")
    assert check_class_names(["a", "b"], ["a", "b"], where="node 7").agrees


def test_two_owners_whose_label_sets_differ_are_detected(tmp_path: Path) -> None:
    """The issue's case: without class-names, 'c' is index 1 at one owner and index 2 at the other."""
    server = load_csv(csv_file(tmp_path, "f,label\n" + "".join(f"{i},{'abc'[i % 3]}\n" for i in range(12)), "server.csv"))
    node = load_csv(csv_file(tmp_path, "f,label\n" + "".join(f"{i},{'ac'[i % 2]}\n" for i in range(8)), "node.csv"))
    assert server.class_names == ("a", "b", "c") and node.class_names == ("a", "c")
    assert node.class_names is not None and server.class_names is not None
    with pytest.raises(ValueError, match=r"node.csv: lacks the labels b of \(a, b, c\)"):
        check_class_names(node.class_names, server.class_names, where=str(tmp_path / "node.csv"))
    # With the agreed list both map labels alike; the node holds a subset, which is fine.
    agreed = [load_csv(tmp_path / n, class_names="a,b,c") for n in ("server.csv", "node.csv")]
    assert agreed[0].class_names == agreed[1].class_names == ("a", "b", "c")
    check_class_names(present_class_names(agreed[1]), ("a", "b", "c"), where="node", allow_missing=True)


def test_every_classification_source_reports_class_names(tmp_path: Path) -> None:
    assert load_source("digits", SourceOptions()).class_names == tuple(str(d) for d in range(10))
    assert load_source("synthetic", SourceOptions(num_samples=200, num_partitions=2)).class_names == tuple(str(d) for d in range(10))
    assert load_source("linear", SourceOptions(num_samples=20)).class_names is None
    data = TensorData(x=torch.zeros(2, 1), y=torch.tensor([0, 1]))
    assert Source("toy", "classification", 2, (1,), data, data).class_names == ("0", "1")
    with pytest.raises(ValueError, match="class_names must be 2 distinct names"):
        Source("toy", "classification", 2, (1,), data, data, class_names=("a", "a"))
    with pytest.raises(ValueError, match="no class names"):
        Source("toy", "regression", None, (1,), data, data, class_names=("a",))


def test_a_held_out_set_with_a_single_class_is_refused() -> None:
    train = TensorData(x=torch.zeros(4, 1), y=torch.tensor([0, 1, 0, 1]))
    test = TensorData(x=torch.zeros(2, 1), y=torch.tensor([1, 1]))
    source = Source("csv", "classification", 2, (1,), train, test, class_names=("neg", "pos"))
    with pytest.raises(ValueError, match=r"held-out set of source 'csv' holds 1 class\(es\) \('pos'\)"):
        check_held_out(source)
    check_held_out(Source("csv", "classification", 2, (1,), train, train))  # two classes: fine
    assert present_class_names(source) == ("neg", "pos")


# ----------------------------------------------------------------------------------------------
# The wire to the server: a node's data error reaches the ClientApp's NodeDataError
# ----------------------------------------------------------------------------------------------


def test_node_file_with_a_label_outside_class_names_is_refused_naming_the_label(tmp_path: Path) -> None:
    from flwr.common import Context, RecordDict

    from flower_app.client_app import NodeDataError, client_fn
    from flower_app.config import parse_run_config
    from flower_app.data import client_data

    path = csv_file(tmp_path, "f,label\n1,cat\n2,dog\n3,cat\n4,wolf\n")
    run_config = {"dataset": "csv", "class-names": "cat,dog", "data-path": str(path)}
    with pytest.raises(ValueError, match=r"labels not in class_names \(cat, dog\): wolf \(first: 'wolf' at line 5\)"):
        client_data(parse_run_config(run_config), {"data-path": str(path)})
    context = Context(run_id=1, node_id=99, node_config={"data-path": str(path)}, state=RecordDict(), run_config=run_config)
    with pytest.raises(NodeDataError, match=r"node 99 cannot load its data .*DataFileError: .*site.csv.*wolf"):
        client_fn(context)


def test_label_counts_are_finite_integers_for_a_subset_owner(tmp_path: Path) -> None:
    """A one-class owner under an agreed list still reports a count for every class."""
    from flower_app.data import label_counts

    source = load_csv(csv_file(tmp_path, "a,label\n1,x\n2,x\n3,x\n"), class_names="x,y")
    counts = label_counts(source.train, source.num_classes)
    assert set(counts) == {"data_label_0", "data_label_1"} and counts["data_label_1"] == 0
    assert np.isfinite(list(counts.values())).all()
