"""Batched autoregressive decoding over speech-conditioned prompts: greedy and beam search.

Both searches drive an `LMStepper` (prefill once with the prompt embeddings, then one token per
step with a KV cache) and share the stopping rules: a per-utterance bound on new tokens and a
repetition guard that ends a hypothesis whose tail is one n-gram repeated `max_repeats` times.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel

log = logging.getLogger(__name__)


def _cache_kwarg(llm: PreTrainedModel) -> str:
    # transformers 5.24 renamed `past_key_values` to `cache`; accept both (the GPU host has 5.17).
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def _new_dynamic_cache(llm: PreTrainedModel) -> DynamicCache:
    try:
        return DynamicCache(config=llm.config)
    except TypeError:
        return DynamicCache()


class LMStepper:
    """KV-cached incremental decoding of a causal LM from left-padded prompt embeddings."""

    def __init__(self, llm: PreTrainedModel) -> None:
        self.llm = llm
        self.cache_kwarg = _cache_kwarg(llm)

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        self.cache = _new_dynamic_cache(self.llm)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=True, logits_to_keep=1, **{self.cache_kwarg: self.cache})
        self.attention_mask = attention_mask
        self.next_position = position_ids[:, -1] + 1
        return out.logits[:, -1]

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        ones = self.attention_mask.new_ones((tokens.shape[0], 1))
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        out = self.llm(input_ids=tokens[:, None], attention_mask=self.attention_mask,
                       position_ids=self.next_position[:, None], use_cache=True, **{self.cache_kwarg: self.cache})
        self.next_position = self.next_position + 1
        return out.logits[:, -1]

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder_cache(rows)
        self.attention_mask = self.attention_mask[rows]
        self.next_position = self.next_position[rows]


def _cache_kv(cache: DynamicCache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]  # older Cache layout


class StaticLMStepper(LMStepper):
    """Fast decode steps for Qwen2: a preallocated KV cache and a hand-written single-token step.

    The prompt is prefilled by the Hugging Face forward (DynamicCache), then copied into static
    buffers. Each step reuses the model's own modules (norms, projections, rotary embedding, MLP)
    on fixed-shape tensors, so on CUDA the whole step is captured once as a CUDA graph and
    replayed: no per-step Python/kernel-launch overhead, no mask rebuilding.
    Equal to the generic stepper up to float rounding (tests/test_model.py).
    """

    SUPPORTED = ("qwen2",)

    @classmethod
    def supports(cls, llm: PreTrainedModel) -> bool:
        return llm.config.model_type in cls.SUPPORTED and not getattr(llm.config, "use_sliding_window", False)

    def __init__(self, llm: PreTrainedModel, max_new_tokens: int, cuda_graph: bool = True) -> None:
        super().__init__(llm)
        if not self.supports(llm):
            raise ValueError(f"StaticLMStepper supports {self.SUPPORTED} without sliding-window attention, "
                             f"not {llm.config.model_type!r}")
        self.max_new_tokens = max_new_tokens
        self.cuda_graph = cuda_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def prefill(self, embeds: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        logits = super().prefill(embeds, attention_mask, position_ids)
        self.use_generic = False
        try:
            self._allocate(attention_mask)
        except Exception as err:  # noqa: BLE001 - e.g. another transformers cache layout
            log.warning("static KV cache unavailable (%s); using the generic DynamicCache stepper", err)
            self.use_generic = True
        return logits

    def _allocate(self, attention_mask: torch.Tensor) -> None:
        """Static buffers sized for the prompt plus max_new_tokens, filled from the prefill cache."""
        rows, prompt = attention_mask.shape
        capacity = prompt + self.max_new_tokens + 1
        device = attention_mask.device
        self.keys, self.values = [], []
        for i in range(len(self.llm.model.layers)):
            k, v = _cache_kv(self.cache, i)
            kbuf = k.new_zeros((rows, k.shape[1], capacity, k.shape[3]))
            vbuf = v.new_zeros((rows, v.shape[1], capacity, v.shape[3]))
            kbuf[:, :, :prompt] = k
            vbuf[:, :, :prompt] = v
            self.keys.append(kbuf)
            self.values.append(vbuf)
        # The DynamicCache is kept until the first fast step has worked (fallback, see step()).
        self.mask = torch.zeros((rows, capacity), dtype=torch.bool, device=device)
        self.mask[:, :prompt] = attention_mask.bool()
        self.write_at = torch.tensor([prompt], dtype=torch.long, device=device)
        self.position = self.next_position.clone()
        self.token = torch.zeros(rows, dtype=torch.long, device=device)
        self.graph = None

    def _step_body(self) -> torch.Tensor:
        """One token for every row; reads/writes only the static buffers."""
        model, cfg = self.llm.model, self.llm.config
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        self.mask.index_fill_(1, self.write_at, True)
        x = model.embed_tokens(self.token)[:, None, :]
        cos, sin = model.rotary_emb(x, self.position[:, None])
        rows = x.shape[0]
        for i, layer in enumerate(model.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(rows, 1, heads, head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(rows, 1, kv_heads, head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(rows, 1, kv_heads, head_dim).transpose(1, 2)
            q, k = _apply_rotary(q, k, cos, sin)
            self.keys[i].index_copy_(2, self.write_at, k)
            self.values[i].index_copy_(2, self.write_at, v)
            o = torch.nn.functional.scaled_dot_product_attention(
                q, self.keys[i], self.values[i], attn_mask=self.mask[:, None, None, :],
                scale=head_dim ** -0.5, enable_gqa=heads != kv_heads)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(rows, 1, heads * head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = self.llm.lm_head(model.norm(x))[:, 0]
        self.write_at.add_(1)
        self.position.add_(1)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.use_generic:
            return super().step(tokens)
        self.token.copy_(tokens)
        if hasattr(self, "cache"):
            return self._first_step(tokens)
        if self.graph is not None:
            self.graph.replay()
            return self.logits_out
        return self._step_body()

    def _first_step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Capture (CUDA) or run the fast step; on any failure fall back, once, to the generic
        stepper (CUDA graph -> eager fast step -> DynamicCache), so decoding never breaks."""
        state = self._state()
        if self.cuda_graph and self.token.is_cuda:
            try:
                self._capture()
                self.graph.replay()
                del self.cache
                return self.logits_out
            except Exception as err:  # noqa: BLE001 - any capture failure has the same remedy
                log.warning("CUDA graph capture of the decode step failed (%s); decoding without it", err)
                self.graph, self.cuda_graph = None, False
                self._restore(state)
        try:
            logits = self._step_body()
        except Exception as err:  # noqa: BLE001
            log.warning("fast decode step failed (%s); using the generic DynamicCache stepper", err)
            self.use_generic = True
            return super().step(tokens)
        del self.cache
        return logits

    @property
    def path(self) -> str:
        """Which step ran: "cuda_graph", "eager" (fast step without graph) or "generic" (fallback)."""
        return "generic" if self.use_generic else ("cuda_graph" if self.graph is not None else "eager")

    def _state(self) -> tuple[torch.Tensor, ...]:
        return self.mask.clone(), self.write_at.clone(), self.position.clone()

    def _restore(self, state: tuple[torch.Tensor, ...]) -> None:
        for buf, saved in zip((self.mask, self.write_at, self.position), state):
            buf.copy_(saved)

    def _capture(self) -> None:
        # Warm up on a side stream (required before capture), then undo the warm-up's writes;
        # capturing records the step without running it.
        state = self._state()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step_body()
        torch.cuda.current_stream().wait_stream(stream)
        self._restore(state)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits_out = self._step_body()
        self._restore(state)

    def reorder(self, rows: torch.Tensor) -> None:
        if hasattr(self, "cache"):  # before the first step both caches are live
            super().reorder(rows)
        if self.use_generic:
            return
        for buf in (*self.keys, *self.values):
            buf.copy_(buf.index_select(0, rows))
        self.mask.copy_(self.mask.index_select(0, rows))
        self.position.copy_(self.position.index_select(0, rows))


def _apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = cos[:, None], sin[:, None]

    def rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def make_stepper(llm: PreTrainedModel, backend: str, max_new_tokens: int) -> LMStepper:
    """backend: "dynamic" (any causal LM), "static" (Qwen2 fast path, CUDA graph on GPU),
    "auto" (static when supported)."""
    if backend == "auto":
        backend = "static" if StaticLMStepper.supports(llm) else "dynamic"
    if backend == "static":
        return StaticLMStepper(llm, max_new_tokens)
    if backend == "dynamic":
        return LMStepper(llm)
    raise ValueError(f"decode backend {backend!r} unknown; use auto, static or dynamic")


@dataclass
class StoppingRules:
    eos_id: int
    pad_id: int
    max_new_tokens: torch.Tensor  # (R,) per row, EOS is forced once reached
    max_repeats: int = 4  # 0 disables the repetition guard
    repeat_max_ngram: int = 4

    def forced_eos(self, history: torch.Tensor, step: int) -> torch.Tensor:
        """(R,) rows that must end now: length bound reached or a repeated n-gram tail."""
        force = self.max_new_tokens <= step
        if self.max_repeats > 1:
            force = force | ends_in_repetition(history[:, :step], self.repeat_max_ngram, self.max_repeats)
        return force

    def apply(self, logits: torch.Tensor, history: torch.Tensor, step: int) -> torch.Tensor:
        force = self.forced_eos(history, step)
        eos_only = torch.full_like(logits[0], float("-inf"))
        eos_only[self.eos_id] = 0.0
        return torch.where(force[:, None], eos_only, logits)


def ends_in_repetition(tokens: torch.Tensor, max_ngram: int, repeats: int) -> torch.Tensor:
    """(R,) True where the last `n * repeats` tokens are one n-gram repeated, for some n <= max_ngram."""
    rows, length = tokens.shape
    out = torch.zeros(rows, dtype=torch.bool, device=tokens.device)
    for n in range(1, max_ngram + 1):
        span = n * repeats
        if length < span:
            break
        tail = tokens[:, length - span:].reshape(rows, repeats, n)
        out |= (tail == tail[:, -1:, :]).all(dim=2).all(dim=1)
    return out


def strip_after_eos(row: list[int], eos_id: int) -> list[int]:
    return row[: row.index(eos_id)] if eos_id in row else row


def greedy_search(stepper: LMStepper, embeds: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor, rules: StoppingRules) -> list[list[int]]:
    rows = embeds.shape[0]
    steps = int(rules.max_new_tokens.max()) + 1
    history = torch.full((rows, steps), rules.pad_id, dtype=torch.long, device=embeds.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=embeds.device)
    logits = stepper.prefill(embeds, attention_mask, position_ids)
    for t in range(steps):
        logits = rules.apply(logits, history, t)
        token = torch.where(finished, rules.pad_id, logits.argmax(dim=-1))
        history[:, t] = token
        finished |= token == rules.eos_id
        if bool(finished.all()):
            break
        logits = stepper.step(token)
    return [strip_after_eos(r, rules.eos_id) for r in history.tolist()]


def beam_search(stepper: LMStepper, embeds: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor, rules: StoppingRules, num_beams: int,
                length_penalty: float = 1.0) -> list[list[int]]:
    """Standard beam search; a hypothesis ends at EOS and is scored log p / len^length_penalty.

    `rules.max_new_tokens` is per utterance (B,); prompts are repeated here for the beams.
    """
    b, k = embeds.shape[0], num_beams
    expand = torch.arange(b, device=embeds.device).repeat_interleave(k)
    row_rules = StoppingRules(rules.eos_id, rules.pad_id, rules.max_new_tokens[expand],
                              rules.max_repeats, rules.repeat_max_ngram)
    steps = int(rules.max_new_tokens.max()) + 1
    history = torch.full((b * k, steps), rules.pad_id, dtype=torch.long, device=embeds.device)
    scores = torch.full((b, k), float("-inf"), device=embeds.device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    done = [False] * b
    logits = stepper.prefill(embeds[expand], attention_mask[expand], position_ids[expand])
    for t in range(steps):
        logp = torch.log_softmax(row_rules.apply(logits.float(), history, t), dim=-1)
        vocab = logp.shape[-1]
        cand = (scores.reshape(-1, 1) + logp).reshape(b, k * vocab)
        top_scores, top_index = cand.topk(2 * k, dim=-1)
        top_scores, top_beam, top_token = top_scores.tolist(), (top_index // vocab).tolist(), (top_index % vocab).tolist()
        new_scores = [[float("-inf")] * k for _ in range(b)]
        new_beam = [list(range(k)) for _ in range(b)]
        new_token = [[rules.pad_id] * k for _ in range(b)]
        prev = history[:, :t].tolist()
        for i in range(b):
            if done[i]:
                continue
            j = 0
            for rank, (s, beam, token) in enumerate(zip(top_scores[i], top_beam[i], top_token[i])):
                if s == float("-inf"):
                    break
                if token == rules.eos_id:
                    if rank < k:
                        finished[i].append((s / (t + 1) ** length_penalty, prev[i * k + beam]))
                    continue
                new_scores[i][j], new_beam[i][j], new_token[i][j] = s, beam, token
                j += 1
                if j == k:
                    break
            done[i] = len(finished[i]) >= k or j == 0
        if all(done):
            break
        rows = (torch.arange(b)[:, None] * k + torch.tensor(new_beam)).reshape(-1).to(embeds.device)
        tokens = torch.tensor(new_token, device=embeds.device).reshape(-1)
        history = history[rows]
        history[:, t] = tokens
        stepper.reorder(rows)
        scores = torch.tensor(new_scores, device=embeds.device)
        logits = stepper.step(tokens)
    for i in range(b):
        if not finished[i]:  # no EOS within the bound: fall back to the live beams
            live = history[i * k:(i + 1) * k].tolist()
            finished[i] = [(s / steps ** length_penalty, [x for x in r if x != rules.pad_id])
                           for s, r in zip(scores[i].tolist(), live)]
    return [strip_after_eos(max(f, key=lambda x: x[0])[1], rules.eos_id) for f in finished]
