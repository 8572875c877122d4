"""`train_loop_per_worker`: what each Ray Train worker runs.

Each worker consumes its own interaction partitions and reads every item
announcement, trains its shards of the ID tables (DMP) and its replica of the dense
engine (DeepSpeed), and takes part in publication and checkpoints. All workers make
the same collective calls in the same order: every loop iteration starts with one
small all-reduce that agrees on whether to step, publish, checkpoint or stop.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import tempfile
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray.train
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from cluster.config import Config
from cluster.devices import control_group, deepspeed_config, precision, want_gpu
from cluster.pipeline import Prefetcher, StepClock
from embeddings.clusters import ClusterModel, clusters_for, frame_descriptor, text_descriptor
from embeddings.mapping import MAPPING_FILE, save_mapping
from embeddings.layered import changed_rows
from embeddings.maturity import StabilityCurve
from embeddings.publish import NAMES_FILE, IndexPublisher
from embeddings.tables import evictions, holds_row, shard_sparse_arch
from streaming.consumer import InteractionStream, ItemFeed, owned_partitions
from streaming.schema import EVENT_TYPES, INT_ID_LIMIT, id_key
from streaming.shards import ShardCache
from trainer.batch import ContentStore, make_batch, spread
from trainer.counts import KeyedCounts
from trainer.history import Histories
from trainer.memer import stage
from trainer.model import DenseArch
from trainer.regression import CHUNK, REGRESSION_FILE, ContentRegression
from trainer.step import TrainStep, cluster_rows, export_vectors, gather_rows, lr_factor, run_progress, set_learning_rates

log = logging.getLogger("coldstream.worker")
DS_TAG = "dense"
EVENT_CODE = {e: k for k, e in enumerate(EVENT_TYPES)}
EARLY_FILE = "early.npz"
SAMPLE_LATENCIES = 5000  # per rank and version: enough for p95


def percentiles(latencies: np.ndarray) -> dict:
    if len(latencies) == 0:
        return {"n": 0}
    p50, p95 = np.percentile(latencies, [50, 95])
    return {"p50": round(float(p50), 3), "p95": round(float(p95), 3), "n": int(len(latencies))}


def all_sum(values: list[float], group: dist.ProcessGroup) -> list[float]:
    """Sums host-side control values over all ranks; `group` must handle CPU tensors (gloo)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.tolist()


def trained_through(positions: dict[int, int], pending: np.ndarray) -> dict[int, int]:
    """Per partition, the lowest offset of a pending (user, item, partition, offset, event) row, or the
    consumer's position when none is pending: every event below it is trained or needs no training."""
    out = {}
    for part, pos in positions.items():
        mine = pending[pending[:, 2] == part, 3]
        out[part] = int(min(pos, mine.min())) if len(mine) else pos
    return out


class ReplayWindow:
    """The most recent positives as (user, item, event code); steps sample from it between fresh events."""

    def __init__(self, capacity: int):
        self.pairs = np.zeros((capacity, 3), np.int64)
        self.size = self.head = 0

    def add(self, pairs: np.ndarray) -> None:
        pairs = pairs[-len(self.pairs):]
        self.pairs[(self.head + np.arange(len(pairs))) % len(self.pairs)] = pairs
        self.head = (self.head + len(pairs)) % len(self.pairs)
        self.size = min(self.size + len(pairs), len(self.pairs))

    def ordered(self) -> np.ndarray:
        """Oldest first: what a checkpoint stores, so a restore evicts in the same order."""
        return np.roll(self.pairs, -self.head, axis=0) if self.size == len(self.pairs) else self.pairs[: self.size].copy()

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return self.pairs[rng.integers(0, self.size, n)]


@dataclass
class Restored:
    """What a checkpoint gives the consumers of a resumed worker."""

    offsets: dict[int, int] = field(default_factory=dict)  # interaction partition -> next offset
    feed_offsets: dict[int, int] = field(default_factory=dict)  # item-topic partition -> next offset
    cluster_id: str | None = None  # of the broker the offsets refer to
    stats: dict[str, int] = field(default_factory=dict)
    trained: int = 0  # fresh positives trained so far, summed over the old ranks this one takes over
    trained_floor: dict[int, int] = field(default_factory=dict)  # partition -> offset trained through


class Worker:
    def __init__(self, cfg: Config, bootstrap: str):
        self.cfg, self.bootstrap = cfg, bootstrap
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.gpu = want_gpu(cfg.train.use_gpu)
        self.device = ray.train.torch.get_device() if self.gpu else torch.device("cpu")
        self.precision = precision(cfg.train.precision, self.gpu)
        self.control = control_group()
        torch.set_num_threads(cfg.train.threads_per_worker)
        torch.manual_seed(cfg.train.seed)
        self.rng = np.random.default_rng((cfg.train.seed, self.rank))
        self.run_dir = cfg.run_dir
        m, o = cfg.model, cfg.optim

        import deepspeed  # imported here: it probes accelerators at import time

        self.sparse = shard_sparse_arch(m, self.device, o.sparse_lr)
        dense = DenseArch(m).to(self.device)
        optimizer = torch.optim.AdamW(dense.parameters(), lr=o.dense_lr, weight_decay=o.weight_decay)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # DeepSpeed prints (not logs) each JIT op it loads, on every rank
            self.engine, *_ = deepspeed.initialize(
                model=dense, optimizer=optimizer, dist_init_required=False,
                config=deepspeed_config(o.batch_size, self.world, o.zero_stage, o.gradient_clipping, self.precision == "bf16"),
            )
        log.debug("deepspeed.initialize printed: %s", printed.getvalue().strip())
        self.step_fn = TrainStep(self.sparse, self.engine, m.temperature, self.device, m.loss)

        self.step = 0
        # Users and items are int64 keys (streaming.schema.id_key) from here on; a string id's raw
        # name is kept beside its key, for what leaves the system (the published index).
        self.counts = KeyedCounts()  # events seen per item on this worker's partitions
        self.item_positives = KeyedCounts()  # positives queued for training, per item / user
        self.user_positives = KeyedCounts()
        self.users: set[int] = set()
        self.names: dict[int, str] = {}  # rank 0: every string id published; others: what they saw
        self.new_names: dict[int, str] = {}  # seen since the last publication: what travels to rank 0
        self.clusters: tuple[ClusterModel, ClusterModel] | None = None
        self.clustered_on = 0  # catalogue size at the last k-means fit
        # Positives travel as (user, item, partition, offset, event code): the source position says up
        # to where every event is trained (`trained_positions`), and who owns the pair after an
        # elastic resume; the event says which MEMER signals it teaches.
        self.waiting: dict[int, list[tuple[int, int, int, int]]] = defaultdict(list)  # item not announced yet: (user, partition, offset, event)
        self.fresh: list[tuple[int, int, int, int, int]] = []
        self.inflight: dict[int, np.ndarray] = {}  # fresh rows of batches built but not yet trained, by batch seq
        self.built = 0
        self.replay = ReplayWindow(o.replay_window)
        self.skips = ReplayWindow(o.replay_window)  # recent skips (user, item, event): extra negatives, drawn once their item has content
        self.histories = Histories(m.history_length, m.user_rows)  # the users of this worker's partitions
        self.parts = owned_partitions(cfg.kafka.interaction_partitions, self.rank, self.world)
        self.shards = ShardCache(m.frames * m.clips, m.frame_size)
        self.store = ContentStore(m, self.device)
        # MEMER: M from the stability curve; items at or past it (by the counts of the last
        # publication) teach the mapping.
        self.curve = StabilityCurve(m.maturity_epsilon)
        self.maturity = m.maturity_threshold
        self.mature_keys = np.zeros(0, np.int64)  # sorted; as of the last publication
        self.item_updates = KeyedCounts()  # times each item was in a batch (fresh or replayed)
        self.evictions_before = 0  # ID-table evictions in runs before this one (from the checkpoint)
        # Incremental export (see publish): the encoder version vectors come from, and what was exported.
        self.encoder: torch.nn.Module | None = None
        self.encoder_clusters: tuple[np.ndarray, np.ndarray] | None = None  # cluster embeddings frozen with it
        self.since_encoder = 0
        self.regression: ContentRegression | None = None  # rank 0: what new items are served by, refit with the encoder
        self.exported_maturity = -1  # the M the last export staged items with
        self.exported: tuple[np.ndarray, np.ndarray] | None = None  # (sorted items, [updates, count, has_row] at export)
        # Freshness: (partition, offset, broker time) of events not yet in a version; announcement times.
        self.event_times: list = []  # [partition, offset, broker time]
        self.announced: dict[int, float] = {}
        restored = Restored()
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                restored = self._restore(Path(d))
        self.stream = InteractionStream(cfg.kafka, bootstrap, self.parts, restored.offsets, f"coldstream-w{self.rank}",
                                        restored.cluster_id)
        for name, value in restored.stats.items():  # in place: the stream's BrokerWatch counts into the same object
            setattr(self.stream.stats, name, value)
        self.feed = ItemFeed(cfg.kafka, bootstrap, f"coldstream-items-w{self.rank}", restored.feed_offsets,
                             restored.cluster_id)
        self.unclustered: list = []  # content read before the cluster model exists
        self.publisher = IndexPublisher(cfg.location("index"), cfg.publish.keep_versions, cfg.publish.index_factory,
                                        cfg.publish.rebase_every, cfg.publish.rebase_fraction, self.run_dir / "index-cache",
                                        cfg.publish.search_params)
        self.dropped_unknown_item = 0
        self.positives_trained = restored.trained  # fresh positives that went through a step, once each
        # Offsets below which the restored checkpoint had trained everything: a fresh pair from there
        # trained again would be a double count beyond the rollback window (checked, expected 0).
        self.rollback_floor = restored.trained_floor
        self.trained_twice = 0
        self.losses: deque[torch.Tensor] = deque(maxlen=20)  # device tensors, read only at status time
        log.info("worker %d/%d on %s (%s) owns partitions %s (resumed at step %d)", self.rank, self.world, self.device,
                 self.precision, self.parts, self.step)

    # ---- input -----------------------------------------------------------------------------
    def _add_content(self, content) -> None:
        frame_km, text_km = self.clusters
        fd, td = frame_descriptor(content.frames), text_descriptor(content.text)
        fc, tc = int(frame_km.assign(fd[None])[0]), int(text_km.assign(td[None])[0])
        key = id_key(content.item_id)
        self.store.add(key, content.frames, content.has_frames, content.text, fc, tc, (fd, td))
        for user, part, offset, event in self.waiting.pop(key, []):
            self.fresh.append((user, key, part, offset, event))

    def _name(self, raw) -> int:
        key = id_key(raw)
        if key >= INT_ID_LIMIT and key not in self.names:
            self.names[key] = self.new_names[key] = raw
        return key

    def _ingest(self, timeout_ms: int | None = None) -> None:
        """Reads what arrived; waits up to `timeout_ms` (the consumer's poll timeout by default)."""
        for ann in self.feed.poll():
            key = self._name(ann.item_id)
            self.announced.setdefault(key, ann.kafka_ts)
            content = self.shards.fetch(ann.item_id, ann.shard_url)
            if content is None:
                self.dropped_unknown_item += len(self.waiting.pop(key, []))
            elif self.clusters is None:
                self.unclustered.append(content)
            else:
                self._add_content(content)
        seen: list[int] = []
        skipped: list[tuple[int, int, int]] = []
        for ev in self.stream.poll(timeout_ms):
            user = ev.user_id if type(ev.user_id) is int else self._name(ev.user_id)  # noqa: E721 - the hot path
            item = ev.item_id if type(ev.item_id) is int else self._name(ev.item_id)  # noqa: E721
            seen.append(item)
            self.users.add(user)
            self.event_times.append((ev.partition, ev.offset, ev.kafka_ts))
            if not ev.positive:
                if self.cfg.model.skip_negatives:  # kept only where they are drawn (`_skipped_items`)
                    skipped.append((user, item, EVENT_CODE[ev.event]))
                continue
            if item in self.store:
                self.fresh.append((user, item, ev.partition, ev.offset, EVENT_CODE[ev.event]))
            elif item in self.shards.skipped:
                self.dropped_unknown_item += 1
            else:
                self.waiting[item].append((user, ev.partition, ev.offset, EVENT_CODE[ev.event]))
        if seen:
            self.counts.add(np.array(seen, np.int64))
        if skipped:
            self.skips.add(np.array(skipped, np.int64))

    def _fit_clusters(self) -> None:
        """Rank 0 fits k-means on the first announced items; every rank gets the same centroids."""
        deadline = time.monotonic() + 120
        while self.rank == 0 and len(self.unclustered) < self.cfg.train.min_items_before_training and time.monotonic() < deadline:
            self._ingest()
        box = [None]
        if self.rank == 0:
            if not self.unclustered:
                raise RuntimeError("no item content arrived within 120 s; is the items topic empty?")
            k = clusters_for(len(self.unclustered), self.cfg.model.n_clusters)
            box = [(ClusterModel.fit(np.stack([frame_descriptor(c.frames) for c in self.unclustered]), k).centroids,
                    ClusterModel.fit(np.stack([text_descriptor(c.text) for c in self.unclustered]), k).centroids,
                    len(self.unclustered))]
        dist.broadcast_object_list(box, src=0, group=self.control)
        self.clusters = (ClusterModel(box[0][0]), ClusterModel(box[0][1]))
        for content in self.unclustered:
            self._add_content(content)
        self.clustered_on = box[0][2]  # rank 0's count: every rank must decide alike when to refit
        self.unclustered = []

    def _refit_clusters(self, catalogue: int) -> bool:
        """Refits both modalities' clusters on the whole catalogue once it (`catalogue`: the items every
        rank holds, so all ranks decide alike) has doubled since the last fit: rank 0 fits, every rank
        gets the same centroids and re-assigns its items; a collective. True when the assignments
        moved, so every item's content vector must be exported again."""
        if catalogue < 2 * max(self.clustered_on, 1):
            return False
        n = len(self.store)
        box = [None]
        if self.rank == 0 and self.store.described:
            k = clusters_for(n, self.cfg.model.n_clusters)
            frame_desc, text_desc = self.store.descriptors()
            box = [(self.clusters[0].refit(frame_desc, k).centroids, self.clusters[1].refit(text_desc, k).centroids)]
        dist.broadcast_object_list(box, src=0, group=self.control)
        if box[0] is None:  # restored from a checkpoint without descriptors: the clusters stay as they are
            log.warning("cluster IDs not refit: the restored content store has no descriptors (an older checkpoint)")
            self.clustered_on = catalogue
            return False
        self.clusters = (ClusterModel(box[0][0]), ClusterModel(box[0][1]))
        frame_desc, text_desc = self.store.descriptors()
        self.store.frame_cluster[:n] = self.clusters[0].assign(frame_desc)
        self.store.text_cluster[:n] = self.clusters[1].assign(text_desc)
        log.info("refit cluster IDs on %d items (was %d): k = %d frame, %d text", catalogue, self.clustered_on,
                 len(self.clusters[0].centroids), len(self.clusters[1].centroids))
        self.clustered_on = catalogue
        return True

    def _catch_up_items(self, timeout_s: float = 120.0) -> None:
        """After a restore, re-read announcements until every buffered pair's item has content
        again; pairs whose item never comes back (its shard is gone) are dropped and counted."""
        needed = set(self.replay.ordered()[:, 1].tolist()) | {p[1] for p in self.fresh}
        deadline = time.monotonic() + timeout_s
        while needed - set(self.store.items) - set(self.shards.skipped) and time.monotonic() < deadline:
            self._ingest()
        kept = self.replay.ordered()
        ok = np.isin(kept[:, 1], list(self.store.items))
        self.replay = ReplayWindow(len(self.replay.pairs))
        self.replay.add(kept[ok])
        skips = self.skips.ordered()  # negatives only: those of items whose shard is gone are let go, not counted as lost
        self.skips = ReplayWindow(len(self.skips.pairs))
        self.skips.add(skips[~np.isin(skips[:, 1], list(self.shards.skipped))])
        before = len(self.fresh)
        self.fresh = [p for p in self.fresh if p[1] in self.store]
        self.dropped_unknown_item += before - len(self.fresh) + int((~ok).sum())

    def _build(self):
        """One round of the input thread: ingest what arrived, and build a batch once there are
        enough positives (fresh first, topped up from the replay window). It waits on Kafka only
        when it has nothing to build a batch from: a blocking poll here once paced the loop."""
        b = self.cfg.optim.batch_size
        self._ingest(0 if len(self.fresh) + self.replay.size >= b else None)
        if len(self.fresh) + self.replay.size < b:
            return None
        take, self.fresh = self.fresh[:b], self.fresh[b:]
        rows = np.array(take, np.int64).reshape(-1, 5)
        fresh = rows[:, [0, 1, 4]]
        self.replay.add(fresh)
        self.user_positives.add(fresh[:, 0])
        self.item_positives.add(fresh[:, 1])
        pairs = fresh if len(fresh) == b else np.concatenate([fresh, self.replay.sample(self.rng, b - len(fresh))])
        self.item_updates.add(pairs[:, 1])
        m = self.cfg.model
        history = self.histories.get(pairs[:, 0]) if m.user_tower == "attention" else None
        k = int(m.skip_negatives * b) if self.skips.size else 0
        batch = make_batch(pairs[:, 0], pairs[:, 1], self.store, 1.0 - m.id_dropout, self.rng, self.item_positives,
                           self.user_positives, pairs[:, 2], m.memer_signals, self._mature, history, self.world,
                           negatives=self._skipped_items(k))
        self.built += 1
        batch.seq = self.built
        self.inflight[batch.seq] = rows
        return batch

    def _skipped_items(self, k: int) -> np.ndarray:
        """k recent skips' items, less those without content yet (announced later, or never: a skip
        may arrive before its item's announcement, or during the first k-means fit)."""
        items = self.skips.sample(self.rng, k)[:, 1]
        return items[np.fromiter((i in self.store for i in items.tolist()), bool, len(items))]

    def _mature(self, items: np.ndarray) -> np.ndarray:
        """Whether MEMER may learn from each item: mature at the last publication, or before any
        item was, by this worker's share of its events scaled to all workers."""
        if len(self.mature_keys) == 0:
            return self.counts.get(items) * self.world >= self.maturity
        return np.isin(items, self.mature_keys, assume_unique=False)

    def _untrained(self) -> np.ndarray:
        """(user, item, partition, offset, event) consumed but not trained yet: in built batches, then queued as fresh."""
        parts = [self.inflight[k] for k in sorted(self.inflight)] + [np.array(self.fresh, np.int64).reshape(-1, 5)]
        return np.concatenate(parts)

    def _trained(self, rows: np.ndarray) -> None:
        # a positive joins its user's history once trained: a checkpoint saves the untrained ones as
        # fresh, so a restore that trains them again adds them once
        self.histories.add(rows[:, 0], rows[:, 1], rows[:, 2])
        self.positives_trained += len(rows)
        for part, floor in self.rollback_floor.items():
            self.trained_twice += int(((rows[:, 2] == part) & (rows[:, 3] < floor)).sum())

    def _waiting_rows(self) -> np.ndarray:
        return np.array([(u, i, p, o, e) for i, us in self.waiting.items() for u, p, o, e in us], np.int64).reshape(-1, 5)

    def trained_positions(self) -> dict[int, int]:
        """Per owned partition, the offset below which every event is trained (or needed no
        training: negatives, dead letters). What a manifest promises, unlike the consumer's position."""
        return trained_through(self.stream.positions(), np.concatenate([self._untrained(), self._waiting_rows()]))

    # ---- collective actions ----------------------------------------------------------------
    def _sum(self, values: list[float]) -> list[float]:
        return all_sum(values, self.control)

    def _freshness(self, trained: dict[int, int], now: float) -> tuple[np.ndarray, np.ndarray]:
        """Seconds from broker time to `now` of the events this version trains for the first time
        (below the trained offsets), and of the items it serves for the first time (rank 0 reads
        every announcement, so it alone answers for items); both sampled to a bound."""
        times = np.array(self.event_times, np.float64).reshape(-1, 3)
        done = np.zeros(len(times), bool)
        for part, through in trained.items():
            done |= (times[:, 0] == part) & (times[:, 1] < through)
        self.event_times = times[~done].tolist()
        events = now - times[done, 2]
        for i in set(self.announced) & set(self.shards.skipped):  # never servable: not waited for
            del self.announced[i]
        items = np.array([now - self.announced.pop(i) for i in list(self.announced) if i in self.store], np.float64)
        if self.rank:
            items = items[:0]
        return (self.rng.choice(events, min(len(events), SAMPLE_LATENCIES), replace=False),
                self.rng.choice(items, min(len(items), SAMPLE_LATENCIES), replace=False))

    def _catalogue(self) -> tuple[np.ndarray, np.ndarray]:
        """(items every rank has content for, users any rank has seen), sorted; gathered as tensors."""
        items = torch.from_numpy(np.fromiter(self.store.items, np.int64, len(self.store)))
        users = torch.from_numpy(np.fromiter(self.users, np.int64, len(self.users)))
        items, _ = gather_rows(items, items[:, None], self.control)
        users, _ = gather_rows(users, users[:, None], self.control)
        keys, n = np.unique(items, return_counts=True)
        return keys[n == self.world], np.unique(users)

    def _to_export(self, items: np.ndarray, counts: np.ndarray, updates: np.ndarray, has_row: np.ndarray, full: bool) -> np.ndarray:
        """Which items this version exports: all of them with a new encoder version, else those
        whose vectors can have changed since their last export (new, trained, with new events,
        or that gained or lost their row). The same answer on every rank (the inputs are)."""
        state = np.stack([updates, counts, has_row.astype(np.int64)], 1)
        if full or self.exported is None:
            changed = np.ones(len(items), bool)
        else:
            changed = changed_rows(*self.exported, items, state)
        self.exported = (items, state)
        changed[0] = True  # at least one item: the export's sharded lookups are collectives over a non-empty batch
        return changed

    def publish(self, final: bool = False) -> dict:
        """Exports what changed since the last version and publishes it; serves mature items by
        their full embedding and early-stage ones (and those without an ID row) by MEMER's
        mapping; measures the stability curve (and with it M) and freshness. Rank 0 writes the
        version with the mapping as an artefact beside the index.

        Vectors come from an encoder version: a frozen copy of the dense model, renewed every
        `publish.rebase_every` versions and at the end of training (`final`); then every item is
        exported again and a base is written. Between, a version exports only the items whose ID
        row, event count or stage moved (and new items), so its cost follows the change, not the
        catalogue; the user vectors are exported whole each version (an ID lookup and the user tower).
        """
        started = time.monotonic()
        # Called with the input thread paused or closed: it polls the consumer and moves pairs.
        trained = self.trained_positions()
        items, users = self._catalogue()
        if len(items) == 0 or len(users) == 0:  # the same on every rank: nothing to serve yet
            return {}
        counts = torch.from_numpy(np.stack([self.counts.get(items), self.item_updates.get(items), self.item_positives.get(items)]
                                           ).astype(np.float64))
        dist.all_reduce(counts, group=self.control)
        counts, updates, positives = counts.numpy().astype(np.int64)
        has_row = holds_row(self.sparse, "item_ids", spread(items), group=self.control)
        evicted = int(self._sum([sum(evictions(self.sparse).values())])[0]) + self.evictions_before
        refit = self._refit_clusters(len(items))  # a catalogue twice the size it was clustered on: new centroids, stable ids
        new_encoder = refit or final or self.encoder is None or self.since_encoder + 1 >= self.cfg.publish.rebase_every
        if new_encoder:  # the dense model and the cluster embeddings (its inputs, trained in the tables) together
            self.encoder = copy.deepcopy(self.engine.module).eval()
            self.encoder_clusters = cluster_rows(self.sparse, len(self.clusters[0].centroids), len(self.clusters[1].centroids),
                                                 self.device)  # a collective
            self.since_encoder = 0
        else:
            self.since_encoder += 1
        # a new M moves every early-stage item (its stage) and those crossing it: all are exported again
        full = new_encoder or self.maturity != self.exported_maturity or not self.publisher_takes_deltas()
        # what the last version held and this one does not (a delta always follows a version that was written)
        removed = np.setdiff1d(self.exported[0], items, assume_unique=True) if self.exported is not None else np.zeros(0, np.int64)
        todo = self._to_export(items, counts, updates, has_row, full)
        self.exported_maturity = self.maturity
        m = self.cfg.model
        ids, n, rowed = items[todo], counts[todo], has_row[todo]
        variants, user_vecs = export_vectors(self.sparse, self.encoder, self.store, ids, users,
                                             stage(torch.from_numpy(n), self.maturity).numpy(), self.device, group=self.control,
                                             clusters=self.encoder_clusters, positives=np.maximum(positives[todo], 1),
                                             histories=self.histories)  # training counts include the example's own positive
        # every rank: the same vectors, the same M; an item without a row has no ID embedding to measure
        self.curve.update(ids[rowed], n[rowed], updates[todo][rowed], variants["full"][rowed])
        measured = self.curve.threshold()
        self.maturity = measured or self.maturity
        self.mature_keys = items[counts >= self.maturity]
        # an item that lost its row (or never held one) is served from its content, as a young one is; with the
        # popularity gate, every item with a row is served by its gated vector (the gate, not M, sets the mix)
        early = f"early_{m.memer_signals[0]}" if m.memer_signals else "content"
        full = rowed if m.popularity_gate else (n >= self.maturity) & rowed
        item_vecs = np.where(full[:, None], variants["full"], variants[early])
        event_lat, item_lat = self._freshness(trained, time.time())
        replay = self.replay.ordered()
        seen_users, seen_items = gather_rows(torch.from_numpy(replay[:, 0].copy()), torch.from_numpy(replay[:, 1:2].copy()), self.control)
        small: list = [None] * self.world
        dist.all_gather_object(small, (trained, event_lat, item_lat, self.new_names), group=self.control)
        self.new_names = {}
        if self.rank != 0:
            return {}
        for g in small:
            self.names.update(g[3])
        regressed = self._regress(ids, n, rowed, variants["full"], new_encoder)
        if regressed is not None:  # items nobody has interacted with yet, and without a row
            item_vecs = np.where((~rowed & (n == 0))[:, None], regressed, item_vecs)
            variants["regressed"] = regressed
        info = {"step": self.step, "mature_items": int((counts >= self.maturity).sum()), "items_without_row": int((~has_row).sum()),
                "evictions": evicted, "exported_items": int(todo.sum()), "encoder_renewed": bool(new_encoder), "kafka_offsets": {
            self.cfg.kafka.interactions_topic: {str(p): o for g in small for p, o in g[0].items()}},
            "maturity": {"threshold": self.maturity, "epsilon": m.maturity_epsilon, "measured": measured is not None,
                         "curve": self.curve.curve()},
            "early_stage": {"served_by": early, "signals": list(m.memer_signals)},
            "freshness": {"event_to_version_s": percentiles(np.concatenate([x[1] for x in small])),
                          "announce_to_servable_s": percentiles(np.concatenate([x[2] for x in small]))}}
        info["publish_s"] = round(time.monotonic() - started, 3)  # export and gathers; the write follows
        extra = {"seen.npz": lambda path: np.savez(path, pairs=np.unique(np.stack([seen_users, seen_items[:, 0]], 1), axis=0))}
        if new_encoder:  # every item's variants, for the early-stage evaluation: with whole exports only
            extra[EARLY_FILE] = lambda path: np.savez(path, ids=ids, counts=n, **variants)
        if m.memer_signals:
            centroids = (self.clusters[0].centroids, self.clusters[1].centroids)
            info["mapping"] = save_mapping(self.encoder, m, self.maturity, centroids, self.encoder_clusters,
                                           self.run_dir / f".{MAPPING_FILE}.rank0")
            extra[MAPPING_FILE] = lambda path: (self.run_dir / f".{MAPPING_FILE}.rank0").replace(path)
        if self.regression is not None:
            info["regression"] = self.regression.save(self.run_dir / f".{REGRESSION_FILE}.rank0.npz")
            extra[REGRESSION_FILE] = lambda path: (self.run_dir / f".{REGRESSION_FILE}.rank0.npz").replace(path)
        named = {str(k): self.names[k] for k in (*items.tolist(), *users.tolist()) if k in self.names} if self.names else {}
        if named:  # string ids: the index is keyed by their int64 keys, and this says which string each is
            extra[NAMES_FILE] = lambda path: path.write_text(json.dumps(named))
        if todo.all():
            pub = self.publisher.publish(ids, item_vecs, users, user_vecs, info, extra)
        else:
            pub = self.publisher.publish_delta(ids, item_vecs, removed, users, user_vecs, info, extra)
        if pub is None:
            return {}
        log.info("published index v%d: %d items (%d exported, %d mature, M=%d), %d users, step %d; freshness p50 %s s",
                 pub.version, len(items), len(ids), info["mature_items"], self.maturity, len(users), self.step,
                 info["freshness"]["event_to_version_s"].get("p50"))
        return {"version": pub.version}

    def _regress(self, ids: np.ndarray, counts: np.ndarray, rowed: np.ndarray, full: np.ndarray, refit: bool) -> np.ndarray | None:
        """Rank 0: the content regression's vectors of `ids` (None when it is off or cannot be fitted).
        With a new encoder version every item was exported, and the regression is refit onto the
        served vectors of those with a row and an interaction."""
        if not self.cfg.model.cold_regression:
            return None
        if refit:
            fit = rowed & (counts > 0)
            if not self.store.described:
                log.warning("content regression: not fitted (the restored content store has no descriptors: an older "
                            "checkpoint); new items are served by MEMER's mapping")
            elif fit.sum() >= 2:
                self.regression = ContentRegression.fit(*self.store.descriptors(ids[fit]), full[fit], seed=self.step)
        if self.regression is None:
            return None
        # in chunks: the descriptors of a whole catalogue are not copied at once
        return np.concatenate([self.regression.predict(*self.store.descriptors(ids[s:s + CHUNK])) for s in range(0, len(ids), CHUNK)])

    def publisher_takes_deltas(self) -> bool:
        """Rank 0's publisher decides for all: after a refused or first write, the next version is whole."""
        return bool(self._sum([float(self.rank == 0 and self.publisher.takes_deltas)])[0])

    def checkpoint(self, metrics: dict) -> None:
        """Sparse shards (torch.distributed.checkpoint), dense engine (DeepSpeed) and Kafka
        offsets, written per rank and merged by Ray into one checkpoint directory."""
        self.stream.flush()  # dead letters reach Kafka before the offsets that skip their records are saved
        self.feed.flush()
        with tempfile.TemporaryDirectory(prefix="coldstream-ckpt-") as d:
            d = Path(d)
            dcp.save({"model": self.sparse.state_dict(), "optim": self.sparse.fused_optimizer.state_dict()},
                     storage_writer=dcp.FileSystemWriter(str(d / "sparse")))
            self.engine.save_checkpoint(str(d / "dense"), tag=DS_TAG)
            # Consumed but not yet trained on: saved with the offsets, so a restart loses no event.
            # Pairs in built batches were already counted and put in the replay window (its newest
            # entries); they are saved as fresh instead, so a restore counts them once.
            untrained = self._untrained()
            built = untrained[: sum(len(p) for p in self.inflight.values())]
            item_pos, user_pos = self.item_positives.copy(), self.user_positives.copy()
            item_pos.add(built[:, 1], -1)
            user_pos.add(built[:, 0], -1)
            replay = self.replay.ordered()
            np.savez(d / f"counts-rank{self.rank}.npz", **{f"{name}_{part}": getattr(c, part)() for name, c in (
                ("events", self.counts), ("item_positives", item_pos), ("user_positives", user_pos)) for part in ("keys", "values")})
            np.savez(d / f"buffers-rank{self.rank}.npz", replay=replay[: max(len(replay) - len(built), 0)],
                     fresh=untrained, waiting=self._waiting_rows(), skips=self.skips.ordered())
            np.savez(d / f"histories-rank{self.rank}.npz", **self.histories.state())
            (d / f"stream-rank{self.rank}.json").write_text(json.dumps({
                "offsets": self.stream.positions(), "users": sorted(self.users), "step": self.step, "world": self.world,
                "maturity": self.maturity, "names": {str(k): v for k, v in self.names.items()},
                "evictions": sum(evictions(self.sparse).values()) + (self.evictions_before if self.rank == 0 else 0),
                "stats": {"consumed": self.stream.stats.consumed, "malformed": self.stream.stats.malformed},
                "trained": self.positives_trained}))
            if self.rank == 0:  # every rank reads every announcement: rank 0's view stands for all
                np.savez(d / "clusters.npz", frame=self.clusters[0].centroids, text=self.clusters[1].centroids, fitted_on=self.clustered_on)
                np.savez(d / "content.npz", **self.store.state(), skipped=np.array(sorted(self.shards.skipped), np.int64))
                (d / "items.json").write_text(json.dumps({"offsets": self.feed.positions(), "cluster_id": self.stream.watch.cluster_id,
                                                          "skipped": self.shards.skipped}))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(d)))

    def _restore(self, d: Path) -> Restored:
        """Loads a checkpoint written by any number of workers. Per-partition state (offsets, and
        the untrained pairs tagged with their partition) follows the partition to its new owner;
        per-rank counters of old rank o go to new rank o % world, so sums are kept, and its replay
        window is split between the new ranks that take over from it; TorchRec's distributed
        checkpoint reshards the tables."""
        old = sorted(d.glob("stream-rank*.json"), key=lambda p: int(p.stem.removeprefix("stream-rank")))
        old_world = len(old)
        mine = [o for o in range(old_world) if o % self.world == self.rank]
        state = {"model": self.sparse.state_dict(), "optim": self.sparse.fused_optimizer.state_dict()}
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(d / "sparse")))
        self.sparse.load_state_dict(state["model"])
        self.sparse.fused_optimizer.load_state_dict(state["optim"])
        if old_world == self.world:
            self.engine.load_checkpoint(str(d / "dense"), tag=DS_TAG)
        else:  # ZeRO partitions the optimizer state by rank: keep the weights, restart AdamW's moments
            self.engine.load_checkpoint(str(d / "dense"), tag=DS_TAG, load_module_only=True)
            log.warning("resuming %d workers from a %d-worker checkpoint: dense weights restored, dense optimizer "
                        "state restarted; tables, offsets and buffers resharded", self.world, old_world)
        streams = [json.loads(p.read_text()) for p in old]
        restored = Restored()
        for o, st in enumerate(streams):
            self.users |= set(st["users"])
            self.names |= {int(k): v for k, v in st.get("names", {}).items()}
            self.evictions_before += st.get("evictions", 0) if self.rank == 0 else 0
            restored.offsets.update({int(p): int(off) for p, off in st["offsets"].items() if int(p) in self.parts})
            buffers = np.load(d / f"buffers-rank{o}.npz")
            if (d / f"histories-rank{o}.npz").exists():  # histories follow their users' partitions
                self.histories.load(dict(np.load(d / f"histories-rank{o}.npz")), self.parts)
            for name, target in (("fresh", self.fresh), ("waiting", None)):
                rows = buffers[name]
                for u, i, p, off, e in rows[np.isin(rows[:, 2], self.parts)].tolist():
                    if target is None:
                        self.waiting[i].append((u, p, off, e))
                    else:
                        target.append((u, i, p, off, e))
            sharers = [r for r in range(self.world) if o % self.world == r or r % old_world == o]
            if self.rank in sharers:  # more workers than before: old replay windows are split between them
                self.replay.add(buffers["replay"][sharers.index(self.rank)::len(sharers)])
                if "skips" in buffers.files:  # older checkpoints kept no skips
                    self.skips.add(buffers["skips"][sharers.index(self.rank)::len(sharers)])
            if o in mine:
                counts = np.load(d / f"counts-rank{o}.npz")
                for name, target in (("events", self.counts), ("item_positives", self.item_positives),
                                     ("user_positives", self.user_positives)):
                    target.add(counts[f"{name}_keys"], counts[f"{name}_values"])
                for k, v in st.get("stats", {}).items():
                    restored.stats[k] = restored.stats.get(k, 0) + v
                restored.trained += st.get("trained", 0)
        self.fresh.sort(key=lambda r: (r[3], r[2]))  # oldest first, as they were consumed
        restored.trained_floor = trained_through(restored.offsets, np.concatenate(
            [np.array(self.fresh, np.int64).reshape(-1, 5), self._waiting_rows()]))
        self.step = max(st["step"] for st in streams)
        self.maturity = streams[0].get("maturity", self.maturity)
        c = np.load(d / "clusters.npz")
        self.clusters = (ClusterModel(c["frame"]), ClusterModel(c["text"]))
        self.clustered_on = int(c["fitted_on"]) if "fitted_on" in c.files else len(c["frame"])
        content = np.load(d / "content.npz")
        self.store.load_state({k: content[k] for k in content.files if k != "skipped"})
        items = json.loads((d / "items.json").read_text())
        self.shards.skipped.update({int(k): v for k, v in items["skipped"].items()})
        restored.feed_offsets = {int(p): int(o) for p, o in items["offsets"].items()}
        restored.cluster_id = items["cluster_id"]
        log.info("restored checkpoint at step %d (written by %d workers): offsets %s, %d items, %d untrained positives",
                 self.step, old_world, restored.offsets, len(self.store), len(self.fresh) + sum(map(len, self.waiting.values())))
        return restored

    # ---- the loop ----------------------------------------------------------------------------
    def _status(self, clock: StepClock, loop_s: float, steps: int, version: int | None) -> None:
        with self.input.paused():  # the consumer is not thread-safe; the input thread polls it
            consumed, lag, malformed, items = self.stream.stats.consumed, self.stream.lag(), self.stream.stats.malformed, len(self.store)
            lost = self.stream.stats.data_loss_incidents + self.feed.stats.data_loss_incidents
            outages = self.stream.stats.outages + self.feed.stats.outages
            down = max(self.stream.watch.down_s, self.feed.watch.down_s)
        examples = steps * self.cfg.optim.batch_size * self.world
        loop_rate, step_rate = examples / max(loop_s, 1e-9), examples / max(clock.seconds(), 1e-9)
        loss = float(torch.stack(list(self.losses)).float().mean())
        print(f"[coldstream] step {self.step} loss {loss:.3f} | {steps / max(loop_s, 1e-9):.1f} steps/s {loop_rate:.0f} ex/s "
              f"(in steps {step_rate:.0f}) | w0 consumed {consumed} lag {lag} dead-letter {malformed}"
              f"{f' BROKER-LOST-LOG x{lost}' if lost else ''}{f' BROKER-DOWN {down:.0f}s' if down else ''}"
              f"{f' outages {outages}' if outages else ''} | items {items} | index v{version}",
              flush=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"t": time.time(), "step": self.step, "loss": loss, "examples_per_s": loop_rate,
                                "step_examples_per_s": step_rate, "broker_data_loss_incidents": lost,
                                "broker_outages": outages, "broker_down_s": down}) + "\n")

    def _schedule(self, elapsed_s: float, held: float) -> None:
        """Sets both learning rates for the run's progress (`trainer.step.run_progress`); every rank
        computes it from the same agreed figures: rank 0's clock, the summed replay windows."""
        t, o = self.cfg.train, self.cfg.optim
        progress = run_progress(self.step, t.max_steps, elapsed_s, t.duration_s, o.batch_size * self.world, held, o.schedule_passes)
        f = lr_factor(progress, o.warmup_fraction, o.lr_floor)
        set_learning_rates(self.engine, self.sparse, o.dense_lr * f, o.sparse_lr * f)

    def run(self) -> None:
        """Agree, step, publish, checkpoint; input arrives from the Prefetcher's thread.

        The loop's own time excludes publication and checkpoints (they are reported apart), so
        loop examples/s over step examples/s measures what waiting for input costs.
        """
        t = self.cfg.train
        if self.clusters is None:
            self._fit_clusters()
        else:
            self._catch_up_items()
        self.input = Prefetcher(self._build, self.device, t.prefetch_batches)
        clock = StepClock(self.device)
        start = last_pub = last_ckpt = last_status = time.monotonic()
        start_step = last_pub_step = self.step
        side_s = 0.0  # publication and checkpoints
        version, batch = None, None
        try:
            while True:
                if batch is None:
                    batch = self.input.get(timeout_s=0.05)
                now = time.monotonic()
                lead = self.rank == 0
                stop = lead and (now - start > t.duration_s or (t.max_steps is not None and self.step >= t.max_steps))
                pub = lead and self.step > last_pub_step and (now - last_pub > t.publish_every_s or self.step - last_pub_step >= t.publish_every_steps)
                ckpt = lead and now - last_ckpt > t.checkpoint_every_s
                # rank 0's clock for all: the learning rate must be the same on every rank
                not_ready, stop, pub, ckpt, elapsed, held = self._sum([float(batch is None), stop, pub, ckpt, (now - start) * lead,
                                                                       float(self.replay.size)])
                if stop:
                    break
                if not not_ready:
                    if self.cfg.optim.lr_schedule == "cosine":
                        self._schedule(elapsed, held)
                    clock.start()
                    self.losses.append(self.step_fn(batch))
                    clock.stop()
                    self._trained(self.inflight.pop(batch.seq))
                    batch = None
                    self.step += 1
                if pub or ckpt:
                    t0 = time.monotonic()
                    with self.input.paused():
                        if pub:
                            version = self.publish().get("version", version)
                            last_pub, last_pub_step = time.monotonic(), self.step
                        if ckpt:
                            self.checkpoint({"step": self.step})
                            last_ckpt = time.monotonic()
                    side_s += time.monotonic() - t0
                if lead and now - last_status > t.status_every_s and self.losses:
                    self._status(clock, now - start - side_s, self.step - start_step, version)
                    last_status = now
        finally:
            self.input.close()  # batches it leaves behind keep their pairs in self.inflight: checkpointed as fresh
        loop_s = time.monotonic() - start - side_s
        step_s = clock.seconds(wait=True)
        version = self.publish(final=True).get("version", version)
        consumed, malformed, dropped, skipped, loop_total, step_total, trained, twice, evicted = self._sum([
            self.stream.stats.consumed, self.stream.stats.malformed, self.dropped_unknown_item,
            len(self.shards.skipped) if self.rank == 0 else 0, loop_s, step_s, self.positives_trained, self.trained_twice,
            sum(evictions(self.sparse).values())])
        steps = self.step - start_step
        examples = steps * self.cfg.optim.batch_size * self.world
        loop_rate = examples / max(loop_total / self.world, 1e-9)
        step_rate = examples / max(step_total / self.world, 1e-9)
        final = {
            "events_consumed": int(consumed), "dead_lettered": int(malformed), "events_dropped_missing_content": int(dropped),
            "items_skipped": int(skipped), "positives_trained": int(trained), "trained_twice_beyond_rollback": int(twice),
            "train_steps": self.step, "steps_this_run": steps, "id_evictions": int(evicted) + self.evictions_before,
            "examples_per_s": loop_rate, "step_examples_per_s": step_rate, "loop_step_ratio": loop_rate / max(step_rate, 1e-9),
            "device": str(self.device), "precision": self.precision,
            "final_loss": float(torch.stack(list(self.losses)).float().mean()) if self.losses else None, "index_version": version,
        }
        self.checkpoint(final)
        self.stream.close()
        self.feed.close()


def train_loop_per_worker(config: dict) -> None:
    from cluster.logs import setup_logging

    setup_logging()
    Worker(Config.model_validate(config["cfg"]), config["bootstrap"]).run()
