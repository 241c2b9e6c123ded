"""RunReport: what the engine did, per stage, and what it measured.

Stages are keyed by the name given to ``Engine.map``; repeated calls with the same name
accumulate (chunk sizes appended, peaks maxed, times summed). ``to_dict()`` is plain JSON.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

MIB = 2**20


@dataclass
class StageReport:
    """One stage (all calls of ``Engine.map`` with this name). Bytes are device bytes.

    Attributes:
        name: the stage name.
        calls: map calls of this stage.
        chunk_sizes: every successful chunk's size, in order.
        n_chunks: number of successful chunks.
        items: items processed over all calls.
        peak_bytes: measured peak (CUDA max reserved, CPU max live tensor bytes).
        peak_allocated_bytes: measured CUDA max allocated (CPU: = peak_bytes).
        predicted_peak_bytes: the planner's prediction for the chunks it chose (max).
        retries: chunks retried smaller after an out-of-memory error.
        oom_errors: first line of each out-of-memory error, for the record.
        wall_s: seconds spent in the stage (host clock).
        gpu_s: CUDA only: the stage's device time from CUDA events (None on the CPU).
        estimate_source: where the cost model came from: "hint", "fake", "probe", "cache:<src>"
            or "none".
        estimate_note: e.g. why fake tracing fell back to a probe.
        estimations: cost-model estimations run for this stage (cache misses).
        corrections: times the first chunk measured more than predicted.
        per_item_bytes: the cost model used last (after correction), bytes per item.
        fixed_bytes: the cost model's fixed bytes.
        checkpointed: whether chunks ran under gradient checkpointing.
        over_budget: a chunk of 1 had to run although the plan said it may not fit.
    """

    name: str
    calls: int = 0
    chunk_sizes: list[int] = field(default_factory=list)  # every successful chunk, in order
    n_chunks: int = 0
    items: int = 0
    peak_bytes: int = 0  # measured: CUDA max reserved, CPU max live tensor bytes
    peak_allocated_bytes: int = 0  # measured: CUDA max allocated (CPU: = peak_bytes)
    predicted_peak_bytes: int = 0  # the planner's prediction for the chunks it chose (max)
    retries: int = 0  # chunks retried smaller after an out-of-memory error
    oom_errors: list[str] = field(default_factory=list)  # first line of each, for the record
    wall_s: float = 0.0
    gpu_s: float | None = None  # CUDA: device time between the stage's CUDA events; None on the CPU
    estimate_source: str | None = None  # "hint" | "fake" | "probe" | "cache:<src>" | "none"
    estimate_note: str | None = None  # e.g. why fake tracing fell back to a probe
    estimations: int = 0  # cost-model estimations run for this stage (cache misses)
    corrections: int = 0  # times the first chunk measured more than predicted
    per_item_bytes: int = 0  # the cost model used last (after correction)
    fixed_bytes: int = 0
    checkpointed: bool = False
    over_budget: bool = False  # a chunk of 1 had to run although the plan said it may not fit

    def to_dict(self) -> dict:
        """Every field as plain JSON-able Python (dataclasses.asdict).

        Returns:
            dict of field name -> value.
        """
        return asdict(self)


@dataclass
class RunReport:
    """Per-stage records plus overall peaks, the budget and any downscale decision.

    Attributes:
        budget_bytes: the budget in bytes, or None (unbounded).
        device: the device, as a string.
        peak_bytes: overall measured peak (CUDA reserved; CPU live tensor bytes).
        peak_allocated_bytes: overall CUDA allocated peak (CPU: = peak_bytes).
        external_bytes: the most held outside torch at once (renderer buffers), estimated from
            sizes.
        downscale_factor: scale the input ran at (1.0 = full resolution).
        downscale_reason: why it was downscaled, or None.
        stages: {stage name: StageReport}.
        sessions: {session name: {"calls", "peak_bytes", "peak_allocated_bytes", "wall_s"}}.
        shards: {"index:device": RunReport} of the other devices a call split its hypotheses over
            (each under its own budget); empty for a one-device call.
        total_peak_bytes: (property) peak_bytes + external_bytes: what the budget bounds.
        within_budget: (property) total_peak_bytes <= budget_bytes, or None when unbounded.
    """

    budget_bytes: int | None = None
    device: str = "cpu"
    peak_bytes: int = 0  # overall measured peak (CUDA reserved; CPU live tensor bytes)
    peak_allocated_bytes: int = 0  # overall CUDA allocated peak (CPU: = peak_bytes)
    external_bytes: int = 0  # the most held outside torch at once (renderer buffers), estimated from sizes
    downscale_factor: float = 1.0
    downscale_reason: str | None = None
    stages: dict[str, StageReport] = field(default_factory=dict)
    sessions: dict[str, dict] = field(default_factory=dict)
    shards: dict[str, "RunReport"] = field(default_factory=dict)

    def stage(self, name: str) -> StageReport:
        """The StageReport of stage ``name``, created empty on first use.

        Args:
            name: the stage name given to Engine.map.

        Returns:
            StageReport (the one stored in ``stages``).
        """
        if name not in self.stages:
            self.stages[name] = StageReport(name)
        return self.stages[name]

    def see_external(self, nbytes: int) -> None:
        """Raise external_bytes to ``nbytes`` if that is more than seen so far.

        Args:
            nbytes: int bytes held outside torch now.
        """
        self.external_bytes = max(self.external_bytes, int(nbytes))

    @property
    def total_peak_bytes(self) -> int:
        """The measured torch peak plus what was held outside torch: what the budget bounds."""
        return self.peak_bytes + self.external_bytes

    def see_peak(self, reserved: int, allocated: int) -> None:
        """Raise the overall peaks to these measurements if higher.

        Args:
            reserved: int bytes, the measured peak (CUDA reserved; CPU live tensor bytes).
            allocated: int bytes, the measured allocated peak (CUDA allocated; CPU: = reserved).
        """
        self.peak_bytes = max(self.peak_bytes, int(reserved))
        self.peak_allocated_bytes = max(self.peak_allocated_bytes, int(allocated))

    def record_session(self, name: str, peak: int, peak_allocated: int, wall_s: float) -> None:
        """Add one finished session span to ``sessions[name]`` (calls counted, peaks maxed, time summed).

        Args:
            name: the session name.
            peak: int bytes, the span's measured peak.
            peak_allocated: int bytes, the span's allocated peak.
            wall_s: float seconds the span took.
        """
        entry = self.sessions.setdefault(name, {"calls": 0, "peak_bytes": 0, "peak_allocated_bytes": 0, "wall_s": 0.0})
        entry["calls"] += 1
        entry["peak_bytes"] = max(entry["peak_bytes"], int(peak))
        entry["peak_allocated_bytes"] = max(entry["peak_allocated_bytes"], int(peak_allocated))
        entry["wall_s"] += float(wall_s)

    @property
    def within_budget(self) -> bool | None:
        return None if self.budget_bytes is None else self.total_peak_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        """The report as plain JSON: the overall fields, total_peak_bytes, within_budget, and every
        stage and session as a dict.

        Returns:
            dict.
        """
        return {
            "budget_bytes": self.budget_bytes,
            "device": self.device,
            "peak_bytes": self.peak_bytes,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "external_bytes": self.external_bytes,
            "total_peak_bytes": self.total_peak_bytes,
            "within_budget": self.within_budget,
            "downscale_factor": float(self.downscale_factor),
            "downscale_reason": self.downscale_reason,
            "stages": {name: stage.to_dict() for name, stage in self.stages.items()},
            "sessions": {name: dict(entry) for name, entry in self.sessions.items()},
            "shards": {name: shard.to_dict() for name, shard in self.shards.items()},
        }

    def summary(self) -> str:
        """A short fixed-width table, one line per stage, then the overall line.

        Returns:
            str: a header, one line per stage (calls, chunks, sizes, peak and predicted MiB, retries,
            seconds, estimate source), and the device/budget/peak/downscale line.
        """
        header = f"{'stage':<24} {'calls':>5} {'chunks':>6} {'sizes':<16} {'peak MiB':>9} {'pred MiB':>9} {'retry':>5} {'time s':>7} {'est':<6}"
        lines = [header, "-" * len(header)]
        for stage in self.stages.values():
            sizes = sizes_text(stage.chunk_sizes)
            lines.append(
                f"{stage.name[:24]:<24} {stage.calls:>5} {stage.n_chunks:>6} {sizes:<16} "
                f"{stage.peak_bytes / MIB:>9.1f} {stage.predicted_peak_bytes / MIB:>9.1f} "
                f"{stage.retries:>5} {stage.wall_s:>7.3f} {str(stage.estimate_source)[:6]:<6}"
            )
        budget = "unbounded" if self.budget_bytes is None else f"{self.budget_bytes / MIB:.1f} MiB"
        overall = f"device {self.device}  budget {budget}  peak {self.peak_bytes / MIB:.1f} MiB"
        if self.peak_allocated_bytes != self.peak_bytes:
            overall += f" (allocated {self.peak_allocated_bytes / MIB:.1f} MiB)"
        if self.external_bytes:
            overall += f" + {self.external_bytes / MIB:.1f} MiB outside torch"
        if self.downscale_factor != 1.0:
            overall += f"  downscale x{self.downscale_factor:.3f} ({self.downscale_reason})"
        lines.append(overall)
        for name, shard in self.shards.items():
            lines.append(f"shard on {name}: peak {shard.peak_bytes / MIB:.1f} MiB"
                         + ("" if shard.budget_bytes is None else f" of {shard.budget_bytes / MIB:.1f} MiB")
                         + f", {', '.join(f'{s.name} {s.n_chunks} chunks' for s in shard.stages.values())}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def sizes_text(sizes: list[int], width: int | None = 16) -> str:
    """Run-length text of chunk sizes: [64, 64, 64, 16] -> '64x3,16' (cut to ``width``).

    Args:
        sizes: chunk sizes in order.
        width: most characters returned (longer text ends in "~"); None = no limit.

    Returns:
        str; "-" for no sizes.
    """
    if not sizes:
        return "-"
    parts = []
    prev, count = sizes[0], 0
    for size in sizes + [None]:
        if size == prev:
            count += 1
            continue
        parts.append(f"{prev}x{count}" if count > 1 else f"{prev}")
        prev, count = size, 1
    text = ",".join(parts)
    return text if width is None or len(text) <= width else text[: width - 1] + "~"
