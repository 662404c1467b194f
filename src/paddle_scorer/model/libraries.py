"""The model libraries that build our models: PaddleNLP 3.0.0b4 (default) and PaddleFormers 1.2.0.

They cannot share a virtualenv (conflicting aistudio-sdk and tokenizers/huggingface-hub pins), so
exactly one is installed; which one a checkpoint needs follows from its architecture. This module is
the only place that knows the differences: which architectures each builds, the module prefix of the
decoder body, fused modules, CPU kernel flags, how to build a model without a random initialisation,
how to attach LoRA, and the KV-cache object. Everything above it (plan, loader, backend, stream)
is library-agnostic.

The spec part (which library, which architectures) imports nothing heavy: ``inspect`` and the plan
use it. The ``build_*`` functions import paddle and the library.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from paddle_scorer.errors import CheckpointError, UnsupportedModelError, UsageError
from paddle_scorer.model.families import ARCHITECTURES, FAMILIES, LIBRARY_FIRST

PADDLENLP = "paddlenlp"
PADDLEFORMERS = "paddleformers"
NATIVE = "paddle-scorer"


@dataclass(frozen=True)
class Arch:
    """One architecture as one library builds it."""

    architecture: str  # config.json "architectures"[0]
    model_type: str
    module: str  # where the classes live
    config_class: str
    model_class: str
    prefix: str  # attribute (and state-dict prefix) of the decoder body
    fused: tuple[str, ...] = ()  # runtime fused modules saved split (ERNIE 4.5: qkv_proj, up_gate_proj)
    cpu_flags: tuple[tuple[str, object], ...] = ()  # config overrides: missing CPU kernels, single-process layers
    gpu_only: str | None = None  # why it cannot run on CPU (MoE kernels)
    lm_head_out_in: bool = False  # the runtime LM head weight is [vocab, hidden] (PaddleFormers), not [hidden, vocab]


@dataclass(frozen=True)
class LibrarySpec:
    name: str  # PADDLENLP | PADDLEFORMERS | NATIVE
    distribution: str
    version_pin: str
    archs: tuple[Arch, ...] = field(default_factory=tuple)
    native: bool = False  # paddle-scorer's own decoder: no model class, CPU only, in every environment

    @property
    def installed(self) -> bool:
        return self.native or importlib.util.find_spec(self.name) is not None

    def arch_for(self, info) -> Arch | None:
        for a in self.archs:
            if info.architecture == a.architecture:
                return a
        if info.architecture is None:
            for a in self.archs:
                if info.model_type == a.model_type:
                    return a
        return None

    def prefix_for(self, info) -> str:
        return self.arch_for(info).prefix

    def fused_for(self, info) -> tuple[str, ...]:
        return self.arch_for(info).fused

    @property
    def architectures(self) -> list[str]:
        return [a.architecture for a in self.archs]

    # ---------------------------------------------------------------- building (imports paddle and the library)

    def check_device(self, info, device: str) -> None:
        arch = self.arch_for(info)
        if self.native and device != "cpu":
            raise CheckpointError(
                f"{info.path}: {arch.architecture} is computed by paddle-scorer's own CPU decoder (no model library here "
                "runs it: PaddleFormers builds it only through paddlefleet, which is not on the package index); "
                "run it with --device cpu."
            )
        if arch.gpu_only and device == "cpu":
            raise CheckpointError(
                f"{info.path}: {arch.architecture} cannot run on CPU: {arch.gpu_only}; run it on a GPU "
                "(--device gpu), or use a dense model for CPU checks."
            )

    def module(self, name: str):
        """This library's submodule ``name`` (``"transformers"``, ``"peft"``, ...), imported quietly."""
        _import_quietly(self.name)
        return importlib.import_module(f"{self.name}.{name}")

    def load_config(self, info, folder: Path, dtype: str, num_layers: int | None = None):
        """The library's config object for ``folder``, with the compute dtype and CPU flags applied."""
        arch = self.arch_for(info)
        config_cls, _ = _classes(arch)
        try:
            config = config_cls.from_pretrained(str(folder))
        except Exception as exc:  # the libraries raise many types on bad configs
            raise CheckpointError(f"{folder}/config.json could not be read by {self.name} ({type(exc).__name__}: "
                                  f"{exc}); fix or re-create it.") from exc
        config.dtype = dtype
        for key, value in arch.cpu_flags:
            setattr(config, key, value)
        if num_layers is not None:
            config.num_hidden_layers = num_layers
        return config

    def no_init_context(self):
        """Build parameters without materialising (or initialising) them: values come from the checkpoint.

        Measured (paddlenlp 3.0.0b4, 220M-parameter Llama): eager build 20 s of random initialisation that
        is then overwritten; under ``no_init_weights`` + ``paddle.LazyGuard`` 0.06 s, and each parameter is
        materialised by its ``set_value`` (same logits, max |delta| 0.0).
        """
        import contextlib

        from paddle_scorer.process.environment import paddle

        pd = paddle()
        stack = contextlib.ExitStack()
        stack.enter_context(self.module("transformers.model_utils").no_init_weights(_enable=True))
        stack.enter_context(pd.LazyGuard())
        return stack

    def build_skeleton(self, info, config):
        """The model with parameters declared but not allocated (see :meth:`no_init_context`)."""
        arch = self.arch_for(info)
        _, model_cls = _classes(arch)
        try:
            with self.no_init_context():
                model = model_cls(config)
        except (AssertionError, ValueError, TypeError, ZeroDivisionError, KeyError, AttributeError) as exc:
            raise CheckpointError(
                f"{info.path}/config.json does not describe a buildable {arch.architecture} ({type(exc).__name__}: "
                f"{exc or 'assertion failed'}); check hidden_size, num_attention_heads, num_key_value_heads and "
                "intermediate_size."
            ) from exc
        model.eval()
        return model

    def attach_lora(self, model, modules: list[str], settings, dtype: str):
        """Wrap ``model`` with the library's own ``LoRAModel`` on exactly ``modules``; values are set by the caller."""
        peft = self.module("peft")
        # a peft adapter's pairs carry their module's scaling (rank padded): scaling 1 = alpha / r with alpha = r
        r, alpha, rslora = (settings.pair_rank, float(settings.pair_rank), False) if settings.peft is not None else \
            (settings.r, settings.lora_alpha, settings.rslora)
        config = peft.LoRAConfig(
            r=r, lora_alpha=alpha, rslora=rslora,
            target_modules=[re.escape(m) for m in sorted(modules)], dtype=dtype, lora_dropout=0.0,
            merge_weights=False,
        )
        lora_model = peft.LoRAModel(model, config)
        lora_model.eval()
        lora_model.model.eval()
        return lora_model



# PaddleFormers 1.2.0 reads fuse_rms_norm (default True: `fused_rms_norm_ext is not registered` on CPU); the
# PaddleNLP-era flags (use_flash_attention, fuse_attention_qkv, fuse_linear, ...) are not read by its models.
# A config saved from a tensor-parallel run keeps tensor_model_parallel_size > 1, which builds parallel layers
# that need a process group: we score in one process on full tensors (flex-checkpoint saves gather them).
_PF_CPU = (("fuse_rms_norm", False), ("tensor_model_parallel_size", 1), ("sequence_parallel", False))

LIBRARIES: tuple[LibrarySpec, ...] = (
    LibrarySpec(PADDLENLP, "paddlenlp", "paddlenlp==3.0.0b4", (
        Arch("LlamaForCausalLM", "llama", "paddlenlp.transformers", "LlamaConfig", "LlamaForCausalLM", "llama"),
        Arch("Qwen2ForCausalLM", "qwen2", "paddlenlp.transformers", "Qwen2Config", "Qwen2ForCausalLM", "qwen2"),
    )),
    LibrarySpec(PADDLEFORMERS, "paddleformers", "paddleformers==1.2.0", (
        Arch("LlamaForCausalLM", "llama", "paddleformers.transformers", "LlamaConfig", "LlamaForCausalLM", "model",
             cpu_flags=_PF_CPU, lm_head_out_in=True),
        Arch("Ernie4_5ForCausalLM", "ernie4_5", "paddleformers.transformers", "Ernie4_5Config",
             "Ernie4_5ForCausalLM", "model", fused=("qkv_proj", "up_gate_proj"), cpu_flags=_PF_CPU,
             lm_head_out_in=True),
        Arch("Ernie4_5_MoeForCausalLM", "ernie4_5_moe", "paddleformers.transformers", "Ernie4_5_MoeConfig",
             "Ernie4_5_MoeForCausalLM", "model", fused=("qkv_proj", "up_gate_proj"), cpu_flags=_PF_CPU,
             lm_head_out_in=True,
             gpu_only="its mixture-of-experts layers need a GPU-only kernel (`expand_modality_expert_id is not "
                      "registered` in PaddleFormers 1.2.0)"),
    )),
    # paddle-scorer's decoder (model/families.py): the models neither library runs on a CPU; on a GPU the library
    # that builds one (ERNIE 4.5 MoE: PaddleFormers) is chosen instead.
    LibrarySpec(NATIVE, "paddle-scorer", "", tuple(
        Arch(arch, family, "", "", "", "model", fused=FAMILIES[family].fused, lm_head_out_in=True)
        for arch, family in ARCHITECTURES.items()), native=True),
)


def spec(name: str) -> LibrarySpec:
    for lib in LIBRARIES:
        if lib.name == name:
            return lib
    raise UsageError(f"unknown model library {name!r}; use {' or '.join(x.name for x in LIBRARIES)}.")


def prefixes_of(architecture: str) -> set[str]:
    """The decoder-body prefixes every library gives ``architecture`` (adapter keys may carry any of them)."""
    return {a.prefix for lib in LIBRARIES for a in lib.archs if a.architecture == architecture}


def paddle_layout_prefixes() -> frozenset[str]:
    """Tensor-name prefixes only PaddleNLP writes (``llama``, ``qwen2``): names that say "Paddle layout"."""
    return frozenset(a.prefix for a in spec(PADDLENLP).archs) - {"model"}


def _arch_name(info) -> str:
    return info.architecture or f"model_type {info.model_type!r}"


def supported_sentence() -> str:
    libs = [lib for lib in LIBRARIES if not lib.native]
    from paddle_scorer.model.families import TITLES

    return ("; ".join(f"{lib.name} builds {', '.join(lib.architectures)}" for lib in libs)
            + f"; paddle-scorer's own CPU decoder computes {', '.join(TITLES.values())}")


def _causal(name: str) -> bool:
    return name.endswith(("ForCausalLM", "LMHeadModel", "ForCausalLMDeprecated"))


def check_buildable(info) -> None:
    """Refuse an architecture nothing here computes: a causal LM not supported yet (exit 7, naming what is), or a
    model that is not a causal LM at all (a classifier head: exit 4)."""
    if any(lib.arch_for(info) for lib in LIBRARIES):
        return
    name = _arch_name(info)
    if info.architecture and not _causal(info.architecture):
        raise CheckpointError(
            f"{info.path}: {name} is not a causal language model (paddle-scorer scores the next-token distribution of "
            f"a ...ForCausalLM); pass the causal LM it was fine-tuned from ({supported_sentence()})."
        )
    raise UnsupportedModelError(
        f"{info.path}: {name} is not supported yet; paddle-scorer runs {supported_sentence()} (docs/checkpoints.md)."
    )


def _family(info, candidates) -> str | None:
    native = next((c for c in candidates if c.native), None)
    return native.arch_for(info).model_type if native is not None else None


def declared_differs(lib: LibrarySpec, info) -> str | None:
    """Why ``lib`` would compute something other than config.json declares (the family module's reading), or None."""
    if lib.native:
        return None
    from paddle_scorer.model import families

    return families.library_differs(lib.name, families.family_of(info.architecture, info.model_type),
                                    info.raw_config, str(info.path))


def choose(info, layout=None, requested: str | None = None, device: str | None = None) -> LibrarySpec:
    """The installed library that builds this architecture and computes what its config.json declares (PaddleNLP
    preferred when both could); paddle-scorer's own decoder for the families only it runs on a CPU (unless ``device``
    is ``gpu`` and a library builds them there), and for a Llama or Qwen2 whose declared settings no installed
    library computes (:func:`declared_differs`): on a GPU that is refused, never computed otherwise."""
    check_buildable(info)
    candidates = [lib for lib in LIBRARIES if lib.arch_for(info) is not None]
    family = _family(info, candidates)
    if requested is not None:
        lib = spec(requested)
        if lib not in candidates:
            raise UsageError(f"{lib.name} cannot build {_arch_name(info)} ({supported_sentence()}).")
        why = declared_differs(lib, info) if lib.installed else None
        if why:
            raise UnsupportedModelError(f"{info.path}: {why}; leave out --library {lib.name}: paddle-scorer's decoder "
                                        "computes what config.json declares (on a CPU).")
        candidates = [lib]
    elif family in LIBRARY_FIRST:
        libs = [c for c in candidates if not c.native and c.installed]
        good = [c for c in libs if not declared_differs(c, info)]
        if good:
            candidates = good
        elif libs and device == "gpu":
            raise UnsupportedModelError(
                f"{info.path}: {declared_differs(libs[0], info)}, and only paddle-scorer's CPU decoder computes it as "
                "declared: run it with --device cpu (or fix config.json if the library's reading is what you meant).")
        else:
            candidates = [c for c in candidates if c.native]
    elif len(candidates) > 1 and any(c.native for c in candidates):
        gpu = device == "gpu" and any(not c.native and c.installed for c in candidates)
        candidates = [c for c in candidates if c.native != gpu]
    installed = [lib for lib in candidates if lib.installed]
    if not installed:
        need = candidates[0]
        other = [lib.name for lib in LIBRARIES if lib.installed]
        raise CheckpointError(
            f"{info.path}: {_arch_name(info)} is built by {need.name}, which is not installed in this environment"
            + (f" (it has {', '.join(other)})" if other else "")
            + f"; {need.name} cannot share a virtualenv with the other library: create one with "
            f"`pip install -e '.[cpu,{'formers' if need.name == PADDLEFORMERS else 'nlp'}]'` (README, install)."
        )
    return installed[0]


def decoder_reason(info) -> str | None:
    """Why a Llama or Qwen2, which a library also builds, is computed by paddle-scorer's decoder (for notes)."""
    candidates = [lib for lib in LIBRARIES if lib.arch_for(info) is not None]
    libs = [c for c in candidates if not c.native and c.installed]
    if not libs:
        names = sorted({c.name for c in candidates if not c.native})
        return f"{' and '.join(names) or 'no library'} builds it, and none is installed here" if names else None
    return declared_differs(libs[0], info)


def likely(info) -> LibrarySpec | None:
    """The library that would build this architecture here on a CPU (:func:`choose`), for reports; None if none
    can."""
    try:
        return choose(info, device="cpu")
    except Exception:  # noqa: BLE001 - a report names what it can; loading says why not
        candidates = sorted((lib for lib in LIBRARIES if lib.arch_for(info) is not None), key=lambda lib: not lib.native)
        return next((lib for lib in candidates if lib.installed), candidates[0] if candidates else None)


def tokenizer_library() -> LibrarySpec:
    """The installed model library whose AutoTokenizer reads a checkpoint's tokenizer files (any will do: the files
    are HF's formats); the decoder's families have no library of their own."""
    for lib in LIBRARIES:
        if not lib.native and lib.installed:
            return lib
    from paddle_scorer.errors import SetupError

    raise SetupError("neither PaddleNLP nor PaddleFormers is installed, and one of them reads the tokenizer: install "
                     "one (pip install -e '.[cpu,nlp]' or '.[cpu,formers]', README, install).")


# --------------------------------------------------------------------------------------------------
# Building (imports paddle and the library)
# --------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _import_quietly(top: str):
    """Import a model library once with its import-time banners captured (PaddleFormers prints "PyTorch was
    not found..." and a compatibility warning on every import) and its own logger set to errors only
    (it logs INFO lines for every config read and LoRA wrap). Handlers the import created on the captured
    stream get the real stderr back, so later errors still show."""
    import contextlib
    import io
    import logging
    import sys

    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(buf):
        importlib.import_module(top)
        log = importlib.import_module(f"{top}.utils.log")
    for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for h in getattr(lg, "handlers", []):
            if getattr(h, "stream", None) is buf:
                h.setStream(sys.stderr)
    log.logger.set_level("ERROR")


def _classes(arch: Arch):
    _import_quietly(arch.module.split(".")[0])
    mod = importlib.import_module(arch.module)
    return getattr(mod, arch.config_class), getattr(mod, arch.model_class)


def body_and_head(model):
    """The decoder body and the LM head of a causal LM (inside a LoRAModel wrapper, if any)."""
    net = model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "lm_head"):
        net = inner
    prefix = getattr(net, "base_model_prefix", None)
    body = getattr(net, prefix, None) if prefix else None
    if body is None:
        body = getattr(net, "model", None)
    head = getattr(net, "lm_head", None)
    if body is None or head is None:
        raise CheckpointError(f"{type(net).__name__} has no decoder body + lm_head; only causal LMs are supported.")
    return net, body, head


def select_cache_rows(cache, index):
    """KV cache of the rows ``index`` (a paddle int64 tensor): tuples per layer (PaddleNLP) or a
    ``DynamicCache`` (PaddleFormers)."""
    from paddle_scorer.process.environment import paddle

    pd = paddle()
    if isinstance(cache, (list, tuple)):
        return [tuple(pd.index_select(t, index, axis=0) for t in layer) for layer in cache]
    if hasattr(cache, "get_seq_length"):  # PaddleFormers' DynamicCache: a new cache, the original untouched
        rows = index.numpy().tolist()
        return type(cache)(ddp_cache_data=[(k[rows], v[rows]) for k, v, *_ in cache])
    raise TypeError(f"unsupported KV cache type {type(cache).__name__}")
