"""Tiny real PaddleFormers 1.2.0 checkpoints and adapters, built in code (no downloads, CPU only).

Runs only in the second virtualenv (`.venv-formers`: paddlepaddle 3.3.1 + paddleformers 1.2.0), because
paddleformers cannot share a venv with paddlenlp 3.0.0b4. See notes/paddleformers.md for every fact used here.

* Architectures: ``"llama"`` (LlamaForCausalLM), ``"ernie4_5"`` (Ernie4_5ForCausalLM, dense),
  ``"ernie4_5_moe"`` (Ernie4_5_MoeForCausalLM).
* Vocab size and special token ids come from checkpoints/demo-base/config.json, and its tokenizer files are
  copied next to each saved model, so the tokenizer matches.
* ``save_model`` / ``save_lora`` call paddleformers' own ``save_pretrained`` (HF layout safetensors shards).
* ``reference_logits`` / ``reference_lora_logits`` run paddleformers' own forward. ERNIE 4.5 MoE cannot run
  its forward on CPU (GPU-only kernel ``expand_modality_expert_id``), so for ``ernie4_5_moe`` they run inside
  ``cpu_moe_forward()``, which swaps only the MoE block for a dense per-token re-implementation of the same
  routing (softmax gate, top-k on prob + e_score_correction_bias, renormalised weights, shared experts).
* ``hf_to_paddle_state`` / ``load_external`` are a minimal external loader: read the safetensors with numpy,
  undo the transposes, re-fuse ERNIE's qkv/up_gate and ``set_value`` into a model built without random init.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("MKL_DEBUG_CPU_TYPE", "5")  # AMD CPUs: MKL's fast path (see FIELD-NOTES)

import numpy as np  # noqa: E402
import paddle  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEMO_BASE = REPO / "checkpoints" / "demo-base"

ARCHS = ("llama", "ernie4_5", "ernie4_5_moe")
METADATA_FILE = "flex-ckpt.auto_generated.metadata"  # pickle that from_pretrained writes into the folder it reads

_TOKENIZER_FILES = ("tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                    "added_tokens.json", "tokenizer.json")

# Default LoRA targets (re.fullmatch on sublayer names). ERNIE 4.5 has only fused qkv_proj / up_gate_proj in
# memory: ".*q_proj.*" matches nothing there (silently), ".*v_proj.*" matches qkv_proj.
LORA_TARGETS = {
    "llama": (".*q_proj.*", ".*v_proj.*", ".*o_proj.*", ".*down_proj.*", ".*gate_proj.*"),
    "ernie4_5": (".*qkv_proj.*", ".*o_proj.*", ".*up_gate_proj.*", ".*down_proj.*"),
    "ernie4_5_moe": (".*qkv_proj.*", ".*o_proj.*", ".*mlp.up_gate_proj.*", ".*experts.*up_gate_proj.*",
                     ".*down_proj.*"),
}


def copy_tokenizer(dst: Path, src: Path = DEMO_BASE) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, Path(dst) / name)


def _classes(arch: str):
    from paddleformers.transformers import (Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM, Ernie4_5Config,
                                            Ernie4_5ForCausalLM, LlamaConfig, LlamaForCausalLM)

    return {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "ernie4_5": (Ernie4_5Config, Ernie4_5ForCausalLM),
        "ernie4_5_moe": (Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM),
    }[arch]


def tiny_config(arch: str = "llama", **overrides):
    """A tiny config that runs on CPU. ``fuse_rms_norm=False`` is required on CPU (no fused_rms_norm_ext kernel)."""
    demo = json.loads((DEMO_BASE / "config.json").read_text())
    kw = dict(vocab_size=demo["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              bos_token_id=demo.get("bos_token_id"), eos_token_id=demo.get("eos_token_id"),
              pad_token_id=demo.get("pad_token_id"), fuse_rms_norm=False)
    if arch == "llama":
        kw["tie_word_embeddings"] = False  # like the demo base; PretrainedConfig's default would be True
    if arch == "ernie4_5_moe":
        # layer 0 dense, layer 1 MoE; no multi-token-prediction block (default num_nextn_predict_layers=1).
        kw.update(moe_num_experts=4, moe_k=2, moe_intermediate_size=32, moe_num_shared_experts=1,
                  moe_layer_start_index=1, num_nextn_predict_layers=0)
    kw.update(overrides)
    config_cls, _ = _classes(arch)
    return config_cls(**kw)


def build_model(arch: str = "llama", seed: int = 0, scale: float | None = None, **overrides):
    """A tiny model in eval mode. 2-D weights are multiplied by ``scale`` (default 3 for Llama, whose init
    std is 0.02, and 1 for ERNIE, whose ForCausalLM raises the init range to sqrt(0.3333/hidden))."""
    paddle.seed(seed)
    _, model_cls = _classes(arch)
    model = model_cls(tiny_config(arch, **overrides))
    if scale is None:
        scale = 3.0 if arch == "llama" else 1.0
    if scale != 1.0:
        with paddle.no_grad():
            for p in model.parameters():
                if len(p.shape) == 2:
                    p.set_value(p.numpy() * scale)
    model.eval()
    return model


def save_model(model, folder: Path, dtype: str = "float32", tokenizer: bool = True) -> Path:
    """``save_pretrained`` (float32, float16 or bfloat16 on disk). The caller's model is not modified."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if dtype != "float32":
        model = copy.deepcopy(model)
        model.to(dtype=dtype)  # saving half works on CPU; only the forward lacks kernels
    model.save_pretrained(str(folder))
    if tokenizer:
        copy_tokenizer(folder)
    return folder


def lora_config(arch: str, base_ref: str | None = None, r: int = 4, alpha: float = 8, rslora: bool = False,
                targets=None):
    from paddleformers.peft import LoRAConfig

    return LoRAConfig(r=r, lora_alpha=alpha, rslora=rslora, target_modules=list(targets or LORA_TARGETS[arch]),
                      base_model_name_or_path=base_ref, dtype="float32")


def make_lora_model(base_model, arch: str, base_ref: str | None = None, r: int = 4, alpha: float = 8,
                    rslora: bool = False, targets=None, seed: int = 1, std: float = 0.2):
    """paddleformers' LoRAModel on a deep copy of ``base_model``, with non-zero random A and B (B starts at 0)."""
    from paddleformers.peft import LoRAModel

    model = copy.deepcopy(base_model)
    lora = LoRAModel(model, lora_config(arch, base_ref, r, alpha, rslora, targets))
    rng = np.random.default_rng(seed)
    n = 0
    with paddle.no_grad():
        for name, p in lora.model.named_parameters():
            if name.endswith("lora_A") or name.endswith("lora_B"):
                p.set_value(rng.normal(0.0, std, p.shape).astype("float32"))
                n += 1
    if n == 0:
        raise ValueError(f"no LoRA layer matched {targets or LORA_TARGETS[arch]}")
    lora.eval()
    return lora


def save_lora(base_model, folder: Path, base_ref: str | None, arch: str | None = None, r: int = 4,
              alpha: float = 8, rslora: bool = False, targets=None, seed: int = 1, std: float = 0.2) -> Path:
    """A real adapter saved by paddleformers' LoRAModel.save_pretrained:
    peft_model-0000k-of-0000n.safetensors + peft_model.safetensors.index.json + lora_config.json + config.json."""
    arch = arch or arch_of(base_model)
    lora = make_lora_model(base_model, arch, base_ref, r, alpha, rslora, targets, seed, std)
    lora.save_pretrained(str(folder))
    return Path(folder)


def arch_of(model) -> str:
    return model.config.model_type


# ----------------------------------------------------------------------------------------------------------
# Reference forwards (paddleformers' own code)
# ----------------------------------------------------------------------------------------------------------

def _dense_moe_block_forward(self, input, token_type_ids=None, use_dense_expert=False):
    """Per-token MoE on CPU, same routing as MOEAllGatherLayerV2 + TopKGate (text-only, one rank, eval)."""
    orig_shape = input.shape
    x = input.reshape([-1, orig_shape[-1]])
    logits = paddle.nn.functional.linear(x.astype("float32"), self.gate.weight.astype("float32"))  # [S, E]
    prob = self.gate.act(logits)  # softmax over experts (scoring_func="softmax")
    select = prob
    if self.use_correction_bias:  # moe_use_aux_free: bias only picks the experts, weights stay uncorrected
        select = prob + self.moe_statics.e_score_correction_bias[0].detach()
    _, expert_id = select.topk(k=self.k, axis=-1)  # [S, k]
    weight = paddle.take_along_axis(prob, expert_id, axis=-1)
    if self.gate.norm_gate_logits:
        weight = weight / paddle.clip(weight.sum(-1, keepdim=True), min=1e-12)
    weight = weight.astype(x.dtype)
    out = paddle.zeros_like(x)
    for e, expert in enumerate(self.experts):
        if expert is None:
            continue
        w_e = (weight * (expert_id == e).astype(weight.dtype)).sum(-1)  # [S]
        rows = paddle.nonzero(expert_id.equal(e).any(-1)).flatten()
        if rows.shape[0] == 0:
            continue
        y = expert(paddle.gather(x, rows)) * paddle.gather(w_e, rows).unsqueeze(-1)
        out = paddle.index_add(out, rows, 0, y)
    if self.shared_experts is not None:
        out = out + self.shared_experts(x)
    out = out.reshape(orig_shape[:-1] + [out.shape[-1]])
    return out, None, paddle.zeros([1], dtype="float32"), logits


@contextlib.contextmanager
def cpu_moe_forward():
    """Temporarily replace Ernie4_5_MoeSparseMoeBlock.forward with ``_dense_moe_block_forward``.

    paddleformers' own MoE forward fails on CPU with
    ``(NotFound) The kernel `expand_modality_expert_id` is not registered.`` (and later needs the GPU-only
    moe_gate_dispatch ops). Everything else (attention, dense layers, norms, lm_head) stays paddleformers'.
    Token dropping by capacity is not modelled: in eval, capacity = int(moe_capacity[1 or 2] * S // E) >= S
    for E <= 64 (default capacity 64), so nothing is dropped for ERNIE 4.5's 64-expert models.
    """
    from paddleformers.transformers.ernie4_5_moe.modeling import Ernie4_5_MoeSparseMoeBlock

    saved = Ernie4_5_MoeSparseMoeBlock.forward
    Ernie4_5_MoeSparseMoeBlock.forward = _dense_moe_block_forward
    try:
        yield
    finally:
        Ernie4_5_MoeSparseMoeBlock.forward = saved


def _to_tensor(x, dtype):
    return None if x is None else paddle.to_tensor(np.asarray(x), dtype=dtype)


def reference_logits(model, input_ids, attention_mask=None, position_ids=None) -> np.ndarray:
    """float32 logits [B, L, V] from paddleformers' own forward (``return_dict=True``).

    ``attention_mask``: 2-D [B, L] ints/bools or 4-D bool [B, 1, L, L] (True = may attend). A non-bool 4-D mask
    is cast to bool by the CausalLM forward, so never pass an additive float mask.
    """
    ids = _to_tensor(input_ids, "int64")
    mask = None
    if attention_mask is not None:
        m = np.asarray(attention_mask)
        mask = _to_tensor(m.astype(bool) if m.ndim == 4 else m, "bool" if m.ndim == 4 else "int64")
    pos = _to_tensor(position_ids, "int64")
    ctx = cpu_moe_forward() if arch_of(_unwrap(model)) == "ernie4_5_moe" else contextlib.nullcontext()
    with ctx, paddle.no_grad():
        out = model(ids, attention_mask=mask, position_ids=pos, return_dict=True)
    return out.logits.numpy().astype(np.float32)


def _unwrap(model):
    from paddleformers.peft import LoRAModel

    return model.model if isinstance(model, LoRAModel) else model


def load_lora_model(base_model, lora_dir: Path):
    """paddleformers' LoRAModel.from_pretrained on a deep copy of ``base_model``.

    It reads a temporary copy of ``lora_dir``: from_pretrained deletes and rewrites
    ``flex-ckpt.auto_generated.metadata`` in the folder it loads from, and the fixtures are shared read-only.
    """
    from paddleformers.peft import LoRAModel

    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "adapter"
        shutil.copytree(lora_dir, dst)
        lora = LoRAModel.from_pretrained(copy.deepcopy(base_model), str(dst))
    lora.eval()
    return lora


def reference_lora_logits(base_model, lora_dir: Path, input_ids, attention_mask=None, position_ids=None):
    """Logits of base + adapter through paddleformers' own LoRAModel (unmerged LoRALinear forward)."""
    return reference_logits(load_lora_model(base_model, lora_dir), input_ids, attention_mask, position_ids)


def load_pretrained(folder: Path, dtype: str = "float32"):
    """paddleformers' own AutoModelForCausalLM.from_pretrained, on CPU.

    The config is read first so that ``fuse_rms_norm=False`` can be forced (``from_pretrained(...,
    fuse_rms_norm=False)`` raises TypeError: the kwarg reaches the model's __init__). Reads a temporary copy,
    because from_pretrained writes ``flex-ckpt.auto_generated.metadata`` into the folder.
    """
    from paddleformers.transformers import AutoConfig, AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "model"
        shutil.copytree(folder, dst)
        config = AutoConfig.from_pretrained(str(dst))
        config.fuse_rms_norm = False
        model = AutoModelForCausalLM.from_pretrained(str(dst), config=config, dtype=dtype)
    model.eval()
    return model


# ----------------------------------------------------------------------------------------------------------
# A minimal external loader (what paddle-scorer's own loader has to do)
# ----------------------------------------------------------------------------------------------------------

def read_safetensors(folder: Path, index_name: str = "model.safetensors.index.json") -> dict[str, np.ndarray]:
    """All tensors of a sharded safetensors checkpoint as numpy (bf16 comes back as ml_dtypes.bfloat16)."""
    from safetensors.numpy import load_file

    folder = Path(folder)
    index = json.loads((folder / index_name).read_text())
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(folder / shard)))
    return out


_SPLIT_ON_DISK = (".self_attn.q_proj.weight", ".self_attn.k_proj.weight", ".self_attn.v_proj.weight",
                  ".gate_proj.weight", ".up_proj.weight")


def fuse_qkv(q: np.ndarray, k: np.ndarray, v: np.ndarray, num_heads: int, num_kv_heads: int,
             head_dim: int) -> np.ndarray:
    """ERNIE 4.5 qkv_proj in Paddle layout [in, out] from HF q/k/v [out, in] (also works on biases, 1-D).

    Columns are grouped per KV head: for g in range(num_kv_heads): q heads g*G..(g+1)*G-1, then k_g, then v_g
    (G = num_heads // num_kv_heads). Not [Q | K | V].
    """
    if q.ndim == 2:
        q, k, v = q.T, k.T, v.T
    g_size = num_heads // num_kv_heads
    parts = []
    for g in range(num_kv_heads):
        parts += [q[..., g * g_size * head_dim:(g + 1) * g_size * head_dim],
                  k[..., g * head_dim:(g + 1) * head_dim], v[..., g * head_dim:(g + 1) * head_dim]]
    return np.ascontiguousarray(np.concatenate(parts, axis=-1))


def split_qkv(qkv: np.ndarray, num_heads: int, num_kv_heads: int, head_dim: int):
    """Inverse of ``fuse_qkv`` on the last axis: fused [..., (G+2)*kv*hd] -> (q, k, v) in the same layout
    (e.g. a LoRA delta A@B [in, out] of qkv_proj -> the q/k/v deltas, each [in, out_x])."""
    g_size = num_heads // num_kv_heads
    blocks = qkv.reshape(qkv.shape[:-1] + (num_kv_heads, (g_size + 2) * head_dim))
    q = blocks[..., :g_size * head_dim].reshape(qkv.shape[:-1] + (num_heads * head_dim,))
    k = blocks[..., g_size * head_dim:(g_size + 1) * head_dim].reshape(qkv.shape[:-1] + (num_kv_heads * head_dim,))
    v = blocks[..., (g_size + 1) * head_dim:].reshape(qkv.shape[:-1] + (num_kv_heads * head_dim,))
    return q, k, v


def hf_to_paddle_state(disk: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """Map a paddleformers ``save_pretrained`` state (HF names/layout) onto the in-memory state_dict.

    * every 2-D ``*.weight`` except ``*.embed_tokens.weight`` and ``lm_head.weight`` is transposed
      [out,in]->[in,out] (MoE ``mlp.gate.weight`` [E, H] -> [H, E] included; the MoE
      ``mlp.moe_statics.e_score_correction_bias`` [1, E] is not transposed);
    * ERNIE 4.5: q/k/v -> ``qkv_proj`` (``fuse_qkv``) and gate/up -> ``up_gate_proj`` = [gate | up] on axis 1,
      for dense MLPs, every expert and the shared experts;
    * a tied model without ``lm_head.weight`` on disk gets the embedding (ERNIE drops it; Llama saves a copy).
    """
    ernie = config.model_type.startswith("ernie4_5")
    nh, nkv = config.num_attention_heads, config.num_key_value_heads
    hd = getattr(config, "head_dim", None) or config.hidden_size // nh
    out: dict[str, np.ndarray] = {}
    for name, arr in disk.items():
        if ernie and name.endswith(_SPLIT_ON_DISK):
            continue
        arr = np.asarray(arr).astype(np.float32)
        if (arr.ndim == 2 and name.endswith(".weight") and not name.endswith("embed_tokens.weight")
                and name != "lm_head.weight"):
            arr = np.ascontiguousarray(arr.T)
        out[name] = arr
    if ernie:
        for name in disk:
            if name.endswith(".self_attn.q_proj.weight"):
                p = name[: -len("q_proj.weight")]
                out[p + "qkv_proj.weight"] = fuse_qkv(
                    *(np.asarray(disk[p + f"{x}_proj.weight"]).astype(np.float32) for x in "qkv"), nh, nkv, hd)
            elif name.endswith(".gate_proj.weight"):
                p = name[: -len("gate_proj.weight")]
                gate = np.asarray(disk[p + "gate_proj.weight"]).astype(np.float32).T
                up = np.asarray(disk[p + "up_proj.weight"]).astype(np.float32).T
                out[p + "up_gate_proj.weight"] = np.ascontiguousarray(np.concatenate([gate, up], axis=1))
    if config.tie_word_embeddings and "lm_head.weight" not in out:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def build_empty(config):
    """The model class for ``config``, built without paying for random init (paddleformers' own
    ``from_pretrained(low_cpu_mem_usage=True)`` uses the same two contexts)."""
    from paddleformers.transformers import AutoModelForCausalLM  # noqa: F401  (registers the classes)
    from paddleformers.transformers.model_utils import no_init_weights

    arch = config.model_type
    _, model_cls = _classes(arch)
    with no_init_weights(), paddle.LazyGuard():
        model = model_cls(config)
    return model


def load_external(folder: Path):
    """Config from config.json (+ fuse_rms_norm=False), empty model, then set_value every parameter from the
    safetensors read with numpy. Raises on any missing or unused tensor. Returns the model in eval mode."""
    from paddleformers.transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder))
    config.fuse_rms_norm = False
    model = build_empty(config)
    want = hf_to_paddle_state(read_safetensors(folder), config)
    state = model.state_dict()
    missing = sorted(set(state) - set(want))
    unused = sorted(set(want) - set(state))
    if missing or unused:
        raise KeyError(f"missing={missing} unused={unused}")
    for name, p in state.items():
        if tuple(p.shape) != want[name].shape:
            raise ValueError(f"{name}: model {tuple(p.shape)} vs file {want[name].shape}")
        p.set_value(want[name].astype(np.float32))
    model.eval()
    return model
