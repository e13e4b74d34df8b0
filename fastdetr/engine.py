"""Train and evaluate for one epoch (the official engine.py), with mixed precision and one host synchronisation per
iteration, the matching cost's copy to scipy (all decoder layers at once): losses and padding are summed on the
device and read back only every `print_freq` iterations (tests/test_host_syncs.py counts them)."""
import contextlib
import datetime
import io
import math
import time

import torch
import torch.distributed as dist

from .data.batching import padding_counts
from .data.transforms import normalize_batch
from .misc import NestedTensor, get_world_size, is_dist_avail_and_initialized, is_main_process
from .progress import Progress, RunClock

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SHOWN = ("loss", "loss_ce", "loss_bbox", "loss_giou", "class_error")
_ADVICE = "Try a lower --lr, --clip_max_norm 0.1, --amp none, or check the data."


def _to_float(outputs):
    """Model outputs in float32, so that matching and losses are computed in full precision under autocast."""
    if isinstance(outputs, dict):
        return {k: _to_float(v) for k, v in outputs.items()}
    if isinstance(outputs, list):
        return [_to_float(v) for v in outputs]
    return outputs.float() if outputs.is_floating_point() else outputs


def _stat_values(loss_dict, weight_dict):
    """The official logged values: total loss, weighted losses, every term unscaled (on the device)."""
    stats = {"loss": sum(loss_dict[k] * weight_dict[k] for k in loss_dict if k in weight_dict)}
    stats.update({k: v * weight_dict[k] for k, v in loss_dict.items() if k in weight_dict})
    stats.update({f"{k}_unscaled": v for k, v in loss_dict.items()})
    stats["class_error"] = loss_dict["class_error"]
    return stats


class _Meter:
    """Sums of the logged values on the device; `read` reduces them over processes and returns host averages."""

    def __init__(self):
        self.keys, self.sums, self.count = None, None, 0

    def update(self, stats):
        values = torch.stack([v.detach().float() for v in stats.values()])
        if self.sums is None:
            self.keys, self.sums = list(stats), values
        else:
            self.sums += values
        self.count += 1

    def read(self, extra=None):
        """{key: sum over iterations and processes} on the host, and the number of terms summed; with `extra` (a
        tensor [n] on the device) also its sum over processes as a list, read back in the same transfer."""
        sums = self.sums.double()  # the float32 sums exactly; summed over processes in float64
        if extra is not None:
            sums = torch.cat([sums, extra.double()])
        if is_dist_avail_and_initialized():
            dist.all_reduce(sums)
        values = sums.tolist()
        read = dict(zip(self.keys, values)), self.count * get_world_size()
        return read if extra is None else (*read, values[len(self.keys):])


def _format(values, count):
    return "  ".join(f"{k}: {values[k] / count:.4f}" for k in SHOWN if k in values)


def to_device(samples: NestedTensor, device: torch.device) -> NestedTensor:
    """A loader's batch on `device`, as the model takes it: a uint8 batch (collate_uint8) is moved as bytes and
    normalised there, a float one (collate_fn) is taken as normalised."""
    samples = samples.to(device, non_blocking=True)
    return samples if samples.tensors.is_floating_point() else normalize_batch(samples)


def _no_span(name):
    return contextlib.nullcontext()


def _takes_targets(model) -> bool:
    return getattr(getattr(model, "module", model), "dn_query_pos", None) is not None


def train_step(model, criterion, optimizer, samples, targets, amp_dtype=None, max_norm: float = 0, scaler=None,
               span=_no_span):
    """One optimisation step: the forward pass under autocast (`amp_dtype`, None for full precision), matching and
    losses on float32 outputs, backward (through `scaler` when it is enabled), clipping to `max_norm` (0: none),
    the optimizer step. Returns the logged values on the device, without synchronising the host.

    `span(name)` is entered around each phase ("forward", "criterion", "backward", "optimizer"); fastdetr.benchmark.step
    times them with it.
    """
    scaling = scaler is not None and scaler.is_enabled()
    with span("forward"), torch.autocast(samples.tensors.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        # the denoising queries (fastdetr.denoising) are made from the targets
        outputs = model(samples, targets=targets) if _takes_targets(model) else model(samples)
    with span("criterion"):
        stats = _stat_values(criterion(_to_float(outputs), targets), criterion.weight_dict)
    with span("backward"):
        optimizer.zero_grad(set_to_none=True)
        (scaler.scale(stats["loss"]) if scaling else stats["loss"]).backward()
    with span("optimizer"):
        if scaling:
            scaler.unscale_(optimizer)
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if scaling:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    return stats


def train_one_epoch(model, criterion, data_loader, optimizer, device, epoch, max_norm: float = 0, amp: str = "none",
                    scaler=None, print_freq: int = 10, clock: RunClock = None, epochs: int = None,
                    token_stride: int = 32, ema=None):
    """One pass over data_loader; returns the epoch averages of the official logged values, the lr, and the padded
    fractions of the batches' pixels and encoder tokens (positions of the stride-`token_stride` feature map).

    Progress: a bar in a terminal, else a line after the first iteration and every print_freq iterations; `clock`
    (a RunClock over the whole run) adds the run's time left, `epochs` the run's epoch count. A non-finite loss
    raises FloatingPointError at the next logging point. `ema` (fastdetr.ema.ModelEMA) is updated after every step.
    """
    model.train()
    criterion.train()
    dtype = AMP_DTYPES[amp]
    meter, num_iters = _Meter(), len(data_loader)
    padded, canvas = None, [0, 0]  # padded pixels and tokens summed on the device; all pixels and tokens
    last_values, last_count, last_iter = None, 0, 0
    start = last_log = end = time.perf_counter()
    data_time = 0.0
    of = f"/{epochs}" if epochs else ""
    bar = Progress(num_iters, f"Epoch {epoch}{of}", leave=False)
    for i, (samples, targets) in enumerate(data_loader):
        data_time += time.perf_counter() - end
        samples = to_device(samples, device)
        if device.type == "cuda":
            samples.tensors = samples.tensors.contiguous(memory_format=torch.channels_last)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        counts, pixels, tokens = padding_counts(samples.mask, token_stride)
        padded = counts if padded is None else padded + counts
        canvas = [canvas[0] + pixels, canvas[1] + tokens]
        try:
            stats = train_step(model, criterion, optimizer, samples, targets, dtype, max_norm, scaler)
        except FloatingPointError as error:  # the matcher meets diverged (NaN) predictions first
            raise FloatingPointError(f"{error}: epoch {epoch}, iteration {i + 1}. Stopping; the last checkpoint "
                                     f"is the one of the previous epoch. {_ADVICE}") from None
        if ema is not None:
            ema.update(getattr(model, "module", model))
        meter.update(stats)
        if clock is not None:
            clock.step()

        if bar.bar is not None:
            bar.update()
        if (i + 1) % print_freq == 0 or i + 1 == num_iters or i == 0:
            values, count = meter.read()  # the only host synchronisation of the loop
            window = {k: v - (last_values[k] if last_values else 0) for k, v in values.items()}
            if not math.isfinite(window["loss"]):
                raise FloatingPointError(
                    f"non-finite loss at epoch {epoch}, in iterations {last_iter + 1}..{i + 1}: "
                    f"{_format(window, count - last_count)}. Stopping; the last checkpoint is the one "
                    f"of the previous epoch. {_ADVICE}")
            now = time.perf_counter()
            iter_time = (now - last_log) / (count - last_count) * get_world_size()
            run_eta = f"  run eta: {clock.eta()}" if clock is not None else ""
            if bar.bar is not None:
                bar.bar.set_postfix_str(f"{_format(window, count - last_count)}  data: {data_time / (i + 1):.3f}"
                                        f"{run_eta}", refresh=False)
            elif is_main_process():
                eta = datetime.timedelta(seconds=int(iter_time * (num_iters - i - 1)))
                memory = (f"  max mem: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB"
                          if device.type == "cuda" else "")
                print(f"Epoch: [{epoch}{of}] [{i + 1:>{len(str(num_iters))}}/{num_iters}]  eta: {eta}{run_eta}  "
                      f"lr: {optimizer.param_groups[0]['lr']:.6f}  {_format(window, count - last_count)}  "
                      f"time: {iter_time:.3f}  data: {data_time / (i + 1):.3f}{memory}", flush=True)
            last_values, last_count, last_iter, last_log = values, count, i + 1, now
        end = time.perf_counter()

    bar.close()
    values, count, (padded_pixels, padded_tokens, pixels, tokens) = meter.read(
        torch.cat([padded.double(), torch.tensor(canvas, dtype=torch.float64).to(device, non_blocking=True)]))
    averages = {k: v / count for k, v in values.items()}
    averages["padded_pixels"], averages["padded_tokens"] = padded_pixels / pixels, padded_tokens / tokens
    if is_main_process():
        elapsed = time.perf_counter() - start
        took = datetime.timedelta(seconds=int(elapsed))
        run_eta = f", run eta {clock.eta()}" if clock is not None else ""
        # Waiting for the loader is host time the step could not hide: above a few percent, the loader is the limit
        # (more --num_workers, or faster decoding). It stays out of log.txt, whose epochs replay exactly on resume.
        print(f"Epoch: [{epoch}{of}] done in {took} ({elapsed / num_iters:.3f} s/it{run_eta})  "
              f"{_format(values, count)}  padding: {averages['padded_pixels']:.1%} of pixels, "
              f"{averages['padded_tokens']:.1%} of tokens  waiting for data: {data_time / elapsed:.1%} "
              f"({data_time / num_iters:.3f} s/it)", flush=True)
    averages["lr"] = optimizer.param_groups[0]["lr"]
    return averages


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def coco_evaluate(coco_gt, results):
    """COCOeval of `results` (COCO results format) against the COCO object `coco_gt`: (COCOeval, 12-line summary)."""
    from pycocotools.cocoeval import COCOeval  # imported here: training steps and fastdetr.benchmark need none

    if not results:
        raise ValueError("no detections to evaluate (empty validation set?)")
    with _quiet():
        coco_dt = coco_gt.loadRes(results)
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):
        coco_eval.summarize()
    return coco_eval, summary.getvalue()


def to_coco_results(prediction, image_id):
    """One image's PostProcess output (xyxy in pixels) as COCO results dicts (xywh)."""
    boxes = prediction["boxes"].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    return [{"image_id": image_id, "category_id": label, "bbox": box, "score": score}
            for box, score, label in zip(boxes.tolist(), prediction["scores"].tolist(), prediction["labels"].tolist())]


@torch.no_grad()
def evaluate(model, criterion, postprocessors, data_loader, base_ds, device, amp: str = "none", print_freq: int = 10):
    """Losses and COCO box AP on data_loader.

    Returns (stats, coco_eval, summary): the averaged logged values plus "coco_eval_bbox" (the 12 COCO numbers) on
    every process; the COCOeval object and its 12-line summary (not printed) on the main process (None elsewhere).
    """
    model.eval()
    criterion.eval()
    dtype = AMP_DTYPES[amp]
    meter, results, start = _Meter(), {}, time.perf_counter()
    bar = Progress(len(data_loader), "Test", leave=False)
    for i, (samples, targets) in enumerate(data_loader):
        image_ids = [int(t["image_id"]) for t in targets]
        samples = to_device(samples, device)
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = model(samples)
        outputs = _to_float(outputs)
        meter.update(_stat_values(criterion(outputs, targets), criterion.weight_dict))
        orig_target_sizes = torch.stack([t["orig_size"] for t in targets])
        predictions = postprocessors["bbox"](outputs, orig_target_sizes)
        results.update({image_id: to_coco_results(p, image_id) for image_id, p in zip(image_ids, predictions)})
        if bar.bar is not None:
            bar.update()
        elif is_main_process() and ((i + 1) % print_freq == 0 or i + 1 == len(data_loader)):
            print(f"Test: [{i + 1}/{len(data_loader)}]  {time.perf_counter() - start:.1f}s", flush=True)
    bar.close()

    values, count = meter.read()
    stats = {k: v / count for k, v in values.items()}
    if is_dist_avail_and_initialized():
        gathered = [None] * get_world_size()
        dist.all_gather_object(gathered, results)
        # DistributedSampler pads with repeated images: keep each image once
        results = {image_id: r for part in gathered for image_id, r in part.items()}
    coco_eval, summary, ap = None, None, [None]
    if is_main_process():
        coco_eval, summary = coco_evaluate(base_ds, [r for image in results.values() for r in image])
        ap = [coco_eval.stats.tolist()]
    if is_dist_avail_and_initialized():
        dist.broadcast_object_list(ap, src=0)
    stats["coco_eval_bbox"] = ap[0]
    return stats, coco_eval, summary
