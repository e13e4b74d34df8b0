"""fastdetr's benchmarks, one module per mode of ``python -m fastdetr.benchmark [MODE] ...``:

- (no mode) step.py: end-to-end throughput of a DETR training step and of inference, peak memory, step breakdown;
- --data: data.py, images/s of one data loader worker, fastdetr's pipeline beside the official one;
- --padding: padding.py, padded pixels and tokens of training batches with and without aspect-ratio grouping;
- --official: official.py, DETR on the CPU beside the official code on the same weights, outputs checked;
- --convergence: convergence.py, AP50 per epoch and wall-clock of the `official` and `fast` training recipes.

Each mode has flags of its own: ``python -m fastdetr.benchmark --MODE --help``.
"""
import importlib

# mode flag -> (module, one line for --help)
MODES = {
    "data": ("data", "measure the data loading pipeline instead (images/s per loader worker, fastdetr vs the official "
                     "code)"),
    "padding": ("padding", "measure the padded fraction of batches with and without aspect-ratio grouping instead "
                           "(no model)"),
    "official": ("official", "time DETR on the CPU beside the official code instead (inference and a training step, "
                             "outputs checked)"),
    "convergence": ("convergence", "train the official and fast recipes side by side instead (AP50 per epoch, "
                                   "wall-clock, peak memory)"),
}

# Names code imports from `fastdetr.benchmark` (the throughput mode's, and the dispatching `main`), loaded on first
# use so that importing one mode's module does not import the others.
_STEP_NAMES = frozenset({"CONFIGS", "Config", "Timeline", "coco_like_image_sizes", "count_launches_and_syncs",
                         "environment", "get_args_parser", "make_optimizer", "report", "run_config",
                         "synthetic_batch"})


def __getattr__(name):
    if name == "main":
        return importlib.import_module(".__main__", __name__).main
    if name in _STEP_NAMES:
        return getattr(importlib.import_module(".step", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
