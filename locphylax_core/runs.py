"""The run store: one folder per run under ``runs/``.

Layout of ``runs/<id>/`` (see docs/run_store.md)::

    config.yaml           the validated configuration
    state.json            status, finished stages, per-stage seconds and results (for resume)
    metrics.jsonl         one row per evaluation point: stage, method, step, metrics
    summary.json          the versioned contract the app and scripts read (schema 1)
    progress.json         what is running now (for live progress in the app)
    tokenizer/            the tokenizer (tokenizer.json, no pickle)
    checkpoints/<key>/    config.json + model.safetensors per finished stage
    hidden/<key>.safetensors   probe-set hidden states per stage
    probe.jsonl           the fixed probe set (text, group, label)

Every whole-file write goes to a temporary file in the same folder and is moved into place with
``os.replace``, so a reader or a crash never sees half a file. Run ids are created with
``os.mkdir`` (which fails if the folder exists), so two runs started at once never share one.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import secrets
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import RunError

SUMMARY_SCHEMA = 1


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunError(f"{path}: missing") from None
    except json.JSONDecodeError as e:
        raise RunError(f"{path}: corrupt JSON ({e})") from None


def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def new_run_id(preset: str) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in preset)[:40] or "run"
    return f"{stamp}-{safe}-{secrets.token_hex(3)}"


class RunDir:
    """A run folder and its files. Create with :meth:`create`; open an existing one with ``RunDir(path)``."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, root: Path, preset: str, run_id: str | None = None) -> "RunDir":
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            rid = run_id or new_run_id(preset)
            try:
                os.mkdir(root / rid)  # atomic: fails if another process took the name
                return cls(root / rid)
            except FileExistsError:
                if run_id is not None:
                    raise RunError(f"run folder {root / rid} already exists") from None
        raise RunError(f"could not create a unique run folder under {root}")

    # --- paths
    @property
    def run_id(self) -> str:
        return self.path.name

    def checkpoint(self, key: str) -> Path:
        return self.path / "checkpoints" / key.replace("/", "__")

    def hidden(self, key: str) -> Path:
        return self.path / "hidden" / (key.replace("/", "__") + ".safetensors")

    @property
    def cancel_file(self) -> Path:
        return self.path / "CANCEL"

    # --- state
    def read_state(self) -> dict:
        return read_json(self.path / "state.json")

    def write_state(self, state: dict) -> None:
        atomic_write_json(self.path / "state.json", state)

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.path / "summary.json", summary)

    def read_summary(self) -> dict:
        s = read_json(self.path / "summary.json")
        if not isinstance(s, dict) or s.get("schema") != SUMMARY_SCHEMA:
            raise RunError(f"{self.path / 'summary.json'}: unknown schema {s.get('schema') if isinstance(s, dict) else s!r}")
        return s

    def write_progress(self, **fields) -> None:
        atomic_write_json(self.path / "progress.json", {**fields, "time": _dt.datetime.now().isoformat(timespec="seconds")})

    # --- metrics: appended a line at a time; on resume, rows of unfinished stages are dropped
    def append_metric(self, row: dict) -> None:
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        p = self.path / "metrics.jsonl"
        if not p.exists():
            return []
        rows = []
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write: skip it
        return rows

    def keep_metrics(self, finished: set[str]) -> None:
        rows = [r for r in self.read_metrics() if r.get("key") in finished]
        atomic_write_text(self.path / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))


def list_runs(root: Path) -> Iterator[dict]:
    """Every run folder under ``root``, newest first, with its status (never raises on a bad folder)."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted((x for x in root.iterdir() if x.is_dir() and not x.name.startswith((".", "_"))), reverse=True):
        info = {"run_id": p.name, "path": str(p), "status": "unknown", "preset": None, "finished": []}
        try:
            st = json.loads((p / "state.json").read_text())
            info.update(status=st.get("status", "unknown"), preset=st.get("preset"), finished=st.get("finished", []))
        except FileNotFoundError:
            info["status"] = "incomplete (no state.json)"
        except (json.JSONDecodeError, OSError):
            info["status"] = "corrupt (state.json unreadable)"
        yield info


def find_run(ref: str, root: Path) -> RunDir:
    """A run by folder path, id, or unique id prefix."""
    p = Path(ref)
    if p.is_dir():
        return RunDir(p)
    root = Path(root)
    if (root / ref).is_dir():
        return RunDir(root / ref)
    matches = [x for x in root.glob(f"{ref}*") if x.is_dir()] if root.is_dir() else []
    if len(matches) == 1:
        return RunDir(matches[0])
    if len(matches) > 1:
        raise RunError(f"run {ref!r} is ambiguous: {sorted(m.name for m in matches)}")
    raise RunError(f"no run {ref!r} under {root}")
