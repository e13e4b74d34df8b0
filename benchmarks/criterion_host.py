"""Host time of DETR's matching and losses per call, before / after issue 17, side by side in one run.

    python benchmarks/criterion_host.py                 # batch 2, 4, 8; 100 queries, 92 classes, ~7 objects
    python benchmarks/criterion_host.py --threads 1 --repeats 200

"before" is the per-layer, per-image form (tests/per_image_criterion.py: one device-to-host copy of the cost per
decoder layer, per-image index gathering); "after" is fastdetr's (all six decoder layers matched from one cost
tensor and one copy, indices and targets gathered once). Each repeat times both on the same inputs, in
alternating order; the medians and their ratio are printed. Criterion = matching + every loss of the 6 layers,
forward only (the backward pass is the same autograd graph in both).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from per_image_criterion import PerImageMatcher, PerImageSetCriterion  # noqa: E402
from test_criterion_batched import WEIGHTS, random_outputs_and_targets  # noqa: E402

from fastdetr import HungarianMatcher, SetCriterion  # noqa: E402

OBJECTS = (7, 3, 12, 5, 1, 9, 6, 8)  # about COCO's mean of 7, as fastdetr.benchmark.step


def timed(fn, repeats):
    """Interleaved medians (seconds) of the callables in `fn`, alternating which goes first."""
    times = [[] for _ in fn]
    for r in range(repeats):
        order = range(len(fn)) if r % 2 == 0 else reversed(range(len(fn)))
        for k in order:
            start = time.perf_counter()
            fn[k]()
            times[k].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = dict(WEIGHTS, **{f"{k}_{i}": v for i in range(5) for k, v in WEIGHTS.items()})
    losses = ["labels", "boxes", "cardinality"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU; median of {args.repeats} "
          "interleaved calls, ms")
    print("| batch | matcher, 6 layers: before | after | ratio | criterion: before | after | ratio |")
    print("|---|---|---|---|---|---|---|")
    for batch in args.batch_sizes:
        outputs, targets = random_outputs_and_targets(0, batch, objects=OBJECTS * 2)
        layers = [{k: v for k, v in outputs.items() if k != "aux_outputs"}, *outputs["aux_outputs"]]
        old_m, new_m = PerImageMatcher(1, 5, 2), HungarianMatcher(1, 5, 2)
        old_c = PerImageSetCriterion(91, old_m, weights, 0.1, losses)
        new_c = SetCriterion(91, new_m, weights, 0.1, losses)
        for _ in range(3):  # warm-up
            old_c(outputs, targets), new_c(outputs, targets)
        match = timed([lambda: [old_m(o, targets) for o in layers], lambda: new_m.match_layers(layers, targets)],
                      args.repeats)
        crit = timed([lambda: old_c(outputs, targets), lambda: new_c(outputs, targets)], args.repeats)
        print(f"| {batch} | {match[0] * 1e3:.2f} | {match[1] * 1e3:.2f} | {match[0] / match[1]:.2f}x | "
              f"{crit[0] * 1e3:.2f} | {crit[1] * 1e3:.2f} | {crit[0] / crit[1]:.2f}x |")


if __name__ == "__main__":
    main()
