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
import inspect
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch

from . import attention
from .cache import CappedCache
from .models import LoadedModel, decoder_attention_modules
from .policies import POLICIES, make_policy
from .rope import RopeSpec
from .types import AppendResult, Answer, Cancelled, Chunk, StreamStats

DEFAULT_SYSTEM_PROMPT = (
    "You are the visual memory of a robot. Timestamped observations from its cameras follow, one per line. "
    "Answer questions about what was observed briefly and factually."
)


@dataclass
class StreamConfig:
    """Knobs of a stream; ``validate`` explains what is wrong with a bad value."""

    policy: str = "infmllm"
    budget_tokens: int = 1024  # per layer; the tighter of this and the byte budgets wins
    budget_bytes: int = 0  # keys + values over all layers; 0 = no byte budget
    budget_bytes_per_layer: int = 0  # 0 = no per-layer byte budget
    max_chunk_tokens: int = 256  # longer chunks are split (text) or refused (frames)
    sinks: int = 4
    recent: int = 64
    retrieval_window: int = 64
    bias: float = 0.0
    per_head: bool = True
    pool: int = 1  # infmllm: odd window of neighbouring keys a score is averaged over (1: off)
    decay: float = 0.0  # infmllm: share of a token's score carried to the next eviction (0: off)
    granularity: str = "token"  # infmllm: "chunk" keeps or drops a chunk (a frame's line) whole
    h2o_recent_ratio: float = 0.5
    rerotate: bool = True
    repetition_penalty: float = 1.1
    system_prompt: str = DEFAULT_SYSTEM_PROMPT

    def validate(self) -> "StreamConfig":
        if self.policy not in POLICIES:
            raise ValueError(f"unknown cache policy {self.policy!r}; choose one of {sorted(POLICIES)}")
        for name in ("budget_tokens", "budget_bytes", "budget_bytes_per_layer", "sinks", "recent"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
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
        if not 0 <= self.h2o_recent_ratio < 1:
            raise ValueError(f"h2o_recent_ratio must be in [0, 1), got {self.h2o_recent_ratio}")
        if not self.repetition_penalty >= 1.0:
            raise ValueError(f"repetition_penalty must be >= 1, got {self.repetition_penalty}")
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
        kv_heads = int(getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads)
        head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads)
        element = torch.finfo(lm.dtype).bits // 8
        self.bytes_per_token = 2 * kv_heads * head_dim * element * self.num_layers  # all layers, keys + values
        self.budget = self._effective_budget()
        self.policy = make_policy(
            config.policy,
            sinks=config.sinks,
            recent=config.recent,
            retrieval_window=config.retrieval_window,
            bias=config.bias,
            per_head=config.per_head,
            pool=config.pool,
            decay=config.decay,
            granularity=config.granularity,
            recent_ratio=config.h2o_recent_ratio,
        )

        self._attention_modules = decoder_attention_modules(lm.model)
        if len(self._attention_modules) != self.num_layers:
            raise ValueError(
                f"found {len(self._attention_modules)} decoder attention modules for {self.num_layers} layers"
            )
        self.rope = RopeSpec.from_model(lm.model, head_dim)
        self.cache = CappedCache(self.num_layers, self.policy, self.budget, config.max_chunk_tokens, self.rope,
                                 rerotate=config.rerotate)
        # Last, once every check has passed: a stream that fails to build holds no hook.
        self._base_attention = attention.install(lm.model, self._attention_modules)
        self._closed = False
        self.format = ChatFormat.from_tokenizer(lm.tokenizer, lm.processor)
        forward_params = inspect.signature(lm.model.forward).parameters
        # transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version takes.
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"
        self._eos_ids = self._end_token_ids()
        self._reset_state()

    # -- public API -------------------------------------------------------------------------------------------

    def append_text(self, text: str, *, kind: str = "text", camera: str = "", stamp: Optional[float] = None,
                    return_logits: bool = False, should_stop: Optional[Callable[[], bool]] = None) -> AppendResult:
        """Tokenise ``text`` and append it (split into pieces if longer than ``max_chunk_tokens``).

        Raises:
            ValueError: empty text.
            Cancelled: ``should_stop()`` returned True between two pieces.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("empty text: nothing to append")
        ids = self._encode(text)
        return self.append_chunk(Chunk(input_ids=ids, kind=kind, camera=camera, stamp=stamp, text=text),
                                 return_logits=return_logits, should_stop=should_stop)

    def append_chunk(self, chunk: Chunk, *, return_logits: bool = False,
                     should_stop: Optional[Callable[[], bool]] = None) -> AppendResult:
        """Append one chunk: a frame's tokens, a text observation, a prompt.

        ``should_stop`` is called before each piece of at most
        ``max_chunk_tokens`` tokens; when it returns True the append stops
        there and :class:`~.types.Cancelled` is raised (pieces already
        appended stay in the stream).
        """
        self._check_chunk(chunk)
        self._ensure_user_turn()
        if chunk.kind == "frame":
            self.frames_seen += 1
            if chunk.camera:
                self.cameras[chunk.camera] = self.cameras.get(chunk.camera, 0) + 1
        return self._append(chunk, return_logits=return_logits, should_stop=should_stop)

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
        continues; it is part of the answer in the stream but not of
        ``Answer.text``. With ``return_first_logits`` the answer carries the
        next-token logits right after the prompt (and prefix), ``[vocab]``
        float32: what a benchmark ranks candidate answers by, without another
        forward pass.
        """
        if not isinstance(question, str) or not question.strip():
            raise ValueError("empty question")
        max_answer = self.config.max_chunk_tokens - len(self._encode(self.format.assistant_to_user))
        if not 1 <= max_new_tokens <= max_answer:
            raise ValueError(f"max_new_tokens must be between 1 and {max_answer} (max_chunk_tokens minus the turn end)")
        started = time.perf_counter()
        self._ensure_user_turn()
        oldest, newest = self._held_frame_stamps(camera)
        about = f" (about camera {camera})" if camera else ""
        prompt = self._encode(f"Question{about}: {question.strip()}{self.format.user_to_assistant}{answer_prefix}")
        try:
            result = self._append(Chunk(input_ids=prompt, kind="question", camera=camera, text=question),
                                  return_logits=True, should_stop=should_stop)
        except Cancelled:
            # Stopped before the question's last piece, which is what opens the assistant
            # turn: the user turn goes on (a cut question followed by more observations).
            self._in_user_turn = True
            return Answer(text="", prompt_tokens=int(prompt.shape[1]), generated_tokens=0,
                          latency_s=time.perf_counter() - started, oldest_stamp=oldest, newest_stamp=newest,
                          cancelled=True)
        logits = result.logits[-1]
        first_logits = logits.clone() if return_first_logits else None
        generated: list[int] = []
        text, cancelled = "", False
        self.cache.decoding = True
        try:
            for _ in range(max_new_tokens):
                if should_stop is not None and should_stop():
                    cancelled = True
                    break
                token = self._next_token(logits, generated)
                if token in self._eos_ids:
                    break
                generated.append(token)
                decoded = self.lm.tokenizer.decode(generated, skip_special_tokens=True)
                if on_text is not None and len(decoded) > len(text):
                    on_text(decoded[len(text):])
                text = decoded
                step = self._append(Chunk(input_ids=torch.tensor([[token]]), kind="answer"), return_logits=True)
                logits = step.logits[-1]
            self._close_assistant_turn()
        finally:
            self.cache.decoding = False
        return Answer(
            text=text.strip(),
            prompt_tokens=int(prompt.shape[1]),
            generated_tokens=len(generated),
            latency_s=time.perf_counter() - started,
            oldest_stamp=oldest,
            newest_stamp=newest,
            cancelled=cancelled,
            first_logits=first_logits,
        )

    def stats(self) -> StreamStats:
        oldest, newest = self._held_frame_stamps()
        return StreamStats(
            policy=self.policy.name,
            tokens_held=self.cache.tokens_held,
            bytes_held=self.cache.nbytes,
            budget_tokens=self.budget if self.policy.evicts else 0,
            budget_bytes=self.budget * self.bytes_per_token if self.policy.evicts else 0,
            tokens_seen=self.cache.tokens_seen,
            evictions=self.cache.evictions,
            chunks_seen=self.chunks_seen,
            frames_seen=self.frames_seen,
            next_position=self.cache.next_position,
            oldest_stamp=oldest,
            newest_stamp=newest,
            cameras=dict(self.cameras),
        )

    def snapshot(self) -> dict:
        """A copy of the stream's state (cache and history), for :meth:`restore`.

        For probing what the stream holds without changing it: snapshot, ask,
        restore. Costs one copy of the cache (``stats().bytes_held``).
        """
        return copy.deepcopy({"cache": self.cache, "state": {k: getattr(self, k) for k in self._STATE}})

    def restore(self, snapshot: dict) -> None:
        """Go back to a state taken by :meth:`snapshot` of this stream; the snapshot is used up (its
        tensors become the stream's), so take a new one to restore again."""
        if type(snapshot.get("cache")) is not type(self.cache) or snapshot["cache"].budget != self.cache.budget:
            raise ValueError("not a snapshot of this stream")
        self.cache = snapshot["cache"]
        for key, value in snapshot["state"].items():
            setattr(self, key, value)

    _STATE = ("_records", "_next_prune", "frames_seen", "chunks_seen", "cameras", "_started", "_in_user_turn")

    def reset(self) -> None:
        """Forget everything; the next append starts a fresh conversation."""
        self.cache.reset()
        self._reset_state()

    def close(self) -> None:
        """Release the model: its own attention implementation is back once no other stream uses it."""
        if not self._closed:
            self._closed = True
            attention.uninstall(self._attention_modules, self._base_attention)

    def save(self, path: str | Path) -> None:
        """Write the stream's state (cache and history) to ``path``."""
        layers = []
        for layer in self.cache.layers:
            if not layer.is_initialized:
                layers.append(None)
                continue
            layers.append({name: getattr(layer, name).cpu() for name in ("keys", "values", "seen", "positions",
                                                                          "accumulated")})
        torch.save({
            "format": 1,
            "model": self.lm.name,
            "num_layers": self.num_layers,
            "config": asdict(self.config),
            "layers": layers,
            "cache": {"next_position": self.cache.next_position, "tokens_seen": self.cache.tokens_seen,
                      "evictions": self.cache.evictions, "group_starts": list(self.cache.group_starts)},
            "records": [asdict(r) for r in self._records],
            "frames_seen": self.frames_seen,
            "chunks_seen": self.chunks_seen,
            "cameras": self.cameras,
            "started": self._started,
            "in_user_turn": self._in_user_turn,
        }, str(path))

    def load(self, path: str | Path) -> None:
        """Restore a state written by ``save`` for the same model and settings."""
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if state.get("format") != 1:
            raise ValueError(f"{path} is not a saved stream")
        if state["num_layers"] != self.num_layers or state["model"] != self.lm.name:
            raise ValueError(f"{path} was saved from model {state['model']!r} ({state['num_layers']} layers), "
                             f"this stream runs {self.lm.name!r} ({self.num_layers} layers)")
        if state["config"] != asdict(self.config):
            raise ValueError(f"{path} was saved with other stream settings: {state['config']}")
        self.reset()
        device = self.lm.device
        for layer, saved in zip(self.cache.layers, state["layers"]):
            if saved is None:
                continue
            layer.lazy_initialization(saved["keys"].to(device), saved["values"].to(device))
            for name, tensor in saved.items():
                setattr(layer, name, tensor.to(device))
        for name, value in state["cache"].items():
            setattr(self.cache, name, value)
        self._records = [_Record(**r) for r in state["records"]]
        self.frames_seen, self.chunks_seen = state["frames_seen"], state["chunks_seen"]
        self.cameras = dict(state["cameras"])
        self._started, self._in_user_turn = state["started"], state["in_user_turn"]

    # -- internals --------------------------------------------------------------------------------------------

    def _close_assistant_turn(self) -> None:
        """Append the end of the assistant turn so the stream stays a well-formed conversation."""
        self._append(Chunk(input_ids=self._encode(self.format.assistant_to_user), kind="answer"))

    def _reset_state(self) -> None:
        self._records: list[_Record] = []
        self._next_prune = 256
        self.frames_seen = 0
        self.chunks_seen = 0
        self.cameras: dict[str, int] = {}
        self._started = False
        self._in_user_turn = False

    def _effective_budget(self) -> int:
        c = self.config
        per_layer_bytes = self.bytes_per_token // self.num_layers
        candidates = [c.budget_tokens] if c.budget_tokens else []
        if c.budget_bytes:
            candidates.append(c.budget_bytes // self.bytes_per_token)
        if c.budget_bytes_per_layer:
            candidates.append(c.budget_bytes_per_layer // per_layer_bytes)
        if c.policy == "full":
            return min(candidates) if candidates else 0
        budget = min(candidates)
        if budget < 1:
            raise ValueError(f"the byte budget holds no token: one token costs {self.bytes_per_token} bytes "
                             f"over all layers ({per_layer_bytes} per layer)")
        return budget

    def _end_token_ids(self) -> set[int]:
        """Tokens that end an answer: EOS, the generation config's EOS ids, and the end-of-turn marker."""
        tok = self.lm.tokenizer
        candidates = [tok.eos_token_id]
        gen_eos = getattr(getattr(self.lm.model, "generation_config", None), "eos_token_id", None)
        candidates += list(gen_eos) if isinstance(gen_eos, (list, tuple)) else [gen_eos]
        if self.format.assistant_to_user.strip():
            # e.g. <|im_end|> or <end_of_utterance>: the first token that closes an assistant turn
            first = int(self._encode(self.format.assistant_to_user)[0, 0])
            if tok.convert_ids_to_tokens(first) in set(tok.all_special_tokens or []):
                candidates.append(first)
        return {int(c) for c in candidates if c is not None}

    def _encode(self, text: str) -> torch.Tensor:
        ids = self.lm.tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return ids

    def _check_chunk(self, chunk: Chunk) -> None:
        if chunk.inputs_embeds is not None:
            hidden = int(self.lm.text_config.hidden_size)
            if chunk.inputs_embeds.shape[-1] != hidden:
                raise ValueError(f"inputs_embeds have width {chunk.inputs_embeds.shape[-1]}, the model expects {hidden}")
            if not chunk.inputs_embeds.is_floating_point():
                raise ValueError(f"inputs_embeds must be floating point, got {chunk.inputs_embeds.dtype}")
            if not torch.isfinite(chunk.inputs_embeds).all():
                raise ValueError("inputs_embeds contain NaN or inf")
            if chunk.rope_positions is not None and len(chunk) > self.config.max_chunk_tokens:
                raise ValueError(f"a frame of {len(chunk)} tokens is longer than max_chunk_tokens "
                                 f"({self.config.max_chunk_tokens}); lower the image size or raise the limit")
        else:
            if chunk.input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"input_ids must be integers, got {chunk.input_ids.dtype}")
            vocab = int(self.lm.text_config.vocab_size)
            if chunk.input_ids.min() < 0 or chunk.input_ids.max() >= vocab:
                raise ValueError(f"input_ids out of the vocabulary range [0, {vocab})")

    def _ensure_user_turn(self) -> None:
        if not self._started:
            text = f"{self.format.system_open}{self.config.system_prompt}{self.format.system_to_user}"
            self._started = True
            self._append(Chunk(input_ids=self._encode(text), kind="system", text=text))
            self._in_user_turn = True
        elif not self._in_user_turn:
            self._in_user_turn = True

    def _append(self, chunk: Chunk, *, return_logits: bool = False,
                should_stop: Optional[Callable[[], bool]] = None) -> AppendResult:
        if chunk.kind == "question":
            self._in_user_turn = False
        limit = self.config.max_chunk_tokens
        total, pieces, evicted, logits = len(chunk), 0, 0, []
        for start in range(0, total, limit):
            if should_stop is not None and should_stop():
                self.chunks_seen += pieces > 0
                raise Cancelled(start, total)
            piece_ids = chunk.input_ids[:, start:start + limit] if chunk.input_ids is not None else None
            piece_embeds = chunk.inputs_embeds[:, start:start + limit] if chunk.inputs_embeds is not None else None
            rel = chunk.rope_positions if chunk.rope_positions is not None and start == 0 else None
            before = self.cache.evictions
            out = self._forward(piece_ids, piece_embeds, rel, return_logits)
            evicted += self.cache.evictions - before
            if out is not None:
                logits.append(out)
            if chunk.stamp is not None:
                self._records.append(_Record(self.cache.tokens_seen - (min(total, start + limit) - start),
                                             self.cache.tokens_seen, chunk.kind, chunk.camera, chunk.stamp))
            pieces += 1
        if len(self._records) >= self._next_prune:
            self._prune_records()
        self.chunks_seen += 1
        return AppendResult(tokens=total, evicted=evicted, tokens_held=self.cache.tokens_held, pieces=pieces,
                            logits=torch.cat(logits) if logits else None)

    @torch.inference_mode()
    def _forward(self, input_ids, inputs_embeds, rel_positions, return_logits) -> Optional[torch.Tensor]:
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
        self.cache.begin_step(cache_positions)
        kwargs = {self._cache_kwarg: self.cache, "position_ids": position_ids, "use_cache": True,
                  "logits_to_keep": 0 if return_logits else 1}
        if input_ids is not None:
            kwargs["input_ids"] = input_ids.to(device)
        else:
            kwargs["inputs_embeds"] = inputs_embeds.to(device=device, dtype=self.lm.dtype)
        try:
            with attention.active(self.cache):
                out = self.lm.model(**kwargs)
        except Exception:
            self.cache.abort_step()
            raise
        self.cache.end_step(span)
        return out.logits[0].float() if return_logits else None

    def _next_token(self, logits: torch.Tensor, generated: list[int]) -> int:
        if generated and self.config.repetition_penalty > 1.0:
            logits = logits.clone()
            ids = torch.tensor(sorted(set(generated)), device=logits.device)
            picked = logits[ids]
            logits[ids] = torch.where(picked > 0, picked / self.config.repetition_penalty,
                                      picked * self.config.repetition_penalty)
        return int(logits.argmax().item())

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
