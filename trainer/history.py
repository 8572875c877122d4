"""Each user's last L positive items: what M3CSR's user tower attends over.

A worker keeps the histories of the users on its partitions (interactions are keyed by user,
so a user's events reach one worker). The store is bounded: it holds at most `capacity`
users, and when a new user needs room the least recently active ones lose their history
(their tower then falls back to the user's ID embedding alone, as for a brand-new user).
Each history remembers the partition its user's events come from, so a checkpoint restored
on a different number of workers hands every history to the worker that now owns it. The worker's
input thread reads histories while its training loop adds to them, so every call holds a lock.
"""
from __future__ import annotations

import threading

import numpy as np

PAD = -1  # an empty position


class Histories:
    def __init__(self, length: int, capacity: int):
        self.length, self.capacity = length, capacity
        self.slot: dict[int, int] = {}
        self.items = np.full((0, length), PAD, np.int64)  # per slot, oldest first, newest in the last column
        self.part = np.zeros(0, np.int64)
        self.touched = np.zeros(0, np.int64)  # clock of the last update, for least-recently-active eviction
        self.clock = 0
        self.evicted = 0
        self._free: list[int] = []
        self._lock = threading.Lock()

    def _slots(self, users: np.ndarray) -> np.ndarray:
        """Slots of these users, making room for new ones (the users asked for are never the ones evicted)."""
        self.clock += 1
        known = [self.slot[u] for u in users.tolist() if u in self.slot]
        self.touched[known] = self.clock
        new = [u for u in dict.fromkeys(users.tolist()) if u not in self.slot]
        over = min(len(self.slot) + len(new) - self.capacity, len(self.slot) - len(set(known)))
        if over > 0:
            keys, live = list(self.slot), np.fromiter(self.slot.values(), np.int64, len(self.slot))
            for k in np.argsort(self.touched[live], kind="stable")[:over].tolist():
                self._free.append(int(live[k]))
                del self.slot[keys[k]]
            self.evicted += over
        for u in new:
            if self._free:
                s = self._free.pop()
            else:
                s = len(self.slot)
                if s >= len(self.items):
                    extra = max(64, len(self.items))
                    self.items = np.concatenate([self.items, np.full((extra, self.length), PAD, np.int64)])
                    self.part = np.concatenate([self.part, np.zeros(extra, np.int64)])
                    self.touched = np.concatenate([self.touched, np.zeros(extra, np.int64)])
            self.slot[u] = s
            self.items[s], self.touched[s] = PAD, self.clock
        return np.fromiter((self.slot[u] for u in users.tolist()), np.int64, len(users))

    def add(self, users: np.ndarray, items: np.ndarray, parts: np.ndarray) -> None:
        """Appends positives (in the order they happened) to their users' histories."""
        users, items, parts = (np.asarray(a, np.int64) for a in (users, items, parts))
        if len(users) == 0:
            return
        with self._lock:
            self._append(users, items, parts)

    def _append(self, users: np.ndarray, items: np.ndarray, parts: np.ndarray) -> None:
        slots = self._slots(users)
        for s, i, p in zip(slots.tolist(), items.tolist(), parts.tolist()):
            row = self.items[s]
            row[:-1] = row[1:]
            row[-1] = i
            self.part[s] = p

    def get(self, users: np.ndarray) -> np.ndarray:
        """[n, L] item keys, newest last, PAD where a user has fewer (or no) positives."""
        out = np.full((len(users), self.length), PAD, np.int64)
        with self._lock:
            for r, u in enumerate(np.asarray(users, np.int64).tolist()):
                s = self.slot.get(u)
                if s is not None:
                    out[r] = self.items[s]
        return out

    def users(self) -> np.ndarray:
        with self._lock:
            return np.fromiter(self.slot, np.int64, len(self.slot))

    def state(self) -> dict[str, np.ndarray]:
        with self._lock:
            users = np.fromiter(self.slot, np.int64, len(self.slot))
            slots = np.fromiter(self.slot.values(), np.int64, len(self.slot))
            order = np.argsort(self.touched[slots], kind="stable")  # oldest first: a restore keeps the eviction order
            return {"users": users[order], "items": self.items[slots[order]], "parts": self.part[slots[order]]}

    def load(self, state: dict[str, np.ndarray], parts: list[int]) -> None:
        """Adds the histories of a checkpoint whose users' partitions are in `parts`."""
        mine = np.isin(state["parts"], parts)
        users, items, part = state["users"][mine], state["items"][mine], state["parts"][mine]
        if len(users) == 0:
            return
        width = min(items.shape[1], self.length)  # a checkpoint written with another L: its newest positions
        with self._lock:
            self._restore(users, items, part, width)

    def _restore(self, users: np.ndarray, items: np.ndarray, part: np.ndarray, width: int) -> None:
        slots = self._slots(users)
        self.items[slots] = PAD
        self.items[slots, self.length - width:] = items[:, items.shape[1] - width:]
        self.part[slots] = part
        self.touched[slots] = self.clock + np.arange(len(slots))  # oldest first, as saved
        self.clock += len(slots)
