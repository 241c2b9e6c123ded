"""Dataset-parallel runs (chunkpose.distributed): claiming, shards, faults, resume, merge.

The multi-rank cases launch tests/distributed_toy.py under torchrun (python -m
torch.distributed.run --standalone, gloo on the CPU) with a toy unit that writes a file and
sleeps a little; its runs.log counts how often each unit's process ran.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch.distributed as dist

from chunkpose.distributed import LaunchError, RankContext, RanksDidNotArrive, ShardError, run_units, unit_key
from chunkpose.distributed.shards import RankShard, read_records

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_toy as toy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY = Path(__file__).resolve().parent / "distributed_toy.py"
N_UNITS = 12
FAIL = "000001/000002"  # the "bad image": recorded as failed, the others go on
KILL = "000001/000000"  # the rank on it dies mid-unit the first time


def _env(**more):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    env.update(more)
    return env


def _torchrun(out, counts, *extra, nproc=2, restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--max-restarts={restarts}", str(TOY), "--out", str(out), "--count-dir", str(counts),
           "--units", str(N_UNITS), "--fail", FAIL, *extra]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=120)


def _runs(counts) -> Counter:
    path = Path(counts) / "runs.log"
    return Counter(line.split()[0] for line in path.read_text().splitlines()) if path.exists() else Counter()


def _tree(folder) -> dict:
    """Every output file's bytes; report.json without its per-rank summary (timings differ)."""
    files = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            rel = path.relative_to(folder).as_posix()
            if rel == "report.json":
                report = json.loads(path.read_text())
                report.pop("distributed")
                files[rel] = report
            else:
                files[rel] = path.read_bytes()
    return files


def _single(out, counts, **kwargs):
    """The same toy run in this process, no torchrun (a world of one)."""
    Path(counts).mkdir(parents=True, exist_ok=True)
    process = toy.make_process(counts, fail=kwargs.pop("fail", FAIL), sleep_s=0.0)
    ctx = RankContext.from_env(environ={}, device="cpu")
    return run_units(toy.toy_units(N_UNITS), process, toy.toy_merge, out, context=ctx,
                     run_key=kwargs.pop("run_key", {"toy": 1}), **kwargs)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A single-process run's output: what every multi-rank run must reproduce."""
    base = tmp_path_factory.mktemp("reference")
    summary = _single(base / "out", base / "counts")
    return {"out": base / "out", "tree": _tree(base / "out"), "summary": summary, "counts": base / "counts"}


# --------------------------------------------------------------------------- single process


def test_single_process_does_each_unit_once_and_records_the_failure(reference):
    summary = reference["summary"]
    assert _runs(reference["counts"]) == Counter(toy.toy_units(N_UNITS))
    assert summary["world_size"] == 1 and summary["units_total"] == N_UNITS
    assert summary["units_failed"] == 1 and summary["failed"][0]["unit"] == FAIL
    assert summary["failed"][0]["error_type"] == "ValueError" and FAIL in summary["failed"][0]["error"]
    rows = (reference["out"] / "results.csv").read_text().splitlines()
    assert len(rows) == N_UNITS + 1 and f"{FAIL},failed,,ValueError,bad image {FAIL}" in rows
    # every done unit's file is in the output, the failed unit left none
    poses = sorted(p.name for p in (reference["out"] / "poses").iterdir())
    assert len(poses) == N_UNITS - 1 and f"{FAIL.replace('/', '_')}.txt" not in poses
    rank = summary["ranks"][0]
    assert rank["units"] == N_UNITS and rank["peak_bytes"] >= 1000 and rank["units_per_second"] > 0


def test_rerun_of_a_finished_run_is_a_no_op(tmp_path):
    out = tmp_path / "out"
    _single(out, tmp_path / "counts")
    stamp = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = _single(out, tmp_path / "counts")
    assert again["published"] is False and again["this_rank"] == {"units": 0, "skipped": N_UNITS}
    assert _runs(tmp_path / "counts") == Counter(toy.toy_units(N_UNITS))  # nothing ran twice
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamp  # nothing was rewritten


def test_unit_files_without_record_are_redone(tmp_path, reference):
    """A crash between moving a unit's files in and writing its record: the unit is redone."""
    out = tmp_path / "out"
    _single(out, tmp_path / "counts")
    parts = Path(f"{out}.parts")
    victim = "000002/000001"
    (parts / "rank-0" / "records" / f"{unit_key(victim)}.json").unlink()
    assert (parts / "rank-0" / "files" / unit_key(victim)).is_dir()
    (parts / "rank-0" / "scratch" / "left-by-a-crash").mkdir()
    summary = _single(out, tmp_path / "counts")
    assert summary["published"] is True and summary["this_rank"]["units"] == 1
    assert _runs(tmp_path / "counts")[victim] == 2
    assert _tree(out) == reference["tree"]
    assert not any((parts / "rank-0" / "scratch").iterdir())


def test_failed_units_are_retried_only_when_asked(tmp_path):
    out, counts = tmp_path / "out", tmp_path / "counts"
    _single(out, counts)
    assert _single(out, counts, fail=None)["units_failed"] == 1  # a plain rerun keeps the failure
    summary = _single(out, counts, fail=None, retry_failed=True)
    assert summary["units_failed"] == 0 and summary["this_rank"]["units"] == 1
    assert _runs(counts)[FAIL] == 2 and sum(_runs(counts).values()) == N_UNITS + 1
    assert f"{FAIL},done," in (out / "results.csv").read_text()
    # the same rank redid it: its done record replaced the failed one
    assert [r["status"] for r in read_records(Path(f"{out}.parts"))[FAIL]] == ["done"]


def test_shards_of_another_run_are_refused(tmp_path):
    out = tmp_path / "out"
    _single(out, tmp_path / "counts")
    with pytest.raises(ShardError, match="different run"):
        _single(out, tmp_path / "counts", run_key={"toy": 2})


def test_keep_parts_false_removes_the_shards(tmp_path, reference):
    out = tmp_path / "out"
    _single(out, tmp_path / "counts", keep_parts=False)
    assert not Path(f"{out}.parts").exists() and _tree(out) == reference["tree"]


def test_process_must_return_a_dict(tmp_path):
    ctx = RankContext.from_env(environ={}, device="cpu")
    with pytest.raises(TypeError, match="must return a dict"):
        run_units(["a"], lambda unit, scratch, device: 3, toy.toy_merge, tmp_path / "out", context=ctx)


def test_units_must_be_unique_strings(tmp_path):
    with pytest.raises(ValueError, match="unique"):
        run_units(["a", "a"], None, None, tmp_path / "out", context=RankContext.from_env(environ={}))
    with pytest.raises(TypeError, match="strings"):
        run_units(["a", 3], None, None, tmp_path / "out", context=RankContext.from_env(environ={}))


def test_unit_keys_are_filenames_and_distinct():
    keys = {unit_key(u) for u in ["a/b", "a_b", "a b", "../x", "Ü", ""]}
    assert len(keys) == 6 and all("/" not in k and not k.startswith(".") for k in keys)


def test_shard_commit_keeps_files_only_for_done_units(tmp_path):
    shard = RankShard(tmp_path, 3)
    shard.prepare()
    for unit, status in (("u1", "done"), ("u2", "failed")):
        scratch = shard.scratch_for(unit)
        (scratch / "x.txt").write_text(unit)
        written = shard.commit({"unit": unit, "status": status}, scratch)
        assert not scratch.exists()
        assert (written["files"] is not None) == (status == "done")
    assert (tmp_path / "rank-3" / "files" / unit_key("u1") / "x.txt").read_text() == "u1"
    assert set(read_records(tmp_path)) == {"u1", "u2"}


# --------------------------------------------------------------------------- the rank context


def test_rank_context_from_torchrun_environment():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0",
           "MASTER_PORT": "29500", "TORCHELASTIC_RESTART_COUNT": "2", "TORCHELASTIC_MAX_RESTARTS": "3",
           "TORCHELASTIC_RUN_ID": "job7"}
    ctx = RankContext.from_env(env, device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.local_world_size) == (3, 4, 1, 2)
    assert (ctx.restart_count, ctx.max_restarts, ctx.run_id, ctx.launched) == (2, 3, "job7", True)
    assert str(ctx.device) == "cpu" and ctx.backend == "gloo" and not ctx.is_main
    single = RankContext.from_env({}, device="cpu")
    assert (single.rank, single.world_size, single.launched, single.backend) == (0, 1, False, "gloo")


@pytest.mark.parametrize("env, needle", [
    ({"RANK": "0"}, "WORLD_SIZE"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"}, "LOCAL_RANK"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, "not an integer"),
])
def test_rank_context_rejects_a_partial_environment(env, needle):
    with pytest.raises(LaunchError, match=needle):
        RankContext.from_env(env, device="cpu")


def test_rank_context_rejects_a_bad_device():
    with pytest.raises(LaunchError, match="device"):
        RankContext.from_env({}, device="tpu")


def test_barrier_timeout_names_the_missing_ranks():
    ctx = RankContext(rank=0, world_size=3)
    ctx.store = dist.HashStore()  # stands in for the shared store; ranks 1 and 2 never come
    ctx.publish("barrier/b/1", None)
    with pytest.raises(RanksDidNotArrive, match="ranks 2 did not arrive") as info:
        ctx.barrier("b", timeout_s=0.1)
    assert info.value.missing == [2]


def test_a_rank_whose_heartbeat_stops_is_named_without_a_fixed_timeout():
    ctx = RankContext(rank=0, world_size=3)
    ctx.store = dist.HashStore()
    with ctx.heartbeat("hb/1", period_s=0.02):  # rank 1 is alive (its counter moves), rank 2 is silent
        ctx.publish("done/0", {})
        with pytest.raises(RanksDidNotArrive, match="ranks 2 gave no sign of life") as info:
            ctx.wait_for({r: f"done/{r}" for r in range(3)}, None, heartbeats={1: "hb/1", 2: "hb/2"}, stall_s=0.3)
    assert info.value.missing == [2]


# --------------------------------------------------------------------------- several ranks


def test_two_ranks_under_torchrun_equal_one_process_and_claim_dynamically(tmp_path, reference):
    out, counts = tmp_path / "out", tmp_path / "counts"
    counts.mkdir()
    result = _torchrun(out, counts, "--slow-rank", "0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _tree(out) == reference["tree"]
    assert _runs(counts) == Counter(toy.toy_units(N_UNITS))  # every unit exactly once
    summary = json.loads((out / "report.json").read_text())["distributed"]
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    ranks = {r["rank"]: r for r in summary["ranks"]}
    assert ranks[0]["units"] + ranks[1]["units"] == N_UNITS
    # rank 0 sleeps 8x longer per unit: the shared counter gives rank 1 most of the work
    assert ranks[1]["units"] > ranks[0]["units"] >= 1
    assert all(r["peak_bytes"] >= 1000 and r["this_session"]["wall_seconds"] > 0 for r in ranks.values())
    # every rank returned the same summary
    per_rank = [json.loads(p.read_text()) for p in sorted(counts.glob("summary-rank*.json"))]
    assert len(per_rank) == 2 and per_rank[0]["units_total"] == per_rank[1]["units_total"] == N_UNITS


def test_killed_rank_then_same_command_resumes(tmp_path, reference):
    out, counts = tmp_path / "out", tmp_path / "counts"
    counts.mkdir()
    kill = ("--kill", KILL, "--marker", str(counts / "killed"))
    first = _torchrun(out, counts, *kill)
    assert first.returncode != 0 and (counts / "killed").exists() and not out.exists()
    finished = {u for u, recs in read_records(Path(f"{out}.parts")).items()}
    assert KILL not in finished
    second = _torchrun(out, counts, *kill)
    assert second.returncode == 0, second.stderr[-3000:]
    assert _tree(out) == reference["tree"]
    runs = _runs(counts)
    assert set(runs) == set(toy.toy_units(N_UNITS))
    assert all(runs[u] == 1 for u in finished)  # finished units were not redone
    redone = {u for u, n in runs.items() if n > 1}
    assert KILL in redone and len(redone) <= 2  # each rank lost at most the unit it was on
    assert all(n <= 2 for n in runs.values())


def test_torchrun_max_restarts_recovers_in_one_command(tmp_path, reference):
    out, counts = tmp_path / "out", tmp_path / "counts"
    counts.mkdir()
    result = _torchrun(out, counts, "--kill", KILL, "--marker", str(counts / "killed"), restarts=1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (counts / "killed").exists() and _tree(out) == reference["tree"]
    # runs.log lines: unit rank attempt pid. A unit finished in attempt 0 never ran in attempt 1.
    lines = [line.split() for line in (counts / "runs.log").read_text().splitlines()]
    records = {u: recs[0] for u, recs in read_records(Path(f"{out}.parts")).items()}
    in_attempt1 = {u for u, _, attempt, _ in lines if attempt == "1"}
    kept = {u for u, r in records.items() if r["restart_count"] == 0}
    assert kept and not kept & in_attempt1 and KILL in in_attempt1
    assert len([1 for u, _, attempt, _ in lines if attempt == "0" and u in in_attempt1]) <= 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_without_torchrun_agent(tmp_path, reference):
    """Ranks started by another launcher (e.g. srun) with the env:// variables: rank 0 hosts the store."""
    out, counts = tmp_path / "out", tmp_path / "counts"
    counts.mkdir()
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, str(TOY), "--out", str(out), "--count-dir", str(counts),
                               "--units", str(N_UNITS), "--fail", FAIL],
                              env=_env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), results[0][1][-2000:] + results[1][1][-2000:]
    assert _tree(out) == reference["tree"] and _runs(counts) == Counter(toy.toy_units(N_UNITS))
