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
``os.replace``, so a reader or a crash never sees half a file. A run folder is set up (config,
tokenizer, probe set, first state) in a hidden temporary folder that is renamed into place when
complete, so a run folder either is resumable or does not exist; the rename fails if the name is
taken, so two runs started at once never share one. One process at a time holds a run: an
exclusive ``flock`` on ``<run>/.lock`` (:class:`RunLock`), which the OS releases when the process
ends, however it ends.
"""

from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import RunError

SUMMARY_SCHEMA = 1
LOCK_FILE = ".lock"
SETUP_PREFIX = ".creating-"  # a run folder being set up (hidden: list_runs skips it)
SETUP_SWEEP_AGE_S = 60.0


def os_problem(e: OSError) -> str:
    """An OSError as one line: what the OS said and about which path (no traceback)."""
    where = f"{e.filename}: " if getattr(e, "filename", None) else ""
    full = (" (the disk is full: free some space; a run keeps its finished stages and `locphylax resume` "
            "continues it)") if e.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{where}{e.strerror or type(e).__name__}{full}"


def wrapped_os_error(e: BaseException, path=None) -> OSError | None:
    """The OS error a library reports in its own exception type (safetensors' SafetensorError:
    "I/O error: No space left on device (os error 28) at path ..."), as that OSError about ``path``
    (None: the path the message names); None when ``e`` carries none."""
    found = re.search(r"\(os error (\d+)\)", str(e)) if type(e).__name__ == "SafetensorError" else None
    if found is None:
        return None
    code = int(found.group(1))
    named = re.search(r'at path "(.*)"', str(e))
    return OSError(code, os.strerror(code), str(path) if path is not None else named and named.group(1))


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:  # a read-only folder, a file where a folder should be, a full disk...
        raise RunError(f"cannot write {path}: {os_problem(e)}") from None
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


def json_safe(obj: Any) -> Any:
    """``obj`` with every float that is nan or infinite as None: JSON has no such numbers, and
    json.dumps would write a bare NaN that strict readers (a browser's, scikit-learn's) refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


MAX_RUN_FILE_BYTES = 16 << 20  # a run's JSON files (state, summary, metrics, analysis, probe set)
MAX_JSON_DEPTH = 64  # what the run store writes is at most 6 deep


class RunFileError(RunError):
    """A run file that cannot be read as one: missing (``missing``), not a regular file, outside its
    run folder, too large, not UTF-8, not JSON, nested too deeply or of the wrong shape. ``reason``
    says which without the path (for lists and pages that name the file themselves)."""

    def __init__(self, path, reason: str, missing: bool = False):
        super().__init__(f"{path}: {reason}")
        self.reason = reason
        self.missing = missing


_FILE_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a device"),
               (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket"))


def read_run_file(path: Path, within: Path | None = None, limit: int = MAX_RUN_FILE_BYTES) -> bytes:
    """The bytes of a run's file, read only if it is a regular file of at most ``limit`` bytes inside
    the folder ``within`` (default: the file's own folder) once links are resolved. A named pipe, a
    device, a link that leaves the folder or a file too large raises :class:`RunFileError`: never a
    hang on a FIFO or a memory exhausted by ``/dev/zero``."""
    path = Path(path)
    base = Path(os.path.realpath(within if within is not None else path.parent))
    real = Path(os.path.realpath(path))
    if real != base and base not in real.parents:
        raise RunFileError(path, "refused: a link to a file outside the run folder")
    try:
        # O_NONBLOCK: opening a named pipe returns at once (and fstat then refuses it); O_NOFOLLOW:
        # the resolved path must not have become a link since
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise RunFileError(path, "missing", missing=True) from None
    except OSError as e:
        raise RunFileError(path, f"cannot be read ({e.strerror or type(e).__name__})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((k for test, k in _FILE_KINDS if test(st.st_mode)), "not a plain file")
            raise RunFileError(path, f"refused: {kind}, not a regular file")
        if st.st_size > limit:
            raise RunFileError(path, f"refused: {st.st_size:,} bytes is larger than a run file may be "
                                     f"({limit:,})")
        chunks, n = [], 0
        while n <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - n))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
        if n > limit:  # it grew while read
            raise RunFileError(path, f"refused: larger than a run file may be ({limit:,} bytes)")
        return b"".join(chunks)
    except OSError as e:
        raise RunFileError(path, f"cannot be read ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)


def _too_deep(obj, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether ``obj`` nests lists and mappings more than ``limit`` deep (iteratively: no recursion)."""
    if not isinstance(obj, (dict, list)):
        return False
    stack = [(obj, 1)]
    while stack:
        o, depth = stack.pop()
        if depth > limit:
            return True
        values = o.values() if isinstance(o, dict) else o
        stack.extend((v, depth + 1) for v in values if isinstance(v, (dict, list)))
    return False


def parse_json(text: str, where) -> Any:
    """``json.loads`` with bounded nesting: RunFileError for text that is not JSON or nests more
    than MAX_JSON_DEPTH deep (which would raise RecursionError here or in whatever reads it next)."""
    try:
        obj = json.loads(text)
    except RecursionError:
        obj = None
        deep = True
    except ValueError as e:
        raise RunFileError(where, f"corrupt JSON ({str(e)[:120]})") from None
    else:
        deep = _too_deep(obj)
    if deep:
        raise RunFileError(where, f"corrupt (nested more than {MAX_JSON_DEPTH} deep)")
    return obj


def read_run_text(path: Path, within: Path | None = None, limit: int = MAX_RUN_FILE_BYTES) -> str:
    """A run file's text (:func:`read_run_file`), with RunFileError for one that is not UTF-8."""
    try:
        return read_run_file(path, within, limit).decode("utf-8")
    except UnicodeDecodeError:
        raise RunFileError(path, "corrupt (not UTF-8 text; a binary file?)") from None


def read_json(path: Path, within: Path | None = None, limit: int = MAX_RUN_FILE_BYTES) -> Any:
    """A run's JSON file, read safely (:func:`read_run_file`, :func:`parse_json`)."""
    return parse_json(read_run_text(path, within, limit), path)


def read_jsonl(path: Path, within: Path | None = None, limit: int = MAX_RUN_FILE_BYTES,
               strict: bool = False) -> tuple[list[tuple[int, Any]], list[int]]:
    """A JSON-lines run file: ``(rows, bad)``, rows as (line number, value) of every line that parses,
    ``bad`` the numbers of the lines that do not (cut by a kill mid-write, or nested too deeply).
    ``strict``: text that is not UTF-8 is a RunFileError (else it is replaced)."""
    data = read_run_file(path, within, limit)
    try:
        text = data.decode("utf-8", errors="strict" if strict else "replace")
    except UnicodeDecodeError:
        raise RunFileError(path, "corrupt (not UTF-8 text; a binary file?)") from None
    rows, bad = [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((i, parse_json(line, path)))
        except RunFileError:
            bad.append(i)
    return rows, bad


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_rate(v) -> bool:
    return v is None or (math.isfinite(v) and 0.0 <= v <= 1.0)


def _check_block(block, where: str) -> str | None:
    """Why a summary's result block (``{"cacc", "asr": {...}, ...}``) has the wrong shape, or None."""
    if block is None:
        return None
    if not isinstance(block, dict):
        return f"{where} is not a mapping"
    if "cacc" not in block or not (block["cacc"] is None or _is_number(block["cacc"])):
        return f"{where}.cacc is missing or not a number"
    if not _is_rate(block["cacc"]):  # a page would show 1e308 as "Infinity" and -5 as "-500%"
        return f"{where}.cacc is {block['cacc']!r}, not a rate between 0 and 1"
    for key in ("asr", "asr_raw"):
        rates = block.get(key, {})
        if not isinstance(rates, dict) or (key == "asr" and key not in block):
            return f"{where}.{key} is missing or not a mapping"
        bad = [k for k, v in rates.items() if not (v is None or _is_number(v))]
        if bad:
            return f"{where}.{key}.{bad[0]} is not a number"
        bad = [k for k, v in rates.items() if not _is_rate(v)]
        if bad:
            return f"{where}.{key}.{bad[0]} is {rates[bad[0]]!r}, not a rate between 0 and 1"
    util = block.get("utility")
    if util is not None and not (isinstance(util, dict) and (util.get("value") is None or _is_number(util.get("value")))):
        return f"{where}.utility is not a mapping with a numeric value"
    return None


def summary_problem(s) -> str | None:
    """Why a ``summary.json`` of schema 1 does not have the shape the readers rely on, or None."""
    if not isinstance(s, dict):
        return "not a mapping"
    if not isinstance(s.get("run_id"), str):
        return "run_id is missing or not a string"
    for key in ("stages", "baselines"):
        if not isinstance(s.get(key), dict):
            return f"{key} is missing or not a mapping"
        for name, block in s[key].items():
            problem = _check_block(block, f"{key}.{name}")
            if problem:
                return problem
    problem = _check_block(s.get("clean_model"), "clean_model")
    if problem:
        return problem
    for key in ("seconds", "triggers"):
        if not isinstance(s.get(key, {}), dict):
            return f"{key} is not a mapping"
    bad = [k for k, v in s.get("seconds", {}).items() if not _is_number(v)]
    if bad:
        return f"seconds.{bad[0]} is not a number"
    return None


def _str_or_none(v) -> bool:
    return v is None or isinstance(v, str)


def state_problem(state) -> str | None:
    """Why a ``state.json`` has the wrong shape for its readers, or None."""
    if not isinstance(state, dict):
        return "not a mapping"
    finished = state.get("finished", [])
    if not isinstance(finished, list) or not all(isinstance(k, str) for k in finished):
        return "finished is not a list of stage names"
    for key in ("status", "preset", "error"):
        if not _str_or_none(state.get(key)):
            return f"{key} is not a string"
    for key in ("results", "seconds", "total_steps"):
        if not isinstance(state.get(key, {}), dict):
            return f"{key} is not a mapping"
    if not all(_is_number(v) for v in state.get("total_steps", {}).values()):
        return "total_steps is not a mapping of numbers"
    return None


def progress_problem(progress) -> str | None:
    """Why a ``progress.json`` has the wrong shape for the job panel, or None."""
    if not isinstance(progress, dict):
        return "not a mapping"
    for key in ("status", "key", "part", "error"):
        if not _str_or_none(progress.get(key)):
            return f"{key} is not a string"
    if not (progress.get("step") is None or _is_number(progress["step"])):
        return "step is not a number"
    return None


def _rates_problem(rates, where: str) -> str | None:
    if not isinstance(rates, dict):
        return f"{where} is not a mapping"
    bad = [k for k, v in rates.items() if not (v is None or _is_number(v))]
    return f"{where}.{str(bad[0])[:40]} is not a number" if bad else None


def metric_row_problem(row) -> str | None:
    """Why one ``metrics.jsonl`` row has the wrong shape for the curves and tables, or None."""
    if not isinstance(row, dict):
        return "not a mapping"
    for key in ("key", "method", "stage", "split"):
        if not isinstance(row.get(key), str):
            return f"{key} is missing or not a string"
    step = row.get("step")
    if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
        return "step is missing or not a whole number"
    if "cacc" not in row or not (row["cacc"] is None or _is_number(row["cacc"])):
        return "cacc is missing or not a number"
    if "asr" not in row:
        return "asr is missing"
    for key in ("asr", "asr_raw"):
        if key in row:
            problem = _rates_problem(row[key], key)
            if problem:
                return problem
    return None


def probe_row_problem(row) -> str | None:
    """Why one ``probe.jsonl`` row is not ``{"text": str, "group": str, "label": int}``, or None."""
    if not isinstance(row, dict):
        return "not a mapping"
    for key in ("text", "group"):
        if not isinstance(row.get(key), str):
            return f"{key} is missing or not a string"
    label = row.get("label")
    if not (isinstance(label, int) and not isinstance(label, bool)):
        return "label is missing or not a whole number"
    return None


def parse_metrics(rows: list[tuple[int, Any]]) -> tuple[list[dict], list[str]]:
    """The well-shaped rows of a parsed ``metrics.jsonl`` and why each other one was left out."""
    good, problems = [], []
    for line, row in rows:
        problem = metric_row_problem(row)
        if problem:
            problems.append(f"line {line}: {problem}")
        else:
            good.append(row)
    return good, problems



def file_sha256(path: Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_folder_atomically(folder: Path, write) -> None:
    """``write(tmp)`` fills a temporary sibling folder, which then replaces ``folder`` in one
    rename: a reader or a crash never sees half a checkpoint."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        try:
            write(tmp)
        except Exception as e:  # a full disk while safetensors writes: the OSError, said in one line
            os_error = wrapped_os_error(e, folder)
            if os_error is None:
                raise
            raise os_error from None
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _id_part(preset: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in preset)[:40] or "run"


def new_run_id(preset: str) -> str:
    """``<date>-<time>-<preset>-<6 hex digits>``; the preset as :func:`run_of_preset` reads it back."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{_id_part(preset)}-{secrets.token_hex(3)}"


def run_of_preset(run_id: str, preset: str) -> bool:
    """Whether ``run_id`` (from :func:`new_run_id`) names a run of ``preset``, whose name may itself
    hold hyphens (``live-smollm2``)."""
    return "-".join(run_id.split("-")[2:-1]) == _id_part(preset)


JOBS_DIR = ".jobs"  # beside the runs: the app's job records and logs, and the warm standby (locphylax_core.jobs)


def jobs_dir(runs_root: str | Path) -> Path:
    """The run store's folder of job records (docs/run_store.md; ``list_runs`` skips it)."""
    return Path(runs_root) / JOBS_DIR


def read_record(path: Path) -> dict | None:
    """A job record or a run's state / progress, through the run store's safe reader (a named pipe
    or a link to /dev/zero in its place is refused, not read); None when it cannot be read or is not
    a mapping."""
    try:
        v = read_json(path)
        return v if isinstance(v, dict) else None
    except RunFileError:
        return None


def check_runs_root(root: Path) -> Path:
    """The runs folder, created if needed; a clear RunError when it is a file or cannot be written."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise RunError(f"runs folder {root} is a file, not a folder; pass --runs a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"runs folder {root} cannot be created ({os_problem(e)})") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise RunError(f"runs folder {root} is not writable; pass --runs a folder you can write to")
    return root


class RunLock:
    """The one process that holds a run: an exclusive, non-blocking ``flock`` on ``<run>/.lock``,
    which also holds the holder's pid for the refusal message. The OS drops the lock when its
    process ends, however it ends (exit, exception, SIGKILL), so a crash never leaves a stale lock.
    flock locks belong to an open file, so a second holder in the same process is refused too."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd: int | None = None

    @property
    def file(self) -> Path:
        return self.folder / LOCK_FILE

    def acquire(self) -> "RunLock":
        try:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"run folder {self.folder} is not writable ({os_problem(e)}); a run can only be "
                           "continued where it can write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunError(f"run folder {self.folder}: cannot take its lock ({os_problem(e)})") from None
            pid = holder_pid(self.folder)
            raise RunError(f"run {self.folder.name} is held by another process (pid {pid or 'unknown'}): it is "
                           "running or being resumed there; wait for it to end or `locphylax cancel "
                           f"{self.folder.name}`") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)  # the pid stays in the file; only the flock counts
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()


def holder_pid(folder: Path) -> int | None:
    """The pid of the process holding the run in ``folder``, or None when no process holds it."""
    try:
        fd = os.open(Path(folder) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            try:
                return int(os.read(fd, 32).decode("ascii", "replace").strip() or 0) or -1
            except ValueError:
                return -1  # held, by a pid we cannot read
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def pid_alive(pid: int, token: str) -> bool:
    """True when ``pid`` runs and is the process we think (its command line holds ``token``: a job's
    run id, a standby's token), not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            if proc.joinpath("stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return False
            return token in proc.joinpath("cmdline").read_bytes().decode(errors="replace")
        except (OSError, IndexError):
            return False
    return True


INTERRUPTED = "interrupted"


def shown_status(folder: Path, status: str) -> str:
    """A run's status as its state.json says, except that a run whose state says "running" while no
    process holds its lock was killed without a word (SIGKILL, a crash, a power cut): it is shown as
    interrupted (resumable), never as running."""
    if status == "running" and holder_pid(folder) is None:
        return INTERRUPTED
    return status


class RunDir:
    """A run folder and its files. Create with :meth:`create`; open an existing one with ``RunDir(path)``.

    The folder's layout (docs/run_store.md) is spelled here and nowhere else: the names below, and
    a property or method per file and folder (``config_path``, ``tokenizer_dir``, ``checkpoint(key)``...)."""

    # the names inside a run folder
    CONFIG = "config.yaml"
    TOKENIZER = "tokenizer"
    PROBE = "probe.jsonl"
    STATE = "state.json"
    METRICS = "metrics.jsonl"
    PROGRESS = "progress.json"
    SUMMARY = "summary.json"
    ANALYSIS = "analysis.json"
    ANALYSIS_DIR = "analysis"
    FIGURES_DIR = "figures"  # under ANALYSIS_DIR
    CHECKPOINTS = "checkpoints"
    HIDDEN = "hidden"
    CANCEL = "CANCEL"
    LOCK = LOCK_FILE

    def __init__(self, path: Path):
        self.path = Path(path)

    @classmethod
    def create(cls, root: Path, preset: str, run_id: str | None = None, setup=None,
               lock: bool = False) -> "RunDir":
        """A new run folder under ``root``. ``setup(tmp_run)`` first fills a hidden temporary folder
        (config, tokenizer, probe set, first state), which is renamed into place only when complete:
        a kill during set-up leaves no half run folder, only a hidden one that the next create
        removes. ``lock``: hold the run's :class:`RunLock` from before it appears (``run.lock``)."""
        root = check_runs_root(root)
        _sweep_setup_folders(root)
        for _ in range(20):
            rid = run_id or new_run_id(preset)
            if (root / rid).exists():
                if run_id is not None:
                    raise RunError(f"run folder {root / rid} already exists")
                continue
            tmp = root / f"{SETUP_PREFIX}{rid}.{secrets.token_hex(4)}"
            try:
                os.mkdir(tmp)
            except OSError as e:
                raise RunError(f"cannot create a run folder under {root} ({os_problem(e)})") from None
            held = RunLock(tmp).acquire()  # marks the set-up folder live; moves with the rename
            try:
                if setup is not None:
                    setup(cls(tmp))
                try:
                    # rename(2) onto an existing folder fails unless it is empty; a run folder is
                    # never empty (it is created whole), so a taken name fails here
                    if (root / rid).exists():
                        raise FileExistsError(errno.EEXIST, "exists", str(root / rid))
                    os.rename(tmp, root / rid)
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise RunError(f"cannot create run folder {root / rid} ({os_problem(e)})") from None
                    if run_id is not None:
                        raise RunError(f"run folder {root / rid} already exists") from None
                    shutil.rmtree(tmp, ignore_errors=True)
                    held.release()
                    continue
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
                held.release()
                raise
            run = cls(root / rid)
            held.folder = run.path
            if lock:
                run.lock = held
            else:
                held.release()
            return run
        raise RunError(f"could not create a unique run folder under {root}")

    lock: RunLock | None = None  # the lock create(lock=True) took for the caller

    # --- paths
    @property
    def run_id(self) -> str:
        return self.path.name

    @staticmethod
    def file_key(key: str) -> str:
        """A stage key as a file name (and as an array name in the run's files): ``clean_ft/stage1``
        is ``clean_ft__stage1``."""
        return key.replace("/", "__")

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / self.TOKENIZER

    @property
    def probe_path(self) -> Path:
        return self.path / self.PROBE

    @property
    def state_path(self) -> Path:
        return self.path / self.STATE

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def progress_path(self) -> Path:
        return self.path / self.PROGRESS

    @property
    def summary_path(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def analysis_path(self) -> Path:
        return self.path / self.ANALYSIS

    @property
    def analysis_dir(self) -> Path:
        return self.path / self.ANALYSIS_DIR

    @property
    def figures_dir(self) -> Path:
        """Where ``locphylax export`` writes a run's figures by default."""
        return self.analysis_dir / self.FIGURES_DIR

    @classmethod
    def analysis_file(cls, name: str) -> str:
        """The path, relative to the run folder (as ``analysis.json`` records it), of the analysis's
        array file ``name`` (``projection_tsne``, ``heads_<key>``, ``layers_<key>``)."""
        return f"{cls.ANALYSIS_DIR}/{name}.safetensors"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def hidden_dir(self) -> Path:
        return self.path / self.HIDDEN

    def checkpoint(self, key: str) -> Path:
        return self.checkpoints_dir / self.file_key(key)

    def hidden(self, key: str) -> Path:
        return self.hidden_dir / (self.file_key(key) + ".safetensors")

    @property
    def cancel_file(self) -> Path:
        return self.path / self.CANCEL

    @property
    def lock_file(self) -> Path:
        return self.path / self.LOCK

    def is_run(self) -> bool:
        """The folder was set up as a run (config.yaml and state.json)."""
        return self.config_path.is_file() and self.state_path.is_file()

    def ask_to_stop(self) -> bool:
        """Ask the run to stop after its current step (the CANCEL file), only while a process holds
        it: a CANCEL left in a run nobody runs would stop its next resume at once. True when asked."""
        if holder_pid(self.path) is None:
            return False
        self.cancel_file.touch()
        return True

    def clean_stale_temporaries(self) -> list[str]:
        """Remove what interrupted writes left: hidden temporary files and folders of atomic writes
        and checkpoint saves (``.name.XXXX``), in the run folder and its checkpoint/hidden folders.
        Only the holder of the run's lock may call this (nothing else writes the folder then)."""
        removed = []
        for folder in (self.path, self.checkpoints_dir, self.hidden_dir):
            if not folder.is_dir():
                continue
            for p in folder.iterdir():
                if not p.name.startswith(".") or p.name == LOCK_FILE:
                    continue
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed.append(str(p.relative_to(self.path)))
        return removed

    # --- state
    def read_state(self) -> dict:
        state = read_json(self.state_path)
        if not isinstance(state, dict) or not isinstance(state.get("finished", []), list):
            raise RunError(f"{self.state_path}: corrupt (not a mapping with a list of finished stages)")
        return state

    def write_state(self, state: dict) -> None:
        atomic_write_json(self.state_path, state)

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.summary_path, summary)

    def read_summary(self) -> dict:
        s = read_json(self.summary_path)
        if not isinstance(s, dict) or s.get("schema") != SUMMARY_SCHEMA:
            schema = s.get("schema") if isinstance(s, dict) else type(s).__name__
            raise RunError(f"{self.summary_path}: unknown schema {str(schema)[:40]!r}")
        problem = summary_problem(s)
        if problem:
            raise RunError(f"{self.summary_path}: corrupt ({problem})")
        return s

    def write_progress(self, **fields) -> None:
        atomic_write_json(self.progress_path, {**fields, "time": _dt.datetime.now().isoformat(timespec="seconds")})

    # --- metrics: appended a line at a time; on resume, rows of unfinished stages are dropped
    def append_metric(self, row: dict) -> None:
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(json_safe(row), allow_nan=False) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        """The well-shaped rows of ``metrics.jsonl`` (a line cut by a kill mid-write, or a row of the
        wrong shape, is left out); RunFileError when the file itself cannot be read safely."""
        p = self.metrics_path
        try:
            rows, _ = read_jsonl(p)
        except RunFileError as e:
            if e.missing:
                return []
            raise
        return parse_metrics(rows)[0]

    def keep_metrics(self, finished: set[str]) -> None:
        rows = [r for r in self.read_metrics() if r.get("key") in finished]
        atomic_write_text(self.metrics_path, "".join(json.dumps(json_safe(r), allow_nan=False) + "\n"
                                                     for r in rows))


def list_runs(root: Path) -> Iterator[dict]:
    """Every run folder under ``root``, newest first, with its status (never raises on a bad folder)."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted((x for x in root.iterdir() if x.is_dir() and not x.name.startswith((".", "_"))), reverse=True):
        info = {"run_id": p.name, "path": str(p), "status": "unknown", "preset": None, "finished": [],
                "problem": None}
        try:
            st = read_json(RunDir(p).state_path, within=p)
        except RunFileError as e:  # a FIFO, a link out of the folder, a huge or deep file: refused, not read
            info["status"] = "incomplete (no state.json)" if e.missing else "corrupt (state.json unreadable)"
            info["problem"] = f"state.json: {e.reason}"
        else:
            problem = state_problem(st)
            if problem:
                info["status"] = "corrupt (state.json has the wrong shape)"
                info["problem"] = f"state.json: {problem}"
            else:
                info.update(status=(st.get("status") or "unknown")[:40], preset=st.get("preset"),
                            finished=st["finished"] if "finished" in st else [])
        yield info


def _sweep_setup_folders(root: Path) -> None:
    """Remove set-up folders a killed ``create`` left: those whose lock no process holds, untouched
    for a minute (a folder just made by a concurrent create may not hold its lock yet)."""
    now = time.time()
    for p in root.glob(f"{SETUP_PREFIX}*"):
        try:
            stale = p.is_dir() and now - p.stat().st_mtime > SETUP_SWEEP_AGE_S and holder_pid(p) is None
        except OSError:
            continue
        if stale:
            shutil.rmtree(p, ignore_errors=True)


def find_run(ref: str, root: Path) -> RunDir:
    """A run by folder path, id, or unique id prefix."""
    p = Path(ref)
    if p.is_dir():
        return RunDir(p)
    root = Path(root)
    if (root / ref).is_dir():
        return RunDir(root / ref)
    # a prefix of the name, compared as text: a reference is not a glob pattern ('r*' made glob raise)
    matches = [x for x in root.iterdir() if x.name.startswith(ref) and x.is_dir()] if root.is_dir() else []
    if len(matches) == 1:
        return RunDir(matches[0])
    if len(matches) > 1:
        raise RunError(f"run {ref!r} is ambiguous: {sorted(m.name for m in matches)}")
    wildcard = " (wildcards such as * are not expanded: give a run id or the start of one)" \
        if any(c in ref for c in "*?[") else ""
    raise RunError(f"no run {ref!r} under {root}{wildcard}")
