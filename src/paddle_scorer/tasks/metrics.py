"""Metrics of classify outputs against gold labels: pure functions over output records."""

from __future__ import annotations

import math


def evaluate(records: list[dict], labels: list[str], bins: int = 10) -> dict | None:
    """accuracy, log-loss, Brier, ECE and confusion matrix over records that carry a known gold label."""
    scored = [r for r in records if r.get("gold") is not None]
    if not scored:
        return None
    known = [r for r in scored if str(r["gold"]) in labels]
    unknown = sorted({str(r["gold"]) for r in scored if str(r["gold"]) not in labels})
    if not known:
        return {"n": 0, "unknown_gold_labels": unknown}
    n = len(known)
    correct = sum(r["prediction"] == str(r["gold"]) for r in known)
    eps = 1e-15
    logloss = -sum(math.log(max(r["probs"][str(r["gold"])], eps)) for r in known) / n
    brier = sum(sum((r["probs"][lab] - (1.0 if lab == str(r["gold"]) else 0.0)) ** 2 for lab in labels)
                for r in known) / n
    confusion = {g: {p: 0 for p in labels} for g in labels}
    for r in known:
        confusion[str(r["gold"])][r["prediction"]] += 1
    return {
        "n": n,
        "accuracy": correct / n,
        "log_loss": logloss,
        "brier": brier,
        "ece": ece(known, bins),
        "confusion": confusion,
        "unknown_gold_labels": unknown,
        "n_unknown_gold": len(scored) - n,
    }


def reliability(records: list[dict], bins: int = 10) -> list[dict]:
    """Per confidence bin: count, mean confidence, accuracy (of the predicted label)."""
    out = []
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [r for r in records if lo < r["probs"][r["prediction"]] <= hi or (b == 0 and r["probs"][r["prediction"]] == 0)]
        if members:
            conf = sum(r["probs"][r["prediction"]] for r in members) / len(members)
            acc = sum(r["prediction"] == str(r["gold"]) for r in members) / len(members)
        else:
            conf = acc = None
        out.append({"lo": lo, "hi": hi, "count": len(members), "confidence": conf, "accuracy": acc})
    return out


def ece(records: list[dict], bins: int = 10) -> float:
    n = len(records)
    return sum(b["count"] / n * abs(b["confidence"] - b["accuracy"]) for b in reliability(records, bins) if b["count"])
