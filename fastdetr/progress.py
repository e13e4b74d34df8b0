"""Progress a person can follow: tqdm bars in a terminal, plain lines (for log files and CI) otherwise."""
import datetime
import sys
import time

from tqdm import tqdm

from .misc import is_main_process


def interactive() -> bool:
    """True when progress goes to a terminal (bars redraw in place), False when it goes to a file or a pipe."""
    return is_main_process() and sys.stderr.isatty() and sys.stdout.isatty()


def duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class Progress:
    """Counts `total` steps of a task called `desc`: a tqdm bar in a terminal; elsewhere a line at each tenth (and at
    the end) with the rate and time left. Nothing on processes other than the main one."""

    def __init__(self, total: int, desc: str, unit: str = "it", leave: bool = True):
        self.total, self.desc, self.count, self.start = total, desc, 0, time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True) if interactive() else None
        self.quiet = not is_main_process()
        self.next_line = max(1, total // 10)
        self.unit = unit

    def update(self, n: int = 1):
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif not self.quiet and (self.count >= self.next_line or self.count == self.total):
            while self.next_line <= self.count:
                self.next_line += max(1, self.total // 10)
            elapsed = time.perf_counter() - self.start
            left = elapsed / self.count * (self.total - self.count)
            print(f"{self.desc}: {self.count}/{self.total} {self.unit} ({self.count / max(elapsed, 1e-9):.1f} "
                  f"{self.unit}/s, {duration(elapsed)} elapsed, {duration(left)} left)", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class RunClock:
    """The whole run's time left: the wall time per training step so far, evaluations included, times the steps
    left. Steps done before this process started (a resumed run) do not count towards the rate."""

    def __init__(self, total_steps: int, done: int = 0):
        self.total, self.done, self.first, self.start = total_steps, done, done, time.perf_counter()

    def step(self, n: int = 1):
        self.done += n

    def eta(self) -> str:
        if self.done == self.first:
            return "?"
        return duration((time.perf_counter() - self.start) / (self.done - self.first) * (self.total - self.done))
