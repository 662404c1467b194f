"""paddle-scorer's float32 CPU decoder: the forward of the architectures it computes, written out in numpy on the
self-checked GEMM kernel (:mod:`paddle_scorer.compute.gemm`). One module per building block: the architecture spec,
weights, rotary tables, the batch layout and KV cache, element-wise ops, the forward."""

from paddle_scorer.compute.decoder.batch import KV, MASKED, Batch, keep_from_mask, real_lengths  # noqa: F401
from paddle_scorer.compute.decoder.forward import ATTENTION_ROWS, Forward  # noqa: F401
from paddle_scorer.compute.decoder.ops import rms_norm, rotate, silu_mul  # noqa: F401
from paddle_scorer.compute.decoder.family_layers import LazyExperts, make_family_layer, norm_weight  # noqa: F401
from paddle_scorer.compute.decoder.rope import (  # noqa: F401
    ContextLimit,
    DualRope,
    NativeRope,
    Rope,
    find_rotary,
    native_rope,
    rotary_is_dynamic,
)
from paddle_scorer.compute.decoder.spec import ArchSpec, spec_for, spec_for_family  # noqa: F401
from paddle_scorer.compute.decoder.threads import PARALLEL_ELEMENTS, parallel_rows  # noqa: F401
from paddle_scorer.compute.decoder.weights import (  # noqa: F401
    LINEARS,
    Layer,
    Linear,
    Outside,
    UnsupportedWeights,
    make_layer,
)
