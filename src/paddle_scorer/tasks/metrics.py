"""Metrics of classify outputs against gold labels: accuracy, log-loss, Brier, ECE, confusion, reliability bins.

Computed from a :class:`Collector` that keeps of each record only what the metrics need, in flat arrays (its label
probabilities, the index of its prediction and of its gold label: 8 bytes a label and 8 a record), so a
million-record output is summarised in a few tens of MB; :func:`evaluate` and :func:`reliability` take records.
"""

from __future__ import annotations

from array import array

import numpy as np

NONE, UNKNOWN = -1, -2  # gold index of a record without a gold label, and of one whose gold is not a label
EPS = 1e-15  # log-loss floor


class Collector:
    """Records added one at a time (:meth:`add`), the metrics computed at the end (:meth:`evaluate`)."""

    def __init__(self, labels: list[str]):
        self.labels = list(labels)
        self.index = {lab: i for i, lab in enumerate(self.labels)}
        self._probs = array("d")
        self._pred = array("i")
        self._gold = array("i")
        self._cached = None
        self.unknown: set[str] = set()

    def __len__(self) -> int:
        return len(self._pred)

    def add(self, record: dict) -> None:
        probs = record["probs"]
        self._probs.extend([float(probs[lab]) for lab in self.labels])
        self._pred.append(self.index[record["prediction"]])
        gold = record.get("gold")
        if gold is None:
            self._gold.append(NONE)
        elif str(gold) in self.index:
            self._gold.append(self.index[str(gold)])
        else:
            self._gold.append(UNKNOWN)
            self.unknown.add(str(gold))

    def result(self) -> dict:
        """What a run's provenance records: ``{"metrics": ...}``."""
        return {"metrics": self.evaluate()}

    # ------------------------------------------------------------------ arrays

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The records as numpy arrays, made once after the last :meth:`add` (copies: a view would stop the arrays
        from growing)."""
        if self._cached is None or self._cached[0] != len(self):
            n = len(self)
            self._cached = (n, np.array(self._probs, dtype=np.float64).reshape(n, len(self.labels)),
                            np.array(self._pred, dtype=np.int64), np.array(self._gold, dtype=np.int64))
        return self._cached[1:]

    @property
    def probs(self) -> np.ndarray:
        """``[records, labels]`` float64."""
        return self._arrays()[0]

    @property
    def pred(self) -> np.ndarray:
        return self._arrays()[1]

    @property
    def gold(self) -> np.ndarray:
        return self._arrays()[2]

    def confidence(self) -> np.ndarray:
        """The probability of each record's predicted label."""
        return self.probs[np.arange(len(self)), self.pred]

    def known(self) -> np.ndarray:
        """Rows with a gold label among the labels."""
        return np.flatnonzero(self.gold >= 0)

    # ------------------------------------------------------------------ metrics

    def evaluate(self, bins: int = 10) -> dict | None:
        """accuracy, log-loss, Brier, ECE and confusion matrix over records that carry a known gold label."""
        gold, pred, probs = self.gold, self.pred, self.probs
        scored = int((gold != NONE).sum())
        if not scored:
            return None
        unknown = sorted(self.unknown)
        known = self.known()
        if not known.size:
            return {"n": 0, "unknown_gold_labels": unknown}
        n, labels = len(known), self.labels
        g, p, pk = gold[known], pred[known], probs[known]
        onehot = np.zeros_like(pk)
        onehot[np.arange(n), g] = 1.0
        confusion = {gl: {pl: 0 for pl in labels} for gl in labels}
        pairs, counts = np.unique(np.stack([g, p], axis=1), axis=0, return_counts=True)
        for (gi, pi), c in zip(pairs.tolist(), counts.tolist()):
            confusion[labels[gi]][labels[pi]] = int(c)
        rel = self.reliability(known, bins)
        return {
            "n": n,
            "accuracy": float((p == g).sum() / n),
            "log_loss": float(-np.log(np.maximum(pk[np.arange(n), g], EPS)).sum() / n),
            "brier": float(((pk - onehot) ** 2).sum() / n),
            "ece": float(sum(b["count"] / n * abs(b["confidence"] - b["accuracy"]) for b in rel if b["count"])),
            "confusion": confusion,
            "unknown_gold_labels": unknown,
            "n_unknown_gold": scored - n,
        }

    def reliability(self, rows: np.ndarray | None = None, bins: int = 10) -> list[dict]:
        """Per confidence bin (the predicted label's probability) of ``rows`` (default: all): count, mean confidence,
        accuracy. Bin ``b`` holds ``b/bins < confidence <= (b+1)/bins`` (and the first also a confidence of 0)."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        conf = self.confidence()[rows]
        right = (self.pred[rows] == self.gold[rows])
        out = []
        for b in range(bins):
            lo, hi = b / bins, (b + 1) / bins
            sel = (conf > lo) & (conf <= hi)
            if b == 0:
                sel |= conf == 0
            k = int(sel.sum())
            c = float(conf[sel].mean()) if k else None
            acc = float(right[sel].mean()) if k else None
            out.append({"lo": lo, "hi": hi, "count": k, "confidence": c, "accuracy": acc})
        return out


def collect(records, labels: list[str]) -> Collector:
    c = Collector(labels)
    for r in records:
        c.add(r)
    return c


def _labels_of(records: list[dict]) -> list[str]:
    return list(records[0]["probs"]) if records else []


def evaluate(records, labels: list[str], bins: int = 10) -> dict | None:
    """accuracy, log-loss, Brier, ECE and confusion matrix over records that carry a known gold label."""
    return collect(records, labels).evaluate(bins)


def reliability(records, bins: int = 10, labels: list[str] | None = None) -> list[dict]:
    """Per confidence bin: count, mean confidence, accuracy (of the predicted label), over ``records``."""
    records = list(records)
    return collect(records, labels or _labels_of(records)).reliability(None, bins)


def ece(records, bins: int = 10, labels: list[str] | None = None) -> float:
    records = list(records)
    n = len(records)
    return sum(b["count"] / n * abs(b["confidence"] - b["accuracy"])
               for b in reliability(records, bins, labels) if b["count"])
