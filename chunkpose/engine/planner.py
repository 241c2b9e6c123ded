"""Cost models per stage and the chunk size they allow.

A stage's cost is linear in the chunk size c (items along the leading axis):

    peak(c) = live_now + pending + fixed + c * per_item

- live_now: bytes live on the device when the chunk starts (inputs, resident tensors, the
  preallocated outputs once they exist),
- pending: bytes that will become live later in the call and stay (the preallocated outputs
  before the first chunk; with autograd and no checkpointing, what each chunk keeps for
  backward),
- fixed + c * per_item: the op's transient peak on a chunk, its outputs included.

The model is estimated without running the real op: the op runs on FakeTensor copies of 2
and 4 items (FakeTensorMode, no real memory, no real compute) under a meter counting fake
storages, and fixed / per_item come from the two peaks. When fake tracing fails (ops that
read data: .item(), numpy, boolean masks; extension ops without a fake kernel) the engine
runs the real op on one item under the real meter instead ("probe"). Hints
(per_item_bytes / fixed_bytes) skip both. The first real chunk then corrects the model
upwards if it measured more. Models are cached per signature (stage name, per-item
shapes/dtypes/devices of the mapped tensors, shapes/dtypes of tensor kwargs, repr of simple
kwargs, hints, autograd mode), so a tracking loop estimates once.
"""
from __future__ import annotations

import dataclasses
import math
import threading
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import _disable_current_modes

from .budget import Budget
from .meter import Meter


#: A measured model (calibration, probe) predicts a chunk larger than any it has seen with
#: this much on top of the per-item bytes of the items beyond those seen: items differ (one hypothesis' silhouette is
#: larger than another's, and a chunk pads to its largest), so more items can cost more
#: per item than the few that were measured. Chunks the model has seen run without it.
UNSEEN_CHUNK_ALLOWANCE = 0.15


@dataclass
class CostModel:
    """Bytes of one stage as a function of the chunk size (see module docstring).

    seen_chunk: the largest chunk a real run of this model measured (None: the model is
    exact for any chunk, as fake traces and hints are); larger chunks are predicted with
    UNSEEN_CHUNK_ALLOWANCE on top.
    """

    fixed_bytes: int
    per_item_bytes: int
    out_per_item_bytes: int | None  # output bytes per item; None = not known yet (hints)
    saved_per_item_bytes: int = 0  # kept per item after a chunk besides its outputs
    source: str = "fake"  # "hint" | "fake" | "probe"
    fail_chunk: int | None = None  # smallest chunk that ran out of memory
    safe_chunk: int | None = None  # largest chunk that ran after that failure
    corrections: int = 0
    note: str | None = None  # why the source is what it is (e.g. the fake-tracing failure)
    seen_chunk: int | None = None

    def transient_bytes(self, chunk: int) -> int:
        per_item = chunk * self.per_item_bytes
        if self.seen_chunk is not None and chunk > self.seen_chunk:
            # only the items beyond those measured are uncertain
            per_item += math.ceil((chunk - self.seen_chunk) * self.per_item_bytes * UNSEEN_CHUNK_ALLOWANCE)
        return self.fixed_bytes + per_item

    def pending_bytes(self, n_items: int, done: int, outputs_allocated: bool) -> int:
        outputs = 0 if outputs_allocated else n_items * (self.out_per_item_bytes or 0)
        return outputs + (n_items - done) * self.saved_per_item_bytes

    def minimum_bytes(self, n_items: int, live_bytes: int = 0) -> int:
        """Peak bytes of the smallest plan (chunks of one item) over ``n_items`` items."""
        return live_bytes + self.pending_bytes(n_items, 0, False) + self.transient_bytes(1)


_TRACING = threading.local()


def tracing_fake() -> bool:
    """True while this thread runs an op on fake tensors for an estimate (nested Engine.map
    calls then run their op whole: no planning, no report entries for fake work)."""
    return getattr(_TRACING, "active", False)


class EstimateFailed(Exception):
    """Fake tracing could not run the op; the planner falls back to a real probe."""


def _signature(value, depth: int = 0):
    """A hashable description of a kwarg: what its memory cost can depend on.

    Tensors passed whole contribute their dtype, device and rank but not their shape: the
    stages' per-item cost does not grow with them (a frame's ROI changes size every tracked
    frame, and re-estimating each time would cost more than the stage). Float values are
    tuning constants, not sizes, and are left out too; ints, strings, bools and None stay.
    An object may describe itself with ``cost_signature()``; the first real chunk still
    corrects a model that measured more than predicted.
    """
    if isinstance(value, torch.Tensor):
        return ("T", str(value.dtype), str(value.device), value.dim(), bool(value.requires_grad))
    if isinstance(value, torch.nn.Module):
        return ("M", type(value).__qualname__, id(value), bool(value.training))
    if isinstance(value, float):
        return ("F",)
    if value is None or isinstance(value, (bool, int, complex, str, bytes, torch.dtype, torch.device)):
        return ("V", repr(value))
    describe = getattr(value, "cost_signature", None)
    if callable(describe) and not isinstance(value, type):
        return ("S", type(value).__qualname__, _signature(describe(), depth + 1))
    if depth > 3:
        return ("O", type(value).__qualname__, id(value))
    if isinstance(value, (tuple, list)):
        return ("L", type(value).__qualname__, tuple(_signature(v, depth + 1) for v in value))
    if isinstance(value, dict):
        return ("D", tuple(sorted((repr(k), _signature(v, depth + 1)) for k, v in value.items())))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = tuple((f.name, _signature(getattr(value, f.name), depth + 1)) for f in dataclasses.fields(value))
        return ("DC", type(value).__qualname__, fields)
    # Any other object (a renderer, a function): the same object is assumed to cost the same.
    return ("O", type(value).__qualname__, id(value))


def stage_signature(name, mapped, kwargs, per_item_bytes, fixed_bytes, grad_mode) -> tuple:
    """The plan cache key of one map call: the stage name, the per-item shapes of the mapped
    tensors, the kwargs' signatures (see _signature), the hints and the autograd mode."""
    per_item = tuple((tuple(t.shape[1:]), str(t.dtype), str(t.device), bool(t.requires_grad)) for t in mapped)
    kw = tuple(sorted((key, _signature(value)) for key, value in kwargs.items()))
    return (name, per_item, kw, per_item_bytes, fixed_bytes, grad_mode)


def _tensor_leaves(out):
    return [leaf for leaf in pytree.tree_leaves(out) if isinstance(leaf, torch.Tensor)]


def output_bytes(out) -> int:
    """Bytes of the tensors in a (nested) op output."""
    return sum(leaf.numel() * leaf.element_size() for leaf in _tensor_leaves(out))


#: Items a real probe runs on, spread over the batch (their average cost stands for all).
PROBE_ITEMS = 4


def probe_indices(n_items: int, count: int = PROBE_ITEMS) -> torch.Tensor:
    """``count`` item indices spread evenly over ``n_items`` (all of them when fewer)."""
    if n_items <= count:
        return torch.arange(n_items)
    return torch.linspace(0, n_items - 1, count).round().long().unique()


class Planner:
    """Cost-model cache and chunk-size choice for one Engine.

    ``cache`` holds a model per stage signature; ``by_name`` the largest model seen per
    stage name, which is what a what-if of a whole call asks for (chunkpose.pipeline.sizing).
    ``reserve_bytes`` is memory held outside torch (renderer buffers), taken off the budget.
    """

    def __init__(self, budget: Budget):
        self.budget = budget
        self.cache: dict[tuple, CostModel] = {}
        self.by_name: dict[str, CostModel] = {}
        self.estimations = 0  # fake or probe estimations run (cache misses without hints)
        self.cache_hits = 0
        self.reserve_bytes = 0

    @property
    def usable_bytes(self) -> int | None:
        """What chunks may fill: the budget's usable part minus the reserve (None: unbounded)."""
        usable = self.budget.usable_bytes
        return None if usable is None else usable - int(self.reserve_bytes)

    def remember(self, name: str, model: CostModel) -> None:
        """Keep ``model`` as the stage's model by name when it costs more than the one kept."""
        kept = self.by_name.get(name)
        if kept is None or model.transient_bytes(1) + (model.out_per_item_bytes or 0) >= \
                kept.transient_bytes(1) + (kept.out_per_item_bytes or 0):
            self.by_name[name] = model

    def calibrated(self, key, name: str, n_items: int, transient: int, out_bytes: int, kept: int) -> CostModel:
        """A model from a measured run of ``n_items`` items (a calibration run), cached under
        ``key`` (the larger per item wins when the key is known already)."""
        n = max(1, int(n_items))
        saved = math.ceil(max(0, kept - out_bytes) / n)
        per_item = max(math.ceil(transient / n), math.ceil(out_bytes / n) + saved)
        model = CostModel(0, int(per_item), math.ceil(out_bytes / n), saved, source="calibrated", seen_chunk=n)
        old = self.cache.get(key)
        if old is not None and old.per_item_bytes >= model.per_item_bytes:
            old.seen_chunk = max(old.seen_chunk or 0, n)
            model = old
        self.cache[key] = model
        self.remember(name, model)
        return model

    # ------------------------------------------------------------------ models
    def model_for(self, key, op, mapped, kwargs, per_item_bytes, fixed_bytes, grad_mode, probe, name=None,
                  probe_limit: int | None = None):
        """The cached model for ``key`` or a new one. Returns (model, was_cached).

        grad_mode: "none" (no autograd), "checkpoint" (chunks checkpointed) or "saved"
        (autograd without checkpointing: activations stay until backward).
        probe(indices) -> (transient_bytes, output_bytes, kept_bytes) runs the real op on
        the items ``indices`` (at most ``probe_limit`` of them).
        """
        model = self.cache.get(key)
        if model is not None:
            self.cache_hits += 1
            return model, True
        if per_item_bytes is not None:
            model = CostModel(
                fixed_bytes=int(fixed_bytes or 0),
                per_item_bytes=int(per_item_bytes),
                out_per_item_bytes=None,
                source="hint",
            )
        else:
            self.estimations += 1
            try:
                model = self._fake_estimate(op, mapped, kwargs, grad_mode)
            except EstimateFailed as failure:
                model = self._probe_estimate(probe, mapped[0].shape[0], probe_limit)
                model.note = f"fake tracing failed ({failure}); measured a real probe of spread items"
            if fixed_bytes is not None:  # a fixed hint alone overrides the estimated intercept
                model.fixed_bytes = int(fixed_bytes)
        self.cache[key] = model
        if name is not None:
            self.remember(name, model)
        return model, False

    def _fake_estimate(self, op, mapped, kwargs, grad_mode) -> CostModel:
        from torch._subclasses.fake_tensor import FakeTensorMode

        n_items = mapped[0].shape[0]
        sizes = (2, 4) if n_items >= 4 else ((1, n_items) if n_items >= 2 else (1,))
        trace_grad = grad_mode == "saved"
        points = []
        _TRACING.active = True
        try:
            # Outer dispatch modes (the engine's own meter) must not see the fake trace.
            with _disable_current_modes():
                fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
                fake_kwargs = pytree.tree_map_only(torch.Tensor, fake_mode.from_tensor, kwargs)
                meter = Meter(counted_device="meta")
                for n in sizes:
                    with fake_mode:
                        args = [
                            torch.empty((n,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for t in mapped
                        ]
                        if trace_grad:
                            args = [a.requires_grad_() if t.requires_grad else a for a, t in zip(args, mapped)]
                    grad = torch.enable_grad() if trace_grad else torch.no_grad()
                    with fake_mode, meter.span() as span, grad:
                        out = op(*args, **fake_kwargs)
                        out_bytes = output_bytes(out)
                        kept = meter.live_bytes() - span.start_bytes
                    points.append((n, span.peak_bytes - span.start_bytes, out_bytes, kept))
                    del out, args
        except Exception as exc:  # noqa: BLE001 - any tracing failure means "cannot fake this op"
            first_line = (str(exc).splitlines() or [""])[0][:200]
            raise EstimateFailed(f"{type(exc).__name__}: {first_line}") from exc
        finally:
            _TRACING.active = False
        n_last, peak_last, out_last, kept_last = points[-1]
        if len(points) == 2:
            n_first, peak_first = points[0][0], points[0][1]
            per_item = max(0.0, (peak_last - peak_first) / (n_last - n_first))
            fixed = max(0.0, peak_first - n_first * per_item)
        else:
            per_item, fixed = peak_last / n_last, 0.0
        out_per_item = math.ceil(out_last / n_last)
        saved = math.ceil(max(0, kept_last - out_last) / n_last) if trace_grad else 0
        per_item = max(math.ceil(per_item), out_per_item + saved)
        return CostModel(int(math.ceil(fixed)), int(per_item), out_per_item, saved, source="fake")

    def _probe_estimate(self, probe, n_items: int, limit: int | None = None) -> CostModel:
        indices = probe_indices(n_items, PROBE_ITEMS if limit is None else max(1, min(PROBE_ITEMS, limit)))
        n = len(indices)
        transient, out_bytes, kept = probe(indices)
        saved = math.ceil(max(0, kept - out_bytes) / n)
        # One measurement: no intercept is knowable, so everything is per item (the stages'
        # fixed costs are small; their per-item costs vary from item to item, hence items
        # spread over the batch rather than the first one).
        per_item = max(math.ceil(transient / n), math.ceil(out_bytes / n) + saved)
        return CostModel(0, int(per_item), math.ceil(out_bytes / n), saved, source="probe", seen_chunk=n)

    # ------------------------------------------------------------------ chunks
    def chunk_size(self, model: CostModel, live: int, pending: int, remaining: int, ceiling: int | None = None,
                   usable: int | None = None) -> int:
        """Largest c <= remaining with live + pending + transient_bytes(c) <= usable (default:
        the budget's usable bytes minus the reserve; chunks past the largest measured one carry
        the unseen-chunk allowance); 0 if none."""
        usable = self.usable_bytes if usable is None else usable
        if usable is None:
            chunk = remaining
        else:
            room = usable - live - pending - model.fixed_bytes
            chunk = remaining if model.per_item_bytes <= 0 else room // model.per_item_bytes
            if model.per_item_bytes > 0 and model.seen_chunk is not None and chunk > model.seen_chunk:
                # past the largest measured chunk the model adds its allowance: plan with it,
                # so that the chunk chosen is one whose prediction fits
                p, seen = model.per_item_bytes, model.seen_chunk
                chunk = max(seen, int((room + seen * p * UNSEEN_CHUNK_ALLOWANCE) // (p * (1 + UNSEEN_CHUNK_ALLOWANCE))))
                while chunk > seen and model.transient_bytes(chunk) - model.fixed_bytes > room:
                    chunk -= 1  # the rounding up of the allowance
        if ceiling is not None:
            chunk = min(chunk, ceiling)
        if model.fail_chunk is not None:
            # never re-test sizes between the last that worked and the first that failed
            chunk = min(chunk, model.safe_chunk or max(1, model.fail_chunk // 2))
        return int(max(0, min(chunk, remaining)))

    def predicted_peak(self, model: CostModel, live: int, pending: int, chunk: int) -> int:
        return int(live + pending + model.transient_bytes(chunk))

    def correct(self, model: CostModel, chunk: int, transient: int, out_bytes: int, kept: int, name=None) -> bool:
        """Fold what a real chunk measured into the model; True if it measured more than predicted."""
        model.out_per_item_bytes = max(model.out_per_item_bytes or 0, math.ceil(out_bytes / chunk))
        saved = math.ceil(max(0, kept - out_bytes) / chunk)
        model.saved_per_item_bytes = max(model.saved_per_item_bytes, saved)
        grew = transient > model.fixed_bytes + chunk * model.per_item_bytes
        if grew:
            model.per_item_bytes = int(math.ceil((transient - model.fixed_bytes) / chunk))
            model.corrections += 1
        if model.seen_chunk is not None:
            model.seen_chunk = max(model.seen_chunk, chunk)
        if name is not None:
            self.remember(name, model)
        return grew

    def note_failure(self, model: CostModel, chunk: int) -> None:
        model.fail_chunk = chunk if model.fail_chunk is None else min(model.fail_chunk, chunk)
        if model.safe_chunk is not None and model.safe_chunk >= model.fail_chunk:
            model.safe_chunk = None

    def note_success(self, model: CostModel, chunk: int) -> None:
        if model.fail_chunk is not None and chunk < model.fail_chunk:
            model.safe_chunk = max(model.safe_chunk or 0, chunk)
