"""One command on a GPU machine: the kernel tests on the GPU, parity of every kernel, the end-to-end throughput and
every benchmark, written up as a markdown report with a PNG chart.

    python benchmarks/gpu_report.py --out benchmarks/report       # about 10 minutes on an H100

Needs fastdetr installed (`pip install -e .`), no network and no pycocotools. Every stage runs in its own
process, so a kernel that fails to compile or crashes its CUDA context costs only its own stage: the failure goes
into the report and the rest still runs. The stages share a time budget (--budget-s); the benchmark suites skip
the cases they have no time left for, and the report lists them. The cost of Group DETR's query groups (the Group DETR
paper's K = 11) has a section of its own: the decoder layer at K = 1 and K = 11 (bench_layers.py) and fastdetr's
training step at both (the end-to-end stage runs `python -m fastdetr.benchmark --query-groups 11 --configs
fastdetr` after its own run). `--cpu` runs the pipeline with the CPU cases and a small end-to-end configuration
(parity needs CUDA and is skipped): a dry run for machines without a GPU.
"""
import argparse
import json
import math
import platform
import re
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

import barchart
import parity

ROOT = Path(__file__).resolve().parents[1]
SUITES = ("attention", "position_embedding", "ffn", "layers", "transformer")  # in the order they run
OPS = ("attention", "position_embedding", "ffn", "encoder_layer", "decoder_layer", "transformer")
IMPLS = ("triton", "reference", "sdpa", "compile")
STAGES = ("tests", "parity", "e2e", "benchmarks")
# The kernel tests run for real on CUDA (bf16 included, dropout's forward/backward agreement, CUDA-graph replays,
# torch.compile, the lean launcher and the autotuner); on a CPU they are the CI's, in Triton's interpreter.
KERNEL_TESTS = ("tests/test_rng.py", "tests/test_attention_kernel.py", "tests/test_ffn_kernel.py",
                "tests/test_position_embedding_kernel.py", "tests/test_kernels_in_model.py")
E2E_CPU_ARGS = ["--device", "cpu", "--backbone", "resnet18", "--image-size", "256", "--batch-size", "2",
                "--steps", "2"]
TESTS_TIMEOUT_S, PARITY_TIMEOUT_S, E2E_TIMEOUT_S = 240, 240, 180
# Group DETR (--query_groups K): the end-to-end stage also times fastdetr's training step at the Group DETR paper's K,
# beside its K = 1 run (one configuration, so a short run); the layer suite times the decoder layer at K = 1 and K.
QUERY_GROUPS = 11  # the Group DETR paper's K (--query_groups; off in the fast recipe)
E2E_GROUPS_TIMEOUT_S = 120
# On a CPU (dry run) the fp32 reference: bf16 autocast on a CPU without bf16 units takes over a minute a step there.
E2E_GROUPS_CONFIG, E2E_GROUPS_CPU_CONFIG = "fastdetr", "reference-fp32"
GROUP_SHAPE = re.compile(r"decoder_K(\d+)$")  # bench_layers.py's query-group shapes

# (goal, issues, group, faster implementation, slower implementation, at least this speedup)
GOALS = (
    ("attention fwd+bwd, B4 H8 L~850 D32 bf16, padded keys, dropout 0.1: >= 4x the reference", (5, 12),
     "attention encoder_self B4 bf16 fwd+bwd cuda", "triton", "reference", 4.0),
    ("attention fwd+bwd, same case: >= 1.3x SDPA with the boolean mask", (5, 12),
     "attention encoder_self B4 bf16 fwd+bwd cuda", "triton", "sdpa", 1.3),
    ("attention inference (forward, no dropout), same shapes: at least as fast as SDPA", (12,),
     "attention encoder_self B4 bf16 fwd cuda", "triton", "sdpa", 1.0),
    ("position embedding, bf16: >= 20x the reference", (6,),
     "position_embedding c5_mask B4 bf16 fwd cuda", "triton", "reference", 20.0),
    ("FFN sublayer fwd+bwd, 3400 rows, bf16: >= 1.5x the reference eager path", (6, 13),
     "ffn encoder B4 bf16 fwd+bwd cuda", "triton", "reference", 1.5),
    ("FFN sublayer fwd+bwd, same case: no slower than torch.compile of the reference", (6, 13),
     "ffn encoder B4 bf16 fwd+bwd cuda", "triton", "compile", 1.0),
    ("FFN sublayer fwd+bwd, 400 rows (decoder, B4), bf16: no slower than the reference eager path", (13,),
     "ffn decoder B4 bf16 fwd+bwd cuda", "triton", "reference", 1.0),
    ("FFN sublayer fwd+bwd, 400 rows: no slower than torch.compile of the reference", (13,),
     "ffn decoder B4 bf16 fwd+bwd cuda", "triton", "compile", 1.0),
)


class Stage:
    """A child process with a deadline, its output kept in a log file."""

    def __init__(self, name: str, command: List[str], log: Path, timeout_s: float):
        self.name, self.command, self.log = name, command, log
        self.started = time.time()
        self._file = open(log, "w", encoding="utf-8")
        self._process = subprocess.Popen(command, cwd=ROOT, stdout=self._file, stderr=subprocess.STDOUT)
        self._timeout_s = max(timeout_s, 1.0)
        self.returncode: Optional[int] = None
        self.timed_out = False
        self.seconds = 0.0

    def wait(self) -> "Stage":
        try:
            self.returncode = self._process.wait(timeout=max(self.started + self._timeout_s - time.time(), 0.1))
        except subprocess.TimeoutExpired:
            self._process.kill()
            self.returncode = self._process.wait()
            self.timed_out = True
        self._file.close()
        self.seconds = time.time() - self.started
        return self

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def _load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _junit_outcomes(path: Path) -> List[Dict[str, str]]:
    """Failed, errored and skipped cases of a pytest junit file."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return []
    outcomes = []
    for case in root.iter("testcase"):
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                message = (child.get("message") or child.text or "").strip()
                outcomes.append({"case": case.get("name", "?"), "outcome": child.tag,
                                 "message": message.splitlines()[0] if message else ""})
    return outcomes


def run_stages(args: argparse.Namespace, out: Path) -> dict:
    raw, logs = out / "raw", out / "logs"
    raw.mkdir(parents=True, exist_ok=True)
    logs.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    end = time.time() + args.budget_s
    stages: List[Stage] = []
    results: dict = {"parity": [], "parity_skipped": None, "e2e": None, "e2e_groups": None, "benchmarks": [],
                     "outcomes": []}

    if "tests" in args.stages and not args.cpu:
        junit_path = raw / "kernel-tests.xml"
        stage = Stage("kernel tests", [python, "-m", "pytest", *KERNEL_TESTS, "-q", "-p", "no:cacheprovider",
                                       "--junitxml", str(junit_path)],
                      logs / "kernel-tests.log", min(TESTS_TIMEOUT_S, end - time.time())).wait()
        stages.append(stage)
        results["outcomes"] += [{"suite": "kernel tests", **o} for o in _junit_outcomes(junit_path)]

    if "parity" in args.stages:
        if args.cpu:
            results["parity_skipped"] = parity.NO_CUDA
        else:
            # The kernels' processes run side by side: their time goes mostly into Triton compiling on the CPU.
            runs = [Stage(f"parity {k}", [python, "benchmarks/parity.py", "--kernel", k, "--json",
                                          str(raw / f"parity-{k}.json")], logs / f"parity-{k}.log",
                          min(PARITY_TIMEOUT_S, end - time.time()))
                    for k in parity.KERNELS]
            for kernel, stage in zip(parity.KERNELS, runs):
                stages.append(stage.wait())
                data = _load_json(raw / f"parity-{kernel}.json")
                results["parity"] += data["checks"] if data else [
                    {"kernel": kernel, "case": "all", "dtype": "-", "quantity": "run", "tolerance": math.nan,
                     "allowed": math.nan, "error": None, "eager_error": None, "passed": False,
                     "failure": f"no result: see logs/{stage.log.name}"}]

    if "e2e" in args.stages:
        e2e_args = E2E_CPU_ARGS if args.cpu else []
        stage = Stage("end to end", [python, "-m", "fastdetr.benchmark", *e2e_args, "--json", str(raw / "e2e.json")],
                      logs / "e2e.log", min(E2E_TIMEOUT_S, end - time.time())).wait()
        stages.append(stage)
        results["e2e"] = _load_json(raw / "e2e.json")
        stage = Stage(f"end to end, {QUERY_GROUPS} query groups",
                      [python, "-m", "fastdetr.benchmark", *e2e_args, "--query-groups", str(QUERY_GROUPS),
                       "--configs", E2E_GROUPS_CPU_CONFIG if args.cpu else E2E_GROUPS_CONFIG,
                       "--json", str(raw / "e2e-groups.json")],
                      logs / "e2e-groups.log", min(E2E_GROUPS_TIMEOUT_S, end - time.time())).wait()
        stages.append(stage)
        results["e2e_groups"] = _load_json(raw / "e2e-groups.json")

    if "benchmarks" in args.stages:
        for suite in args.suites:
            # A case that starts just before the deadline may still take a minute (torch.compile's first call):
            # the process gets that much beyond the deadline its cases observe.
            deadline = end - 60
            json_path, junit_path = raw / f"bench-{suite}.json", raw / f"bench-{suite}.xml"
            stage = Stage(f"benchmarks {suite}", [
                python, "-m", "pytest", f"benchmarks/bench_{suite}.py", "--benchmark-only", "-q",
                "-p", "no:cacheprovider", "-m", "cpu" if args.cpu else "gpu", "--bench-deadline", str(deadline),
                "--benchmark-json", str(json_path), "--junitxml", str(junit_path)],
                logs / f"bench-{suite}.log", end - time.time()).wait()
            stages.append(stage)
            data = _load_json(json_path)
            results["benchmarks"] += data["benchmarks"] if data else []
            results["outcomes"] += [{"suite": suite, **o} for o in _junit_outcomes(junit_path)]
    results["stages"] = stages
    return results


# ------------------------------------------------------------------------------------------------ report

def _speedups(benchmarks: List[dict]) -> Dict[str, Dict[str, float]]:
    """group -> impl -> median ms."""
    medians: Dict[str, Dict[str, float]] = defaultdict(dict)
    for b in benchmarks:
        medians[b["group"]][b["extra_info"]["impl"]] = b["extra_info"]["median_ms"]
    return medians


def _ordered(benchmarks: List[dict]) -> List[dict]:
    """By operation, shape (as its suite lists them), dtype, pass, batch and implementation."""
    shapes = list(dict.fromkeys(b["extra_info"]["shape"] for b in benchmarks))

    def key(b: dict):
        e = b["extra_info"]
        return (OPS.index(e["op"]) if e["op"] in OPS else len(OPS), shapes.index(e["shape"]), e["dtype"] != "fp32",
                e["backward"], e["batch"], IMPLS.index(e["impl"]) if e["impl"] in IMPLS else len(IMPLS))
    return sorted(benchmarks, key=key)


def _ms(value: Optional[float]) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _count(value: Optional[int]) -> str:
    return "-" if value is None else str(value)


def _table(header: Sequence[str], rows: List[Sequence[object]]) -> List[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows)]


def _environment() -> List[str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cpu = f"CPU ({platform.processor() or platform.machine()})"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else cpu
    return [f"- date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
            f"- device: {device}",
            f"- torch {torch.__version__}, triton {triton_version}, CUDA {torch.version.cuda}, "
            f"Python {platform.python_version()}",
            f"- commit: {commit}",
            f"- command: `python {' '.join(sys.argv)}`"]


def _goal_rows(medians: Dict[str, Dict[str, float]]) -> List[List[object]]:
    rows = []
    for goal, issues, group, fast, slow, target in GOALS:
        times = medians.get(group, {})
        issue = ", ".join(f"#{number}" for number in issues)
        if fast in times and slow in times:
            speedup = times[slow] / times[fast]
            rows.append([goal, issue, f"{speedup:.2f}x ({_ms(times[fast])} vs {_ms(times[slow])} ms)",
                         f"{target:g}x", "yes" if speedup >= target else "**no**"])
        else:
            rows.append([goal, issue, "not measured", f"{target:g}x", "-"])
    return rows


def _parity_section(checks: List[dict], skipped: Optional[str]) -> List[str]:
    lines = ["## Parity with the float64 reference", ""]
    if skipped:
        return lines + [f"Skipped: {skipped}.", ""]
    if not checks:
        return lines + ["No parity result (see the stage table and logs/parity-*.log).", ""]
    passed = sum(c["passed"] for c in checks)
    lines += [f"{passed} of {len(checks)} checks pass. Error = max |kernel - reference| / max |reference|; allowed = "
              "max(tolerance, 2 x the error of the reference path run in the same dtype), tolerance fp32 1e-5, fp16 "
              "and bf16 1e-2 (benchmarks/parity.py says why).", ""]
    summary = defaultdict(list)
    for c in checks:
        summary[(c["kernel"], c["dtype"])].append(c)

    def worst(cs: List[dict], key: str) -> str:
        return f"{max((c[key] for c in cs if c[key] is not None), default=float('nan')):.2e}"
    lines += _table(["kernel", "dtype", "checks", "pass", "worst error", "worst reference-path error"],
                    [[k, d, len(cs), sum(c["passed"] for c in cs), worst(cs, "error"), worst(cs, "eager_error")]
                     for (k, d), cs in summary.items()])
    failed = [c for c in checks if not c["passed"]]
    if failed:
        lines += ["", "Failed checks:", ""]
        lines += _table(["kernel", "dtype", "case", "quantity", "error or failure", "reference-path error", "allowed"],
                        [[c["kernel"], c["dtype"], c["case"], c["quantity"], c["failure"] or f"{c['error']:.2e}",
                          "-" if c["eager_error"] is None else f"{c['eager_error']:.2e}", f"{c['allowed']:.1e}"]
                         for c in failed])
    return lines + [""]


def _e2e_section(e2e: Optional[dict]) -> List[str]:
    lines = ["## End to end (`python -m fastdetr.benchmark`)", ""]
    if not e2e:
        return lines + ["No result (see the stage table and logs/e2e.log).", ""]
    a = e2e["args"]
    lines += [f"DETR-{a['backbone']}, batch {a['batch_size']}, COCO-like images up to a shorter side of "
              f"{a['image_size']}, {a['steps']} timed steps; {e2e['environment']['device']}.", ""]
    done = [c for c in e2e["configs"] if "error" not in c]
    lines += _table(["config", "train img/s", "train peak MiB", "infer img/s", "infer peak MiB", "train kernels",
                     "train syncs", "infer kernels", "infer syncs"],
                    [[c["config"], f"{c['train']['images_per_s']:.2f}", _ms(c["train"]["peak_mib"]),
                      f"{c['inference']['images_per_s']:.2f}", _ms(c["inference"]["peak_mib"]),
                      *(_count(c[mode][k]) for mode in ("train", "inference") for k in ("kernels", "syncs"))]
                     for c in done])
    if done:
        phases = list(done[0]["train"]["breakdown_ms"])
        lines += ["", "Training step, ms per phase:", ""]
        lines += _table(["config", *phases], [[c["config"], *(_ms(c["train"]["breakdown_ms"][p]) for p in phases)]
                                              for c in done])
    lines += [f"- {c['config']}: FAILED: {c['error']}" for c in e2e["configs"] if "error" in c]
    return lines + [""]


def _ratio(base: Optional[float], other: Optional[float]) -> str:
    """other / base, or "-" where either is missing."""
    return f"{other / base:.2f}x" if base and other is not None else "-"


def _groups_section(benchmarks: List[dict], e2e: Optional[dict], e2e_groups: Optional[dict]) -> List[str]:
    """The cost of Group DETR's K query groups: the decoder layer at K = 1 and K (bench_layers.py) and fastdetr's
    training step at K = 1 (the end-to-end stage) and K, as times and their ratio."""
    lines = [f"## Query groups (Group DETR, K = {QUERY_GROUPS}, the paper's value; `--query_groups`)", ""]
    layer: Dict[tuple, Dict[int, dict]] = defaultdict(dict)
    for b in benchmarks:
        e = b["extra_info"]
        match = GROUP_SHAPE.match(e["shape"]) if e["op"] == "decoder_layer" else None
        if match:
            key = (e["impl"], e["batch"], e["dtype"], "fwd+bwd" if e["backward"] else "fwd", e["device"])
            layer[key][int(match.group(1))] = e
    rows = []
    for key, by_k in layer.items():
        for k in sorted(k for k in by_k if k != 1):
            one, many = by_k.get(1), by_k[k]
            rows.append([*key, k, _ms(one["median_ms"]) if one else "-", _ms(many["median_ms"]),
                         _ratio(one and one["median_ms"], many["median_ms"]), many.get("tokens", "-"),
                         f"{many['padded_fraction']:.0%}" if "padded_fraction" in many else "-"])
    lines += ["Decoder layer (benchmarks/bench_layers.py, shapes `decoder_K1` and `decoder_K<K>`): K x 100 queries, "
              "self-attention within each group (the groups folded into the batch), cross-attention and FFN over all "
              "K x 100 against the encoder memory; training mode, dropout 0.1.", ""]
    if rows:
        lines += _table(["impl", "B", "dtype", "pass", "device", "K", "K=1 ms", "K ms", "K / K=1", "memory tokens",
                         "padded keys"], rows)
    else:
        lines += ["Not measured (see the stage table and logs/bench-layers.log)."]

    # the configuration the K run timed, against the same configuration of the end-to-end stage (K = 1)
    config = next((c.get("config") for c in (e2e_groups or {}).get("configs", [])), E2E_GROUPS_CONFIG)

    def train(result: Optional[dict]) -> Optional[dict]:
        done = [c for c in (result or {}).get("configs", []) if c.get("config") == config and "error" not in c]
        return done[0]["train"] if done else None
    one, many = train(e2e), train(e2e_groups)
    lines += ["", f"Training step of DETR (`python -m fastdetr.benchmark --query-groups {QUERY_GROUPS} --configs "
              f"{config}` against the end-to-end stage's {config} configuration, K = 1; same model, batch and "
              "images):", ""]
    if not (one and many):
        return lines + ["Not measured (see the stage table and logs/e2e.log, logs/e2e-groups.log).", ""]
    table = [["step", _ms(one["step_ms"]), _ms(many["step_ms"]), _ratio(one["step_ms"], many["step_ms"])]]
    table += [[phase, _ms(one["breakdown_ms"][phase]), _ms(many["breakdown_ms"].get(phase)),
               _ratio(one["breakdown_ms"][phase], many["breakdown_ms"].get(phase))] for phase in one["breakdown_ms"]]
    table += [["peak MiB", _ms(one["peak_mib"]), _ms(many["peak_mib"]), _ratio(one["peak_mib"], many["peak_mib"])],
              ["kernels", _count(one["kernels"]), _count(many["kernels"]), _ratio(one["kernels"], many["kernels"])],
              ["syncs", _count(one["syncs"]), _count(many["syncs"]), _ratio(one["syncs"], many["syncs"])]]
    return lines + _table(["training step", "K=1 ms", f"K={QUERY_GROUPS} ms", f"K={QUERY_GROUPS} / K=1"],
                          table) + [""]


def _benchmark_section(benchmarks: List[dict], medians: Dict[str, Dict[str, float]]) -> List[str]:
    lines = ["## Benchmarks (`pytest benchmarks/ --benchmark-only`)", ""]
    if not benchmarks:
        return lines + ["No benchmark result (see the stage table and logs/bench-*.log).", ""]
    info = benchmarks[0]["extra_info"]
    lines += [f"Times are medians ({info['timer']}); floor = max(compulsory bytes / {info['copy_GBps']} GB/s copy "
              f"bandwidth, matmul flops / measured matmul rate, launches x {info['launch_us']} us); see "
              "benchmarks/README.md.", ""]
    rates = {b["extra_info"]["dtype"]: b["extra_info"]["matmul_TFLOPS"] for b in benchmarks}
    lines += ["Measured matmul rates: " + ", ".join(f"{d} {r} TFLOPS" for d, r in sorted(rates.items())) +
              f" (fp32 matmul precision: {info['fp32_matmul_precision']}).", ""]
    by_op = defaultdict(list)
    for b in _ordered(benchmarks):
        by_op[b["extra_info"]["op"]].append(b)
    for op, rows in by_op.items():
        lines += [f"### {op}", ""]
        table = []
        for b in rows:
            e = b["extra_info"]
            reference = medians[b["group"]].get("reference")
            table.append([e["shape"], e["batch"], e["dtype"], "fwd+bwd" if e["backward"] else "fwd", e["impl"],
                          _ms(e["median_ms"]), f"{reference / e['median_ms']:.2f}x" if reference else "-",
                          f"{_ms(e['floor_ms'])} ({e['floor_bound']})", f"{e['fraction_of_floor']:.0%}",
                          _ms(e["step_peak_mib"])])
        lines += _table(["shape", "B", "dtype", "pass", "impl", "ms", "vs reference", "floor ms (bound)",
                         "of floor", "step peak MiB"], table) + [""]
    return lines


def _chart_rows(benchmarks: List[dict], medians: Dict[str, Dict[str, float]], batch: int) -> List[barchart.Row]:
    """Every implementation of every group at one batch size."""
    rows = []
    for b in _ordered(benchmarks):
        e = b["extra_info"]
        if e["batch"] != batch:
            continue
        reference = medians[b["group"]].get("reference")
        label = f"{e['op']} {e['shape']} {e['dtype']} {'fwd+bwd' if e['backward'] else 'fwd'}"
        rows.append(barchart.Row(label, e["impl"], reference / e["median_ms"] if reference else None,
                                 e["fraction_of_floor"]))
    return rows


def write_report(results: dict, out: Path, args: argparse.Namespace, seconds: float) -> Path:
    medians = _speedups(results["benchmarks"])
    lines = ["# fastdetr GPU report" if not args.cpu else "# fastdetr benchmark report (CPU dry run)", "",
             *_environment(), f"- wall time: {seconds:.0f} s (budget {args.budget_s:.0f} s)", ""]
    lines += ["## Stages", ""]
    lines += _table(["stage", "exit status", "seconds", "log"],
                    [[s.name, "killed at its time limit" if s.timed_out else s.returncode, f"{s.seconds:.0f}",
                      f"logs/{s.log.name}"] for s in results["stages"]])
    failed = [s for s in results["stages"] if s.returncode != 0]
    for s in failed:
        lines += ["", f"Last lines of {s.log.name}:", "", "```", s.tail(), "```"]
    lines += ["", "## Goals (issues 5, 6, 12 and 13)", ""]
    lines += _table(["goal", "issue", "measured", "target", "met"], _goal_rows(medians)) + [""]
    lines += _parity_section(results["parity"], results["parity_skipped"])
    lines += _e2e_section(results["e2e"])
    lines += _groups_section(results["benchmarks"], results["e2e"], results.get("e2e_groups"))
    batches = {b["extra_info"]["batch"] for b in results["benchmarks"]}
    if batches:
        batch = 4 if 4 in batches else min(batches)
        barchart.draw(_chart_rows(results["benchmarks"], medians, batch), str(out / "report.png"),
                      f"fastdetr benchmarks at batch {batch}, {'CPU dry run' if args.cpu else 'CUDA'}")
        lines += ["![speedups and fractions of the floor](report.png)", ""]
    lines += _benchmark_section(results["benchmarks"], medians)
    problems = [o for o in results["outcomes"] if o["outcome"] != "skipped"]
    skipped = [o for o in results["outcomes"] if o["outcome"] == "skipped"]
    lines += ["## Failed and skipped cases", "",
              f"{len(problems)} failed, {len(skipped)} skipped.", ""]
    if problems or skipped:
        lines += _table(["suite", "case", "outcome", "message"],
                        [[o["suite"], o["case"], o["outcome"], o["message"].replace("|", "\\|")[:200]]
                         for o in problems + skipped])
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "report"), help="report directory")
    parser.add_argument("--budget-s", type=float, default=540, help="time for all stages together")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument("--cpu", action="store_true", help="dry run of the pipeline on the CPU cases")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_report: no CUDA device; use --cpu for a dry run of the pipeline", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()  # the stages run from the repository root
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results = run_stages(args, out)
    path = write_report(results, out, args, time.time() - start)
    print(f"gpu_report: wrote {path} in {time.time() - start:.0f} s")
    for stage in results["stages"]:
        print(f"  {stage.name}: {'killed at its time limit' if stage.timed_out else f'exit {stage.returncode}'}, "
              f"{stage.seconds:.0f} s")
    return 0 if all(s.returncode == 0 for s in results["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
