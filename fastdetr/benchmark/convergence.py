"""Convergence of fastdetr-train's `official` and `fast` recipes, side by side on the same data, seeds and schedule.

    python -m fastdetr.benchmark --convergence                         # the demo's shapes, seeds 0 1 2
    python -m fastdetr.benchmark --convergence --dataset hard --epochs 8 -- --synthetic_train 500

Measured, per recipe over the seeds (each (recipe, seed) run is a subprocess of its own): AP50 on the validation
split after every epoch (mean, sample std; each seed's in results.json); the first epoch at which `fast`'s mean
curve reaches `official`'s final mean AP50, and the cumulative wall-clock then (training alone, and with the
evaluations), as fractions of official's epochs and wall-clock (also seed by seed); each run's peak memory (CUDA:
torch.cuda.max_memory_allocated; CPU: the process's peak resident set) and mean training step time.
"""
import argparse
import concurrent.futures
import contextlib
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import List, Optional, Sequence

RECIPES = ("official", "fast")
DATASETS = ("shapes", "hard")
# set by the benchmark for every run: not to be passed through to fastdetr.train after `--`
OWN_TRAIN_FLAGS = ("--recipe", "--seed", "--output_dir", "--synthetic_set", "--coco_path", "--epochs", "--lr_drop",
                   "--overwrite_output_dir", "--resume", "--eval")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage and message
        raise SystemExit(f"error: {message}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = _Parser("python -m fastdetr.benchmark --convergence", description=__doc__.split("\n")[0],
                     epilog="Flags after `--` go to fastdetr.train unchanged (e.g. -- --synthetic_train 500 "
                            "--device cuda).")
    parser.add_argument("--dataset", help=f"synthetic set: {' or '.join(DATASETS)} (default shapes, the demo's; "
                                          "fastdetr.train --synthetic_set)")
    parser.add_argument("--coco_path", help="a COCO-format dataset instead of a synthetic one (as fastdetr.train's)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="one run per recipe and seed (default 0 1 2)")
    parser.add_argument("--epochs", type=int, help="default: fastdetr.train's (the demo's without --coco_path)")
    parser.add_argument("--lr_drop", type=int, help="default: fastdetr.train's")
    parser.add_argument("--out", type=Path, help="results folder (default outputs/convergence-DATASET)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at a time (default 1). 2: each seed's official and fast runs side by side, each "
                             "with half the CPU threads, so both meet the same machine load (on a CPU, two 1-thread "
                             "runs train this small model faster than two 2-thread runs in turn)")
    return parser


def parse_args(argv: Sequence[str]):
    """(args, train flags passed through); every mistake is a one-line SystemExit."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = get_args_parser().parse_args(argv[:split])
    passed = argv[split + 1:]
    if args.coco_path and args.dataset:
        raise SystemExit("error: give --dataset (a synthetic set) or --coco_path (your data), not both")
    if args.dataset is None and not args.coco_path:
        args.dataset = "shapes"
    if args.dataset is not None and args.dataset not in DATASETS:
        raise SystemExit(f"error: --dataset {args.dataset}: unknown; choose {' or '.join(DATASETS)} "
                         "(or --coco_path for your data)")
    if not args.seeds:
        raise SystemExit("error: --seeds: give at least one seed")
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs {args.jobs}: must be at least 1")
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit(f"error: --seeds {' '.join(map(str, args.seeds))}: each seed once")
    for flag in ("epochs", "lr_drop"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise SystemExit(f"error: --{flag} {value}: must be at least 1")
    own = sorted({a.split("=")[0] for a in passed if a.split("=")[0] in OWN_TRAIN_FLAGS})
    if own:
        raise SystemExit(f"error: {', '.join(own)} after `--`: the benchmark sets these (use its own --epochs, "
                         "--lr_drop, --seeds, --dataset, --coco_path, --out)")
    if args.out is None:
        name = args.dataset or Path(args.coco_path).resolve().name
        args.out = Path("outputs") / f"convergence-{name}"
    return args, passed


def train_argv(args, recipe: str, seed: int, passed: Sequence[str]) -> List[str]:
    """fastdetr.train's flags for one run."""
    argv = ["--recipe", recipe, "--seed", str(seed), "--output_dir", str(run_dir(args.out, recipe, seed)),
            "--overwrite_output_dir"]
    argv += ["--coco_path", args.coco_path] if args.coco_path else ["--synthetic_set", args.dataset]
    for flag in ("epochs", "lr_drop"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", str(getattr(args, flag))]
    return argv + list(passed)


def run_dir(out: Path, recipe: str, seed: int) -> Path:
    return out / f"{recipe}-seed{seed}"


def check_train_flags(argv: Sequence[str], parse=None) -> argparse.Namespace:
    """fastdetr.train's arguments from `argv` (parsed by `parse`, default its parse_args; nothing trains), or a
    one-line SystemExit."""
    if parse is None:
        from ..train import parse_args as parse
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parse(list(argv))
    except SystemExit as error:
        if error.code in (0, None):
            raise
        lines = [line for line in stderr.getvalue().splitlines() if line.strip()]
        message = lines[-1].split("error: ", 1)[-1] if lines else f"exit status {error.code}"
        raise SystemExit(f"error: fastdetr.train: {message}") from None


# --- the worker: one run, in its own process -------------------------------------------------------------------

def worker_command(result: Path, argv: Sequence[str]) -> List[str]:
    return [sys.executable, "-m", "fastdetr.benchmark.convergence", "--worker", str(result), "--", *argv]


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def peak_rss_mib() -> float:
    """Peak resident set of this process and of its finished children (loader workers), MiB (Linux: KiB units)."""
    usage = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return max(u.ru_maxrss for u in usage) / 1024


def worker_main(argv: Sequence[str]) -> int:
    """`--worker RESULT.json -- TRAIN FLAGS`: train once, write the epochs' records and the peak memory to RESULT.
    One JSON line per event goes to the original stdout (the orchestrator's pipe); the training's own output goes
    to stderr (its log file)."""
    argv = list(argv)
    result_path, train_flags = Path(argv[0]), argv[argv.index("--") + 1:] if "--" in argv else []
    progress = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # everything else printed goes to the log

    def emit(**event):
        progress.write(json.dumps(event) + "\n")

    result = {"argv": train_flags, "epochs": [], "peak_rss_mib": None, "peak_cuda_mib": None, "error": None}
    start = time.perf_counter()
    try:
        import torch

        from .. import train

        args = train.parse_args(train_flags)
        device = torch.device(args.device)
        result.update(device=str(device), planned_epochs=args.epochs)
        emit(start={"epochs": args.epochs, "device": str(device)})

        def on_epoch(record: dict) -> None:
            keep = {k: record[k] for k in ("epoch", "ap", "ap50", "train_seconds", "eval_seconds", "steps")}
            result["epochs"].append(keep)
            _write_json(result_path, result)  # an interrupted run keeps its epochs
            emit(epoch=keep)

        train.run(args, on_epoch=on_epoch)
        if device.type == "cuda":
            result["peak_cuda_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    except BaseException as error:  # noqa: B036 -- reported, then the exit status says it
        traceback.print_exc()
        message = str(error).strip().splitlines()
        result["error"] = f"{type(error).__name__}: {message[-1] if message else ''}"
    result["peak_rss_mib"] = peak_rss_mib()
    result["process_seconds"] = time.perf_counter() - start
    _write_json(result_path, result)
    emit(done={"error": result["error"]})
    return 1 if result["error"] else 0


# --- the summary: arithmetic on the curves ----------------------------------------------------------------------

def mean_std(rows: Sequence[Sequence[float]]) -> tuple:
    """Per position across `rows` (one per seed, equal lengths): (means, sample standard deviations; 0 for one)."""
    columns = list(zip(*rows))
    means = [statistics.fmean(c) for c in columns]
    stds = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in columns]
    return means, stds


def cumulative(values: Sequence[float]) -> List[float]:
    total, out = 0.0, []
    for v in values:
        total += v
        out.append(total)
    return out


def first_reaching(curve: Sequence[float], target: float) -> Optional[int]:
    """Index of the first value at least `target`, or None."""
    return next((i for i, v in enumerate(curve) if v >= target), None)


def reaching(curve: Sequence[float], train_s: Sequence[float], wall_s: Sequence[float], target: float,
             ref_train_s: float, ref_wall_s: float, ref_epochs: int) -> dict:
    """When `curve` (AP50 per epoch) first reaches `target`, in epochs trained and cumulative seconds (`train_s`:
    training alone, `wall_s`: with evaluation), and as fractions of the reference's epochs and seconds."""
    i = first_reaching(curve, target)
    if i is None:
        return {"target_ap50": target, "reached": False, "epoch": None, "epoch_fraction": None,
                "train_seconds": None, "train_fraction": None, "wall_seconds": None, "wall_fraction": None}
    return {"target_ap50": target, "reached": True, "epoch": i + 1, "epoch_fraction": (i + 1) / ref_epochs,
            "train_seconds": train_s[i], "train_fraction": train_s[i] / ref_train_s if ref_train_s else None,
            "wall_seconds": wall_s[i], "wall_fraction": wall_s[i] / ref_wall_s if ref_wall_s else None}


def run_curves(run: dict) -> dict:
    """AP50, cumulative training seconds and cumulative seconds with evaluation, per epoch, of one run."""
    epochs = run["epochs"]
    return {"ap50": [e["ap50"] for e in epochs],
            "train_s": cumulative([e["train_seconds"] for e in epochs]),
            "wall_s": cumulative([e["train_seconds"] + e["eval_seconds"] for e in epochs])}


def recipe_summary(runs: Sequence[dict]) -> dict:
    """Mean curves over the complete runs of one recipe, peak memory and step time."""
    curves = [run_curves(r) for r in runs]
    ap50, ap50_std = mean_std([c["ap50"] for c in curves])
    train_s, _ = mean_std([c["train_s"] for c in curves])
    wall_s, _ = mean_std([c["wall_s"] for c in curves])
    step_s = [sum(e["train_seconds"] for e in r["epochs"]) / max(sum(e["steps"] for e in r["epochs"]), 1)
              for r in runs]
    peaks = [r.get("peak_cuda_mib") or r.get("peak_rss_mib") for r in runs]
    peaks = [p for p in peaks if p is not None]
    return {"seeds": [r["seed"] for r in runs], "ap50_mean": ap50, "ap50_std": ap50_std,
            "train_seconds_mean": train_s, "wall_seconds_mean": wall_s,
            "step_seconds_mean": statistics.fmean(step_s) if step_s else None,
            "peak_memory_kind": "cuda max_memory_allocated" if any(r.get("peak_cuda_mib") for r in runs)
            else "host peak resident set",
            "peak_mib_mean": statistics.fmean(peaks) if peaks else None, "peak_mib_max": max(peaks, default=None)}


def summarize(runs: Sequence[dict]) -> dict:
    """From the runs ({recipe, seed, epochs: [records], peak_*_mib, error}): each recipe's mean curves, and when
    fast reaches official's final AP50, for the means and seed by seed."""
    complete = {}
    for recipe in RECIPES:
        done = [r for r in runs if r["recipe"] == recipe and not r.get("error") and r["epochs"]]
        lengths = [len(r["epochs"]) for r in done]  # equal, unless a run stopped early without an error
        complete[recipe] = [r for r in done if len(r["epochs"]) == max(lengths, key=lengths.count)] if done else []
    summary = {"recipes": {k: recipe_summary(rs) if rs else None for k, rs in complete.items()},
               "fast_reaches_official": None, "per_seed": []}
    official, fast = summary["recipes"]["official"], summary["recipes"]["fast"]
    if official and fast:
        summary["fast_reaches_official"] = reaching(
            fast["ap50_mean"], fast["train_seconds_mean"], fast["wall_seconds_mean"], official["ap50_mean"][-1],
            official["train_seconds_mean"][-1], official["wall_seconds_mean"][-1], len(official["ap50_mean"]))
    by_seed = {(r["recipe"], r["seed"]): run_curves(r) for rs in complete.values() for r in rs}
    for seed in sorted({s for _, s in by_seed}):
        if ("official", seed) in by_seed and ("fast", seed) in by_seed:
            o, f = by_seed["official", seed], by_seed["fast", seed]
            row = reaching(f["ap50"], f["train_s"], f["wall_s"], o["ap50"][-1], o["train_s"][-1], o["wall_s"][-1],
                           len(o["ap50"]))
            summary["per_seed"].append({"seed": seed, **row})
    return summary


# --- the report --------------------------------------------------------------------------------------------------

def _fraction(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def describe_reaching(r: dict, official_epochs: int, official_train_s: float, official_wall_s: float) -> str:
    if not r["reached"]:
        return f"not reached (target AP50 {r['target_ap50']:.3f})"
    return (f"epoch {r['epoch']} of {official_epochs} ({r['epoch_fraction']:.2f} of official's epochs), "
            f"{r['train_seconds']:.0f} s of training ({_fraction(r['train_fraction'])} of {official_train_s:.0f} s), "
            f"{r['wall_seconds']:.0f} s with evaluation ({_fraction(r['wall_fraction'])} of {official_wall_s:.0f} s)")


def report(result: dict) -> str:
    summary, runs = result["summary"], result["runs"]
    recipes = summary["recipes"]
    lines = [f"Convergence of the official and fast recipes on {result['dataset']}, seeds "
             f"{' '.join(map(str, result['seeds']))}; AP50 on the validation split: mean ± std over seeds", ""]
    done = [k for k in RECIPES if recipes[k]]
    if done:
        n = max(len(recipes[k]["ap50_mean"]) for k in done)
        header = ["epoch", *(f"{k} AP50" for k in done), *(f"{k} train s" for k in done)]
        rows = []
        for i in range(n):
            cells = [str(i + 1)]
            for k in done:
                m, s = recipes[k]["ap50_mean"], recipes[k]["ap50_std"]
                cells.append(f"{m[i]:.3f} ± {s[i]:.3f}" if i < len(m) else "-")
            for k in done:
                t = recipes[k]["train_seconds_mean"]
                cells.append(f"{t[i]:.0f}" if i < len(t) else "-")
            rows.append(cells)
        widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
        lines += ["  ".join(h.rjust(w) for h, w in zip(row, widths)) for row in [header, *rows]]
        lines.append("")
    official = recipes["official"]
    if summary["fast_reaches_official"]:
        ref = (len(official["ap50_mean"]), official["train_seconds_mean"][-1], official["wall_seconds_mean"][-1])
        target = summary["fast_reaches_official"]["target_ap50"]
        lines.append(f"fast reaches official's final mean AP50 {target:.3f}: "
                     f"{describe_reaching(summary['fast_reaches_official'], *ref)}")
        by_run = {(r["recipe"], r["seed"]): run_curves(r) for r in runs if r["epochs"]}
        for row in summary["per_seed"]:
            o = by_run["official", row["seed"]]
            described = describe_reaching(row, len(o["ap50"]), o["train_s"][-1], o["wall_s"][-1])
            lines.append(f"  seed {row['seed']}: {described}")
        lines.append("")
    for k in done:
        r = recipes[k]
        peak = "n/a" if r["peak_mib_mean"] is None else \
            f"{r['peak_mib_mean']:.0f} MiB mean, {r['peak_mib_max']:.0f} MiB max over seeds"
        lines.append(f"{k}: peak memory {peak} ({r['peak_memory_kind']}), mean training step "
                     f"{r['step_seconds_mean'] * 1e3:.1f} ms (loading included)")
    for r in runs:
        if r.get("error"):
            lines.append(f"{r['recipe']} seed {r['seed']}: FAILED: {r['error']} (log: {r['log']})")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    """AP50 mean ± std per recipe against epochs and against cumulative training seconds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    recipes = result["summary"]["recipes"]
    for name, color in zip(RECIPES, ("tab:blue", "tab:orange")):
        r = recipes[name]
        if not r:
            continue
        mean, std = r["ap50_mean"], r["ap50_std"]
        low, high = [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)]
        for ax, x in ((axes[0], list(range(1, len(mean) + 1))), (axes[1], r["train_seconds_mean"])):
            ax.plot(x, mean, marker="o", markersize=3, color=color, label=f"{name} (n={len(r['seeds'])})")
            ax.fill_between(x, low, high, color=color, alpha=0.2, linewidth=0)
    if recipes["official"]:
        for ax in axes:
            ax.axhline(recipes["official"]["ap50_mean"][-1], color="gray", linestyle="--", linewidth=1,
                       label="official's final mean")
    axes[0].set_xlabel("epoch")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_ylim(bottom=0)
    axes[1].set_xlabel("cumulative training seconds (mean over seeds; evaluation excluded)")
    axes[0].set_ylabel("AP50 (validation)")
    axes[0].legend(loc="lower right")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"official vs fast recipe on {result['dataset']}: AP50 mean ± std over seeds "
                 f"{' '.join(map(str, result['seeds']))}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the orchestrator --------------------------------------------------------------------------------------------

def run_one(args, recipe: str, seed: int, passed: Sequence[str], label: str, threads: Optional[int] = None) -> dict:
    """One run in a subprocess (with `threads` CPU threads: OMP_NUM_THREADS, else the environment's); prints its
    progress; returns its result (with recipe, seed, log, error)."""
    directory = run_dir(args.out, recipe, seed)
    directory.mkdir(parents=True, exist_ok=True)
    result_path, log_path = directory / "run.json", directory / "worker.log"
    result_path.unlink(missing_ok=True)
    argv = train_argv(args, recipe, seed, passed)
    epochs, error = "?", None
    print(f"{label}: {recipe} seed {seed} (log {log_path})", flush=True)
    with log_path.open("w") as log:
        env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": str(threads)}
        process = subprocess.Popen(worker_command(result_path, argv), stdout=subprocess.PIPE, stderr=log, text=True,
                                   env=env)
        for line in process.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if "start" in event:
                epochs = event["start"]["epochs"]
            elif "epoch" in event:
                e = event["epoch"]
                print(f"  {recipe} seed {seed}: epoch {e['epoch'] + 1}/{epochs}  AP50 {e['ap50']:.3f}  AP "
                      f"{e['ap']:.3f}  train {e['train_seconds']:.1f} s  eval {e['eval_seconds']:.1f} s", flush=True)
            elif "done" in event:
                error = event["done"]["error"]
        code = process.wait()
    run = json.loads(result_path.read_text()) if result_path.exists() else {"epochs": []}
    if code != 0 and not run.get("error"):
        run["error"] = error or f"exit status {code}"
    run.update(recipe=recipe, seed=seed, argv=argv, log=str(log_path), output_dir=str(directory))
    run.setdefault("error", None)
    if run["error"]:
        print(f"  {recipe} seed {seed}: FAILED: {run['error']} (log {log_path})", flush=True)
    return run


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, passed = parse_args(sys.argv[1:] if argv is None else argv)
    # The flags are checked before anything trains; the schedule is official's (train's defaults unless given),
    # passed to both recipes.
    official = check_train_flags(train_argv(args, "official", args.seeds[0], passed))
    args.epochs, args.lr_drop = args.epochs or official.epochs, args.lr_drop or official.lr_drop
    check_train_flags(train_argv(args, "fast", args.seeds[0], passed))
    args.out.mkdir(parents=True, exist_ok=True)
    dataset = args.coco_path or args.dataset
    plan = [(recipe, seed) for seed in args.seeds for recipe in RECIPES]  # pairs first: a partial result pairs
    total, threads = len(plan), None if args.jobs == 1 else max(1, (os.cpu_count() or 1) // args.jobs)
    runs = []
    try:
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            futures = [pool.submit(run_one, args, recipe, seed, passed, f"[run {i + 1}/{total}]", threads)
                       for i, (recipe, seed) in enumerate(plan)]
            runs = [future.result() for future in futures]
    except KeyboardInterrupt:
        print("\ninterrupted: the finished runs follow", flush=True)
        runs = [f.result() for f in futures if f.done() and not f.cancelled() and f.exception() is None]
    result = {"dataset": dataset, "seeds": args.seeds, "schedule": {"epochs": args.epochs, "lr_drop": args.lr_drop},
              "train_flags": passed, "jobs": args.jobs, "threads_per_run": threads, "out": str(args.out),
              "std": "sample standard deviation over seeds",
              "runs": runs}
    result["summary"] = summarize(runs)
    print()
    print(report(result))
    _write_json(args.out / "results.json", result)
    if any(result["summary"]["recipes"].values()):
        plot(result, args.out / "convergence.png")
    print(f"\nresults.json, convergence.png and each run's output folder in {args.out}")
    return 1 if any(r["error"] for r in runs) or len(runs) < total else 0


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sys.exit(worker_main(arguments[1:]) if arguments[:1] == ["--worker"] else main(arguments))
