"""What the decoder must know of an architecture (:class:`ArchSpec`), or why it does not compute it."""

from __future__ import annotations

from dataclasses import dataclass

from paddle_scorer.compute import config_support


@dataclass(frozen=True)
class ArchSpec:
    library: str
    architecture: str
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    rotation: str  # "half" | "interleaved"
    qk_scale: str  # "multiply-q" | "divide-q" | "scores"
    head_out_in: bool  # the LM head weight is [vocab, hidden]: logits = h @ W.T
    prefix: str  # the decoder body's name prefix ("llama", "qwen2", "model")
    zero_embedding_id: int | None = None
    v_head_dim: int | None = None  # None: head_dim (DeepSeek's MLA: values narrower than queries and keys)
    scale: float | None = None  # the attention scale when qk_scale is "scores" (None: head_dim^-0.5)
    rot_dim: int | None = None  # rotated dims of a head (None: all; GLM-4.5 rotates half)
    family: object = None  # a model.families.FamilyConfig: a model computed without the library's model class

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def value_dim(self) -> int:
        return self.v_head_dim or self.head_dim


def spec_for_family(fc, architecture: str) -> ArchSpec:
    """The spec of a family model (:mod:`paddle_scorer.model.families`): HF's math, ``[vocab, hidden]`` LM head."""
    mla = fc.mla is not None
    return ArchSpec(
        library="paddle-scorer", architecture=architecture, hidden=fc.hidden, heads=fc.heads,
        kv_heads=fc.heads if mla else fc.kv_heads, head_dim=fc.head_dim, eps=fc.eps, rotation=fc.rope.layout,
        qk_scale="scores", head_out_in=True, prefix="model", v_head_dim=fc.mla["v_head_dim"] if mla else None,
        scale=fc.softmax_scale, rot_dim=None if fc.rope.dim == fc.head_dim else fc.rope.dim, family=fc,
    )


def spec_for(library: str, architecture: str, prefix: str, config) -> tuple[ArchSpec | None, str | None]:
    """The spec of a model this forward computes exactly, or ``(None, why not)``."""
    get = lambda k, d=None: getattr(config, k, d)  # noqa: E731
    known = {("paddlenlp", "LlamaForCausalLM"), ("paddlenlp", "Qwen2ForCausalLM"),
             ("paddleformers", "LlamaForCausalLM"), ("paddleformers", "Ernie4_5ForCausalLM")}
    if (library, architecture) not in known:
        return None, f"{architecture} ({library}) has no CPU fast path"
    why = config_support.unsupported(config)
    if why:
        return None, why
    hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    kv = int(get("num_key_value_heads", None) or heads)
    if library == "paddleformers":
        head_dim = int(get("head_dim", None) or hidden // heads)
    else:
        head_dim = hidden // heads
    if heads % kv:
        return None, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}"
    scale = {"LlamaForCausalLM": "multiply-q", "Qwen2ForCausalLM": "divide-q"}[architecture] \
        if library == "paddlenlp" else "scores"
    zero = None
    if library == "paddleformers" and architecture == "LlamaForCausalLM":
        pad = get("pad_token_id", None)
        zero = int(pad) if isinstance(pad, int) and not isinstance(pad, bool) else None
    return ArchSpec(
        library=library, architecture=architecture, hidden=hidden, heads=heads, kv_heads=kv, head_dim=head_dim,
        eps=float(get("rms_norm_eps", 1e-6)), rotation="interleaved" if architecture == "Ernie4_5ForCausalLM" else "half",
        qk_scale=scale, head_out_in=library == "paddleformers", prefix=prefix, zero_embedding_id=zero,
    ), None
