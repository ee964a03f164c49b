"""What the benchmarks in this folder share: logging, the run root, the local Ray cluster,
the machine figures, the CPU-contention watcher, the report title and the JSON line.

The benchmarks run as scripts (``python benchmarks/X.py``), so this folder is on
``sys.path`` and they import this module as ``common``. Only the driver uses it:
code that Ray ships to its workers must not import it (workers do not have this
folder on their path).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psutil

RAY_NUM_CPUS = 2
"""CPUs of the local Ray cluster every benchmark starts (the machine these figures come from has 2)."""


def setup_logging() -> None:
    """Warnings from everything, progress lines from shoprank and the benchmark (logger ``bench``)."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("shoprank", "bench"):
        logging.getLogger(name).setLevel(logging.INFO)


def start_ray() -> None:
    """A fresh local cluster of :data:`RAY_NUM_CPUS` CPUs, Ray Data progress bars off.

    ``address="local"``: never a cluster that a ``ray start`` left running. The caller
    shuts it down (``ray.shutdown()``), and nothing else.
    """
    import ray
    from ray.data.context import DataContext

    from shoprank.entrypoint import local_ray_options

    with local_ray_options(RAY_NUM_CPUS) as options:
        ray.init(**options, logging_level=logging.WARNING)
    DataContext.get_current().enable_progress_bars = False


@contextmanager
def watched_ray(machine_figures: dict[str, Any]) -> Iterator["ContentionWatcher"]:
    """A :class:`ContentionWatcher` and a local cluster (:func:`start_ray`); on leaving, Ray is shut down
    (phase ``shutdown``), the watcher stopped and its figures added to ``machine_figures``."""
    import ray

    watcher = ContentionWatcher().start()
    try:
        start_ray()
        yield watcher
    finally:
        watcher.set_phase("shutdown")
        ray.shutdown()
        watcher.stop()
    machine_figures.update(watcher.figures())


def machine() -> dict[str, Any]:
    """CPUs and memory of this machine."""
    return {"cpus": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1)}


def versions() -> dict[str, str]:
    import ray
    import torch

    return {"torch": torch.__version__, "ray": ray.__version__}


def run_benchmark(benchmark: Callable[[Path], dict[str, Any]], root: str | None, prefix: str,
                  json_path: str | None) -> int:
    """Run ``benchmark(root)`` (it prints its report, returns its figures), then print the figures as one JSON line.

    ``root`` is kept when given; otherwise a temporary directory named ``prefix...`` is
    used and removed. With ``json_path`` the line is also written to that file.
    """
    keep = root is not None
    directory = Path(root).resolve() if keep else Path(tempfile.mkdtemp(prefix=prefix))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        figures = benchmark(directory)
    finally:
        if not keep:
            shutil.rmtree(directory, ignore_errors=True)
    line = json.dumps(figures, sort_keys=True, default=str)
    if json_path:
        Path(json_path).write_text(line + "\n")
    sys.stdout.flush()
    print(line, flush=True)
    return 0


def round_floats(value: Any, digits: int = 4) -> Any:
    """``value`` with every float, also inside dicts and lists, rounded to ``digits``."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: round_floats(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [round_floats(v, digits) for v in value]
    return value


def print_title(title: str, machine_figures: dict[str, Any], details: list[str], width: int,
                versions_figures: dict[str, str] | None = None) -> None:
    """The report's first lines: the benchmark, the machine, the Ray cluster, then ``details``."""
    tools = f"; torch {versions_figures['torch']}, ray {versions_figures['ray']}" if versions_figures else ""
    print()
    print("=" * width)
    print(f"shoprank {title}  ({machine_figures['cpus']} CPUs, {machine_figures['memory_gib']} GiB; "
          f"Ray local cluster num_cpus={RAY_NUM_CPUS}{tools})")
    for line in details:
        print(line)
    print("=" * width)


# --------------------------------------------------------------------------- samplers


_Sampler = TypeVar("_Sampler", bound="PhaseSampler")


class PhaseSampler:
    """Calls :meth:`sample` every ``interval`` s on a daemon thread; the benchmark names its phases
    (:meth:`set_phase`) so that subclasses keep their figures per phase."""

    def __init__(self, interval: float, name: str) -> None:
        self.interval = interval
        self.phase = "startup"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def sample(self) -> None:
        raise NotImplementedError

    def start(self: _Sampler) -> _Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling, after one last sample of the current phase."""
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()

    def set_phase(self, phase: str) -> None:
        self.sample()  # the phase that ends gets its last sample
        self.phase = phase

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)


def other_train_jobs() -> list[str]:
    """Command lines of running ``jobs/train_encoder.py`` processes (someone else's training)."""
    try:
        out = subprocess.run(["pgrep", "-af", "jobs/train_encoder.py"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.stdout.splitlines() if line.strip()]


class ContentionWatcher(PhaseSampler):
    """Every ``interval`` s, notes per benchmark phase whether another ``jobs/train_encoder.py`` runs,
    how much CPU processes outside this benchmark use and the highest 1-minute load average:
    figures of a phase that shared the CPUs are suspect."""

    def __init__(self, interval: float = 5.0) -> None:
        super().__init__(interval, "contention-watcher")
        self.phases: dict[str, dict[str, Any]] = {}
        self.at_start = {"loadavg_start": [round(x, 2) for x in os.getloadavg()],
                         "other_train_encoder_jobs_at_start": len(other_train_jobs())}
        self._procs: dict[int, psutil.Process] = {}

    def _outside_cpu_percent(self) -> float | None:
        """CPU % of processes outside this benchmark's process tree since the previous sample."""
        me = psutil.Process()
        mine = {me.pid, *(c.pid for c in me.children(recursive=True))}
        total, first = 0.0, not self._procs
        seen = set()
        for proc in psutil.process_iter():
            if proc.pid in mine:
                continue
            seen.add(proc.pid)
            cached = self._procs.setdefault(proc.pid, proc)
            try:
                total += cached.cpu_percent(None)  # 0.0 on the first call for a process
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        self._procs = {pid: p for pid, p in self._procs.items() if pid in seen}
        return None if first else total

    def sample(self) -> None:
        entry = self.phases.setdefault(self.phase, {"other_jobs_seen": 0, "max_loadavg_1m": 0.0,
                                                    "outside_cpu_percent_samples": []})
        entry["other_jobs_seen"] = max(entry["other_jobs_seen"], len(other_train_jobs()))
        entry["max_loadavg_1m"] = max(entry["max_loadavg_1m"], round(os.getloadavg()[0], 2))
        outside = self._outside_cpu_percent()
        if outside is not None:
            entry["outside_cpu_percent_samples"].append(outside)

    def figures(self) -> dict[str, Any]:
        """Load and other training jobs at start and end, and per phase (for ``figures["machine"]``)."""
        phases = {}
        for name, entry in self.phases.items():
            samples = entry["outside_cpu_percent_samples"]
            phases[name] = {"other_jobs_seen": entry["other_jobs_seen"], "max_loadavg_1m": entry["max_loadavg_1m"],
                            "outside_cpu_percent_mean": round(sum(samples) / len(samples), 1) if samples else None,
                            "outside_cpu_percent_max": round(max(samples), 1) if samples else None}
        return {**self.at_start, "loadavg_end": [round(x, 2) for x in os.getloadavg()],
                "other_train_encoder_jobs_at_end": len(other_train_jobs()), "phases": phases,
                "phases_sharing_cpus_with_jobs_train_encoder": [
                    name for name, entry in self.phases.items() if entry["other_jobs_seen"]]}


def print_contention(machine_figures: dict[str, Any]) -> None:
    """The report's last lines: what else ran on the machine meanwhile (from :meth:`ContentionWatcher.figures`)."""
    m = machine_figures
    print(f"(load avg at start {m['loadavg_start']}, at end {m['loadavg_end']}; other train_encoder jobs at start "
          f"{m['other_train_encoder_jobs_at_start']}, at end {m['other_train_encoder_jobs_at_end']})")
    shared = m["phases_sharing_cpus_with_jobs_train_encoder"]
    print("phases during which jobs/train_encoder.py also ran (their times are suspect): "
          + (", ".join(shared) if shared else "none"))
    print("CPU used by processes outside this benchmark, mean/max % per phase (200% = 2 cores busy): " + ", ".join(
        f"{name} {entry['outside_cpu_percent_mean']}/{entry['outside_cpu_percent_max']}"
        for name, entry in m["phases"].items()))
    print("max 1-min load average per phase: " + ", ".join(
        f"{name} {entry['max_loadavg_1m']}" for name, entry in m["phases"].items()))
    print()
