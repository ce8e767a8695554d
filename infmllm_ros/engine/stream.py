"""A stream: an unbounded sequence of chunks through one model, with a capped KV cache.

The stream is a single, never-ending conversation. It opens with a system
prompt and a user turn in which observations (frames, text) accumulate; a
question closes that turn, the model answers as the assistant, and a new user
turn opens for the next observations. Questions and answers stay in the stream,
so later rounds can refer to them; the cache policy decides what survives.

Not thread-safe: one thread (the node's worker) owns a stream.
"""

from __future__ import annotations

import copy
import hashlib
import math
import operator
import threading
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence, Union

import torch

from . import attention
from .cache import CappedCache, answer_room
from .decode import (COMPILE_CHOICES, CompiledDecodeStep, DirectDecodeStep, Generation, IncrementalDetokenizer,
                     compile_wanted)
from .models import LoadedModel, cache_argument, decoder_attention_modules
from .policies import FRAME, POLICIES, TALK, make_policy
from .rope import RopeSpec
from .types import AppendResult, Answer, Cancelled, Chunk, StreamStats, is_finite_number, is_integer

#: ``return_logits``: False (none), "last" (next-token logits only) or True / "all" (every position)
LogitsRequest = Union[bool, Literal["none", "last", "all"]]
_STATE_FORMAT = 2
#: what a saved stream holds (see Stream.save)
_STATE_KEYS = ("model", "num_layers", "config", "layers", "cache", "records", "frames_seen", "chunks_seen", "cameras",
               "started", "in_user_turn")

#: settings that decide only future evictions: a state saved with other values loads (see _comparable_config)
_FUTURE_ONLY = ("compile", "keep_latest_per_camera", "decay", "carry", "bias_frames")

DEFAULT_SYSTEM_PROMPT = (
    "You are the visual memory of a robot. Timestamped observations from its cameras follow, one per line. "
    "Answer questions about what was observed briefly and factually."
)


@dataclass
class StreamConfig:
    """Knobs of a stream; ``validate`` explains what is wrong with a bad value."""

    policy: str = "infmllm"
    budget_tokens: int = 1024  # per layer, kept after each eviction (full: the most it holds)
    budget_bytes: int = 0  # keys + values over all layers, room for a chunk/answer included; 0 = none
    budget_bytes_per_layer: int = 0  # the same for one layer; 0 = none
    max_chunk_tokens: int = 256  # longer chunks are split (text) or refused (frames)
    sinks: int = 4
    recent: int = 64
    retrieval_window: int = 64
    bias: float = 1.0  # infmllm: the measured default (docs/benchmarks.md section 11); 0: attention alone
    per_head: bool = True
    pool: int = 1  # infmllm: odd window of neighbouring keys a score is averaged over (1: off)
    decay: float = 0.0  # infmllm: share of a token's score carried to the next eviction (0: off)
    carry: str = "sum"  # infmllm, with decay: "sum" adds the carried score, "max" keeps the larger
    granularity: str = "token"  # infmllm: "chunk" keeps or drops a chunk (a frame's line) whole
    #: infmllm: false takes frames off the bias's clock (a token's age is the conversation tokens after it) and
    #: ranks them by their carried scores (decay); text streams rank exactly as with true, the paper's rule
    #: (docs/benchmarks.md section 11c: better scene-memory recall, worse free-form answers with SmolLM2)
    bias_frames: bool = True
    #: every policy: each camera's newest frame chunk is kept through evictions (below sinks and the
    #: recent tail, above every score; see cache.py), so a rarely reporting camera's last observation
    #: is not pushed out by a busy one. Off here (the baselines as their papers describe them); the
    #: node turns it on.
    keep_latest_per_camera: bool = False
    h2o_recent_ratio: float = 0.5
    rerotate: bool = True
    repetition_penalty: float = 1.1
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    #: decode steps compiled with static shapes: "auto" (CUDA only: measured fastest per device), "on", "off"
    compile: str = "auto"

    def validate(self) -> "StreamConfig":
        # Types first, so that a wrong one is named rather than failing later inside a comparison, a slice or
        # the first eviction ("no" is not false, 2.5 tokens is not a length).
        for name in ("policy", "carry", "granularity", "system_prompt", "compile"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string, got {getattr(self, name)!r}")
        for name in ("per_head", "keep_latest_per_camera", "rerotate", "bias_frames"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("budget_tokens", "budget_bytes", "budget_bytes_per_layer", "sinks", "recent", "max_chunk_tokens",
                     "retrieval_window", "pool"):
            if not is_integer(getattr(self, name)):
                raise ValueError(f"{name} must be an integer, got {getattr(self, name)!r}")
        for name in ("bias", "decay", "h2o_recent_ratio", "repetition_penalty"):
            if not is_finite_number(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown cache policy {self.policy!r}; choose one of {sorted(POLICIES)}")
        for name in ("budget_tokens", "budget_bytes", "budget_bytes_per_layer", "sinks", "recent"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.max_chunk_tokens < 1:
            raise ValueError(f"max_chunk_tokens must be >= 1, got {self.max_chunk_tokens}")
        if self.retrieval_window < 1:
            raise ValueError(f"retrieval_window must be >= 1, got {self.retrieval_window}")
        if not (self.bias >= 0 and math.isfinite(self.bias)):
            raise ValueError(f"bias must be a finite number >= 0, got {self.bias}")
        if not (isinstance(self.pool, int) and self.pool >= 1 and self.pool % 2 == 1):
            raise ValueError(f"pool must be an odd integer >= 1, got {self.pool!r}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {self.decay}")
        if self.granularity not in ("token", "chunk"):
            raise ValueError(f"granularity must be 'token' or 'chunk', got {self.granularity!r}")
        if self.carry not in ("sum", "max"):
            raise ValueError(f"carry must be 'sum' or 'max', got {self.carry!r}")
        if self.carry == "max" and self.decay == 0:
            raise ValueError("carry 'max' needs decay > 0 (it says how carried scores combine; with decay 0 "
                             "nothing is carried)")
        if not self.bias_frames and self.decay == 0:
            raise ValueError("bias_frames false needs decay > 0 (frames rank by their carried scores)")
        if not 0 <= self.h2o_recent_ratio < 1:
            raise ValueError(f"h2o_recent_ratio must be in [0, 1), got {self.h2o_recent_ratio}")
        if not self.repetition_penalty >= 1.0:
            raise ValueError(f"repetition_penalty must be >= 1, got {self.repetition_penalty}")
        if self.compile not in COMPILE_CHOICES:
            raise ValueError(f"compile must be one of {COMPILE_CHOICES}, got {self.compile!r}")
        if self.policy != "full" and not (self.budget_tokens or self.budget_bytes or self.budget_bytes_per_layer):
            raise ValueError(f"policy {self.policy!r} needs a budget (budget_tokens or budget_bytes)")
        return self

    @classmethod
    def from_dict(cls, values: dict) -> "StreamConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown stream settings {unknown}; known: {sorted(known)}")
        return cls(**values).validate()


@dataclass
class _Record:
    """Where a chunk sits in the stream, for stamps and camera counts."""

    seen_start: int
    seen_end: int
    kind: str
    camera: str
    stamp: Optional[float]


class ChatFormat:
    """The four strings that splice a never-ending conversation out of the model's chat template."""

    def __init__(self, system_open: str, system_to_user: str, user_to_assistant: str, assistant_to_user: str):
        self.system_open = system_open
        self.system_to_user = system_to_user
        self.user_to_assistant = user_to_assistant
        self.assistant_to_user = assistant_to_user

    @classmethod
    def from_tokenizer(cls, tokenizer, processor=None) -> "ChatFormat":
        marks = ["\x01S\x01", "\x01U\x01", "\x01A\x01", "\x01V\x01"]
        roles = ["system", "user", "assistant", "user"]
        owner = processor if processor is not None and getattr(processor, "chat_template", None) else tokenizer
        if not getattr(owner, "chat_template", None):
            return cls("", "\n", "\nAnswer:", "\n")
        text = None
        for content in (lambda m: m, lambda m: [{"type": "text", "text": m}]):
            try:
                text = owner.apply_chat_template(
                    [{"role": r, "content": content(m)} for r, m in zip(roles, marks)], tokenize=False
                )
                break
            except Exception:  # templates differ in what content they accept
                continue
        if not isinstance(text, str) or any(m not in text for m in marks):
            return cls("", "\n", "\nAnswer:", "\n")
        cut = [text.index(m) for m in marks]
        return cls(
            system_open=text[: cut[0]],
            system_to_user=text[cut[0] + len(marks[0]) : cut[1]],
            user_to_assistant=text[cut[1] + len(marks[1]) : cut[2]],
            assistant_to_user=text[cut[2] + len(marks[2]) : cut[3]],
        )


class Stream:
    """Stream chunks through ``lm`` with a KV cache capped by ``config``.

    Memory: the cache's buffers are allocated once, ``capacity`` rows per
    layer: the ``budget`` kept after each eviction plus room for one chunk (or
    one answer) on top. A byte budget (``budget_bytes``) bounds the whole
    allocation, room included.

    Example:
        >>> lm = load_model("smollm2")
        >>> stream = Stream(lm, StreamConfig(policy="infmllm", budget_tokens=512))
        >>> stream.append_text("12:00:01 front: 2 people, left")
        >>> stream.ask("How many people were seen?").text
    """

    def __init__(self, lm: LoadedModel, config: Optional[StreamConfig] = None, **overrides):
        config = config or StreamConfig()
        if overrides:
            config = StreamConfig.from_dict({**asdict(config), **overrides})
        self.config = config.validate()
        self.lm = lm
        text_config = lm.text_config
        self.num_layers = int(text_config.num_hidden_layers)
        self.kv_heads = int(getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads)
        self.head_dim = int(getattr(text_config, "head_dim", None)
                            or text_config.hidden_size // text_config.num_attention_heads)
        element = torch.finfo(lm.dtype).bits // 8
        self.bytes_per_token = 2 * self.kv_heads * self.head_dim * element * self.num_layers  # all layers, K + V
        #: the model's context (max_position_embeddings; 0: unknown)
        self.context = int(getattr(text_config, "max_position_embeddings", 0) or 0)
        self.policy = make_policy(
            config.policy,
            sinks=config.sinks,
            recent=config.recent,
            retrieval_window=config.retrieval_window,
            bias=config.bias,
            per_head=config.per_head,
            pool=config.pool,
            decay=config.decay,
            carry=config.carry,
            granularity=config.granularity,
            bias_frames=config.bias_frames,
            recent_ratio=config.h2o_recent_ratio,
        )
        self.budget, self.capacity = self._budgets()

        self._attention_modules = decoder_attention_modules(lm.model)
        if len(self._attention_modules) != self.num_layers:
            raise ValueError(
                f"found {len(self._attention_modules)} decoder attention modules for {self.num_layers} layers"
            )
        self.rope = RopeSpec.from_model(lm.model, self.head_dim)
        # Compiled decode steps need a fixed capacity and a policy that is quiet while decoding
        # (Inf-MLLM); H2O and StreamingLLM evict at every step and stay eager. Multimodal RoPE
        # models (Qwen2.5-VL) decode eagerly too: their compiled step is untested.
        self._compile = (compile_wanted(config.compile, lm.device) and self.policy.evicts
                         and self.policy.quiet_while_decoding and self.rope.components == 1)
        # `full` allocates as it grows (doubling, up to its capacity: a model's context can be
        # long); every capped cache allocates its capacity once.
        self.cache = CappedCache(self.num_layers, self.policy, self.budget, config.max_chunk_tokens, self.rope,
                                 rerotate=config.rerotate, capacity=self.capacity if self.policy.evicts else None,
                                 max_rows=self.capacity or 0,
                                 keep_latest_per_source=config.keep_latest_per_camera)
        self.format = ChatFormat.from_tokenizer(lm.tokenizer, lm.processor)
        self._cache_kwarg = cache_argument(lm.model)
        # The node checks questions from its service threads while the worker (and its frame
        # encoder) tokenizes: a fast tokenizer must not be entered from two threads at once, so
        # checks use a copy of their own, one at a time.
        self._check_lock = threading.Lock()
        self._check_tokenizer = None
        self._turn_end = self._encode(self.format.assistant_to_user)
        self._eos_ids = self._end_token_ids()
        self._decode_step: Optional[CompiledDecodeStep] = None
        #: why compile "auto" fell back to eager decoding (None: it did not)
        self.compile_error: Optional[str] = None
        # Last, once every check has passed: a stream that fails to build holds no hook.
        self._base_attention = attention.install(lm.model, self._attention_modules)
        # One-token steps walk the decoder directly where the model's layout allows (bit-identical
        # logits, less per-token overhead); the rest go through model(...).
        self.direct_decode_unsupported = (DirectDecodeStep.unsupported(lm.model) if self.rope.components == 1
                                          else "multimodal RoPE positions")
        self._direct = None if self.direct_decode_unsupported else DirectDecodeStep(lm.model)
        self._closed = False
        self._reset_state()

    # -- public API -------------------------------------------------------------------------------------------

    @property
    def max_answer_tokens(self) -> int:
        """Longest answer :meth:`ask` accepts: an answer and its turn end fit in one chunk's room."""
        return self.config.max_chunk_tokens - int(self._turn_end.shape[1])

    def append_text(self, text: str, *, kind: str = "text", camera: str = "", stamp: Optional[float] = None,
                    return_logits: LogitsRequest = False,
                    should_stop: Optional[Callable[[], bool]] = None) -> AppendResult:
        """Tokenise ``text`` and append it (split into pieces if longer than ``max_chunk_tokens``).

        Raises:
            ValueError: empty text, or (``full``) no room left in the cache.
            Cancelled: ``should_stop()`` returned True between two pieces.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty text: nothing to append")
        ids = self._encode(text)
        return self.append_chunk(Chunk(input_ids=ids, kind=kind, camera=camera, stamp=stamp, text=text),
                                 return_logits=return_logits, should_stop=should_stop)

    def append_chunk(self, chunk: Chunk, *, return_logits: LogitsRequest = False,
                     should_stop: Optional[Callable[[], bool]] = None) -> AppendResult:
        """Append one chunk: a frame's tokens, a text observation, a prompt.

        ``return_logits``: ``False`` (none), ``"last"`` (the next-token logits
        after the chunk, ``[1, vocab]``) or ``True`` / ``"all"`` (every
        position, ``[q, vocab]``: only for perplexity; a long chunk's full
        logits take ``q * vocab * 4`` bytes).

        ``should_stop`` is called before each piece of at most
        ``max_chunk_tokens`` tokens; when it returns True the append stops
        there and :class:`~.types.Cancelled` is raised (pieces already
        appended stay in the stream).

        Raises:
            ValueError: a malformed chunk, or with ``full`` a chunk that would
                pass the cache's capacity (its budget or the model's context).
        """
        self._check_chunk(chunk)
        self._ensure_user_turn()
        self._check_room(len(chunk))
        if chunk.kind == "frame":
            self.frames_seen += 1
            if chunk.camera:
                self.cameras[chunk.camera] = self.cameras.get(chunk.camera, 0) + 1
        return self._append(chunk, logits=_logits_mode(return_logits), should_stop=should_stop)

    def check_question(self, question: str, max_new_tokens: Optional[int] = None, *,
                       answer_prefix: str = "") -> Optional[str]:
        """Why :meth:`ask` would refuse ``question`` (with an answer of ``max_new_tokens``), or None.

        A question is appended to the cache like any chunk, so a long one would
        evict what it asks about. It is refused when the question (with its
        chat framing and any ``answer_prefix``) and the answer would take more
        than half of the budget (``full``: more than the room left in the
        cache); the reason says how many tokens fit. Safe to call from another
        thread than the stream's.
        """
        if not isinstance(question, str) or not question.strip():
            return "empty question"
        if max_new_tokens is not None and not is_integer(max_new_tokens):
            return f"max_new_tokens must be an integer, got {max_new_tokens!r}"
        answer = self.max_answer_tokens if max_new_tokens is None else int(max_new_tokens)
        if not 1 <= answer <= self.max_answer_tokens:
            return (f"max_new_tokens must be between 1 and {self.max_answer_tokens} "
                    "(max_chunk_tokens minus the turn end)")
        with self._check_lock:
            if self._check_tokenizer is None:
                try:
                    self._check_tokenizer = copy.deepcopy(self.lm.tokenizer)
                except Exception:  # noqa: BLE001 - a tokenizer that cannot be copied: share it
                    self._check_tokenizer = self.lm.tokenizer
            text = self._question_text(question, "", answer_prefix)
            tokens = len(self._check_tokenizer(text, add_special_tokens=False,
                                               return_attention_mask=False)["input_ids"])
        room = self.question_room(answer)
        if tokens > room:
            if self.policy.evicts:
                why = (f"the question and an answer of up to {answer} tokens may take at most half of the "
                       f"{self.budget}-token budget, so that what it asks about stays in memory")
            else:
                why = (f"the full cache holds at most {self.capacity} tokens and {self.cache.length} are held; "
                       f"an answer of up to {answer} tokens needs room too")
            return f"question too long: {tokens} tokens with its framing, at most {max(room, 0)} fit ({why})"
        return None

    def question_room(self, max_new_tokens: int) -> int:
        """Most tokens a question (chat framing included) may take with an answer of ``max_new_tokens``."""
        end = int(self._turn_end.shape[1])
        if self.policy.evicts:
            return self.budget // 2 - max_new_tokens - end
        if self.capacity is None:
            return 1 << 62
        return self.capacity - self.cache.length - max_new_tokens - end

    def ask(
        self,
        question: str,
        *,
        max_new_tokens: int = 64,
        camera: str = "",
        should_stop: Optional[Callable[[], bool]] = None,
        on_text: Optional[Callable[[str], None]] = None,
        answer_prefix: str = "",
        return_first_logits: bool = False,
    ) -> Answer:
        """Ask a question about what the stream holds; the question and answer stay in the stream.

        ``answer_prefix`` opens the assistant's answer with fixed text (a
        "prefilled" response, e.g. ``"22:15:03 hall:"``) that the model then
        continues; it is part of the answer in the stream (and counts towards
        the question's length) but not of ``Answer.text``. With
        ``return_first_logits`` the answer carries the next-token logits right
        after the prompt (and prefix), ``[vocab]`` float32: what a benchmark
        ranks candidate answers by, without another forward pass.

        Raises:
            ValueError: an empty or too long question (:meth:`check_question`
                gives the reason), or ``max_new_tokens`` outside
                ``[1, max_answer_tokens]``.
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("empty question")
        if not is_integer(max_new_tokens):
            raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if not 1 <= max_new_tokens <= self.max_answer_tokens:
            raise ValueError(f"max_new_tokens must be between 1 and {self.max_answer_tokens} "
                             "(max_chunk_tokens minus the turn end)")
        started = time.perf_counter()
        self._ensure_user_turn()
        reason = self.check_question(question, max_new_tokens, answer_prefix=answer_prefix)
        if reason:
            raise ValueError(reason)
        oldest, newest = self._held_frame_stamps(camera)
        prompt = self._question_prompt(question, camera, answer_prefix)
        try:
            result = self._append(Chunk(input_ids=prompt, kind="question", camera=camera, text=question),
                                  logits="last", should_stop=should_stop)
        except Cancelled:
            # Stopped before the question's last piece, which is what opens the assistant
            # turn: the user turn goes on (a cut question followed by more observations).
            self._in_user_turn = True
            return Answer(text="", prompt_tokens=int(prompt.shape[1]), generated_tokens=0,
                          latency_s=time.perf_counter() - started, oldest_stamp=oldest, newest_stamp=newest,
                          cancelled=True)
        first_logits = result.logits[-1].clone() if return_first_logits else None
        self.cache.decoding = True
        try:
            generation = self.generate(result.logits[-1], max_new_tokens, should_stop=should_stop,
                                       on_text=on_text, stop_texts=("\nQuestion",))
            # Still decoding: Inf-MLLM keeps the whole answer until the next chunk scores it.
            self._close_assistant_turn()
        finally:
            self.cache.decoding = False
        return Answer(
            text=generation.text.strip(),
            prompt_tokens=int(prompt.shape[1]),
            generated_tokens=len(generation.tokens),
            latency_s=time.perf_counter() - started,
            oldest_stamp=oldest,
            newest_stamp=newest,
            cancelled=generation.cancelled,
            first_logits=first_logits,
        )

    def generate(self, logits: torch.Tensor, max_new_tokens: int, *,
                 should_stop: Optional[Callable[[], bool]] = None, on_text: Optional[Callable[[str], None]] = None,
                 repetition_penalty: Optional[float] = None, stop_at_eos: bool = True,
                 append_last: bool = True, stop_texts: Sequence[str] = ()) -> Generation:
        """Greedy decoding from next-token ``logits`` (``[vocab]``); each token is appended to the stream.

        The loop keeps to what the method needs: one host sync per token (the
        argmax, needed to stop at an end token and to stream text), logits of
        the last position only, incremental detokenisation, and a compiled
        static-shape step where the policy allows it (``compile``). The cache
        is in decoding mode throughout (Inf-MLLM grows into its room, H2O and
        StreamingLLM evict at every step).

        Args:
            logits: ``[vocab]`` scores for the first token.
            max_new_tokens: most tokens generated.
            should_stop: checked before each token; True ends the answer (``cancelled``).
            on_text: called with each new piece of text.
            repetition_penalty: default ``config.repetition_penalty`` (1: off).
            stop_at_eos: stop at an end-of-turn / EOS token (not appended).
            append_last: False leaves the ``max_new_tokens``-th token out of the
                stream, for a caller that appends it with what follows in one
                forward pass (a benchmark closing the answer with a line break).
            stop_texts: the answer ends where the text first contains one of these
                (left out of ``text``; the token that completed it is not appended,
                the ones before it are), e.g. the framing of a new question that a
                small model goes on to write itself.

        Raises:
            ValueError: ``max_new_tokens`` is not an integer >= 0 (nothing is appended).
        """
        if not is_integer(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        penalty = self.config.repetition_penalty if repetition_penalty is None else float(repetition_penalty)
        detok = IncrementalDetokenizer(self.lm.tokenizer)
        used = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device) if penalty > 1.0 else None
        tokens: list[int] = []
        cancelled = False
        cut: Optional[int] = None
        text = ""
        decoding, self.cache.decoding = self.cache.decoding, True
        try:
            for i in range(max_new_tokens):
                if should_stop is not None and should_stop():
                    cancelled = True
                    break
                if used is not None:
                    # Greedy with a repetition penalty (CTRL, Keskar et al. 2019): tokens already in
                    # the answer have positive logits divided and negative ones multiplied.
                    logits = torch.where(used, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
                token = int(logits.argmax())
                if stop_at_eos and token in self._eos_ids:
                    break
                tokens.append(token)
                if used is not None:
                    used[token] = True
                piece = detok.add(token)
                shown = len(detok.text) - len(piece)  # the text before this piece, already passed to on_text
                cut = _first_stop(detok.text, stop_texts, shown) if piece else None
                if cut is not None:
                    text = detok.text[:cut]
                    if on_text is not None and cut > shown:
                        on_text(text[shown:])
                    break
                if on_text is not None and piece:
                    on_text(piece)
                if i + 1 < max_new_tokens or append_last:
                    logits = self._decode_one(token, want_logits=i + 1 < max_new_tokens)
            if cut is None:
                piece = detok.flush()
                if on_text is not None and piece:
                    on_text(piece)
                text = detok.text
        finally:
            self.cache.decoding = decoding
        if tokens:
            self.chunks_seen += 1
        return Generation(tokens=tokens, text=text, cancelled=cancelled)

    @torch.inference_mode()  # the cache's buffers are inference tensors: change them in that mode
    def warmup(self) -> Optional[float]:
        """Compile the decode step now (if ``compile`` is on) instead of at the first answer.

        Runs the step on the stream's own buffers and forgets it (the stream is
        unchanged apart from its opening system prompt). Returns the compile
        time in seconds, or None when nothing is compiled. Later starts reuse
        torch's on-disk cache (:func:`~.decode.persistent_compile_cache`).
        """
        if not self._compile:
            return None
        self._ensure_user_turn()
        started = time.perf_counter()
        self.cache.decoding = True
        try:
            step = self._compiled_step()
            # CUDA graphs record on the first replays: warm up past them.
            for _ in range(3):
                self.cache.make_room(1)
                step(int(self._turn_end[0, 0]), self.cache.next_position, commit=False)
        except Exception as exc:  # noqa: BLE001 - compilers fail in many ways
            if self.config.compile == "on":
                raise
            # compile "auto": an eager decode is still right, only slower; say why.
            self._compile, self._decode_step = False, None
            self.compile_error = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"the compiled decode step failed ({self.compile_error}); decoding eagerly",
                          RuntimeWarning, stacklevel=2)
            return None
        finally:
            self.cache.decoding = False
        return time.perf_counter() - started

    @property
    def decode_path(self) -> str:
        """How one-token steps run: ``compiled`` (the static-shape graph, where its step is allowed; the
        others as below), ``direct`` (:class:`~.decode.DirectDecodeStep`) or ``model`` (``model(...)``;
        ``direct_decode_unsupported`` says why)."""
        return "compiled" if self._compile else "direct" if self._direct is not None else "model"

    @property
    def compiled(self) -> bool:
        """Whether decode steps run compiled (``compile`` resolved for this device and policy)."""
        return self._compile

    def stats(self) -> StreamStats:
        oldest, newest = self._held_frame_stamps()
        capacity = self.capacity or 0
        return StreamStats(
            policy=self.policy.name,
            tokens_held=self.cache.tokens_held,
            bytes_held=self.cache.nbytes,
            budget_tokens=self.budget if self.policy.evicts else capacity,
            budget_bytes=self.config.budget_bytes or capacity * self.bytes_per_token,
            tokens_seen=self.cache.tokens_seen,
            evictions=self.cache.evictions,
            chunks_seen=self.chunks_seen,
            frames_seen=self.frames_seen,
            next_position=self.cache.next_position,
            oldest_stamp=oldest,
            newest_stamp=newest,
            cameras=dict(self.cameras),
            capacity_tokens=capacity,
            bytes_reserved=self.cache.reserved_bytes,
        )

    @torch.inference_mode()
    def reset(self) -> None:
        """Forget everything; the next append starts a fresh conversation (buffers stay allocated)."""
        self.cache.reset()
        self._reset_state()

    def close(self) -> None:
        """Release the model: its own attention implementation is back once no other stream uses it."""
        if not self._closed:
            self._closed = True
            attention.uninstall(self._attention_modules, self._base_attention)

    def save(self, path: str | Path) -> None:
        """Write the stream's state (the held rows of every cache buffer, and the history) to ``path``."""
        # Copies of the held rows: a view would make torch.save write the whole buffer.
        layers = self._held_rows(torch.device("cpu"))
        torch.save({
            "format": _STATE_FORMAT,
            "model": self.lm.name,
            "num_layers": self.num_layers,
            "dtype": str(self.lm.dtype).replace("torch.", ""),
            "config": self._comparable_config(asdict(self.config)),
            "layers": layers,
            "cache": self._cache_counters(),
            "records": [asdict(r) for r in self._records],
            "frames_seen": self.frames_seen,
            "chunks_seen": self.chunks_seen,
            "cameras": self.cameras,
            "started": self._started,
            "in_user_turn": self._in_user_turn,
        }, str(path))

    @torch.inference_mode()
    def load(self, path: str | Path) -> None:
        """Restore a state written by ``save`` for the same model and settings.

        A state saved on another device is moved to this stream's device; one
        saved in another floating-point dtype (e.g. float32 into a bfloat16
        stream) is converted, with a ``UserWarning`` that says so. Everything
        is checked before anything changes: on any error the stream is as it
        was.

        Raises:
            ValueError: not a saved stream, another model, other settings, or
                tensors whose shapes do not fit this model and budget.
        """
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - an unpickling error, a truncated or foreign file
            raise ValueError(f"{path} is not a saved stream ({type(exc).__name__}: {exc})") from None
        if (not isinstance(state, dict) or state.get("format") not in (1, _STATE_FORMAT)
                or not all(key in state for key in _STATE_KEYS)):
            missing = sorted(set(_STATE_KEYS) - set(state)) if isinstance(state, dict) else []
            raise ValueError(f"{path} is not a saved stream" + (f" (missing {missing})" if missing else ""))
        if state["num_layers"] != self.num_layers or state["model"] != self.lm.name:
            raise ValueError(f"{path} was saved from model {state['model']!r} ({state['num_layers']} layers), "
                             f"this stream runs {self.lm.name!r} ({self.num_layers} layers)")
        saved, ours = self._comparable_config(state["config"]), self._comparable_config(asdict(self.config))
        if saved != ours:
            differ = {k: (saved.get(k), ours.get(k)) for k in sorted(set(saved) | set(ours))
                      if saved.get(k) != ours.get(k) and k != "system_prompt"}
            if saved.get("system_prompt") != ours.get("system_prompt"):
                differ["system_prompt"] = "(differs)"
            raise ValueError(f"{path} was saved with other stream settings (saved, this stream): {differ}")
        layers = self._checked_layers(path, state["layers"])
        try:
            counters = {k: operator.index(v) for k, v in dict(state["cache"]).items()}
            counters.setdefault("length", next((l["keys"].shape[-2] for l in layers if l), 0))
            records = [_Record(**r) for r in state["records"]]
            history = {"frames_seen": operator.index(state["frames_seen"]),
                       "chunks_seen": operator.index(state["chunks_seen"]),
                       "cameras": {str(k): operator.index(v) for k, v in dict(state["cameras"]).items()},
                       "_started": bool(state["started"]), "_in_user_turn": bool(state["in_user_turn"])}
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{path} is not a saved stream: bad bookkeeping ({exc})") from None
        # What the checks above cannot see (a length past the capacity, rows that do not fit) surfaces while the
        # rows are written: go back to the state before, so a failed load changes nothing.
        before = self.snapshot()
        try:
            self.reset()
            self._write_rows(layers, counters)
        except Exception as exc:  # noqa: BLE001 - whatever a file's rows hold, a failed load changes nothing
            self.restore(before)
            raise ValueError(f"{path} does not fit this stream: {exc}") from None
        self._records = records
        for name, value in history.items():
            setattr(self, name, value)

    @torch.inference_mode()
    def held_fraction(self, start: int, end: int) -> float:
        """Share of the stream's tokens ``[start, end)`` that the cache still holds, over every layer and KV head.

        ``start`` and ``end`` are stream indices, as :attr:`StreamStats.tokens_seen` counts them (the
        first token ever appended is 0). 1.0: every layer and head holds all of them; per-head policies
        (H2O, Inf-MLLM) may keep a token in some heads only, which counts for that share.

        Raises:
            TypeError: ``start`` or ``end`` is not an integer.
            ValueError: an empty or negative range, or one reaching past the tokens seen so far.
        """
        start, end = operator.index(start), operator.index(end)
        seen_so_far = self.cache.tokens_seen
        if not 0 <= start < end <= seen_so_far:
            raise ValueError(f"held_fraction needs 0 <= start < end <= tokens seen ({seen_so_far}), "
                             f"got [{start}, {end})")
        held = sum(int(((layer.seen >= start) & (layer.seen < end)).sum())
                   for layer in self.cache.layers if layer.is_initialized)
        return held / (len(self.cache.layers) * self.kv_heads * (end - start))

    @torch.inference_mode()
    def snapshot(self) -> dict:
        """A copy of the stream's state, for :meth:`restore`: probe what the stream holds without changing it.

        Copies the held rows of every cache buffer (keys, values, stream
        indices, positions and the policy's per-token buffers such as Inf-MLLM's
        carried scores and chunk numbers), the cache's counters (held length,
        next position, tokens seen, evictions, chunks begun) and the history
        (records, frame, chunk and camera counts, turn state). Costs one copy of
        the held rows, on the cache's device (about ``stats().bytes_held``).
        """
        return {
            "cache_id": id(self.cache),
            "layers": self._held_rows(None),
            "cache": self._cache_counters(),
            "history": copy.deepcopy({name: getattr(self, name) for name in self._HISTORY}),
        }

    @torch.inference_mode()
    def restore(self, snapshot: dict) -> None:
        """Go back to the state :meth:`snapshot` took of this stream.

        Rows are copied back into the cache's own buffers (their addresses, part
        of a compiled decode step, stay), so the snapshot stays valid and can be
        restored again.

        Raises:
            ValueError: ``snapshot`` was not taken from this stream.
        """
        if not isinstance(snapshot, dict) or snapshot.get("cache_id") != id(self.cache):
            raise ValueError("not a snapshot of this stream")
        self.cache.reset()
        self._write_rows(snapshot["layers"], snapshot["cache"])
        for name, value in copy.deepcopy(snapshot["history"]).items():
            setattr(self, name, value)

    # -- internals --------------------------------------------------------------------------------------------

    #: the stream's bookkeeping beside the cache (what snapshot/restore copy)
    _HISTORY = ("_records", "_next_prune", "frames_seen", "chunks_seen", "cameras", "_started", "_in_user_turn")

    def _cache_counters(self) -> dict:
        c = self.cache
        return {"length": c.length, "next_position": c.next_position, "tokens_seen": c.tokens_seen,
                "evictions": c.evictions, "chunks_begun": c.chunks_begun}

    def _held_rows(self, device: Optional[torch.device]) -> list[Optional[dict[str, torch.Tensor]]]:
        """Per layer (None: never written), copies of the held rows of keys, values and every per-token
        buffer, ``[1, kv_heads, held, ...]``, on ``device`` (None: where they are)."""
        rows = []
        for layer in self.cache.layers:
            if not layer.is_initialized:
                rows.append(None)
                continue
            rows.append({name: layer.held(name).to(device or layer.keys.device, copy=True)
                         for name in ("keys", "values", *layer.buffers)})
        return rows

    def _write_rows(self, layers: list, counters: dict) -> None:
        """Write rows taken by :meth:`_held_rows` (or loaded) into a reset cache, and its counters."""
        length = int(counters["length"])
        device = self.lm.device
        for layer, saved in zip(self.cache.layers, layers):
            if saved is None:
                continue
            if not layer.is_initialized:
                layer.lazy_initialization(saved["keys"].to(device, self.lm.dtype),
                                          saved["values"].to(device, self.lm.dtype))
            layer.ensure_rows(length)
            for name, tensor in saved.items():
                target = layer.held(name, length)
                target.copy_(tensor.to(device=device, dtype=target.dtype))
        self.cache._set_length(length)
        for name in ("next_position", "tokens_seen", "evictions"):
            setattr(self.cache, name, int(counters[name]))
        # States saved before chunk numbers existed: only a policy without them can load those.
        self.cache.chunks_begun = int(counters.get("chunks_begun", 0))

    @staticmethod
    def _comparable_config(config: dict) -> dict:
        # How the decode step runs does not change what the cache holds, and keep_latest_per_camera, decay,
        # carry and bias_frames only decide future evictions (a state saved without them loads with no chunk kept
        # yet, no score carried and no token known as a frame's: see _checked_layers), so switching them
        # never sets a state file aside. A setting added after a state was saved reads as its default there.
        return {k: v for k, v in {**asdict(StreamConfig()), **config}.items()
                if k not in _FUTURE_ONLY}

    def _checked_layers(self, path, layers: list) -> list:
        """The saved layers, checked against this model and budget (and their dtype noted)."""
        if len(layers) != self.num_layers:
            raise ValueError(f"{path} holds {len(layers)} layers, the model has {self.num_layers}")
        names = {"keys", "values", *self.cache.token_buffers}
        # a state saved without keep_latest_per_camera, decay or bias_frames lacks these
        optional = self.cache.latest_buffers | {"carried", FRAME, TALK}
        lengths = set()
        dtypes = set()
        for i, saved in enumerate(layers):
            if saved is None:
                lengths.add(0)
                continue
            missing = names - set(saved) - optional
            if missing:
                raise ValueError(f"{path}: layer {i} lacks {sorted(missing)}")
            keys = saved["keys"]
            expected = (1, self.kv_heads, keys.shape[-2], self.head_dim)
            if tuple(keys.shape) != expected or tuple(saved["values"].shape[:3]) != expected[:3]:
                raise ValueError(f"{path}: layer {i} keys have shape {tuple(keys.shape)}, this model needs "
                                 f"[1, {self.kv_heads}, tokens, {self.head_dim}]")
            if not keys.is_floating_point():
                raise ValueError(f"{path}: layer {i} keys are {keys.dtype}, not floating point")
            lengths.add(int(keys.shape[-2]))
            dtypes.add(keys.dtype)
        if len(lengths) > 1:
            raise ValueError(f"{path}: layers hold different token counts {sorted(lengths)}: the state is corrupt")
        held = lengths.pop() if lengths else 0
        if self.capacity is not None and held > self.capacity:
            raise ValueError(f"{path} holds {held} tokens per layer, more than this stream's capacity "
                             f"of {self.capacity}")
        other = sorted(str(d).replace("torch.", "") for d in dtypes if d != self.lm.dtype)
        if other:
            warnings.warn(f"{path} was saved from a {', '.join(other)} stream; its cached keys and values are "
                          f"converted to this stream's {str(self.lm.dtype).replace('torch.', '')}", UserWarning,
                          stacklevel=3)

        def rows(saved: dict, name: str) -> torch.Tensor:
            if name in saved:
                return saved[name]
            spec = self.cache.token_buffers[name]  # -1: no source, no chunk number; never kept as a newest line
            return torch.full((*saved["keys"].shape[:3], *spec.trailing), spec.fill, dtype=spec.dtype)

        return [None if saved is None else {n: rows(saved, n) for n in names} for saved in layers]

    def _question_text(self, question: str, camera: str, answer_prefix: str = "") -> str:
        about = f" (about camera {camera})" if camera else ""
        return f"Question{about}: {question.strip()}{self.format.user_to_assistant}{answer_prefix}"

    def _question_prompt(self, question: str, camera: str, answer_prefix: str = "") -> torch.Tensor:
        return self._encode(self._question_text(question, camera, answer_prefix))

    def _close_assistant_turn(self) -> None:
        """Append the end of the assistant turn so the stream stays a well-formed conversation."""
        self._append(Chunk(input_ids=self._turn_end, kind="answer"))

    def _reset_state(self) -> None:
        self._records: list[_Record] = []
        self._next_prune = 256
        self.frames_seen = 0
        self.chunks_seen = 0
        self.cameras: dict[str, int] = {}
        self._started = False
        self._in_user_turn = False

    def _budgets(self) -> tuple[int, Optional[int]]:
        """``(budget, capacity)`` in tokens per layer: kept after an eviction, and the most ever held.

        An evicting policy keeps ``budget`` and has room on top for the next
        chunk and, for Inf-MLLM, for an answer (which it decodes without
        evicting): ``capacity = budget + max_chunk_tokens`` (H2O, StreamingLLM,
        window) or ``budget + 2 * max_chunk_tokens`` (Inf-MLLM). A byte budget
        bounds the capacity, room included, so the promise is exact: the
        budget kept is what the bytes hold minus that room. ``full`` never
        evicts: its capacity is the tightest of ``budget_tokens``, the byte
        budgets and the model's context, and it refuses to grow past it.
        """
        c = self.config
        per_layer_bytes = self.bytes_per_token // self.num_layers
        byte_caps = []
        if c.budget_bytes:
            byte_caps.append(c.budget_bytes // self.bytes_per_token)
        if c.budget_bytes_per_layer:
            byte_caps.append(c.budget_bytes_per_layer // per_layer_bytes)
        byte_cap = min(byte_caps) if byte_caps else None
        if byte_cap is not None and byte_cap < 1:
            raise ValueError(f"the byte budget holds no token: one token costs {self.bytes_per_token} bytes "
                             f"over all layers ({per_layer_bytes} per layer)")
        if c.policy == "full":
            caps = [x for x in (c.budget_tokens, byte_cap, self.context) if x]
            capacity = min(caps) if caps else None
            return capacity or 0, capacity
        room = c.max_chunk_tokens + answer_room(self.policy, c.max_chunk_tokens)
        budget = c.budget_tokens or None
        if byte_cap is not None:
            if byte_cap - room < 1:
                raise ValueError(
                    f"the byte budget holds {byte_cap} tokens, no more than the {room} tokens of room that a chunk "
                    f"(and an answer) need beside the kept ones (max_chunk_tokens {c.max_chunk_tokens}): raise the "
                    f"byte budget or lower max_chunk_tokens")
            budget = min(budget or byte_cap, byte_cap - room)
        return budget, budget + room

    def _end_token_ids(self) -> set[int]:
        """Tokens that end an answer: EOS, the generation config's EOS ids, and the end-of-turn marker."""
        tok = self.lm.tokenizer
        candidates = [tok.eos_token_id]
        gen_eos = getattr(getattr(self.lm.model, "generation_config", None), "eos_token_id", None)
        candidates += list(gen_eos) if isinstance(gen_eos, (list, tuple)) else [gen_eos]
        if self.format.assistant_to_user.strip():
            # e.g. <|im_end|> or <end_of_utterance>: the first token that closes an assistant turn
            first = int(self._turn_end[0, 0])
            if tok.convert_ids_to_tokens(first) in set(tok.all_special_tokens or []):
                candidates.append(first)
        return {int(c) for c in candidates if c is not None}

    def _encode(self, text: str) -> torch.Tensor:
        return self.lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def _check_chunk(self, chunk: Chunk) -> None:
        if chunk.inputs_embeds is not None:
            hidden = int(self.lm.text_config.hidden_size)
            if chunk.inputs_embeds.shape[-1] != hidden:
                raise ValueError(f"inputs_embeds have width {chunk.inputs_embeds.shape[-1]}, the model expects {hidden}")
            if not chunk.inputs_embeds.is_floating_point():
                raise ValueError(f"inputs_embeds must be floating point, got {chunk.inputs_embeds.dtype}")
            # Checked as the model will read them: a float32 1e5 is inf in float16, a float64 1e300 in float32.
            if not torch.isfinite(chunk.inputs_embeds.to(self.lm.dtype)).all():
                raise ValueError(f"inputs_embeds contain NaN or inf (or values beyond {self.lm.dtype}'s range)")
            if chunk.rope_positions is not None and len(chunk) > self.config.max_chunk_tokens:
                raise ValueError(f"a frame of {len(chunk)} tokens is longer than max_chunk_tokens "
                                 f"({self.config.max_chunk_tokens}); lower the image size or raise the limit")
        else:
            if chunk.input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"input_ids must be integers, got {chunk.input_ids.dtype}")
            vocab = int(self.lm.text_config.vocab_size)
            if chunk.input_ids.min() < 0 or chunk.input_ids.max() >= vocab:
                raise ValueError(f"input_ids out of the vocabulary range [0, {vocab})")

    def _check_room(self, tokens: int) -> None:
        """``full``: refuse, before anything is appended, a chunk that would pass the capacity."""
        if self.policy.evicts or self.capacity is None or self.cache.length + tokens <= self.capacity:
            return
        limit = ("the model's context" if self.capacity == self.context
                 else "budget_tokens / the byte budget")
        raise ValueError(
            f"the full cache holds at most {self.capacity} tokens ({limit}); it holds {self.cache.length} and "
            f"this chunk has {tokens}: use a capped policy (infmllm, streamingllm, h2o, window) for a longer "
            f"stream, or reset it")

    def _ensure_user_turn(self) -> None:
        if not self._started:
            text = f"{self.format.system_open}{self.config.system_prompt}{self.format.system_to_user}"
            opening = Chunk(input_ids=self._encode(text), kind="system", text=text)
            self._check_room(len(opening))  # full: a cap below the system prompt is refused, nothing appended
            seen = self.cache.tokens_seen
            try:
                self._append(opening)
            finally:
                # started once any of the prompt is in (a prompt longer than a chunk goes in pieces): a failure
                # after the first piece must not append the whole prompt again next time
                self._started = self._in_user_turn = self.cache.tokens_seen > seen
        elif not self._in_user_turn:
            self._in_user_turn = True

    def _append(self, chunk: Chunk, *, logits: str = "none",
                should_stop: Optional[Callable[[], bool]] = None) -> AppendResult:
        if chunk.kind == "question":
            self._in_user_turn = False
        limit = self.config.max_chunk_tokens
        source = self._source_id(chunk)
        frame = chunk.kind == "frame" and FRAME in self.cache.token_buffers
        total, pieces, evicted, kept_logits = len(chunk), 0, 0, []
        for start in range(0, total, limit):
            if should_stop is not None and should_stop():
                self.chunks_seen += pieces > 0
                raise Cancelled(start, total)
            piece_ids = chunk.input_ids[:, start:start + limit] if chunk.input_ids is not None else None
            piece_embeds = chunk.inputs_embeds[:, start:start + limit] if chunk.inputs_embeds is not None else None
            rel = chunk.rope_positions if chunk.rope_positions is not None and start == 0 else None
            last_piece = start + limit >= total
            want = logits if logits == "all" or (logits == "last" and last_piece) else "none"
            before = self.cache.evictions
            out = self._forward(piece_ids, piece_embeds, rel, want, source=source, frame=frame,
                                continues=start > 0)
            evicted += self.cache.evictions - before
            if out is not None:
                kept_logits.append(out)
            if chunk.stamp is not None:
                self._records.append(_Record(self.cache.tokens_seen - (min(total, start + limit) - start),
                                             self.cache.tokens_seen, chunk.kind, chunk.camera, chunk.stamp))
            pieces += 1
        if len(self._records) >= self._next_prune:
            self._prune_records()
        self.chunks_seen += 1
        return AppendResult(tokens=total, evicted=evicted, tokens_held=self.cache.tokens_held, pieces=pieces,
                            logits=torch.cat(kept_logits) if kept_logits else None)

    def _compiled_step(self) -> CompiledDecodeStep:
        if self._decode_step is None:
            if not self.cache.layers[0].is_initialized:
                self._ensure_user_turn()
            self._decode_step = CompiledDecodeStep(self.lm.model, self.cache, self._cache_kwarg, self.lm.device)
        return self._decode_step

    @torch.inference_mode()
    def _decode_one(self, token: int, want_logits: bool = True) -> Optional[torch.Tensor]:
        """Append one generated token; returns the next-token logits ``[vocab]`` (float32) if wanted."""
        self._check_open()
        if self._compile and self._compiled_step().allowed():
            self.cache.make_room(1)
            if self._decode_step.allowed():  # re-rotation does not change the count; stay safe
                return self._decode_step(token, self.cache.next_position)
        ids = torch.tensor([[token]], device=self.lm.device)
        out = self._forward(ids, None, None, "last" if want_logits else "none")
        return None if out is None else out[-1]

    def _source_id(self, chunk: Chunk) -> Optional[int]:
        """The cache's source id of a frame chunk (``keep_latest_per_camera``), else None.

        A 63-bit hash of the camera name, not a counter: the same camera has the same id after a save/load
        or a restore, with no table to keep (two names would share one kept chunk only if their hashes
        collide, about 2^-63 per pair). Frames without a camera name share the id of ``""``.
        """
        if not self.cache.keep_latest_per_source or chunk.kind != "frame":
            return None
        # surrogatepass: any Python str has bytes (a lone surrogate from a caller must not fail mid-append)
        digest = hashlib.blake2b(chunk.camera.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF

    @torch.inference_mode()
    def _forward(self, input_ids, inputs_embeds, rel_positions, logits: str,
                 source: Optional[int] = None, frame: bool = False,
                 continues: bool = False) -> Optional[torch.Tensor]:
        """One forward pass over a piece; returns float32 logits ``[q or 1, vocab]`` per ``logits``, or None.

        ``source``: the frame's camera id for the cache (``_source_id``); ``frame``: mark the tokens as a
        frame's in the policy's frame flag (``InfMLLM.bias_frames``); ``continues``: a further piece of
        the chunk the previous piece began.
        """
        self._check_open()
        device = self.lm.device
        new = int((input_ids if input_ids is not None else inputs_embeds).shape[1])
        self.cache.make_room(new)
        start = self.cache.next_position
        if self.rope.components == 1:
            absolute = torch.arange(start, start + new, device=device)
            position_ids = absolute.unsqueeze(0)
            cache_positions = absolute.unsqueeze(-1)
            span = new
        else:
            rel = rel_positions if rel_positions is not None else torch.arange(new).view(1, 1, -1).expand(3, 1, new)
            rel = rel.to(device=device, dtype=torch.long)
            position_ids = rel + start
            cache_positions = position_ids[:, 0, :].transpose(0, 1)
            span = int(rel.max().item()) + 1
        # Only the logits that are used: every row for perplexity, the last one to pick a
        # token, none at all (an empty index) while prefilling.
        keep = {"all": 0, "last": 1}.get(logits)
        if keep is None:
            keep = torch.empty(0, dtype=torch.long, device=device)
        kwargs = {self._cache_kwarg: self.cache, "position_ids": position_ids, "use_cache": True,
                  "logits_to_keep": keep}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids.to(device)
        else:
            kwargs["inputs_embeds"] = inputs_embeds.to(device=device, dtype=self.lm.dtype)
        # Hooks a user put on the model after this stream was built run only inside model(...).
        direct = self._direct is not None and input_ids is not None and new == 1 and not self._direct.hooked()
        values = {}
        if source is not None:
            values[CappedCache.SOURCE] = torch.full((new,), source, dtype=torch.long, device=device)
        if frame:
            values[FRAME] = torch.ones(new, dtype=torch.bool, device=device)
        self.cache.begin_step(cache_positions, values, continues=continues)
        try:
            with attention.active(self.cache):
                if direct:
                    out = self._direct(self.cache, kwargs["input_ids"], position_ids, want_logits=logits != "none")
                else:
                    out = self.lm.model(**kwargs).logits[0]
            self.cache.end_step(span)
        except BaseException:
            # Roll back: no layer changed what it holds before the commit in end_step.
            self.cache.abort_step()
            raise
        return out.float() if logits in ("all", "last") else None

    def _check_open(self) -> None:
        if self._closed:
            # Closing gave the model back its own attention: a step now would bypass the cap's hook.
            raise RuntimeError("this stream is closed (Stream.close released the model); make a new Stream")

    def _held_seen(self) -> torch.Tensor:
        return torch.unique(torch.cat([layer.seen.reshape(-1) for layer in self.cache.layers
                                       if layer.is_initialized]).cpu())

    def _prune_records(self) -> None:
        """Forget records of chunks that no layer holds any token of (keeps the history bounded)."""
        if self.cache.layers[0].is_initialized and self._records:
            held = self._held_seen()
            self._records = [r for r in self._records
                             if bool(((held >= r.seen_start) & (held < r.seen_end)).any())]
        self._next_prune = max(256, 2 * len(self._records))

    def _held_frame_stamps(self, camera: str = "") -> tuple[Optional[float], Optional[float]]:
        """Stamps of the first- and last-appended frames (of ``camera``, or of any) that still
        have a token in any layer.

        By order in the stream, not by stamp value: a bag replayed in a loop, a clock
        reset or two cameras on different clocks make stamps jump, but what arrived
        last is the newest thing the stream knows.
        """
        stamped = [r for r in self._records if r.stamp is not None and r.kind == "frame"
                   and (not camera or r.camera == camera)]
        if not stamped or not self.cache.layers[0].is_initialized:
            return None, None
        held = self._held_seen()
        starts = torch.tensor([r.seen_start for r in stamped])
        ends = torch.tensor([r.seen_end for r in stamped])
        slot = torch.searchsorted(starts, held, right=True) - 1
        valid = slot >= 0
        slot, held = slot[valid], held[valid]
        inside = held < ends[slot]
        kept = slot[inside]
        if kept.numel() == 0:
            return None, None
        return stamped[int(kept.min())].stamp, stamped[int(kept.max())].stamp


def _first_stop(text: str, stops: Sequence[str], new_from: int) -> Optional[int]:
    """Where the first of ``stops`` begins in ``text``, looking only at matches that end in
    the part from ``new_from`` on (the newest piece), or None."""
    found = [i for i in (text.find(st, max(0, new_from - len(st) + 1)) for st in stops) if i >= 0]
    return min(found) if found else None


def _logits_mode(request: LogitsRequest) -> str:
    if request is True or request == "all":
        return "all"
    if request == "last":
        return "last"
    if request is False or request is None or request == "none":
        return "none"
    raise ValueError(f"return_logits must be False, 'last', True or 'all', got {request!r}")
