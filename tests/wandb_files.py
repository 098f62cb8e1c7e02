"""Read the history of a wandb run written offline (`run-<id>.wandb`), without any network.

The file is wandb's record log: a 7-byte header (":W&B", a 2-byte magic, a version byte), then
32 KiB blocks of records, each with a 7-byte header (crc32c, little-endian length, type:
1 full, 2 first, 3 middle, 4 last) whose payloads are `wandb_internal_pb2.Record` protobufs.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterator

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def find_run_file(path: str | Path) -> Path:
    """A `.wandb` file, or the newest one below a directory (a run dir or its wandb/ folder)."""
    path = Path(path)
    if path.is_file():
        return path
    files = sorted(path.rglob("run-*.wandb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(f"no wandb run file (run-*.wandb) below {path}")
    return files[-1]


def _payloads(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a wandb run file (missing :W&B header)")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer padding
            pos += room
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += room
            continue
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_offline_history(path: str | Path) -> list[dict[str, Any]]:
    """The rows passed to `run.log`, in order, as {key: value} (media as their JSON summaries)."""
    rows = []
    for kind, history in read_offline_records(path):
        if kind == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) if item.value_json else None
                         for item in history.item})
    return rows


def read_offline_records(path: str | Path) -> list[tuple[str, Any]]:
    """Every record of the run file as (record type, the record's message of that type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    out = []
    for payload in _payloads(find_run_file(path).read_bytes()):
        record = pb.Record()
        try:
            record.ParseFromString(payload)
        except Exception:  # noqa: BLE001 - a torn final record of a killed run
            continue
        kind = record.WhichOneof("record_type")
        out.append((kind, getattr(record, kind)))
    return out


def read_offline_summary(path: str | Path) -> dict[str, Any]:
    """The run summary a user sees: every summary update applied in order, values decoded."""
    summary = {}
    for kind, record in read_offline_records(path):
        if kind == "summary":
            for item in record.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return summary


def hidden_metrics(path: str | Path) -> set[str]:
    """Keys defined with `hidden=True` (no panel of their own in the workspace)."""
    return {r.name for kind, r in read_offline_records(path) if kind == "metric" and r.options.hidden}
