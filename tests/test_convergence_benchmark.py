"""`python -m fastdetr.benchmark --convergence` without training: the summary's arithmetic on hand-made curves, the
flag errors (one line, before anything runs), and the orchestration with a fake worker process writing known
curves (progress, results.json, the plot)."""
import json
import sys
import textwrap
from types import SimpleNamespace

import pytest

from fastdetr.benchmark import convergence
from fastdetr.benchmark.__main__ import main as benchmark_main


def test_first_reaching_mean_std_and_fractions():
    assert convergence.first_reaching([0.1, 0.3, 0.5], 0.3) == 1
    assert convergence.first_reaching([0.1, 0.3, 0.5], 0.51) is None
    means, stds = convergence.mean_std([[0.1, 0.3], [0.3, 0.7]])
    assert means == pytest.approx([0.2, 0.5]) and stds == pytest.approx([0.02 ** 0.5, 0.08 ** 0.5])
    assert convergence.mean_std([[0.1, 0.3]]) == ([0.1, 0.3], [0.0, 0.0])
    assert convergence.cumulative([10, 20, 5]) == [10, 30, 35]

    reached = convergence.reaching([0.2, 0.5, 0.6], [10, 20, 30], [12, 24, 36], 0.5, ref_train_s=80, ref_wall_s=100,
                                   ref_epochs=4)
    assert reached == {"target_ap50": 0.5, "reached": True, "epoch": 2, "epoch_fraction": 0.5, "train_seconds": 20,
                       "train_fraction": 0.25, "wall_seconds": 24, "wall_fraction": 0.24}
    missed = convergence.reaching([0.2, 0.3], [1, 2], [2, 4], 0.5, 8, 10, 4)
    assert missed["reached"] is False and missed["epoch"] is None and missed["train_fraction"] is None
    text = convergence.describe_reaching(missed, 4, 8, 10)
    assert text.startswith("not reached")


def _run(recipe, seed, ap50, train_s, eval_s=2.0, steps=5, peak=100.0, error=None):
    return {"recipe": recipe, "seed": seed, "error": error, "peak_rss_mib": peak, "peak_cuda_mib": None,
            "epochs": [{"epoch": i, "ap": a / 2, "ap50": a, "train_seconds": train_s, "eval_seconds": eval_s,
                        "steps": steps} for i, a in enumerate(ap50)]}


def test_summary_of_hand_made_runs():
    runs = [_run("official", 0, [0.1, 0.2, 0.3, 0.4], 10), _run("fast", 0, [0.2, 0.35, 0.45, 0.5], 8, peak=80),
            _run("official", 1, [0.1, 0.2, 0.3, 0.6], 10), _run("fast", 1, [0.2, 0.3, 0.4, 0.45], 8, peak=90),
            _run("fast", 2, [], 8, error="RuntimeError: boom")]
    summary = convergence.summarize(runs)
    official, fast = summary["recipes"]["official"], summary["recipes"]["fast"]
    assert official["ap50_mean"] == pytest.approx([0.1, 0.2, 0.3, 0.5])
    assert official["ap50_std"][-1] == pytest.approx(0.02 ** 0.5)
    assert fast["seeds"] == [0, 1]  # the failed run is left out
    assert fast["train_seconds_mean"] == pytest.approx([8, 16, 24, 32])
    assert fast["step_seconds_mean"] == pytest.approx(8 / 5) and fast["peak_mib_mean"] == pytest.approx(85)
    assert fast["peak_mib_max"] == 90 and official["step_seconds_mean"] == pytest.approx(2)
    # official's final mean 0.5; fast's mean curve 0.2, 0.325, 0.425, 0.475: never reaches it
    assert summary["fast_reaches_official"]["reached"] is False
    # seed 0: fast reaches 0.4 at epoch 3, after 24 s of 40 (30 s of 48 with evaluation); seed 1: 0.6 never
    seed0, seed1 = summary["per_seed"]
    assert (seed0["seed"], seed0["epoch"], seed0["epoch_fraction"]) == (0, 3, 0.75)
    assert seed0["train_fraction"] == pytest.approx(0.6) and seed0["wall_fraction"] == pytest.approx(30 / 48)
    assert seed1["seed"] == 1 and not seed1["reached"]

    alone = convergence.summarize([runs[0], runs[-1]])  # every fast run failed
    assert alone["recipes"]["fast"] is None and alone["fast_reaches_official"] is None and alone["per_seed"] == []
    report = convergence.report({"summary": alone, "runs": [{**runs[-1], "log": "x.log"}], "dataset": "shapes",
                                 "seeds": [0]})
    assert "fast seed 2: FAILED: RuntimeError: boom" in report and "official AP50" in report


@pytest.mark.parametrize("flags, message", [
    (["--dataset", "coco"], "--dataset coco: unknown"),
    (["--seeds"], "--seeds: give at least one seed"),
    (["--seeds", "1", "1"], "each seed once"),
    (["--epochs", "0"], "--epochs 0: must be at least 1"),
    (["--lr_drop", "-1"], "--lr_drop -1"),
    (["--dataset", "hard", "--coco_path", "data"], "not both"),
    (["--epochs", "x"], "invalid int value"),
    (["--", "--seed", "3"], "--seed after `--`"),
    (["--jobs", "0"], "--jobs 0: must be at least 1"),
])
def test_flag_errors_are_one_line_before_anything_runs(flags, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ran = []
    monkeypatch.setattr(convergence, "run_one", lambda *a: ran.append(a))
    with pytest.raises(SystemExit) as error:
        benchmark_main(["--convergence", *flags])
    assert message in str(error.value.code) and "\n" not in str(error.value.code)
    assert not ran and not (tmp_path / "outputs").exists()


def test_train_flags_rejected_by_train_are_one_line():
    def parse_args(argv):  # as argparse fails
        print("usage: fastdetr-train ...\nfastdetr-train: error: unrecognized arguments: --bogus", file=sys.stderr)
        raise SystemExit(2)
    with pytest.raises(SystemExit) as error:
        convergence.check_train_flags(["--bogus"], parse_args)
    assert str(error.value.code).endswith("unrecognized arguments: --bogus") and "\n" not in str(error.value.code)


FAKE_WORKER = textwrap.dedent("""
    import json, os, sys
    result, argv = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
    recipe, seed = argv[argv.index("--recipe") + 1], int(argv[argv.index("--seed") + 1])
    epochs = int(argv[argv.index("--epochs") + 1])
    assert argv[argv.index("--synthetic_set") + 1] == "hard" and argv[-2:] == ["--synthetic_train", "16"]
    if recipe == "fast" and seed == 2:
        print(json.dumps({"done": {"error": "RuntimeError: out of memory"}}), flush=True)
        sys.exit(1)
    curve = {"official": [0.1, 0.2, 0.3, 0.4], "fast": [0.2, 0.35, 0.45, 0.5]}[recipe]
    print(json.dumps({"start": {"epochs": epochs, "device": "cpu"}}), flush=True)
    records = []
    for i in range(epochs):
        record = {"epoch": i, "ap": curve[i] / 2, "ap50": curve[i] + 0.01 * seed,
                  "train_seconds": 10.0 if recipe == "official" else 8.0, "eval_seconds": 2.0, "steps": 5}
        records.append(record)
        print("training noise that is not JSON", flush=True)
        print(json.dumps({"epoch": record}), flush=True)
    out = {"argv": argv, "epochs": records, "peak_rss_mib": 100.0 if recipe == "official" else 90.0,
           "peak_cuda_mib": None, "error": None, "device": "cpu", "threads": os.environ.get("OMP_NUM_THREADS")}
    open(result, "w").write(json.dumps(out))
    print(json.dumps({"done": {"error": None}}), flush=True)
""")


@pytest.mark.parametrize("jobs", [1, 2])
def test_orchestration_with_a_fake_worker(tmp_path, monkeypatch, capsys, jobs):
    monkeypatch.setattr(convergence, "worker_command",
                        lambda result, argv: [sys.executable, "-c", FAKE_WORKER, str(result), "--", *argv])
    checked = []

    def check(argv):  # fastdetr.train's parse_args: the schedule its defaults give, unless --epochs / --lr_drop
        checked.append(argv)
        return SimpleNamespace(epochs=16, lr_drop=3)
    monkeypatch.setattr(convergence, "check_train_flags", check)
    monkeypatch.setattr(convergence.os, "cpu_count", lambda: 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    out = tmp_path / "bench"
    code = benchmark_main(["--convergence", "--dataset", "hard", "--seeds", "0", "1", "2", "--epochs", "4",
                           "--out", str(out), "--jobs", str(jobs), "--", "--synthetic_train", "16"])
    printed = capsys.readouterr().out
    assert code == 1  # fast seed 2 failed
    assert [a[a.index("--recipe") + 1] for a in checked] == ["official", "fast"]
    assert "--lr_drop" not in checked[0] and checked[1][checked[1].index("--lr_drop") + 1] == "3"
    assert "[run 1/6]: official seed 0" in printed and "fast seed 1: epoch 4/4  AP50 0.510" in printed
    assert "fast seed 2: FAILED: RuntimeError: out of memory" in printed

    result = json.loads((out / "results.json").read_text())
    assert result["schedule"] == {"epochs": 4, "lr_drop": 3}
    # side by side, each run gets its share of the cores; one at a time, the environment's threads
    assert {r.get("threads") for r in result["runs"][:-1]} == {"2" if jobs == 2 else "7"}
    assert all(r["argv"][r["argv"].index("--lr_drop") + 1] == "3" for r in result["runs"])
    assert [(r["recipe"], r["seed"]) for r in result["runs"]] == [
        ("official", 0), ("fast", 0), ("official", 1), ("fast", 1), ("official", 2), ("fast", 2)]
    assert result["runs"][0]["output_dir"] == str(out / "official-seed0")
    assert "--output_dir" in result["runs"][0]["argv"] and result["runs"][-1]["error"]
    assert result["runs"][3]["epochs"][-1]["ap50"] == pytest.approx(0.51)
    summary = result["summary"]
    assert summary["recipes"]["official"]["ap50_mean"] == pytest.approx([0.11, 0.21, 0.31, 0.41])
    assert summary["recipes"]["fast"]["seeds"] == [0, 1]
    # official's final mean 0.41; fast's mean 0.205, 0.355, 0.455: epoch 3 of 4, 24 s of 40, 30 s of 48
    reached = summary["fast_reaches_official"]
    assert (reached["epoch"], reached["epoch_fraction"]) == (3, 0.75)
    assert reached["train_fraction"] == pytest.approx(0.6) and reached["wall_fraction"] == pytest.approx(0.625)
    assert [row["epoch"] for row in summary["per_seed"]] == [3, 3]
    assert "epoch 3 of 4 (0.75 of official's epochs)" in printed and "0.455 ± 0.007" in printed
    assert "fast: peak memory 90 MiB mean, 90 MiB max over seeds (host peak resident set)" in printed
    png = (out / "convergence.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
