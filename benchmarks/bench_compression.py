"""Time every codec of ``strategies.compression`` on one large float32 update.

Run from the repository root::

    python -m benchmarks.bench_compression --numel 50000000 --repeats 5

For each codec it reports the best and median wall time of ``encode``,
``decode`` (``decompress``, validation included) and ``compress`` with error
feedback (encode + decode + residual), and the payload size relative to float32.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial

import numpy as np

from strategies.compression import CODECS, CompressionConfig, compress, decompress, wire_nbytes

logger = logging.getLogger("bench_compression")


def _time(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Best and median seconds of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def run(numel: int, repeats: int, codecs: Sequence[str], seed: int = 0) -> list[dict[str, float | str]]:
    """Benchmark ``codecs`` on a standard-normal float32 tensor of ``numel`` elements.

    Returns:
        One row per codec with keys ``codec``, ``ratio`` (wire bytes / float32
        bytes) and ``{encode,decode,compress_ef}_{best,median}`` in seconds.
    """
    update = [np.random.default_rng(seed).standard_normal(numel, dtype=np.float32)]
    shapes = [update[0].shape]
    rows: list[dict[str, float | str]] = []
    for name in codecs:
        config = CompressionConfig(codec=name)
        codec = CODECS[name]
        wire = codec.encode(update, config)
        residual = None if codec.lossless else [np.zeros_like(update[0])]
        row: dict[str, float | str] = {"codec": name, "ratio": wire_nbytes(wire) / update[0].nbytes}
        for label, fn in (
            ("encode", partial(codec.encode, update, config)),
            ("decode", partial(decompress, wire, shapes, config)),
            ("compress_ef", partial(compress, update, config, residual)),
        ):
            row[f"{label}_best"], row[f"{label}_median"] = _time(fn, repeats)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numel", type=int, default=50_000_000, help="elements of the update tensor")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per operation")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated codec names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    logger.info("numel=%d (%.0f MB float32), best/median of %d", args.numel, args.numel * 4 / 1e6, args.repeats)
    logger.info("%-11s %6s  %-15s  %-15s  %-15s", "codec", "ratio", "encode s", "decode s", "compress+EF s")
    for row in run(args.numel, args.repeats, codecs):
        logger.info(
            "%-11s %6.3f  %6.3f / %6.3f  %6.3f / %6.3f  %6.3f / %6.3f",
            row["codec"],
            row["ratio"],
            row["encode_best"],
            row["encode_median"],
            row["decode_best"],
            row["decode_median"],
            row["compress_ef_best"],
            row["compress_ef_median"],
        )


if __name__ == "__main__":
    main()
