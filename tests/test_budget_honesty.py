"""The budget's promises, checked from outside the engine: the CPU meter against an
independent storage count, predicted stage peaks and the what-if of a whole call against
what the call measures, one chunk per stage when the budget holds everything, and memory
outside torch (the GL framebuffers) inside the budget."""
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chunkpose.estimator import PoseEstimator
from chunkpose.models import RefineNet, ScoreNetMultiPair, official_config
from chunkpose.pipeline.learned import LearnedRefiner, LearnedScorer

MIB = 2**20
W, H = 320, 240


class StorageCount(TorchDispatchMode):
    """Live bytes of every storage an op creates, from its creation until it dies (views
    and in-place results add nothing: their storage is known or pre-existing), plus the
    bytes declared up front; the peak over the whole block."""

    def __init__(self, declared_bytes: int = 0):
        super().__init__()
        self.live = self.peak = int(declared_bytes)
        self.refs = {}  # storage key -> the weakref whose callback counts it out

    def _died(self, key, nbytes):
        def callback(_):
            self.refs.pop(key, None)
            self.live -= nbytes
        return callback

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = storage._cdata
            if storage.device.type != "cpu" or key in self.refs or key in inputs:
                continue
            self.refs[key] = weakref.ref(storage, self._died(key, storage.nbytes()))
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        return out


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


@pytest.fixture(scope="module")
def scene():
    from chunkpose.synth import make_scene

    s = make_scene("drill", W, H, frames=3, footprint=0.12, seed=3)
    return s


def _learned_estimator(scene, budget_gb, **kwargs):
    torch.manual_seed(0)
    refiner = LearnedRefiner(RefineNet().eval(), official_config("refiner", input_resize=[32, 32]))
    scorer = LearnedScorer(ScoreNetMultiPair().eval(), official_config("scorer", input_resize=[32, 32]))
    # random weights cannot track: without health checks a track call stays one call (no
    # re-registration), which is what these tests measure
    kwargs.setdefault("health_threshold", None)
    return PoseEstimator(scene.mesh, budget_gb=budget_gb, device="cpu", refiner=refiner, scorer=scorer, **kwargs)


def _estimator(kind, scene, budget_gb):
    if kind == "learned":
        return _learned_estimator(scene, budget_gb, hypotheses=12, refine_iterations=2)
    return PoseEstimator(scene.mesh, budget_gb=budget_gb, device="cpu", hypotheses=24, refine_iterations=2)


def _held_bytes(est) -> int:
    """What the estimator holds from before the call: the networks and the rotation set."""
    held = [p for stage in (est.refiner, est.scorer) for m in vars(stage).values() if isinstance(m, torch.nn.Module)
            for p in (*m.parameters(), *m.buffers())]
    return sum(t.numel() * t.element_size() for t in held) + est._rotations.numel() * 4


@pytest.mark.gl
@pytest.mark.parametrize("kind", ["geometric", "learned"])
def test_cpu_meter_equals_an_independent_storage_count(scene, kind):
    budget_gb = 0.25
    est = _estimator(kind, scene, budget_gb)
    est.register(scene.rgb[0], scene.depth[0], scene.K, scene.masks[0])  # calibrations out of the way
    est.track(scene.rgb[1], scene.depth[1], scene.K)
    for call in ("register", "track"):
        count = StorageCount(_held_bytes(est))
        with count:
            if call == "register":
                res = est.register(scene.rgb[0], scene.depth[0], scene.K, scene.masks[0])
            else:
                res = est.track(scene.rgb[2], scene.depth[2], scene.K)
        report = res.report
        assert abs(report.peak_bytes - count.peak) <= MIB, (call, report.peak_bytes, count.peak)
        assert report.total_peak_bytes <= report.budget_bytes
        assert report.external_bytes > 0  # the GL framebuffers are in the budget too


@pytest.mark.gl
@pytest.mark.parametrize("kind", ["geometric", "learned"])
def test_predicted_peaks_within_15_percent_of_measured(scene, kind):
    """Every stage's predicted peak, and the what-if of the whole call, against what the call
    measured: within 15%, and never below it by more than the planner's margin."""
    unbounded = _estimator(kind, scene, None)
    peak = unbounded.register(scene.rgb[0], scene.depth[0], scene.K, scene.masks[0]).report.total_peak_bytes
    need = unbounded.required_budget_gb(scene.rgb[0], scene.depth[0], scene.K, scene.masks[0]) * 2**30
    assert need < peak
    for budget_bytes in (2 * peak, (need + peak) / 2):  # all at once; chunked
        est = _estimator(kind, scene, budget_bytes / 2**30)
        margin = est.engine.budget.total_bytes - est.engine.budget.usable_bytes
        predicted_call = est.estimate_peak_bytes(scene.rgb[0], scene.depth[0], scene.K, scene.masks[0])
        report = est.register(scene.rgb[0], scene.depth[0], scene.K, scene.masks[0]).report
        for name, stage in report.stages.items():
            measured, predicted = stage.peak_bytes + report.external_bytes, stage.predicted_peak_bytes
            predicted += report.external_bytes
            assert abs(predicted - measured) <= 0.15 * measured, (name, predicted, measured)
            assert predicted >= measured - margin, (name, predicted, measured)
        measured = report.total_peak_bytes
        assert abs(predicted_call - measured) <= 0.15 * measured, (predicted_call, measured)
        track_predicted = est.estimate_peak_bytes(scene.rgb[1], scene.depth[1], scene.K)
        track = est.track(scene.rgb[1], scene.depth[1], scene.K).report
        assert abs(track_predicted - track.total_peak_bytes) <= 0.15 * track.total_peak_bytes
        for name, stage in track.stages.items():
            measured = stage.peak_bytes + track.external_bytes
            assert abs(stage.predicted_peak_bytes + track.external_bytes - measured) <= 0.15 * measured, name


@pytest.mark.gl
def test_one_chunk_per_stage_when_the_budget_holds_the_unbounded_peak(scene):
    unbounded = _estimator("geometric", scene, None)
    peak = unbounded.register(scene.rgb[0], scene.depth[0], scene.K, scene.masks[0]).report.total_peak_bytes
    est = _estimator("geometric", scene, 1.05 * peak / 2**30)
    for call in range(2):
        report = est.register(scene.rgb[0], scene.depth[0], scene.K, scene.masks[0]).report
        for name, stage in report.stages.items():
            # the first chunk after calibration (8 hypotheses measured) carries the allowance for
            # items not measured yet, which may split one item off; after it the model has seen
            # the full chunk, and every later map call, and the whole second call, is one chunk
            extra = 1 if call == 0 and name == "refine.geometric" else 0
            assert stage.n_chunks <= stage.calls + extra, (name, stage.chunk_sizes)
        assert report.total_peak_bytes <= report.budget_bytes
    assert report.stages["refine.geometric"].estimations == 0


@pytest.mark.gl
def test_required_budget_runs_without_downscale_and_close_to_it(scene):
    """required_budget_gb is what the call then needs: no downscale at it, a peak within it."""
    est = _estimator("geometric", scene, None)
    need = est.required_budget_gb(scene.rgb[0], scene.depth[0], scene.K, scene.masks[0])
    tight = _estimator("geometric", scene, need)
    report = tight.register(scene.rgb[0], scene.depth[0], scene.K, scene.masks[0]).report
    assert report.downscale_factor == 1.0
    assert 0.85 * need * 2**30 <= report.total_peak_bytes <= need * 2**30
