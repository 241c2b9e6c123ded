"""Dataset-parallel runs on torch.distributed (launched by torchrun, or one plain process).

    from chunkpose.distributed import run_units
    summary = run_units(unit_ids, process, merge, out_dir)

``RankContext`` says who this process is (rank, device, backend) and opens the store the
ranks share; ``run_units`` lets the ranks claim whole units from that store, writes each
rank's finished units into its shard, and has rank 0 merge the shards into one output folder.
See units.py for the claiming and fault rules, shards.py for the on-disk layout.
"""
from chunkpose.distributed.context import DEFAULT_TIMEOUT_S, LaunchError, RankContext, RanksDidNotArrive
from chunkpose.distributed.merge import build_summary, copy_unit_files
from chunkpose.distributed.shards import ShardError, parts_dir_for, unit_key
from chunkpose.distributed.units import RunAborted, run_units

__all__ = [
    "DEFAULT_TIMEOUT_S", "LaunchError", "RankContext", "RanksDidNotArrive", "RunAborted", "ShardError",
    "build_summary", "copy_unit_files", "parts_dir_for", "run_units", "unit_key",
]
