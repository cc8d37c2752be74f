"""Sampling with a KV cache, written out by hand: no `model.generate`.

`sample` draws n completions of ONE prompt: the prompt is prefilled once, its cache is repeated
per row, finished rows leave the batch, and at most `chunk_size` rows decode at a time. Keys and
values go into preallocated buffers (no per-step concatenation), and tokens are drawn by inverting
the cumulative distribution. `generate_batch` completes different prompts side by side (left
padding, for evaluation). Temperature 0 is greedy. Completions come back as token lists that keep
the EOS that ended them. On CPU both may run on other kernels where a measurement on the machine
says they are faster (`sampling_kernels`, tinyrl/cpu.py). `StaticDecoder` is the fixed-shape
variant for CUDA graphs (--static-cache).
"""
from __future__ import annotations

import functools
import inspect
import time

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from tinyrl import cpu


@functools.lru_cache(maxsize=None)
def _cache_kwarg(model_class) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept either (looked up once per class)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


class PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in buffers of `capacity` positions: update() writes in place, returns views.

    HF's DynamicLayer re-concatenates the whole cache on every step; on CPU that copy was most of
    a decode step at 50 rows x 300 tokens (bench/sampling.py)."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.k_buf = key_states.new_empty(b, h, self.capacity, d)  # (B, kv_heads, capacity, head_dim)
        self.v_buf = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise RuntimeError(f"KV cache capacity {self.capacity} exceeded")
        self.k_buf[:, :, self.length:end] = key_states
        self.v_buf[:, :, self.length:end] = value_states
        self.length = end
        self.keys, self.values = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.capacity

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]  # a copy, made only when rows finish
        self.keys, self.values = self.k_buf[:, :, :self.length], self.v_buf[:, :, :self.length]

    def repeat_rows(self, rows: int, capacity: int) -> "PreallocatedLayer":
        """A new layer that holds this 1-row layer's positions in each of `rows` rows, with room for `capacity`."""
        out = PreallocatedLayer(capacity)
        out.update(self.keys.expand(rows, -1, -1, -1), self.values.expand(rows, -1, -1, -1))
        return out


class FixedLayer(DynamicLayer):
    """Fixed-shape keys/values for CUDA graphs: each step writes at `slot` (a tensor, not a Python int)
    and attention reads the whole buffer under a mask, so every step has the same shapes and addresses."""

    def __init__(self, k_buf: torch.Tensor, v_buf: torch.Tensor, slot: torch.Tensor):
        super().__init__()
        self.k_buf, self.v_buf, self.slot = k_buf, v_buf, slot
        self.keys, self.values, self.is_initialized = k_buf, v_buf, True
        if k_buf.is_cuda:
            torch._dynamo.mark_static_address(k_buf)
            torch._dynamo.mark_static_address(v_buf)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.k_buf.index_copy_(2, self.slot, key_states)
        self.v_buf.index_copy_(2, self.slot, value_states)
        return self.k_buf, self.v_buf

    def get_seq_length(self) -> int:
        return self.k_buf.shape[2]


def new_cache(model, capacity: int | None = None) -> Cache:
    """A KV cache for `model`: preallocated for `capacity` positions, or HF's growing DynamicCache."""
    if capacity is None:
        return DynamicCache(config=model.config)
    return Cache(layers=[PreallocatedLayer(capacity) for _ in range(model.config.num_hidden_layers)])


def sampling_kernels(model, rows: int, positions: int):
    """The kernels a CPU model decodes on (`tinyrl.cpu.choose`): measured once, on a decode step of `rows`
    rows over `positions` cached positions; elsewhere torch's own."""
    if not cpu.is_cpu(model):
        return cpu.use(model, cpu.TORCH)
    filled: list = []  # built on the first probe only: once the choice is made, each call does no extra work

    def probe() -> float:
        if not filled:  # the cached positions, filled once on torch's kernels
            vocab = model.get_input_embeddings().num_embeddings
            prompt = torch.randint(vocab, (1, positions), generator=torch.Generator().manual_seed(0))
            filled.extend([new_cache(model, positions),
                           torch.randint(vocab, (rows, 1), generator=torch.Generator().manual_seed(1))])
            forward_step(model, prompt, filled[0])
        tokens = filled[1]
        cache = Cache(layers=[layer.repeat_rows(rows, positions + 1) for layer in filled[0].layers])
        start = time.perf_counter()
        forward_step(model, tokens, cache)
        return time.perf_counter() - start

    linear, attention = cpu.onednn_usable(), model.config._attn_implementation == "sdpa"
    candidates = [cpu.Kernels(lin, att) for lin in {False, linear} for att in {False, attention}]
    with torch.no_grad():
        return cpu.use(model, cpu.choose(model, "decode", probe, candidates, f"{rows} rows x {positions} positions"))


def forward_step(model, input_ids, cache, attention_mask=None, position_ids=None) -> torch.Tensor:
    """Run `input_ids` (B, T) through the model, appending to `cache`; return last-position logits (B, V)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, logits_to_keep=1, **{_cache_kwarg(type(model)): cache})
    return out.logits[:, -1].float()


def pick_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next tokens: argmax at temperature 0, else a draw from softmax(logits / T).

    The draw inverts the cumulative distribution with one uniform per row. torch.multinomial draws an
    exponential for every vocabulary entry instead, which on CPU cost 40 ms per step at 50 x 49k."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    cdf = probs.double().cumsum(-1)  # (B, V); float64 so that the top end is exact enough
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=torch.float64)
    picked = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # first index whose cdf exceeds u
    return picked.squeeze(1).clamp(max=probs.shape[1] - 1)  # zero-probability tokens are never picked


def decode(
    model,
    cache,
    logits: torch.Tensor,
    max_new_tokens: int,
    temperature: float,
    eos_ids: list[int],
    generator: torch.Generator | None = None,
    attention_mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> list[list[int]]:
    """Decode from a filled `cache` whose next-token logits are `logits` (B, V).

    attention_mask (B, S) and positions (B,) are needed only for left-padded batches; rows that emit
    an EOS id are dropped from the batch (and the cache) at once."""
    rows = logits.shape[0]
    eos = torch.tensor(sorted(eos_ids), device=logits.device)
    alive = torch.arange(rows, device=logits.device)  # original row of each row still decoding
    completions: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        tokens = pick_tokens(logits, temperature, generator)  # (b,)
        for row, tok in zip(alive.tolist(), tokens.tolist()):
            completions[row].append(tok)
        if step == max_new_tokens - 1:
            break
        done = torch.isin(tokens, eos)
        if done.any():
            keep = (~done).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            alive, tokens = alive[keep], tokens[keep]
            cache.batch_select_indices(keep)
            if attention_mask is not None:
                attention_mask, positions = attention_mask[keep], positions[keep]
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(alive), 1)], dim=1)
            positions = positions + 1
        logits = forward_step(model, tokens[:, None], cache, attention_mask,
                              None if positions is None else positions[:, None])
    return completions


class StaticDecoder:
    """Fixed-shape decoding state for CUDA graphs, kept across calls so a compiled step is captured once.

    Finished rows keep decoding (and are ignored) instead of leaving the batch; the cache has room for
    `capacity` positions from the start and attention reads all of it under a mask. With compile=True
    each step runs under torch.compile(mode="reduce-overhead"), which replays one CUDA graph."""

    _cache: dict = {}

    @classmethod
    def get(cls, model, prompt_cache: Cache, rows: int, max_new_tokens: int, compile: bool) -> "StaticDecoder":
        P = prompt_cache.layers[0].get_seq_length()
        capacity = -(-(P + max_new_tokens) // 64) * 64  # round up, so that prompts of similar length share one
        key = (id(model), rows, capacity, compile)
        if key not in cls._cache:
            cls._cache = {k: v for k, v in cls._cache.items() if k[0] == id(model)}  # one model at a time
            cls._cache[key] = cls(model, prompt_cache, rows, capacity, compile)
        return cls._cache[key]

    def __init__(self, model, prompt_cache: Cache, rows: int, capacity: int, compile: bool):
        first = prompt_cache.layers[0].keys
        self.slot = torch.zeros(1, dtype=torch.long, device=first.device)  # where this step's keys/values go
        self.cache = Cache(layers=[FixedLayer(layer.keys.new_zeros(rows, layer.keys.shape[1], capacity, layer.keys.shape[3]),
                                              layer.values.new_zeros(rows, layer.values.shape[1], capacity,
                                                                     layer.values.shape[3]), self.slot)
                                   for layer in prompt_cache.layers])
        self.mask = torch.zeros(rows, 1, 1, capacity, dtype=torch.bool, device=first.device)  # (B, 1, q=1, capacity)
        self.position = torch.zeros(rows, 1, dtype=torch.long, device=first.device)
        self.tokens_in = torch.zeros(rows, 1, dtype=torch.long, device=first.device)
        self.step = lambda: forward_step(model, self.tokens_in, self.cache, self.mask, self.position)  # noqa: E731
        if compile:
            self.step = torch.compile(self.step, mode="reduce-overhead")

    def run(self, prompt_cache: Cache, logits: torch.Tensor, max_new_tokens: int, temperature: float,
            eos_ids: list[int], generator: torch.Generator | None = None) -> list[list[int]]:
        rows, P = logits.shape[0], prompt_cache.layers[0].get_seq_length()
        for fixed, layer in zip(self.cache.layers, prompt_cache.layers):  # the prompt, in every row
            fixed.k_buf[:, :, :P], fixed.v_buf[:, :, :P] = layer.keys, layer.values
        self.mask.zero_()
        self.mask[..., :P] = True
        self.slot.fill_(P)
        self.position.fill_(P)
        eos = torch.tensor(sorted(eos_ids), device=logits.device)
        finished = torch.zeros(rows, dtype=torch.bool, device=logits.device)
        completions: list[list[int]] = [[] for _ in range(rows)]
        for i in range(max_new_tokens):
            tokens = pick_tokens(logits, temperature, generator)
            for row, (tok, done) in enumerate(zip(tokens.tolist(), finished.tolist())):
                if not done:
                    completions[row].append(tok)
            finished |= torch.isin(tokens, eos)
            if i == max_new_tokens - 1 or bool(finished.all()):
                break
            self.tokens_in.copy_(tokens[:, None])
            self.mask.index_fill_(3, self.slot, True)
            logits = self.step().clone()  # clone: the next replay of a captured graph overwrites its output
            self.slot += 1
            self.position += 1
        return completions


@torch.no_grad()
def sample(
    model,
    prompt_ids: list[int] | torch.Tensor,
    n: int,
    max_new_tokens: int,
    temperature: float,
    eos_ids: list[int],
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    static: bool = False,
) -> list[list[int]]:
    """n completions of one prompt: one shared prefill, its cache repeated per row, chunks of <= chunk_size rows.

    static=True decodes with fixed shapes and, on CUDA, under torch.compile with CUDA graphs (`StaticDecoder`)."""
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt_ids, device=device).view(1, -1)  # (1, P)
    with sampling_kernels(model, min(chunk_size or n, n), prompt.shape[1] + max_new_tokens // 2):
        prompt_cache = new_cache(model, capacity=prompt.shape[1])
        first_logits = forward_step(model, prompt, prompt_cache)  # (1, V): the prefill, done once
        chunk = chunk_size or n
        completions: list[list[int]] = []
        for start in range(0, n, chunk):
            rows = min(chunk, n - start)
            if static:
                decoder = StaticDecoder.get(model, prompt_cache, rows, max_new_tokens, compile=device.type == "cuda")
                completions += decoder.run(prompt_cache, first_logits.expand(rows, -1), max_new_tokens, temperature,
                                           eos_ids, generator)
                continue
            capacity = prompt.shape[1] + max_new_tokens
            cache = Cache(layers=[layer.repeat_rows(rows, capacity) for layer in prompt_cache.layers])  # (rows, h, P, d)
            completions += decode(model, cache, first_logits.expand(rows, -1), max_new_tokens, temperature,
                                  eos_ids, generator)
        return completions


@torch.no_grad()
def generate_batch(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    eos_ids: list[int],
    pad_id: int,
    generator: torch.Generator | None = None,
) -> list[list[int]]:
    """One completion for each of several prompts, decoded together with left padding."""
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p, device=device)
        mask[i, width - len(p):] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, S): each prompt starts at position 0
    cache = new_cache(model, capacity=width + max_new_tokens)
    with sampling_kernels(model, len(prompts), width + max_new_tokens // 2):
        logits = forward_step(model, ids, cache, mask, position_ids)
        return decode(model, cache, logits, max_new_tokens, temperature, eos_ids, generator,
                      attention_mask=mask, positions=position_ids[:, -1])


class _Slots:
    """The KV cache of a continuously batched decode: one row per slot, columns shared by all rows.

    Every decode step appends one column to every row. A prompt placed into a slot occupies the P
    columns that end at the current width (earlier columns of that row are masked), so a new
    problem joins without disturbing the others; `mask` (rows, width) marks each row's valid columns.
    When the buffers are full, columns no row uses any more are dropped from the left."""

    def __init__(self, model, rows: int, capacity: int):
        self.cache = new_cache(model, capacity)
        self.capacity, self.width, self.rows = capacity, 0, rows
        self.mask = torch.zeros(rows, 0, dtype=torch.bool, device=next(model.parameters()).device)

    def _resize(self, capacity: int, shift: int, keep_from: int = 0) -> None:
        """Buffers of `capacity` columns holding the old columns [keep_from, width) at offset `shift`."""
        for layer in self.cache.layers:
            for name in ("k_buf", "v_buf"):
                old = getattr(layer, name)
                new = old.new_zeros(old.shape[0], old.shape[1], capacity, old.shape[3])
                new[:, :, shift:shift + self.width - keep_from] = old[:, :, keep_from:self.width]
                setattr(layer, name, new)
            layer.capacity = capacity
        mask = self.mask.new_zeros(self.mask.shape[0], shift + self.width - keep_from)
        mask[:, shift:] = self.mask[:, keep_from:]
        self.mask, self.capacity, self.width = mask, capacity, shift + self.width - keep_from
        self._sync()

    def _sync(self) -> None:
        for layer in self.cache.layers:
            layer.length = self.width
            layer.keys, layer.values = layer.k_buf[:, :, :self.width], layer.v_buf[:, :, :self.width]

    def place(self, slot: int, prompt_cache: Cache, row: int = 0) -> None:
        """Put row `row` of a prefilled prompt cache into `slot`, ending at the current width."""
        P = prompt_cache.layers[0].get_seq_length()
        if not self.cache.layers[0].is_initialized:  # the first prompt: buffers shaped like one row of its keys
            for layer, src in zip(self.cache.layers, prompt_cache.layers):
                layer.lazy_initialization(src.keys[:1].expand(self.rows, -1, -1, -1),
                                          src.values[:1].expand(self.rows, -1, -1, -1))
                layer.k_buf.zero_(), layer.v_buf.zero_()  # masked columns are read (weight 0): no stale NaN
        if P > self.width:  # room on the left for a prompt longer than the window
            self._resize(max(self.capacity, 2 * P), shift=P - self.width)
        for layer, src in zip(self.cache.layers, prompt_cache.layers):
            layer.k_buf[slot, :, self.width - P:self.width] = src.keys[row]
            layer.v_buf[slot, :, self.width - P:self.width] = src.values[row]
        self.mask[slot] = False
        self.mask[slot, self.width - P:] = True

    def make_room(self, unused: int = 32) -> None:
        """Room for one more column. Columns no row attends to any more are dropped once there are `unused` of
        them (every decode step attends over the whole width) or the buffers are full; full even then: grow."""
        first = int(self.mask.any(0).int().argmax()) if self.mask.any() else self.width
        if first >= unused or (first > 0 and self.width >= self.capacity):
            self._resize(self.capacity, shift=0, keep_from=first)
        if self.width >= self.capacity:
            self._resize(2 * self.capacity, shift=0)

    def keep(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)
        self.mask = self.mask[rows]
        self.rows = len(rows)


@torch.no_grad()
def generate_continuous(
    model,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos_ids: list[int],
    batch_size: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    on_done=None,
) -> list[list[int]]:
    """One completion per prompt with continuous batching: up to `batch_size` rows decode together, and
    when rows end (an EOS id or max_new_tokens) their slots take the next prompts, so no row waits for the
    longest of a fixed batch. Slots are refilled once an eighth of them are free: prompts are prefilled
    without padding (those of equal length together), then placed into the shared cache with their own
    positions. on_done(i, tokens) is called as prompt i ends.
    Greedy results equal one-prompt-at-a-time decoding (tested on the tiny model and SmolLM2)."""
    device = next(model.parameters()).device
    completions: list[list[int]] = [[] for _ in prompts]
    if not prompts:
        return completions
    eos = torch.tensor(sorted(eos_ids), device=device)
    rows = min(batch_size, len(prompts))
    longest = max(map(len, prompts))
    slots = _Slots(model, rows, capacity=2 * (longest + max_new_tokens))
    queue = iter(range(len(prompts)))
    owner = [-1] * rows  # which prompt each slot decodes
    length = torch.zeros(rows, dtype=torch.long, device=device)  # tokens of each row so far (prompt + generated)

    def start(free: list[int]) -> dict[int, torch.Tensor]:
        """Prefill the next prompts into the `free` slots; returns {slot: next-token logits (V,)}. Prompts of
        equal length are prefilled together (no padding, so each row computes as it would alone)."""
        taken = [(s, i) for s, i in zip(free, queue)]
        by_length: dict[int, list[tuple[int, int]]] = {}
        for s, i in taken:
            by_length.setdefault(len(prompts[i]), []).append((s, i))
        logits = {}
        for P, group in by_length.items():
            prompt_cache = new_cache(model, capacity=P)
            ids = torch.tensor([prompts[i] for _, i in group], device=device)  # (g, P)
            out = forward_step(model, ids, prompt_cache)
            for row, (s, i) in enumerate(group):
                slots.place(s, prompt_cache, row)
                owner[s], length[s], logits[s] = i, P, out[row]
        return logits

    with sampling_kernels(model, rows, longest + max_new_tokens // 2):
        first = start(list(range(rows)))
        logits = torch.stack([first[s] for s in range(rows)])  # (rows, V)
        left = len(prompts) - rows  # prompts not started yet
        refill_at = max(1, rows // 8)  # one prefill pass for several prompts costs less than one pass each
        idle: list[int] = []  # slots whose row has ended; they wait (masked) for the next prompts
        while True:
            tokens = pick_tokens(logits, temperature, generator)
            ended = torch.isin(tokens, eos).tolist()
            for s, tok in enumerate(tokens.tolist()):
                i = owner[s]
                if i < 0:
                    continue
                completions[i].append(tok)
                if ended[s] or len(completions[i]) == max_new_tokens:
                    owner[s] = -1
                    idle.append(s)
                    if on_done:
                        on_done(i, completions[i])
            fresh: dict[int, torch.Tensor] = {}  # slots that took a new prompt: their prefill logits
            if idle and left == 0:  # nothing left to start: the batch shrinks
                keep = [s for s, i in enumerate(owner) if i >= 0]
                if not keep:
                    return completions
                index = torch.tensor(keep, device=device)
                slots.keep(index)
                owner, tokens, length, idle = [owner[s] for s in keep], tokens[index], length[index], []
            elif len(idle) >= min(refill_at, left) or len(idle) == len(owner):
                fresh = start(idle)
                left, idle = left - len(fresh), []
            slots.make_room()
            continuing = torch.tensor([i >= 0 and s not in fresh for s, i in enumerate(owner)], device=device)
            step_mask = torch.cat([slots.mask, continuing[:, None]], dim=1)  # the new column: real tokens only
            positions = torch.where(continuing, length, 0)[:, None]  # a continuing row's token sits at length
            step_tokens = torch.where(continuing, tokens, pad_id)[:, None]
            logits = forward_step(model, step_tokens, slots.cache, step_mask, positions)
            slots.width += 1
            slots.mask = step_mask
            length = length + continuing.long()
            for s, new in fresh.items():
                logits[s] = new
