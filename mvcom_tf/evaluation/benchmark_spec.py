"""Benchmark specifications `<kind>:<path>` (no TensorFlow here: flag validators use it)."""

from __future__ import annotations

import posixpath

KINDS = ("bin", "pairs", "csv", "rfw", "ijb", "synthetic")


def parse_benchmark(spec: str) -> tuple[str, str]:
    """`<kind>:<path>` -> (kind, path); a bare path (also `gs://...`) is the synthetic kind."""
    kind, sep, path = spec.partition(":")
    if sep and kind in KINDS:
        if not path:
            raise ValueError(f"{spec!r} names no file or folder after '{kind}:'")
        return kind, path
    if sep and not path.startswith("//") and "/" not in kind:
        raise ValueError(f"unknown benchmark kind {kind!r} in {spec!r}; expected one of {', '.join(KINDS)}")
    return "synthetic", spec


def benchmark_key(kind: str, path: str) -> str:
    """results.json's key: `<kind>:<file or folder name>`."""
    return f"{kind}:{posixpath.basename(path.rstrip('/'))}"
