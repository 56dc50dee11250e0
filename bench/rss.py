"""Memory of the servers under load: summed RSS of their processes, sampled in a thread."""

import contextlib
import threading

import psutil


def rss_mib(procs) -> float:
    """Summed RSS of the psutil processes ``procs`` (MiB); a process that has gone counts 0."""
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total / 2**20


def torchserve_processes(launcher_pid: int) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """(workers, [java frontend]) under the TorchServe launcher: workers run model_service_worker."""
    workers, java = [], []
    with contextlib.suppress(psutil.Error):
        for p in psutil.Process(launcher_pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(p.cmdline())
                if "model_service_worker" in cmd:
                    workers.append(p)
                elif p.name().startswith("java"):
                    java.append(p)
    return workers, java


class RssSampler:
    """Peak summed RSS (MiB) of the (workers, frontend) processes ``find()`` returns, every 0.25 s in a thread."""

    def __init__(self, find) -> None:
        self.find, self.peak, self.frontend_peak = find, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        workers, frontend = self.find()
        self.peak = max(self.peak, rss_mib(workers))
        self.frontend_peak = max(self.frontend_peak, rss_mib(frontend))

    def _loop(self) -> None:
        while not self._stop.wait(0.25):
            self.sample()

    def __enter__(self):
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
