"""4-bit weights on the CPU, in llama.cpp's Q4_1 block format, for decode's products.

Decode reads every weight once per token, so on a CPU its speed is the memory
bandwidth divided by the weight bytes. The ``smollm2`` model ships as a Q4_1
GGUF (llama.cpp's format: blocks of 32 weights along the input dimension,
each ``w = d * q + m`` with ``q`` in 0..15 and fp16 ``d``, ``m``;
ggml-quants.c), which transformers dequantises to float32 on load: 6.4x the
bytes the file holds (32 bits a weight against 4 + 32 / 32). :class:`Int4Linear` stores a Linear layer the way the file
does and multiplies with one of two kernels (``Int4Linear.kernel``):

* ``q4_1``: our own AVX2 kernel (``csrc/blocks_matmul.cpp``, built on first use
  with torch's C++ extension loader: :mod:`.kernels`).
  It reads llama.cpp's own 20-byte ``block_q4_1`` (fp16 ``d`` and ``m``, 16
  bytes of nibbles), so it multiplies with the file's exact weights, and
  rounds each block of 32 activations to int16 (at most half of
  ``max|x| / 32767`` off an element: 256x finer than llama.cpp's int8
  activations, and finer than bfloat16); the products are integer sums, scaled
  and added in float32. A row of activations with a non-finite value gives NaN
  outputs. 1.9-2.0x faster than ``torch`` over SmolLM2's 210 decoder shapes
  (docs/benchmarks.md section 12e). Needs an x86 CPU with AVX2/FMA/F16C and a
  C++ compiler (g++ and ninja) the first time; ``INFMLLM_CPU_KERNELS=0`` turns it off.
* ``torch``: ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (torch >= 2.6; the
  kernel torchao's int4 CPU layout uses), whose blocks are
  ``w = (q - 8) * scale + zero``: the same grid with ``scale = d`` and
  ``zero = m + 8 d``, but with scale and zero in bfloat16 (a weight moves by a
  fraction of its block's step, at most 4.6% of a step on SmolLM2-135M) and
  activations and output in bfloat16. The fallback where ``q4_1`` cannot be
  built or run (other CPUs, no compiler).

:func:`quantize_int4` finds each block's grid from the float weights alone:
min-max asymmetric rounding over groups of 32, which is how Q4_1 is made. On
weights dequantised from a Q4_1 file it gives back the file's own integers
exactly (each block's smallest weight is ``q = 0``, its largest ``q = 15``;
``Int4Linear.grid_error`` is 0.0), and the file's fp16 ``d`` and ``m`` (so
``Int4Linear.max_error`` is 0.0 with ``q4_1``). Perplexity token by token:
docs/benchmarks.md sections 12 and 12e. On other float weights it is
round-to-nearest 4-bit quantisation, with the error that brings.

The 4-bit blocks serve products of at most :data:`INT4_MAX_ROWS` rows (decode's
matrix-vector products, bound by reading the weights); longer ones (prefill
chunks) use the float weights, because float32 GEMM reads the weights once for
all rows and computes faster (docs/benchmarks.md section 12). So the float
weights stay in memory; the 4-bit copy adds 5 bits a weight (5/32 of float32
weights, 5/16 of half ones).

The LM head stays out of the 4-bit blocks (its GGUF type is Q8_0); with a
float32 model it gets a float16 copy for decode instead (:class:`Float16Head`:
half the bytes of the step's largest read, +10% decode tokens/s at one thread
on SmolLM2-135M), adding 16 bits a weight of the head.
"""

from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import NamedTuple, Optional

import torch

from .kernels import cpu_kernels_status

_JOIN_LOCK = threading.Lock()

#: Weights per block along the input dimension: Q4_1's block size.
GROUP_SIZE = 32

#: The kernel packs output rows in tiles of 16: other widths stay float.
OUT_MULTIPLE = 16

#: ``auto`` (``lossless_only``) takes a layer only if its integers are the file's own and the kernel's
#: bfloat16 scale and zero move no weight by more than this share of its block's step.
MAX_ERROR_STEPS = 0.25

#: Most rows (tokens) a product sends through the int4 kernel; more use the float weights.
#: Measured over SmolLM2's 210 decoder Linears, one thread: int4 2.1x faster at 1 row, 1.3x at 8,
#: slower from 16 (float32 GEMM reads the weights once for all rows).
INT4_MAX_ROWS = 8


#: The kernels an Int4Linear can multiply with; ``auto`` takes ``q4_1`` where it builds, else ``torch``.
INT4_KERNELS = ("auto", "q4_1", "torch")


def int4_kernels(model: torch.nn.Module) -> list[str]:
    """The int4 kernels ``model``'s :class:`Int4Linear` layers use, sorted (``[]``: none is int4)."""
    return sorted({m.kernel for m in model.modules() if isinstance(m, Int4Linear)})


def resolve_int4_kernel(kernel: str = "auto") -> str:
    """``auto`` -> ``q4_1`` where :func:`~.kernels.cpu_kernels_status` says it works, else ``torch``.

    Raises:
        ValueError: an unknown name, or the kernel asked for (or, for ``auto``, both) cannot run here.
    """
    if kernel not in INT4_KERNELS:
        raise ValueError(f"int4 kernel must be one of {INT4_KERNELS}, got {kernel!r}")
    torch_missing = (f"torch's int4 CPU kernel (_weight_int4pack_mm_for_cpu) needs torch >= 2.6; "
                     f"this is torch {torch.__version__}")
    if kernel == "torch":
        if not _torch_int4_available():
            raise ValueError(torch_missing)
        return kernel
    built, reason = cpu_kernels_status()
    if built:
        return "q4_1"
    if kernel == "q4_1" or not _torch_int4_available():
        raise ValueError(f"the q4_1 int4 kernel cannot run here: {reason}"
                         + ("" if kernel == "q4_1" else f"; and {torch_missing}"))
    return "torch"


def _torch_int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def int4_kernel_available(device: Optional[torch.device] = None) -> bool:
    """Whether an int4 kernel runs here (and, given a ``device``, whether it is the CPU): torch's, or ours
    (:func:`~.kernels.cpu_kernels_status`, tried only where torch's is missing)."""
    return (device is None or device.type == "cpu") and (_torch_int4_available() or cpu_kernels_status()[0])


class _FewRowCopy(torch.nn.Module):
    """What Int4Linear and Float16Head share: a float ``nn.Linear``'s weight and bias, and a lower-precision
    copy of the weight that serves products of at most ``max_rows`` rows."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.max_rows = INT4_MAX_ROWS  # 0: every product takes the float weight (see float_weights)

    def takes_copy(self, x: torch.Tensor) -> bool:
        """Whether ``x`` goes to the copy: few rows, and what nn.Linear would take. Long inputs, and inputs
        nn.Linear would refuse (another dtype, another width), take the float weight: the same result or
        the same error as the float layer, whatever the row count."""
        return (x.numel() <= self.max_rows * self.in_features and x.dtype == self.weight.dtype
                and x.shape[-1] == self.in_features)

    def float_forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def _as_output(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A kernel's ``[rows, out]`` product of ``x`` as ``nn.Linear`` returns it: ``x``'s dtype and leading
        shape, the bias added."""
        if y.dtype != x.dtype:  # (a no-op conversion still costs a dispatch, 7 products a layer)
            y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


def _kernel_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[..., in]`` as a kernel takes it: ``[rows, in]``, contiguous, in ``dtype`` (bfloat16 for torch's
    int4 kernel, float32 for ours)."""
    if x.dtype == dtype and x.is_contiguous():  # decode's usual case: one view, no no-op calls
        return x.view(-1, x.shape[-1])
    return x.reshape(-1, x.shape[-1]).to(dtype).contiguous()


class _Fit(NamedTuple):
    """How one kernel's block scales hold a layer's weights (:meth:`Int4Linear._scales`)."""

    scales: torch.Tensor  # [out, blocks, 2]: fp16 d, m (q4_1) or bfloat16 scale, zero (torch)
    max_error: float  # largest |weight used - float weight|
    max_error_steps: float  # the same, per block in units of its step
    rounding_steps: float  # the part the scales' own rounding adds, in steps
    holds: bool  # finite, and (q4_1) no step float16 keeps too few bits of


class Int4Linear(_FewRowCopy):
    """A Linear layer with a 4-bit copy of its weight, in blocks of 32, for few-row products.

    Built from a float ``nn.Linear`` with ``in_features`` a multiple of 32 and
    ``out_features`` a multiple of 16, whose weight (and bias) it shares. The
    4-bit copy is made then: weights changed afterwards are not seen by it
    (quantize after loading). For inference (no gradient through the kernel).
    ``forward`` takes ``[..., in_features]`` in the layer's dtype (as
    ``nn.Linear``) and returns ``[..., out_features]`` in that dtype: up to
    ``max_rows`` rows (:data:`INT4_MAX_ROWS`) through the 4-bit kernel, more
    through the float weight.

    Args:
        linear: the float layer.
        kernel: ``auto``, ``q4_1`` or ``torch`` (module docstring; :func:`resolve_int4_kernel`).

    Attributes:
        kernel: the kernel in use, ``q4_1`` or ``torch``.
        blocks: (``q4_1``) ``[out, in / 32, 20]`` uint8, llama.cpp's ``block_q4_1`` per block.
        packed, scale_and_zero: (``torch``) the kernel's packed layout of the ``[out, in]``
            integers 0..15, and ``[in / 32, out, 2]`` bfloat16 ``scale`` and ``zero`` per block
            so that ``w = (q - 8) * scale + zero``.
        grid_error: largest ``|q * scale + low - w|`` with float32 scales, in the
            weight's units: 0.0 when the weight was already on a Q4_1 grid.
        max_error: largest difference between the weights the kernel multiplies with (fp16 ``d``
            and ``m`` for ``q4_1``, bfloat16 scale and zero for ``torch``) and the float ones.
        max_error_steps: the same, per block in units of that block's step.

    Raises:
        ValueError: widths the blocks do not divide; ``kernel`` unknown or ``q4_1`` unavailable.
    """

    def __init__(self, linear: torch.nn.Linear, kernel: str = "auto"):
        super().__init__(linear)
        weight = linear.weight.detach().float()
        out_features, in_features = weight.shape
        if in_features % GROUP_SIZE or out_features % OUT_MULTIPLE:
            raise ValueError(f"int4 needs in_features divisible by {GROUP_SIZE} and out_features by "
                             f"{OUT_MULTIPLE}, got {in_features} -> {out_features}")
        chosen = resolve_int4_kernel(kernel)
        blocks = weight.view(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        low = blocks.amin(-1)
        scale = (blocks.amax(-1) - low) / 15  # 0 for a constant block: every q is 0, w = zero = low
        divisor = torch.where(scale > 0, scale, 1.0)
        q = torch.round((blocks - low[..., None]) / divisor[..., None]).clamp_(0, 15)
        self.grid_error = float((q * scale[..., None] + low[..., None] - blocks).abs().max())
        # With auto, each layer takes the kernel whose scales hold its weights more exactly: q4_1's fp16
        # is finer than bfloat16 for weights like a model's, but overflows past 65504 and coarsens
        # below 6e-5 (subnormal), where bfloat16 keeps float32's range.
        candidates = [chosen] + (["torch"] if kernel == "auto" and chosen == "q4_1" and _torch_int4_available()
                                 else [])
        fits = {name: self._scales(name, q, scale, low, blocks, divisor) for name in candidates}
        # the first (q4_1) on a tie; one whose scales cannot hold the weights only if no other can
        held = [name for name in candidates if fits[name].holds] or candidates
        self.kernel = min(held, key=lambda name: fits[name].rounding_steps)
        fit = fits[self.kernel]
        self.max_error, self.max_error_steps = fit.max_error, fit.max_error_steps
        if not fit.holds:
            raise ValueError(f"int4 kernel {self.kernel}: the block scales do not fit its "
                             f"{'float16' if self.kernel == 'q4_1' else 'bfloat16'} (weights "
                             f"{float(weight.abs().min()):.3g} to {float(weight.abs().max()):.3g} in size: beyond "
                             f"its range, or block steps below float16's normal range); use kernel auto or torch, "
                             f"or keep this layer float")
        if self.kernel == "q4_1":
            nibbles = q.to(torch.uint8)
            nibbles = nibbles[..., :GROUP_SIZE // 2] | (nibbles[..., GROUP_SIZE // 2:] << 4)
            self.register_buffer("blocks", torch.cat([fit.scales.view(torch.uint8), nibbles], -1).contiguous())
        else:
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                q.view(out_features, in_features).to(torch.int32), 1))
            self.register_buffer("scale_and_zero", fit.scales.transpose(0, 1).contiguous())

    @staticmethod
    def _scales(kernel: str, q: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, blocks: torch.Tensor,
                divisor: torch.Tensor) -> _Fit:
        """``kernel``'s per-block scales (fp16 ``d, m`` for q4_1, bfloat16 ``scale, zero`` for torch); the
        largest error of the weights they give, from the float weights and in units of the block's step;
        the largest error in steps that their rounding alone adds (to the grid with float32 scales); and
        whether they hold the weights at all: finite, and for q4_1 no nonzero step below float16's
        smallest normal number (2^-14) that float16 does not hold exactly (there it keeps too few bits)."""
        if kernel == "q4_1":
            scales = torch.stack([scale, low], -1).to(torch.float16)
            used = q * scales[..., :1].float() + scales[..., 1:].float()  # inf where float16 overflows
        else:
            scales = torch.stack([scale, low + 8 * scale], -1).to(torch.bfloat16)
            used = (q - 8) * scales[..., :1].float() + scales[..., 1:].float()

        def in_steps(error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            error = torch.where(error.isnan(), math.inf, error)  # (nan_to_num would make inf the largest float)
            # a constant block has no step: exact (0) or infinitely far
            return error, torch.where(scale > 0, error / divisor, torch.where(error > 0, math.inf, 0.0))

        error, steps = in_steps((used - blocks).abs().amax(-1))
        _, rounding = in_steps((used - (q * scale[..., None] + low[..., None])).abs().amax(-1))
        holds = math.isfinite(float(error.max()))
        if kernel == "q4_1":
            coarse = (scale > 0) & (scale < 2.0 ** -14) & (scales[..., 0].float() != scale)  # (a file's own are exact)
            holds = holds and not bool(coarse.any())
        return _Fit(scales, float(error.max()), float(steps.max()), float(rounding.max()), holds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Called 7 times per layer per decoded token: as few tensor calls as the kernel allows.
        if not self.takes_copy(x):
            return self.float_forward(x)
        return self._product(self._rows(x), x)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        return _kernel_rows(x, torch.float32 if self.kernel == "q4_1" else torch.bfloat16)

    def _product(self, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The 4-bit product of ``rows`` (``x`` as ``[rows, in]``, :meth:`_rows`), shaped and typed as ``x``."""
        if self.kernel == "q4_1":
            y = torch.ops.infmllm.q4_1_matmul.default(rows, self.blocks)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP_SIZE, self.scale_and_zero)
        return self._as_output(y, x)

    @staticmethod
    def forward_siblings(layers: tuple[torch.nn.Module, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``tuple(layer(x) for layer in layers)``, the same bits, with ``x`` converted once.

        For the projections that read one input (q/k/v; an MLP's gate and up): when every layer is an
        Int4Linear (its own ``forward``, no forward hooks) on the same kernel that sends ``x`` to its
        4-bit copy, the input's conversion (to bfloat16 for ``torch``) is shared; otherwise each layer
        is called as usual.
        """
        if (not layers or len({getattr(layer, "kernel", None) for layer in layers}) > 1
                or not all(type(layer).forward is _INT4_FORWARD and "forward" not in vars(layer) and layer.takes_copy(x)
                           and not (layer._forward_hooks or layer._forward_pre_hooks) for layer in layers)):
            return tuple(layer(x) for layer in layers)
        rows = layers[0]._rows(x)
        return tuple(layer._product(rows, x) for layer in layers)

    @staticmethod
    def joined_blocks(layers: tuple["Int4Linear", ...]) -> torch.Tensor:
        """The ``q4_1`` blocks of ``layers`` as one ``[sum of out, in / 32, 20]`` tensor whose consecutive row
        ranges are each layer's own ``blocks``, in order: one kernel call then computes all their products
        (each output row exactly as its layer alone computes it), as the projections that read one input
        (q/k/v; gate and up) do in a decode step (``csrc/decode_layer.cpp``).

        The first call moves the layers' blocks into one tensor and makes each layer's ``blocks`` buffer a
        view of its rows (the same bytes, no second copy); later calls find them joined and return that
        memory again.

        Raises:
            ValueError: a layer is not on the ``q4_1`` kernel, or the layers' inputs differ.
        """
        if not layers or any(getattr(layer, "kernel", None) != "q4_1" for layer in layers):
            raise ValueError("joined blocks need Int4Linear layers on the q4_1 kernel")
        with _JOIN_LOCK:  # two streams built at once on one model must not each re-home the same blocks
            return Int4Linear._join(layers)

    @staticmethod
    def _join(layers: tuple["Int4Linear", ...]) -> torch.Tensor:
        blocks = [layer.blocks for layer in layers]
        if len({b.shape[1:] for b in blocks}) != 1:
            raise ValueError(f"the layers read different inputs: {[tuple(b.shape) for b in blocks]}")
        first, rows = blocks[0], sum(b.shape[0] for b in blocks)
        offset = first.storage_offset()
        joined = all(b.is_contiguous() for b in blocks)
        for b in blocks:
            joined = joined and b.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() \
                and b.storage_offset() == offset
            offset += b.numel()
        if joined:
            return first.as_strided((rows, *first.shape[1:]), first.stride())
        with torch.inference_mode(False):  # plain tensors, usable outside inference mode like the ones they replace
            together = torch.cat(blocks)
        start = 0
        for layer, b in zip(layers, blocks):
            layer.blocks = together[start:start + b.shape[0]]
            start += b.shape[0]
        return together

    @property
    def lossless(self) -> bool:
        """The file's own integers (``grid_error`` 0) and the kernel within :data:`MAX_ERROR_STEPS` of them."""
        return self.grid_error == 0.0 and self.max_error_steps <= MAX_ERROR_STEPS

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={GROUP_SIZE}, "
                f"kernel={self.kernel}")


#: Int4Linear's own forward, as defined here: one replaced since (on the class or an instance) is called, not
#: bypassed by :meth:`Int4Linear.forward_siblings`
_INT4_FORWARD = Int4Linear.forward


class Float16Head(_FewRowCopy):
    """The LM head with a float16 copy of its weight, for few-row products (decode's next-token logits).

    With the decoder Linears in 4 bits, the float32 LM head (vocabulary x
    hidden, tied to the embeddings) is the largest read of a decode step:
    113 MB a token for SmolLM2-135M, a fifth of its time (docs/benchmarks.md
    section 12). Its GGUF type is Q8_0 (ggml-quants.c: int8 ``q`` times an
    fp16 scale ``d`` per block of 32), which no CPU kernel in torch reads
    block by block; float16 halves the bytes and rounds each weight by at most
    2^-11 of itself, at most 0.062 of its Q8_0 step (``|q| <= 127``), finer
    than the bfloat16 activations the int4 layers already take. Up to
    ``max_rows`` rows (:data:`INT4_MAX_ROWS`) multiply in float16 (activations
    rounded to float16, logits returned in float32); more rows, or a product
    that overflows float16, use the float weight. The float16 copy is made when
    the head is built: weights changed afterwards are not seen by it.

    Args:
        linear: a float32 ``nn.Linear`` whose weight (and bias) the head shares.

    Raises:
        ValueError: the weight is not float32 or does not fit float16.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear)
        if linear.weight.dtype != torch.float32:
            raise ValueError(f"a float16 LM head is made from float32 weights, got {linear.weight.dtype}")
        half = linear.weight.detach().to(torch.float16)
        if not torch.isfinite(half).all():
            raise ValueError("the LM head's weights are not all finite in float16 (|w| > 65504, or NaN/inf)")
        self.register_buffer("half_weight", half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.takes_copy(x):
            y = torch.nn.functional.linear(x.to(torch.float16), self.half_weight).to(x.dtype)
            if torch.isfinite(y).all():  # on the CPU (int4's device) this costs no device sync
                return y if self.bias is None else y + self.bias
        return self.float_forward(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, float16 for <= {self.max_rows} rows"


class Q8_0Head(_FewRowCopy):
    """The LM head with its weight in llama.cpp's Q8_0 blocks, for few-row products through the q4_1 kernels.

    The ``smollm2`` GGUF stores the head (tied to the embeddings) as Q8_0
    (ggml-quants.c: blocks of 32 weights along the input dimension, int8 ``q``
    in -127..127 times an fp16 ``d``), 34 bytes a block against 64 for a float16
    copy (:class:`Float16Head`). Built only from weights already on such a grid
    (dequantised from the file): each block's ``d = max|w| / 127`` in fp16 gives
    back every weight exactly, so its products are the file's weights times the
    activations rounded to int16 per block (as :class:`Int4Linear`'s q4_1
    kernel; ``csrc/blocks_matmul.cpp``), summed in float32. Up to ``max_rows``
    rows (:data:`INT4_MAX_ROWS`) go to the blocks, more to the float weight. A
    row of activations with a non-finite value gives NaN logits.

    Args:
        linear: a float ``nn.Linear`` whose weight (and bias) the head shares.

    Raises:
        ValueError: the kernel cannot run here (:func:`~.kernels.cpu_kernels_status`), the
            input width is not a multiple of 32, or the weight is not on a Q8_0 grid.
    """

    def __init__(self, linear: torch.nn.Linear):
        super().__init__(linear)
        built, reason = cpu_kernels_status()
        if not built:
            raise ValueError(f"a Q8_0 head needs the q4_1 kernels: {reason}")
        if linear.in_features % GROUP_SIZE:
            raise ValueError(f"a Q8_0 head needs in_features divisible by {GROUP_SIZE}, got {linear.in_features}")
        weight = linear.weight.detach().float()
        blocks = weight.view(linear.out_features, -1, GROUP_SIZE)
        d = (blocks.abs().amax(-1) / 127).to(torch.float16)
        q = torch.round(blocks / torch.where(d > 0, d, 1).float()[..., None]).clamp_(-127, 127)
        if not (torch.isfinite(d).all() and torch.equal(q * d.float()[..., None], blocks)):
            raise ValueError("the LM head's weights are not on a Q8_0 grid (int8 times an fp16 scale per "
                             "block of 32): only a head dequantised from Q8_0 is kept this way")
        self.register_buffer("blocks", torch.cat([d[..., None].view(torch.uint8),
                                                  q.to(torch.int8).view(torch.uint8)], -1).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes_copy(x):
            return self.float_forward(x)
        return self._as_output(torch.ops.infmllm.q8_0_matmul.default(_kernel_rows(x, torch.float32), self.blocks), x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, Q8_0 for <= {self.max_rows} rows"


@contextmanager
def float_weights(model: torch.nn.Module):
    """Within the block, every :class:`Int4Linear`, :class:`Q8_0Head` and :class:`Float16Head` of ``model`` multiplies with
    its float weight: the float model, for comparisons, without a second copy of the weights. It changes
    the shared modules: no other thread may run the model meanwhile."""
    layers = [m for m in model.modules() if isinstance(m, _FewRowCopy)]
    saved = [m.max_rows for m in layers]
    for m in layers:
        m.max_rows = 0
    try:
        yield model
    finally:
        for m, rows in zip(layers, saved):
            m.max_rows = rows


def quantize_int4(model: torch.nn.Module, skip=lambda name: False, *, lossless_only: bool = False,
                  kernel: str = "auto") -> list[str]:
    """Replace the language model's ``nn.Linear`` layers with :class:`Int4Linear`, in place.

    The LM head (tied to the embeddings, Q8_0 in the GGUF) is not made 4-bit
    (once any layer is int4): on a Q8_0 grid and unless ``kernel`` is ``torch``,
    it keeps those blocks (:class:`Q8_0Head`, where the q4_1 kernels run); else
    a float32 one gets a float16 copy (:class:`Float16Head`).
    Any layer for which ``skip(name)`` is true stays float, as do layers whose
    input width is not a multiple of 32 or output width not a multiple of 16. With
    ``lossless_only``, the model is left as it was (and ``[]`` returned) unless
    every replaced layer is :attr:`Int4Linear.lossless` (weights dequantised
    from a Q4_1 GGUF). On any error the model is left as it was.

    Returns:
        The qualified names of the replaced layers.

    ``kernel``: ``auto``, ``q4_1`` or ``torch`` (module docstring), the same for every layer.

    Raises:
        ValueError: the model is not on the CPU, no int4 kernel runs here (or
            not the one asked for), or no layer could be replaced.
    """
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"quantize int4 runs on the CPU (torch's int4 CPU kernel); the model is on "
                         f"{device.type}: use quantize none or int8 there")
    resolve_int4_kernel(kernel)  # an unknown kernel, or none that runs here, fails before any change
    replaced = []  # (parent, attribute, the float layer, qualified name)

    def undo() -> None:
        for owner, attribute, linear, _ in replaced:
            setattr(owner, attribute, linear)

    try:
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                if (type(child) is torch.nn.Linear and child_name != "lm_head" and not skip(name)
                        and child.in_features % GROUP_SIZE == 0 and child.out_features % OUT_MULTIPLE == 0):
                    try:
                        int4 = Int4Linear(child, kernel)
                    except ValueError:  # scales no kernel holds (a NaN or huge weight): not lossless either
                        if not lossless_only:
                            raise
                        int4 = None
                    if lossless_only and not (int4 is not None and int4.lossless):
                        undo()
                        return []
                    setattr(parent, child_name, int4)
                    replaced.append((parent, child_name, child, name))
        for parent_name, parent in list(model.named_modules()) if replaced else []:
            head = getattr(parent, "lm_head", None)
            name = f"{parent_name}.lm_head" if parent_name else "lm_head"
            if type(head) is not torch.nn.Linear or skip(name):
                continue
            # The file's Q8_0 blocks where the head is on that grid (not with torch's kernel asked for), else a
            # float16 copy; a head neither takes (not float32, beyond float16's range) stays as it is.
            for copy_class in ((Float16Head,) if kernel == "torch" else (Q8_0Head, Float16Head)):
                try:
                    parent.lm_head = copy_class(head)
                except ValueError:
                    continue
                replaced.append((parent, "lm_head", head, name))
                break
    except BaseException:
        undo()
        raise
    if not replaced and not lossless_only:
        raise ValueError(f"no Linear layer to quantize in {type(model).__name__}")
    return [name for *_, name in replaced]
