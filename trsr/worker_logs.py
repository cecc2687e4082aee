"""Where the Ray workers' output goes: trsr's own lines to the console, everything to
<run_dir>/logs/workers.log.

Ray sends every worker's stdout/stderr lines to the driver (`log_to_driver`), which
prints them all: vLLM's start-up and exit messages, weight-loading bars, Ray's
warnings. `ray.init(log_to_driver=False)` would drop trsr's own worker lines too (the
training loop's progress runs in Ray Train workers), and Ray has no public filter for
them, so in quiet mode (the default) trsr replaces the handler Ray registers on its
driver-side dispatcher of worker lines (`ray._private.ray_logging`, the hook Ray's own
printer uses) with `_route`: lines that trsr's loggers wrote in a worker (`PREFIX`,
set up by `worker_log_handler`) are printed without it; every line, those included,
is appended to <run_dir>/logs/workers.log (local run folders; Ray also keeps each
worker's full log under its session folder, /tmp/ray/session_*/logs, on every node).
`trsr --verbose` leaves Ray's printer in place. Without the hook (another Ray version),
Ray's printer stays and the console is as noisy as Ray makes it, nothing is lost.
"""

from __future__ import annotations

import logging
import os
import sys
import threading

PREFIX = "[trsr] "
FOLDER = "logs"
FILE = "workers.log"
BUFFERED_LINES = 50_000  # kept until the run folder is known (then written)

_lock = threading.Lock()
_state: dict = {"path": None, "buffer": []}


def worker_log_handler() -> logging.Handler:
    """The handler of the `trsr` logger in Ray workers: INFO and above to stderr with
    PREFIX, which `_route` recognises on the driver."""

    class _Format(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            message = record.getMessage()
            if record.levelno >= logging.WARNING:
                message = f"{record.levelname.lower()}: {message}"
            return PREFIX + message

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Format())
    handler.setLevel(logging.INFO)
    return handler


def use_in_worker() -> None:
    """In a Ray worker: trsr's records through worker_log_handler only (not also through
    the root logger Ray Train sets up, which would print them twice)."""
    logger = logging.getLogger("trsr")
    if not any(getattr(h, "_trsr_worker", False) for h in logger.handlers):
        handler = worker_log_handler()
        handler._trsr_worker = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def log_to_run_folder(run_dir: str) -> str | None:
    """Append the workers' lines to <run_dir>/logs/workers.log from now on (lines routed
    before are written first). Remote run folders: None (Ray's session folder only)."""
    from trsr import storage

    if storage.is_remote(run_dir):
        return None
    path = os.path.join(run_dir, FOLDER, FILE)  # the folder is made with the first line
    with _lock:
        _state["path"] = path
        buffered, _state["buffer"] = _state["buffer"], []
    if buffered:
        _append(path, buffered)
    return path


# Messages the raylets publish to every driver (Ray's error channel) that are notices,
# not problems: the console gets every other one (a worker killed for memory, a crash).
RAYLET_NOTICES = ("PYTHON worker processes have been started on node",)


def install() -> bool:
    """Replace Ray's printer of worker lines by `_route` (after ray.init), and let the
    raylets' notices (RAYLET_NOTICES, e.g. one per burst of worker start-ups) go to the
    log file only. False where this Ray has no such hook (Ray's printer stays)."""
    try:
        import ray._private.worker as ray_worker
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return False
    if not hasattr(dispatcher, "remove_handler") or not hasattr(dispatcher, "add_handler"):
        return False
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.remove_handler("trsr_route_logs")
    dispatcher.add_handler("trsr_route_logs", _route)
    # The raylets' messages reach the driver through Ray's error listener, which calls
    # this module-level printer directly (not the dispatcher).
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is not None and not getattr(printer, "_trsr", False):
        def print_to_stdstream(data: dict, ignore_prefix: bool) -> None:
            if data.get("pid") == "raylet" and any(n in line for line in data.get("lines", []) for n in RAYLET_NOTICES):
                _route(data)  # to the log file only (no PREFIX line)
            else:
                printer(data, ignore_prefix)

        print_to_stdstream._trsr = True  # type: ignore[attr-defined]
        ray_worker.print_to_stdstream = print_to_stdstream
    return True


def _route(data: dict) -> None:
    lines = data.get("lines") or []
    origin = data.get("actor_name") or data.get("task_name") or ""
    where = f"({origin + ' ' if origin else ''}pid={data.get('pid')}{', ip=' + data['ip'] if data.get('ip') else ''})"
    record = []
    for line in lines:
        record.append(f"{where} {line}")
        if line.startswith(PREFIX):
            print(line[len(PREFIX):], file=sys.stdout, flush=True)
    with _lock:
        path = _state["path"]
        if path is None:
            _state["buffer"].extend(record)
            del _state["buffer"][:-BUFFERED_LINES]
            return
    _append(path, record)


def _append(path: str, lines: list[str]) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a", encoding="utf-8", errors="replace") as handle:
            handle.write("\n".join(lines) + "\n")
    except OSError:
        pass  # the run folder went away (a test's tmp dir); Ray's session folder keeps them
