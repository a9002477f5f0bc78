"""Data parallelism on torchrun: the building blocks a run needs to spread its samples over ranks.

stagewise scales out on the launcher the PyTorch world already uses: ``torchrun`` (``python -m
torch.distributed.run``) starts one process per GPU and sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``; :class:`DistContext` reads them and :func:`init`
joins the process group (NCCL on CUDA, gloo on CPU), one GPU per process (``cuda:LOCAL_RANK``).

A data-parallel run, rank by rank (what the runner does with these pieces)::

    ctx = init(DistContext.from_env(), device_type)        # single process when not under torchrun
    lay = layout(ctx, tensor_parallel_size=T)              # data-parallel rank/size (T = 1: all ranks)
    todo = rank_todo(samples, run_dir, ctx, layout=lay)    # this rank's shard, minus what any file holds
    devices = gather_devices(ctx)                          # -> config.json["rank_devices"]
    barrier(ctx)                                           # measured loops start together
    with SampleWriter(rank_samples_file(run_dir, lay.dp_rank)) as w:   # only if lay.writes_records
        ... one record per sample as it finishes ...
    write_rank_report(run_dir, RankReport(...))            # n ok / failed, wall time, error if any
    barrier(ctx)
    if ctx.is_main:
        merge_rank_files(run_dir, [s.sample_id for s in samples], world_size=lay.dp_size)
        data_parallel_summary(read_rank_reports(run_dir, lay.dp_size), lay.dp_size)  # -> summary.json

Sharding is round-robin in dataset order (rank ``r`` of ``W`` takes samples ``r, r + W, ...``):
deterministic, the shard sizes differ by at most one, and neighbouring samples (often of the same
recording, so of similar cost) land on different ranks. Each rank appends to its own
``samples.rank<R>.jsonl`` as samples finish (the same fsynced writer as a single-process run), so
a rank that dies loses nothing it had finished; ``samples.jsonl`` is always DERIVED from the rank
files by :func:`merge_rank_files` (each sample exactly once, in dataset order), never a source
they are merged into, so merging again after a resume is idempotent. ``--resume`` is per rank:
:func:`rank_todo` skips every sample that any rank file (or an earlier ``samples.jsonl``) holds,
so a resume works with the same or another world size.

Launching: ``torchrun --nproc-per-node N -m stagewise run ...``, or :func:`launch` (the CLI's
``--nproc N``), which runs exactly that. Multi-node uses torchrun's own rendezvous: on every node
``torchrun --nnodes M --nproc-per-node N --rdzv-backend c10d --rdzv-endpoint HOST:PORT
--rdzv-id RUN -m stagewise run ...`` (``HOST`` one node's address, reachable from all; the same
``--out`` on a shared file system so rank 0 can merge), or ``launch(N, argv, nnodes=M,
rdzv_endpoint="HOST:PORT")`` on each node.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from stagewise.errors import InputError
from stagewise.results.records import SampleRecord, read_samples, write_json

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

T = TypeVar("T")

RANK_FILE_RE = re.compile(r"^samples\.rank(\d+)\.jsonl$")
"""Names of the per-rank records files (:func:`rank_samples_file`)."""

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


# ----------------------------------------------------------------------------------------------
# Context and process group


@dataclass(frozen=True)
class DistContext:
    """Where this process sits among torchrun's processes (a single process by default).

    Attributes:
        rank / world_size: global rank and number of processes.
        local_rank / local_world_size: rank and number of processes on this node.
        master_addr / master_port: the rendezvous store torchrun set up (``None`` when absent).
        device: this rank's device once :func:`init` ran (``"cuda:<local_rank>"`` or ``"cpu"``).
        backend: the process group's backend once initialized (``"nccl"``, ``"gloo"``), else ``None``.

    Raises:
        ValueError: inconsistent ranks (named).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None
    device: str = "cpu"
    backend: str | None = None

    def __post_init__(self) -> None:
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK/WORLD_SIZE: need 0 <= RANK < WORLD_SIZE, got {self.rank}/{self.world_size}")
        if self.local_world_size < 1 or not 0 <= self.local_rank < self.local_world_size:
            raise ValueError(f"LOCAL_RANK/LOCAL_WORLD_SIZE: need 0 <= LOCAL_RANK < LOCAL_WORLD_SIZE, "
                             f"got {self.local_rank}/{self.local_world_size}")

    @property
    def distributed(self) -> bool:
        """More than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Global rank 0 (merges, writes the summary and the report)."""
        return self.rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "DistContext":
        """Read torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
        ``MASTER_ADDR``, ``MASTER_PORT``); none of them set: a single process.

        Raises:
            ValueError: a variable that is not an integer, or ``RANK`` without ``WORLD_SIZE`` (or
                the reverse), named.
        """
        env = os.environ if environ is None else environ
        if "RANK" not in env and "WORLD_SIZE" not in env:
            return cls()
        if "RANK" not in env or "WORLD_SIZE" not in env:
            raise ValueError("RANK and WORLD_SIZE: torchrun sets both; only one is set")

        def num(name: str, default: int) -> int:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return int(raw)
            except ValueError:
                raise ValueError(f"{name}: expected an integer, got {raw!r}") from None

        world = num("WORLD_SIZE", 1)
        return cls(rank=num("RANK", 0), world_size=world, local_rank=num("LOCAL_RANK", 0),
                   local_world_size=num("LOCAL_WORLD_SIZE", world), master_addr=env.get("MASTER_ADDR"),
                   master_port=num("MASTER_PORT", 0) or None)


def init(ctx: DistContext, device_type: str, *, timeout_s: float | None = None) -> DistContext:
    """Pick this rank's device and join the process group (nothing to join for one process).

    ``device_type`` ``"cuda"``: device ``cuda:<local_rank>`` (made current), backend NCCL;
    ``"cpu"``: backend gloo. Sets ``NCCL_NVLS_ENABLE=0`` unless the environment sets it (NVLink
    SHARP multicast: unused by a 2-GPU all-reduce, and on shared hosts a multicast object can take
    the GPUs out of service); what applied is recorded by
    :meth:`stagewise.engine.parallel.TPCollectives.describe`.

    Args:
        timeout_s: the process group's collective timeout (``None``: torch's default).

    Returns:
        ``ctx`` with ``device`` and ``backend`` filled in.

    Raises:
        ValueError: an unknown ``device_type``, or ``LOCAL_RANK`` beyond the visible GPUs.
    """
    import torch.distributed as dist

    if device_type not in ("cuda", "cpu"):
        raise ValueError(f"device_type: expected cuda or cpu, got {device_type!r}")
    if device_type == "cuda":
        n = torch.cuda.device_count()
        if ctx.local_rank >= n:
            raise ValueError(f"LOCAL_RANK: {ctx.local_rank} but {n} CUDA device(s) visible (one GPU per process)")
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if not ctx.distributed:
        return dataclasses.replace(ctx, device=str(device))
    if not dist.is_initialized():
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        kw: dict[str, Any] = {"backend": backend, "rank": ctx.rank, "world_size": ctx.world_size}
        if timeout_s is not None:
            from datetime import timedelta

            kw["timeout"] = timedelta(seconds=timeout_s)
        if device.type == "cuda":
            kw["device_id"] = device  # binds the communicator to this GPU (eager NCCL init)
        dist.init_process_group(**kw)
    return dataclasses.replace(ctx, device=str(device), backend=dist.get_backend())


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for one process)."""
    import torch.distributed as dist

    if ctx.distributed and dist.is_initialized():
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[torch.device(ctx.device).index])
        else:
            dist.barrier()


def gather_devices(ctx: DistContext) -> list[str]:
    """Every rank's device, by global rank (collective: every rank calls it). Each entry is
    ``"<device> (<GPU name>)"`` on CUDA, ``"cpu"`` on CPU: what ``config.json`` records."""
    import torch.distributed as dist

    dev = torch.device(ctx.device)
    mine = f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else str(dev)
    if not (ctx.distributed and dist.is_initialized()):
        return [mine]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, mine)
    return [str(d) for d in out]


def destroy(ctx: DistContext) -> None:
    """Leave the process group (no-op for one process)."""
    import torch.distributed as dist

    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Layout:
    """How the ranks divide the work: ``world = dp_size x tensor_parallel_size``; the
    ``tensor_parallel_size`` consecutive global ranks ``[k T, (k + 1) T)`` hold one copy of the
    model split by tensor parallelism and form data-parallel rank ``k``.

    Attributes:
        dp_rank / dp_size: this rank's shard and the number of shards.
        tp_rank / tensor_parallel_size: this rank's place in its model copy.
        writes_records: this rank writes its shard's records (``tp_rank == 0``; the other ranks
            of the copy compute the same tokens).
    """

    dp_rank: int
    dp_size: int
    tp_rank: int
    tensor_parallel_size: int

    @property
    def writes_records(self) -> bool:
        """True on the rank that writes ``samples.rank<dp_rank>.jsonl``."""
        return self.tp_rank == 0


def layout(ctx: DistContext, tensor_parallel_size: int = 1) -> Layout:
    """This rank's :class:`Layout` for ``tensor_parallel_size`` GPUs per model copy.

    Raises:
        ValueError: ``tensor_parallel_size`` < 1, not dividing the world size, or spanning more
            than one node (tensor parallelism stays on one host's NVLink).
    """
    t = tensor_parallel_size
    if t < 1 or ctx.world_size % t:
        raise ValueError(f"tensor_parallel_size: must be >= 1 and divide the world size {ctx.world_size}, got {t}")
    if t > 1 and ctx.local_world_size % t:
        raise ValueError(f"tensor_parallel_size: {t} must divide the processes per node ({ctx.local_world_size}): "
                         "a model copy stays on one host")
    return Layout(dp_rank=ctx.rank // t, dp_size=ctx.world_size // t, tp_rank=ctx.rank % t, tensor_parallel_size=t)


def tensor_parallel_group(ctx: DistContext, lay: Layout) -> ProcessGroup | None:
    """The process group of this rank's model copy (collective: every rank calls it). ``None``
    (the default group) when the copy spans the whole world."""
    import torch.distributed as dist

    t = lay.tensor_parallel_size
    if t == ctx.world_size:
        return None
    mine = None
    for k in range(ctx.world_size // t):  # every rank creates every group, in the same order
        group = dist.new_group(list(range(k * t, (k + 1) * t)))
        if k == lay.dp_rank:
            mine = group
    return mine


# ----------------------------------------------------------------------------------------------
# Sharding and per-rank files


def shard_indices(n: int, rank: int, world_size: int) -> list[int]:
    """Indices of the ``n`` ordered samples that ``rank`` of ``world_size`` takes: round-robin,
    ``rank, rank + world_size, ...`` (deterministic; sizes differ by at most one).

    Raises:
        ValueError: ``n < 0`` or a rank outside ``[0, world_size)``.
    """
    if n < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"shard: need n >= 0 and 0 <= rank < world_size, got n={n}, rank={rank}, world_size={world_size}")
    return list(range(rank, n, world_size))


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The items that ``rank`` of ``world_size`` takes (:func:`shard_indices`), in order."""
    return [items[i] for i in shard_indices(len(items), rank, world_size)]


def rank_samples_file(run_dir: Path, rank: int) -> Path:
    """``<run_dir>/samples.rank<rank>.jsonl``: the records one data-parallel rank writes."""
    return Path(run_dir) / f"samples.rank{rank}.jsonl"


def rank_files(run_dir: Path) -> dict[int, Path]:
    """The per-rank records files present in ``run_dir``, by rank."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return {}
    out = {}
    for p in run_dir.iterdir():
        m = RANK_FILE_RE.match(p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def completed_ids(run_dir: Path) -> set[str]:
    """Ids of the samples that have a record in ``run_dir``: any rank file or ``samples.jsonl``
    (a torn last line, from a kill mid-write, does not count).

    Raises:
        InputError: a file whose line other than the last is not a record.
    """
    run_dir = Path(run_dir)
    paths = list(rank_files(run_dir).values())
    if (run_dir / "samples.jsonl").is_file():
        paths.append(run_dir / "samples.jsonl")
    return {r.sample_id for p in paths for r in read_samples(p)}


def rank_todo(samples: Sequence[T], run_dir: Path, ctx: DistContext, *, layout: Layout | None = None,
              key: Callable[[T], str] = lambda s: s.sample_id) -> list[T]:
    """This rank's shard of ``samples`` minus every sample already recorded in ``run_dir``
    (:func:`completed_ids`), in dataset order; also drops a torn last line from this rank's own
    file so that appending continues it cleanly (an atomic rewrite: a rank reading it meanwhile
    sees the old or the new content, with the same complete records).

    Args:
        samples: the run's ordered samples (after repeats).
        layout: the run's :class:`Layout` (default: every rank a data-parallel rank).
        key: a sample's id.

    Raises:
        InputError: an unreadable records file (:func:`completed_ids`).
    """
    lay = layout or Layout(dp_rank=ctx.rank, dp_size=ctx.world_size, tp_rank=0, tensor_parallel_size=1)
    done = completed_ids(run_dir)
    own = rank_samples_file(run_dir, lay.dp_rank)
    if lay.writes_records and own.is_file():
        _write_records_atomically(own, read_samples(own))
    return [s for s in shard(samples, lay.dp_rank, lay.dp_size) if key(s) not in done]


def _write_records_atomically(path: Path, records: Sequence[SampleRecord]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(r.to_json() + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Merge


@dataclass
class MergeReport:
    """What :func:`merge_rank_files` found.

    Attributes:
        path: the merged ``samples.jsonl``.
        n_records: records written to it.
        per_rank: records taken from each rank's file.
        missing: ids of the dataset with no record anywhere (dataset order): a rank that failed
            before reaching them; ``--resume`` runs them.
        missing_by_rank: the same, by the data-parallel rank that owned them (when the world
            size is known).
        unexpected: ids in the files that are not in the dataset (an earlier run over other
            samples), kept after the dataset's records in file order.
    """

    path: Path
    n_records: int
    per_rank: dict[int, int]
    missing: list[str]
    missing_by_rank: dict[int, list[str]]
    unexpected: list[str]

    @property
    def complete(self) -> bool:
        """Every sample of the dataset has a record."""
        return not self.missing

    def describe(self) -> str:
        """One line for the log."""
        line = f"merged {self.n_records} records from {len(self.per_rank)} rank file(s) into {self.path.name}"
        if self.missing:
            by = "; ".join(f"rank {r}: {len(ids)}" for r, ids in self.missing_by_rank.items())
            line += f"; {len(self.missing)} sample(s) have no record ({by or ', '.join(self.missing[:5])}): run again with --resume"
        if self.unexpected:
            line += f"; {len(self.unexpected)} record(s) of samples outside this dataset kept at the end"
        return line


def merge_rank_files(run_dir: Path, sample_ids: Sequence[str], *, world_size: int | None = None) -> MergeReport:
    """Merge ``samples.rank<R>.jsonl`` into ``samples.jsonl``: each sample exactly once, in
    dataset order (the order of ``sample_ids``), written atomically.

    An earlier ``samples.jsonl`` (a previous merge, or a single-process run being continued) is
    read too: a record there that a rank file holds again must be identical (a previous merge
    of the same file); its other records are kept.

    Args:
        sample_ids: the dataset's ids, in order (after repeats).
        world_size: the data-parallel size, to attribute missing samples to their rank.

    Raises:
        InputError: a sample recorded twice with different contents (named, with the files), or
            an unreadable file.
        ValueError: duplicate ids in ``sample_ids``.
    """
    run_dir = Path(run_dir)
    order = {sid: i for i, sid in enumerate(sample_ids)}
    if len(order) != len(sample_ids):
        raise ValueError("sample_ids: not unique")
    found: dict[str, tuple[SampleRecord, str]] = {}
    dups: list[str] = []
    per_rank: dict[int, int] = {}

    def take(rec: SampleRecord, source: str, *, same_ok: bool) -> bool:
        prev = found.get(rec.sample_id)
        if prev is None:
            found[rec.sample_id] = (rec, source)
            return True
        if not (same_ok and prev[0].to_json() == rec.to_json()):
            dups.append(f"{rec.sample_id} ({prev[1]}, {source})")
        return False

    for r, path in rank_files(run_dir).items():
        recs = read_samples(path)
        per_rank[r] = sum(take(rec, path.name, same_ok=False) for rec in recs)
    merged_path = run_dir / "samples.jsonl"
    if merged_path.is_file():
        for rec in read_samples(merged_path):
            take(rec, merged_path.name, same_ok=True)
    if dups:
        raise InputError(run_dir, f"{len(dups)} sample(s) recorded twice with different results: {', '.join(dups[:5])}"
                         f"{' ...' if len(dups) > 5 else ''}; remove the stale copies and merge again")
    known = sorted((rec for rec, _ in found.values() if rec.sample_id in order), key=lambda rec: order[rec.sample_id])
    extra = [rec for rec, _ in found.values() if rec.sample_id not in order]
    _write_records_atomically(merged_path, known + extra)
    missing = [sid for sid in sample_ids if sid not in found]
    by_rank: dict[int, list[str]] = {}
    if world_size:
        for sid in missing:
            by_rank.setdefault(order[sid] % world_size, []).append(sid)
    return MergeReport(path=merged_path, n_records=len(known) + len(extra), per_rank=per_rank, missing=missing,
                       missing_by_rank=dict(sorted(by_rank.items())), unexpected=[rec.sample_id for rec in extra])


# ----------------------------------------------------------------------------------------------
# Per-rank reports and throughput


@dataclass
class RankReport:
    """What one data-parallel rank reports at the end of its loop (``status.rank<R>.json``).

    Attributes:
        rank: data-parallel rank.
        device: its device (``gather_devices`` style).
        n_samples: samples it had to run this invocation (its shard minus those already done).
        n_ok / n_failed: records it wrote this invocation, without / with ``error``.
        wall_s: wall time of its measured loop, from the common start (a barrier) to its last
            record (s).
        error: why the rank stopped early (``None``: it finished its shard).

    Raises:
        ValueError: a negative count or time.
    """

    rank: int
    device: str
    n_samples: int
    n_ok: int
    n_failed: int
    wall_s: float
    error: str | None = None

    def __post_init__(self) -> None:
        if min(self.rank, self.n_samples, self.n_ok, self.n_failed) < 0 or self.wall_s < 0:
            raise ValueError(f"rank report: negative field in {self}")


def rank_report_file(run_dir: Path, rank: int) -> Path:
    """``<run_dir>/status.rank<rank>.json``."""
    return Path(run_dir) / f"status.rank{rank}.json"


def write_rank_report(run_dir: Path, report: RankReport) -> None:
    """Write ``report`` to :func:`rank_report_file` (overwrites an earlier invocation's)."""
    write_json(rank_report_file(run_dir, report.rank), dataclasses.asdict(report))


def read_rank_reports(run_dir: Path, world_size: int) -> dict[int, RankReport | None]:
    """Each rank's report, ``None`` for a rank that wrote none (it died before the end).

    Raises:
        InputError: a report file that is not a report.
    """
    out: dict[int, RankReport | None] = {}
    for r in range(world_size):
        path = rank_report_file(run_dir, r)
        if not path.is_file():
            out[r] = None
            continue
        try:
            out[r] = RankReport(**json.loads(path.read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError, ValueError) as e:
            raise InputError(path, f"not a rank report ({e})") from None
    return out


def data_parallel_summary(reports: Mapping[int, RankReport | None], world_size: int) -> dict[str, Any]:
    """Per-rank and total throughput of a data-parallel invocation (for ``summary.json``).

    Each rank's ``samples_per_s`` is its ok samples over its own loop time; the total is all
    ranks' ok samples over the slowest rank's loop time (the makespan: the loops start together,
    after a barrier, so this is samples per wall-clock second of the whole job). Throughput
    counts this invocation only (a resumed run's earlier records have no time here).

    Returns:
        ``{"world_size", "samples_per_s", "makespan_s", "per_rank": [{"rank", "device",
        "n_samples", "n_ok", "n_failed", "wall_s", "samples_per_s", "error"}], "failed_ranks"}``;
        a rank with no report appears with ``error = "no report (the process died)"``.
    """
    per_rank, failed = [], []
    for r in range(world_size):
        rep = reports.get(r)
        if rep is None:
            per_rank.append({"rank": r, "device": None, "n_samples": None, "n_ok": None, "n_failed": None, "wall_s": None,
                             "samples_per_s": None, "error": "no report (the process died)"})
            failed.append(r)
            continue
        row = dataclasses.asdict(rep)
        row["samples_per_s"] = rep.n_ok / rep.wall_s if rep.wall_s > 0 else None
        per_rank.append(row)
        if rep.error is not None:
            failed.append(r)
    walls = [row["wall_s"] for row in per_rank if row["wall_s"] is not None]
    n_ok = sum(row["n_ok"] or 0 for row in per_rank)
    makespan = max(walls) if walls else None
    return {"world_size": world_size, "samples_per_s": n_ok / makespan if makespan else None, "makespan_s": makespan,
            "per_rank": per_rank, "failed_ranks": failed}


# ----------------------------------------------------------------------------------------------
# Launching


def torchrun_command(nproc: int, argv: Sequence[str], *, nnodes: int = 1, rdzv_endpoint: str | None = None,
                     rdzv_id: str = "stagewise", module: str = "stagewise") -> list[str]:
    """The torchrun command line that runs ``python -m <module> <argv>`` on ``nproc`` processes
    per node. One node: ``--standalone`` (a local rendezvous on a free port); several: the c10d
    rendezvous at ``rdzv_endpoint`` (``HOST:PORT``), the same command on every node. A ``--nproc
    N`` / ``--nproc=N`` in ``argv`` is dropped (the workers must not launch again).

    Raises:
        ValueError: ``nproc`` or ``nnodes`` < 1, or several nodes without ``rdzv_endpoint``.
    """
    if nproc < 1 or nnodes < 1:
        raise ValueError(f"nproc and nnodes: must be >= 1, got {nproc} and {nnodes}")
    if nnodes > 1 and not rdzv_endpoint:
        raise ValueError("rdzv_endpoint: several nodes need a rendezvous endpoint HOST:PORT reachable from all of them")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if rdzv_endpoint:
        cmd += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
    else:
        cmd += ["--standalone"]
    return cmd + ["-m", module, *_drop_option(list(argv), "--nproc")]


def _drop_option(argv: list[str], name: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == name:
            skip = True
        elif not a.startswith(name + "="):
            out.append(a)
    return out


def launch(nproc: int, argv: Sequence[str], *, nnodes: int = 1, rdzv_endpoint: str | None = None,
           rdzv_id: str = "stagewise", module: str = "stagewise", env: Mapping[str, str] | None = None) -> int:
    """Run ``argv`` (a ``stagewise`` command line, e.g. ``["run", "--preset", ...]``) on ``nproc``
    processes per node through torchrun (:func:`torchrun_command`), wait, and return torchrun's
    exit status (non-zero when a rank failed; torchrun prints which, and stops the others).

    Args:
        env: the workers' environment (default: this process's).

    Raises:
        ValueError: called inside a torchrun worker, or bad arguments (:func:`torchrun_command`).
    """
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        raise ValueError("--nproc: already inside a torchrun worker; run the command without --nproc")
    cmd = torchrun_command(nproc, argv, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, module=module)
    return subprocess.run(cmd, env=dict(os.environ if env is None else env), check=False).returncode
