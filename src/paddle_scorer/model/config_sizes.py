"""config.json's sizes checked against the weights before anything is planned (pure, no paddle): a layer count, width
or context that the tensors contradict is refused naming the field, before ``inspect`` lists millions of missing
tensors or ``classify`` sizes its memory (and rotary tables) from a number nothing backs."""

from __future__ import annotations

from paddle_scorer.errors import CheckpointError
from paddle_scorer.model.tensor_layout import layer_index

# Longest context a config may declare: libraries build their rotary tables that long when the model is built
# (PaddleNLP: cos and sin, [positions, head_dim] float32 each); the longest real contexts are about 1M (Qwen2.5-1M).
MAX_POSITIONS = 1 << 22
_EMBEDDINGS = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight")


def _refuse(where: str, what: str, fix: str) -> CheckpointError:
    return CheckpointError(f"{where}/config.json {what}; {fix}")


def check_config_sizes(info) -> None:
    """Refuse a config whose ``num_hidden_layers``, ``hidden_size``, ``vocab_size`` or ``max_position_embeddings`` the
    weights cannot back (the fields are read as numbers first: a string or a negative count is refused too)."""
    cfg, where = info.raw_config, info.path
    for key in ("num_hidden_layers", "hidden_size", "vocab_size", "max_position_embeddings", "intermediate_size",
                "num_attention_heads"):
        v = cfg.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise _refuse(where, f"has {key} {v!r}, not a positive whole number", "fix that field.")
    present = {layer_index(n) for n in info.tensors} - {None}
    layers = cfg.get("num_hidden_layers")
    if isinstance(layers, int) and info.tensors and layers > len(present):
        top = max(present) + 1 if present else 0
        held = f"{len(present)} decoder layer(s) (0-{top - 1})" if present else "no decoder layers"
        gaps = sorted(set(range(top)) - present)
        if gaps:  # layers missing between the ones held: a shard is missing, not a wrong count
            held += f", without layer(s) {', '.join(map(str, gaps[:8]))}{' ...' if len(gaps) > 8 else ''}"
        fix = "add the missing shards" if gaps else f"fix num_hidden_layers (to {top} if the weights are whole), or " \
                                                     "add the missing shards"
        raise _refuse(where, f"says num_hidden_layers {layers:,}, but the weights hold {held}", fix + ".")
    emb = next(((n, tuple(r.shape)) for n, r in info.tensors.items() if n.endswith(_EMBEDDINGS) and len(r.shape) == 2),
               None)
    if emb is not None:
        name, shape = emb
        for key in ("hidden_size", "vocab_size"):
            v = cfg.get(key)
            if isinstance(v, int) and v not in shape:
                raise _refuse(where, f"says {key} {v:,}, but the embedding {name} is {shape[0]:,} x {shape[1]:,}",
                              f"fix {key} to the weights' size.")
    mp = cfg.get("max_position_embeddings")
    if isinstance(mp, int) and mp > MAX_POSITIONS:
        raise _refuse(where, f"says max_position_embeddings {mp:,}, beyond any model's context (at most "
                             f"{MAX_POSITIONS:,} here: libraries build rotary tables that long)",
                      "fix max_position_embeddings to the context the model was trained for.")


def _head_and_embedding(info):
    head = next((n for n in info.tensors if n == "lm_head.weight" or n.endswith(".lm_head.weight")), None)
    emb = next((n for n in info.tensors if n.endswith(_EMBEDDINGS) and len(info.tensors[n].shape) == 2), None)
    return head, emb


def check_tied_head(info, tie: bool) -> None:
    """With tied embeddings the embedding is the LM head: a stored ``lm_head`` must equal it (transformers ties the
    two and drops one; which one depends on the library and the loading order), or the scores would depend on that
    choice. Refused naming both tensors when they differ."""
    head, emb = _head_and_embedding(info)
    if not tie or head is None or emb is None:
        return
    import numpy as np

    from paddle_scorer.checkpoint.weights import read_tensors

    arrays = read_tensors([info.tensors[head], info.tensors[emb]])
    h, e = (np.asarray(arrays[n]) for n in (head, emb))
    if h.shape != e.shape and h.shape[::-1] == e.shape:
        h = h.T
    same = h.shape == e.shape
    step = max(1, (64 << 20) // max(1, e.shape[1] * 4))  # compared a block of rows at a time: no whole float32 copy
    for r0 in range(0, e.shape[0] if same else 0, step):
        if not np.array_equal(h[r0:r0 + step].astype(np.float32), e[r0:r0 + step].astype(np.float32)):
            same = False
            break
    if not same:
        raise CheckpointError(
            f"{info.path}/config.json says tie_word_embeddings true, but the stored {head} differs from {emb} (the head "
            "would be one or the other depending on the library); set tie_word_embeddings false if the model was "
            "trained with its own head, or remove lm_head.weight if it was tied.")
