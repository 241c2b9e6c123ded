"""Engine: runs a batched op over chunks of its leading axis under a memory budget.

    engine = Engine(budget_gb=4.0, device="cuda")
    xyz = engine.map(op, rows, name="depth.xyz", depth=depth, K=K)

The op is called on slices of the positional tensors (axis 0) with the keyword arguments
whole; chunk outputs are written into outputs preallocated from the first chunk's result
(no concatenation). The chunk size comes from the planner's cost model; an out-of-memory
error halves it (after leaving the except block and freeing), and a chunk of one item that
still fails raises BudgetTooSmall. With autograd on and an input that requires grad, each
chunk runs under non-reentrant gradient checkpointing, so only chunk inputs are kept for
backward.

CUDA allocator tip: set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True before the first
CUDA allocation to cut the reserved-minus-allocated overhead that the budget margin covers
(``torch.backends.cuda.max_split_size_mb`` is not an API; the env var is the real knob).
"""
from __future__ import annotations

import functools
import gc
import warnings
from contextlib import contextmanager

import torch
import torch.utils._pytree as pytree
from torch.utils.checkpoint import checkpoint as _checkpoint

from .budget import GIB, Budget, BudgetTooSmall, gib_ceil
from .meter import Meter, tensors_in
from .planner import CostModel, Planner, stage_signature, tracing_fake
from .report import RunReport


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    # The CPU allocator reports exhaustion as a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(exc)


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _output_bytes(leaves) -> int:
    return sum(t.numel() * t.element_size() for t in leaves)


class Engine:
    """Budget-driven chunked execution. See the module docstring.

    budget_gb: GiB (2**30 bytes) the work may use on ``device``, resident tensors, inputs and
        outputs included; None = unbounded (every map runs as one chunk).
    device: "cpu", "cuda", "cuda:N" or a torch.device. The meter measures this device.
    hard_cap: CUDA: torch.cuda.set_per_process_memory_fraction while the engine runs
        (restored afterwards); CPU: the meter raises torch.OutOfMemoryError rather than let
        live tensor bytes pass the budget.
    checkpoint: run chunks under gradient checkpointing when autograd needs them (default).
    max_chunk: optional upper bound on items per chunk (latency, debugging); None = the
        budget alone decides.
    """

    def __init__(
        self,
        budget_gb: float | None = None,
        device="cpu",
        hard_cap: bool = False,
        checkpoint: bool = True,
        max_chunk: int | None = None,
    ):
        if max_chunk is not None and (isinstance(max_chunk, bool) or not isinstance(max_chunk, int) or max_chunk < 1):
            raise ValueError(f"max_chunk must be a positive int or None, got {max_chunk!r}")
        self.max_chunk = max_chunk
        self.budget = Budget.from_gb(budget_gb, device, hard_cap)
        cap = self.budget.total_bytes if (hard_cap and not self.budget.unbounded) else None
        self.meter = Meter(self.budget.device, hard_cap_bytes=cap)
        self.planner = Planner(self.budget)
        self.report = RunReport(budget_bytes=self.budget.total_bytes, device=str(self.budget.device))
        self.checkpointing = bool(checkpoint)

    # ------------------------------------------------------------------ properties
    @property
    def budget_bytes(self) -> int | None:
        return self.budget.total_bytes

    @property
    def device(self) -> torch.device:
        return self.budget.device

    @property
    def hard_cap(self) -> bool:
        return self.budget.hard_cap

    def __repr__(self) -> str:
        budget = "unbounded" if self.budget_bytes is None else f"{self.budget_bytes / GIB:g} GiB"
        return f"Engine(budget={budget}, device={self.device}, hard_cap={self.hard_cap})"

    def available_bytes(self) -> int | None:
        """Budget minus what is live now on the device (None when unbounded)."""
        if self.budget_bytes is None:
            return None
        return max(0, self.budget_bytes - self.meter.live_bytes())

    # ------------------------------------------------------------------ contexts
    @contextmanager
    def resident(self, *tensors_or_modules):
        """Count these tensors (module parameters and buffers) against the budget inside the block.

        On CUDA the allocator counts every device tensor anyway; on CPU the meter only counts
        tensors created outside the engine when they are declared here or passed to map.
        """
        with self.meter.holding(*tensors_or_modules):
            yield self

    @contextmanager
    def session(self, name: str):
        """One measured span over several map calls; its peak goes to report.peak_bytes."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"session name must be a non-empty string, got {name!r}")
        self._release_cache_over_budget()
        span = None
        try:
            with self.meter.span(name) as span:
                yield span
        finally:
            if span is not None:
                self.report.record_session(name, span.peak_bytes, span.peak_allocated_bytes, span.wall_s)
                self.report.see_peak(span.peak_bytes, span.peak_allocated_bytes)

    def note_downscale(self, factor: float, reason: str) -> None:
        """Record (and warn about) a decision to run on inputs downscaled by ``factor``."""
        factor = float(factor)
        if not (0.0 < factor <= 1.0):
            raise ValueError(f"factor must be in (0, 1], got {factor!r}")
        self.report.downscale_factor = factor
        self.report.downscale_reason = str(reason)
        if factor < 1.0:
            warnings.warn(f"chunkpose: input downscaled by {factor:.3f}: {reason}", stacklevel=2)

    # ------------------------------------------------------------------ planning
    def estimate(self, op, *mapped, name: str, per_item_bytes=None, fixed_bytes=None, **kwargs) -> CostModel:
        """The cost model map would use for this call (cached; may trace the op on fakes)."""
        self._check_args(op, mapped, name)
        grad_mode, checkpointed = self._grad_mode(mapped, kwargs)
        key = stage_signature(name, mapped, kwargs, per_item_bytes, fixed_bytes, grad_mode)
        probe = functools.partial(self._probe, op, mapped, kwargs, checkpointed)
        with self.meter.span(name):
            self.meter.track(mapped, kwargs, scope="span")
            model, _ = self.planner.model_for(key, op, mapped, kwargs, per_item_bytes, fixed_bytes, grad_mode, probe)
        return model

    def _grad_mode(self, mapped, kwargs):
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (*mapped, *tensors_in(kwargs))
        )
        checkpointed = needs_grad and self.checkpointing
        return ("checkpoint" if checkpointed else ("saved" if needs_grad else "none")), checkpointed

    @staticmethod
    def _check_args(op, mapped, name):
        if not callable(op):
            raise ValueError(f"op must be callable (a function of the sliced tensors), got {type(op).__name__}")
        if not isinstance(name, str) or not name:
            raise ValueError(f"name must be a non-empty stage name such as 'refine.render', got {name!r}")
        if not mapped:
            raise ValueError("map needs at least one positional tensor to slice along axis 0; pass whole tensors as keywords")
        for i, t in enumerate(mapped):
            if not isinstance(t, torch.Tensor) or t.dim() == 0:
                what = type(t).__name__ if not isinstance(t, torch.Tensor) else "a 0-dim tensor"
                raise ValueError(
                    f"positional argument {i} of map must be a tensor with a leading item axis, got {what}; "
                    f"pass non-sliced values as keyword arguments"
                )
        n = mapped[0].shape[0]
        for i, t in enumerate(mapped[1:], start=1):
            if t.shape[0] != n:
                raise ValueError(
                    f"positional tensors must share the leading length: argument 0 has {n}, argument {i} has {t.shape[0]}"
                )

    # ------------------------------------------------------------------ running
    def map(self, op, *mapped, name: str, per_item_bytes: int | None = None, fixed_bytes: int | None = None, **kwargs):
        """op(*slices_of_mapped, **kwargs) over chunks; returns what op(*mapped, **kwargs) returns.

        mapped: tensors sliced along axis 0 (same leading length N). kwargs: passed whole.
        per_item_bytes / fixed_bytes: cost hints in bytes (skip estimation).
        The op must return a tensor, or a tuple/list/dict of tensors, each with leading length
        equal to its slice's.
        """
        self._check_args(op, mapped, name)
        if tracing_fake():  # an outer stage is being estimated on fake tensors
            return op(*mapped, **kwargs)
        stage = self.report.stage(name)
        grad_mode, checkpointed = self._grad_mode(mapped, kwargs)
        stage.checkpointed = stage.checkpointed or checkpointed
        self._release_cache_over_budget()
        span = None
        try:
            with self.meter.span(name) as span:
                # Inputs count against the budget for the whole outermost span (a session).
                self.meter.track(mapped, kwargs, scope="span")
                if self.budget.unbounded or mapped[0].shape[0] == 0:
                    return self._run_whole(op, mapped, kwargs, stage)
                return self._run_chunked(op, mapped, kwargs, name, stage, grad_mode, checkpointed, per_item_bytes, fixed_bytes)
        finally:
            stage.calls += 1
            if span is not None:
                stage.wall_s += span.wall_s
                stage.peak_bytes = max(stage.peak_bytes, span.peak_bytes)
                stage.peak_allocated_bytes = max(stage.peak_allocated_bytes, span.peak_allocated_bytes)
                self.report.see_peak(span.peak_bytes, span.peak_allocated_bytes)

    def _run_whole(self, op, mapped, kwargs, stage):
        out = op(*mapped, **kwargs)
        n = mapped[0].shape[0]
        self._check_output(out, n)
        stage.estimate_source = stage.estimate_source or "none"
        stage.chunk_sizes.append(n)
        stage.n_chunks += 1
        stage.items += n
        return out

    def _call_chunk(self, op, mapped, kwargs, start, stop, checkpointed):
        args = [t[start:stop] for t in mapped]
        if checkpointed:
            return _checkpoint(functools.partial(op, **kwargs), *args, use_reentrant=False)
        return op(*args, **kwargs)

    def _probe(self, op, mapped, kwargs, checkpointed, n):
        """Run the real op on the first n items; (transient, output, kept) bytes measured."""
        before = self.meter.live_bytes()
        with self.meter.span() as span:
            out = self._call_chunk(op, mapped, kwargs, 0, n, checkpointed)
            leaves = self._check_output(out, n)
            out_bytes = _output_bytes(leaves)
            kept = self.meter.live_bytes() - before
        del out, leaves
        return span.peak_allocated_bytes - before, out_bytes, kept

    @staticmethod
    def _check_output(out, n):
        leaves = pytree.tree_leaves(out)
        if not leaves:
            raise ValueError("op returned no tensors; it must return a tensor or a tuple/list/dict of tensors")
        for leaf in leaves:
            if not isinstance(leaf, torch.Tensor):
                raise ValueError(
                    f"op must return tensors (or a tuple/list/dict of tensors), found a {type(leaf).__name__}"
                )
            if leaf.dim() == 0 or leaf.shape[0] != n:
                raise ValueError(
                    f"op output of shape {tuple(leaf.shape)} lacks the leading item axis of length {n}; "
                    f"ops run by Engine.map must return one row per input item"
                )
        return leaves

    def _too_small(self, name, model: CostModel, n, live, attempted=None, detail="") -> BudgetTooSmall:
        need = model.minimum_bytes(n, live)
        if attempted is not None:
            need = max(need, int(attempted))
        minimum = max(self.budget.budget_for_usable(need), (self.budget_bytes or 0) + 1 if attempted is not None else 0)
        budget_gb = self.budget_bytes / GIB
        text = (
            f"budget {budget_gb:.3f} GiB is below the minimum {minimum / GIB:.3f} GiB this stage needs "
            f"(stage '{name}': {live / 2**20:.1f} MiB live, {model.pending_bytes(n, 0, False) / 2**20:.1f} MiB of "
            f"outputs, {model.fixed_bytes / 2**20:.1f} MiB fixed + {model.per_item_bytes / 2**20:.2f} MiB per item)"
            f"{detail}; pass budget_gb>={gib_ceil(minimum)}"
        )
        return BudgetTooSmall(text, minimum_bytes=minimum, stage=name)

    @staticmethod
    def _write(buffers, leaves, start, chunk):
        """Copy one chunk's outputs into the preallocated buffers (a function, so that no
        loop variable keeps the chunk's output alive afterwards)."""
        for buffer, leaf in zip(buffers, leaves):
            if buffer.shape[1:] != leaf.shape[1:] or buffer.dtype != leaf.dtype:
                raise ValueError(
                    f"op returned {tuple(leaf.shape[1:])} {leaf.dtype} per item for items {start}..{start + chunk - 1} "
                    f"but {tuple(buffer.shape[1:])} {buffer.dtype} before; ops must not depend on the slicing"
                )
            buffer[start : start + chunk].copy_(leaf)

    def _release_cache_over_budget(self):
        """CUDA: cached blocks of earlier work count in reserved bytes; when they alone pass
        the usable budget, return them before a span starts measuring."""
        if self.meter.is_cuda and not self.budget.unbounded and self.meter.reserved_bytes() > self.budget.usable_bytes:
            torch.cuda.empty_cache()

    def _free(self):
        gc.collect()
        if self.meter.is_cuda:
            torch.cuda.empty_cache()

    def _run_chunked(self, op, mapped, kwargs, name, stage, grad_mode, checkpointed, per_item_bytes, fixed_bytes):
        meter, planner = self.meter, self.planner
        n = mapped[0].shape[0]
        key = stage_signature(name, mapped, kwargs, per_item_bytes, fixed_bytes, grad_mode)
        probe = functools.partial(self._probe, op, mapped, kwargs, checkpointed)

        failed = None
        estimations_before = planner.estimations
        try:
            model, _cached = planner.model_for(key, op, mapped, kwargs, per_item_bytes, fixed_bytes, grad_mode, probe)
        except Exception as exc:  # only memory errors are turned into BudgetTooSmall
            if not _is_out_of_memory(exc):
                raise
            failed = (_first_line(exc), getattr(exc, "attempted_bytes", None))
        if failed is not None:  # the one-item probe itself did not fit
            self._free()
            stage.oom_errors.append(failed[0])
            probe_model = CostModel(0, 0, 0, source="probe")
            raise self._too_small(name, probe_model, n, meter.live_bytes(), attempted=failed[1] or (self.budget_bytes + 1),
                                  detail=f"; one item ran out of memory: {failed[0]}")
        stage.estimations += planner.estimations - estimations_before
        stage.estimate_source = model.source
        stage.estimate_note = model.note

        self._release_cache_over_budget()  # the estimate may have left cached blocks
        live = meter.live_bytes()
        pending = model.pending_bytes(n, 0, False)
        chunk = planner.chunk_size(model, live, pending, n, self.max_chunk)
        if chunk < 1:  # before anything big exists
            raise self._too_small(name, model, n, live)
        if model.out_per_item_bytes is None:
            chunk = 1  # hints say nothing about outputs: learn their size on one item first
        stage.predicted_peak_bytes = max(stage.predicted_peak_bytes, planner.predicted_peak(model, live, pending, chunk))
        stage.per_item_bytes, stage.fixed_bytes = model.per_item_bytes, model.fixed_bytes

        outputs = None  # (leaves, spec) of the preallocated outputs
        result = None
        done = 0
        ceiling = self.max_chunk  # after an OOM the chunk never grows back above the halved size
        first = True
        while done < n:
            chunk = max(1, min(chunk, n - done))
            before = meter.live_bytes()
            failed = None
            try:
                with meter.span() as chunk_span:
                    out = self._call_chunk(op, mapped, kwargs, done, done + chunk, checkpointed)
                    kept = meter.live_bytes() - before
            except Exception as exc:
                if not _is_out_of_memory(exc):
                    raise
                failed = (_first_line(exc), getattr(exc, "attempted_bytes", None))
            if failed is not None:
                # Out of the except block: the failed attempt's tensors are gone with its frames.
                self._free()
                stage.retries += 1
                stage.oom_errors.append(failed[0])
                planner.note_failure(model, chunk)
                if chunk == 1:
                    raise self._too_small(name, model, n, meter.live_bytes(), attempted=failed[1] or (self.budget_bytes + 1),
                                          detail=f"; one item ran out of memory: {failed[0]}")
                chunk = chunk // 2
                ceiling = chunk if ceiling is None else min(ceiling, chunk)
                continue

            leaves = self._check_output(out, chunk)
            planner.note_success(model, chunk)
            if first:
                transient = chunk_span.peak_allocated_bytes - before
                if planner.correct(model, chunk, transient, _output_bytes(leaves), kept):
                    stage.corrections += 1
                stage.per_item_bytes, stage.fixed_bytes = model.per_item_bytes, model.fixed_bytes
                first = False
            if meter.is_cuda and chunk_span.peak_bytes > self.budget.usable_bytes and chunk > 1:
                # Allocator overhead beyond the margin: make later chunks smaller.
                ceiling = max(1, (chunk * 3) // 4) if ceiling is None else min(ceiling, max(1, (chunk * 3) // 4))
                torch.cuda.empty_cache()

            if done == 0 and chunk == n:
                result = out  # one chunk: the op's own result, nothing copied
            else:
                if outputs is None:
                    spec = pytree.tree_structure(out)
                    try:
                        buffers = [torch.empty((n,) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device) for t in leaves]
                    except Exception as exc:
                        if not _is_out_of_memory(exc):
                            raise
                        failed = (_first_line(exc), getattr(exc, "attempted_bytes", None))
                    if failed is not None:
                        del out, leaves
                        self._free()
                        raise self._too_small(name, model, n, meter.live_bytes(), attempted=failed[1],
                                              detail="; the full outputs did not fit")
                    outputs = (buffers, spec)
                self._write(outputs[0], leaves, done, chunk)
            del out, leaves
            stage.chunk_sizes.append(chunk)
            stage.n_chunks += 1
            done += chunk
            if done >= n:
                break
            live = meter.live_bytes()
            pending = model.pending_bytes(n, done, outputs is not None)
            remaining = n - done
            next_chunk = planner.chunk_size(model, live, pending, remaining, ceiling)
            if next_chunk < 1:
                next_chunk = 1
                stage.over_budget = True
            stage.predicted_peak_bytes = max(
                stage.predicted_peak_bytes, planner.predicted_peak(model, live, pending, min(next_chunk, remaining))
            )
            chunk = next_chunk
        stage.items += n
        if result is not None:
            return result
        return pytree.tree_unflatten(outputs[0], outputs[1])
