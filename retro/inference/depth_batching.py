"""Depth-batched decoding: rows of a batch run at different depths, and a queue of prompts refills freed rows.

With a per-token exit rule, a batch decoded in lockstep waits at every token for its deepest row. Here every
row (slot) keeps its own position, its own pass counter and its own cache length, and one *tick* runs one
recurrent pass for every slot still iterating, whatever pass or token that slot is at:

- a slot that is iterating runs its next block pass at its current token;
- a slot whose token exited waits, out of the block, until `readout_share` of the occupied slots waits; then
  one coda + head call reads them all out (kl/entropy: the read-out of each exit pass, kept), each picks its
  next token, and at the next tick runs that token's embed + prelude and first pass.

So the block runs on every slot still iterating, and the passes of different slots are batched together. The
block's K/V cache is one buffer per layer with a pass axis [P, B, H, L, D]: each slot reads and writes the
buffer of its own pass, at its own position, and its attention mask shows its own positions only. A slot whose
request finished is refilled with the next prompt of the queue (prefilled at r_max passes, several new slots at
once, right-padded), as in continuous batching.

Every request draws its s0 and samples from its own generator seeded with `settings.seed`, in the order a batch
of one would, so the output of each request is that of `generate` on it alone (greedy tokens and exit depths
identical; tested in tests/unit/test_depth_batching.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from retro.inference.adaptive import _score
from retro.inference.generate import (
    Completion,
    GenerationSettings,
    StopStrings,
    _next_token,
    prepare_prompts,
    truncate_at_stop,
)
from retro.model.modeling import RetroForCausalLM
from retro.model.precision import to_autocast_dtype
from retro.model.rope import rope_cos_sin


class _RowSlot:
    """One layer's K/V [P, B, H, L, D] (P = passes for block layers with a per-pass cache, else 1)."""

    __slots__ = ("cache", "k", "v")

    def __init__(self, cache: RowKVCache, passes: int, shape: tuple[int, ...], dtype, device) -> None:
        self.cache = cache
        self.k = torch.zeros((passes, *shape), dtype=dtype, device=device)
        self.v = torch.zeros((passes, *shape), dtype=dtype, device=device)

    def update(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.cache
        which = c.passes if self.k.size(0) > 1 else torch.zeros_like(c.passes)
        index = (which[:, None], c.rows[:, None], slice(None), c.positions)  # each row at its pass and positions
        self.k[index] = key.transpose(1, 2)
        self.v[index] = value.transpose(1, 2)
        span = slice(0, c.read_len)
        one = 0 if self.k.size(0) == 1 else c.one_pass  # the pass every row is at, or None
        if one is None:
            return self.k[:, :, :, span][which, c.rows], self.v[:, :, :, span][which, c.rows]
        if c.all_rows:  # every row at one pass: a view, no gather
            return self.k[one, :, :, span], self.v[one, :, :, span]
        return self.k[one, :, :, span][c.rows], self.v[one, :, :, span][c.rows]


class RowKVCache:
    """K/V for every (stage, pass, layer) where each batch row has its own positions and its own pass.

    Before each model call, `set` names the rows that run, the positions [n, T] they write, the recurrent pass
    each is at (block layers only), and how many positions attention reads back (masked per row by the caller).
    The model asks for `("block", p, i)`; the slot of block layer i serves every row at its own pass instead.
    """

    def __init__(
        self, model: RetroForCausalLM, batch_size: int, max_length: int, num_passes: int, share_block_cache: bool
    ) -> None:
        config = model.config
        param = model.lm_head.weight
        shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
        self.max_length = max_length
        self.num_passes = num_passes
        self.share_block_cache = share_block_cache
        block_passes = 1 if share_block_cache else num_passes
        self._slots: dict[tuple, _RowSlot] = {}
        for i in range(config.n_prelude):
            self._slots[("prelude", i)] = _RowSlot(self, 1, shape, param.dtype, param.device)
        for i in range(config.n_coda):
            self._slots[("coda", i)] = _RowSlot(self, 1, shape, param.dtype, param.device)
        self.block = [_RowSlot(self, block_passes, shape, param.dtype, param.device) for _ in range(config.n_recurrent)]
        self.rows = self.positions = self.passes = torch.zeros(0, dtype=torch.long, device=param.device)
        self.read_len = 0
        self.batch_size, self.all_rows, self.one_pass = batch_size, False, None
        self.past_length = 0  # the model's KVCache protocol; unused (the caller gives positions and masks)

    def set(self, rows: torch.Tensor, positions: torch.Tensor, passes: torch.Tensor, read_len: int) -> None:
        if int(positions.max()) >= self.max_length:
            raise ValueError(f"KV cache overflow: position {int(positions.max())}, cache holds {self.max_length}")
        self.rows, self.positions, self.passes, self.read_len = rows, positions, passes, read_len
        self.all_rows = rows.numel() == self.batch_size  # rows are distinct and sorted: all of them, in order
        first = int(passes[0])
        self.one_pass = first if bool((passes == first).all()) else None

    def at_pass(self, p: int) -> None:
        """The rows of the last `set` all move on to pass p."""
        self.passes, self.one_pass = torch.full_like(self.rows, p), p

    def slot(self, key: tuple) -> _RowSlot:
        if key[0] == "block":
            return self.block[key[-1]]
        return self._slots[key]

    def fill_later_passes(self, rows: list[int], exit_pass: list[int], positions: list[int]) -> None:
        """Rows that exited at `exit_pass`: copy that pass's K/V at their position into every later pass's
        buffer, so later tokens attending through those passes read the exit state (as StaticKVCache does)."""
        if self.share_block_cache:
            return
        dst, row, src, pos = [], [], [], []
        for b, e, t in zip(rows, exit_pass, positions):
            for q in range(e + 1, self.num_passes):
                dst.append(q), row.append(b), src.append(e), pos.append(t)
        if not dst:
            return
        device = self.rows.device
        dst_t, row_t, src_t, pos_t = (torch.tensor(x, device=device) for x in (dst, row, src, pos))
        for s in self.block:
            for buf in (s.k, s.v):
                buf[dst_t, row_t, :, pos_t] = buf[src_t, row_t, :, pos_t]


@dataclass
class Finished:
    """One request's output: its index in the queue, the generated ids (up to the stop) and passes per token."""

    index: int
    tokens: list[int]
    passes: list[int]


@dataclass
class DepthStats:
    """How busy the block was: `ticks` (one pass for every active slot each), `work` (row passes run)."""

    ticks: int = 0
    work: int = 0
    prefills: int = 0
    readouts: int = 0  # read-outs of waiting slots (each one coda + head call for the state rule and fixed r)
    slots_of: dict[int, int] = field(default_factory=dict)  # request index -> slot it ran in


def _row_mask(pos: torch.Tensor, read: int) -> torch.Tensor:
    """[n, 1, 1, read]: each row sees its own positions up to its current one."""
    return (torch.arange(read, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]


def _prelude(model, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: RowKVCache):
    """Embeddings and prelude layers with per-row positions and mask (`embed_and_prelude` takes one past length
    for the whole batch, so it cannot be reused here)."""
    m = model.model
    x = to_autocast_dtype(m.embed_tokens(ids))
    rope = rope_cos_sin(m.inv_freq, positions, x.dtype)
    for i, layer in enumerate(m.prelude):
        x = layer(x, rope, mask, cache.slot(("prelude", i)))
    return x, rope


def _initial_states(model, e: torch.Tensor, lengths: list[int], generators: list) -> torch.Tensor:
    """s0 for each row, drawn from the row's own generator over its real positions only (as a batch of one)."""
    m = model.model
    if m.config.state_init in ("zeros", "embed"):
        return m.initial_state(e)
    s0 = torch.zeros_like(e)
    for i, (n, g) in enumerate(zip(lengths, generators)):
        s0[i, :n] = m.initial_state(e[i : i + 1, :n], g)[0]
    return s0


class _Decoder:
    """The slots' state between ticks; `run` yields each request when it finishes."""

    def __init__(
        self, model, prompts, settings: GenerationSettings, max_batch: int, eos, stop, stats, readout_share: float
    ) -> None:
        self.model, self.settings, self.stop, self.stats = model, settings, stop, stats
        self.rule = settings.exit_rule()
        self.r = settings.num_recurrences
        config = model.config
        device = model.lm_head.weight.device
        self.device = device
        self.queue = deque(enumerate(prompts))
        self.eos = set(eos)
        batch = min(max_batch, len(prompts))
        length = max(len(p) for p in prompts) + settings.max_new_tokens
        self.cache = RowKVCache(model, batch, length, self.r, settings.share_block_cache)
        self.request = [-1] * batch  # request index per slot, -1: free
        self.out: list[list[int]] = [[] for _ in range(batch)]
        self.used: list[list[int]] = [[] for _ in range(batch)]
        self.generators: list[torch.Generator | None] = [None] * batch
        long = dict(dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, **long)  # position of each slot's current input token
        self.token = torch.zeros(batch, **long)  # its current input token
        self.npass = torch.zeros(batch, **long)  # passes run at the current token
        self.starting = torch.zeros(batch, dtype=torch.bool, device=device)  # needs embed + prelude this tick
        self.has_prev = torch.zeros(batch, dtype=torch.bool, device=device)
        width = (
            config.hidden_size if self.rule is None or self.rule.criterion == "state" else model.lm_head.out_features
        )
        self.prev = torch.zeros(batch, width, dtype=torch.float32, device=device)
        self.state = self.injection = None  # [B, 1, h], allocated at the first token (compute dtype)
        self.waiting = torch.zeros(batch, dtype=torch.bool, device=device)  # token exited, read-out pending
        self.logits: torch.Tensor | None = None  # kl / entropy: each waiting slot's exit-pass logits [B, V]
        # kl / entropy read out every pass anyway: nothing to gain by waiting
        self.readout_at = 0.0 if self.rule is not None and self.rule.needs_readout else readout_share

    def run(self) -> Iterator[Finished]:
        yield from self._refill()
        while any(r >= 0 for r in self.request):
            yield from self._tick()
            yield from self._refill()

    def _free(self, b: int) -> Finished:
        done = Finished(self.request[b], self.out[b], self.used[b])
        self.request[b], self.out[b], self.used[b] = -1, [], []
        return done

    def _emit(self, b: int, token: int, passes: int) -> bool:
        """Record a slot's new token; True when its request is finished (EOS, stop, budget)."""
        self.out[b].append(token)
        self.used[b].append(passes)
        return (
            token in self.eos
            or (self.stop is not None and self.stop(self.out[b]))
            or len(self.out[b]) == self.settings.max_new_tokens
        )

    def _pick(self, logits: torch.Tensor, slots: list[int]) -> list[int]:
        if not self.settings.do_sample:
            return logits.argmax(-1).tolist()
        return [int(_next_token(logits[i : i + 1], self.settings, self.generators[b])) for i, b in enumerate(slots)]

    def _refill(self) -> Iterator[Finished]:
        """Prefill free slots from the queue (all at once); a request done at its first token frees its slot."""
        while self.queue and -1 in self.request:
            slots, rows = [], []
            for b in range(len(self.request)):
                if self.request[b] < 0 and self.queue:
                    index, prompt = self.queue.popleft()
                    self.request[b], self.stats.slots_of[index] = index, b
                    self.generators[b] = torch.Generator(self.device).manual_seed(self.settings.seed)
                    slots.append(b), rows.append(list(prompt))
            logits = self._prefill(slots, rows)
            for b, prompt, t in zip(slots, rows, self._pick(logits, slots)):
                if self._emit(b, t, self.r):
                    yield self._free(b)
                else:  # the first new token is the next input, right after the prompt
                    self.pos[b], self.token[b], self.starting[b] = len(prompt), t, True

    def _prefill(self, slots: list[int], rows: list[list[int]]) -> torch.Tensor:
        """The prompts of `slots` at r passes, right-padded; last-position logits [n, V]."""
        model, m = self.model, self.model.model
        self.stats.prefills += 1
        n, width = len(rows), max(map(len, rows))
        device = self.device
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows], device=device)
        lengths = torch.tensor([len(r) for r in rows], device=device)
        keys = torch.arange(width, device=device)
        causal = keys[None, :] <= keys[:, None]
        mask = (causal[None] & (keys[None, None, :] < lengths[:, None, None])) | torch.eye(
            width, dtype=torch.bool, device=device
        )
        mask = mask[:, None]  # padded queries see themselves (finite); their K/V lie past the row's end, masked
        positions = keys.expand(n, width)
        slot_t = torch.tensor(slots, device=device)
        self.cache.set(slot_t, positions, torch.zeros(n, dtype=torch.long, device=device), width)
        e, rope = _prelude(model, ids, positions, mask, self.cache)
        injection, state = m.recurrent.start(
            e, _initial_states(model, e, lengths.tolist(), [self.generators[b] for b in slots])
        )
        for p in range(self.r):
            self.cache.at_pass(p)
            state = m.recurrent.recurrence_pass(state, injection, rope, mask, self.cache, p)
        hidden = m.coda_and_norm(state, rope, mask, self.cache)
        return model.lm_head(hidden[torch.arange(n, device=device), lengths - 1])

    def _tick(self) -> Iterator[Finished]:
        """One block pass for every slot still iterating; then the read-out of the waiting slots, if due."""
        occupied = [b for b, r in enumerate(self.request) if r >= 0]
        waiting = self.waiting.tolist()
        iterating = [b for b in occupied if not waiting[b]]
        if iterating:
            self._pass(torch.tensor(iterating, device=self.device))
        waiting = [b for b in occupied if self.waiting[b]]
        if waiting and (len(waiting) >= self.readout_at * len(occupied) or len(waiting) == len(occupied)):
            yield from self._readout(torch.tensor(waiting, device=self.device))

    def _pass(self, active: torch.Tensor) -> None:
        """Embed + prelude for the slots that begin a token, one block pass for all of `active`, the exit test;
        slots whose token exits start waiting for the read-out (their skipped passes' K/V filled)."""
        model, m, cache = self.model, self.model.model, self.cache
        pos = self.pos[active]
        read = int(pos.max()) + 1
        mask = _row_mask(pos, read)
        starting = self.starting[active]
        if bool(starting.any()):
            self._start_tokens(active[starting], pos[starting], mask[starting], read)
        rope = rope_cos_sin(m.inv_freq, pos[:, None], self.state.dtype)
        cache.set(active, pos[:, None], self.npass[active], read)
        new = m.recurrent.recurrence_pass(self.state[active], self.injection[active], rope, mask, cache, 0)
        self.state[active] = new
        self.npass[active] += 1
        done = self.npass[active]
        self.stats.ticks += 1
        self.stats.work += active.numel()
        out = None
        if self.rule is not None and self.rule.needs_readout:
            out = model.lm_head(m.coda_and_norm(new, rope, mask, cache)[:, -1])
        exits = done >= self.r
        if self.rule is not None:
            score, now = _score(self.rule, out, self.prev[active], new)
            valid = torch.ones_like(exits) if self.rule.criterion == "entropy" else self.has_prev[active]
            exits |= valid & (done >= self.rule.min_passes) & (score < self.rule.threshold)
            if now is not None:
                self.prev[active] = now
                self.has_prev[active] = True
        if not bool(exits.any()):
            return
        slots = active[exits]
        cache.fill_later_passes(slots.tolist(), (done[exits] - 1).tolist(), pos[exits].tolist())
        self.waiting[slots] = True
        if out is not None:  # kl / entropy: the exit pass's read-out is the token's
            if self.logits is None:
                self.logits = out.new_zeros(len(self.request), out.size(-1))
            self.logits[slots] = out[exits]

    def _readout(self, slots: torch.Tensor) -> Iterator[Finished]:
        """The waiting slots' next tokens: coda + head on their exit states (kl / entropy: the exit pass's
        logits, kept), picked, emitted; an unfinished slot begins its next token at the next tick."""
        model, m, cache = self.model, self.model.model, self.cache
        if self.logits is not None:
            logits = self.logits[slots]
        else:
            pos = self.pos[slots]
            read = int(pos.max()) + 1
            cache.set(slots, pos[:, None], torch.zeros_like(slots), read)
            rope = rope_cos_sin(m.inv_freq, pos[:, None], self.state.dtype)
            logits = model.lm_head(m.coda_and_norm(self.state[slots], rope, _row_mask(pos, read), cache)[:, -1])
        self.stats.readouts += 1
        slot_list, passes = slots.tolist(), self.npass[slots].tolist()
        self.waiting[slots] = False
        for b, t, used in zip(slot_list, self._pick(logits, slot_list), passes):
            if self._emit(b, t, used):
                yield self._free(b)
            else:
                self.pos[b] += 1
                self.token[b], self.starting[b] = t, True

    def _start_tokens(self, slots: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, read: int) -> None:
        """Embed + prelude for the slots that begin a token; their s0 and injection for the passes."""
        m = self.model.model
        self.cache.set(slots, pos[:, None], torch.zeros_like(slots), read)
        e, _ = _prelude(self.model, self.token[slots][:, None], pos[:, None], mask, self.cache)
        listed = slots.tolist()
        s0 = _initial_states(self.model, e, [1] * len(listed), [self.generators[b] for b in listed])
        injection, state = m.recurrent.start(e, s0)
        if self.state is None:
            batch = len(self.request)
            self.state = state.new_zeros(batch, *state.shape[1:])
            self.injection = injection.new_zeros(batch, *injection.shape[1:])
        self.state[slots], self.injection[slots] = state, injection
        self.npass[slots] = 0
        self.has_prev[slots] = False
        self.starting[slots] = False


@torch.no_grad()
def generate_stream(
    model: RetroForCausalLM,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings,
    max_batch: int,
    eos_token_ids: Sequence[int] = (),
    stop: Callable[[list[int]], bool] | None = None,
    stats: DepthStats | None = None,
    readout_share: float = 0.5,
) -> Iterator[Finished]:
    """Decode a queue of prompts (token ids, unpadded) `max_batch` at a time with depth batching; yields each
    request as it finishes (at EOS, `stop` or `max_new_tokens`). Each request's output is `generate`'s on it
    alone. `stats` (optional) is filled with the ticks and work done.

    `readout_share` in [0, 1]: slots whose token exited wait (their rows leave the block) until this share of
    the occupied slots waits, then coda + head run once for all of them. 0 reads out each tick; 1 waits for
    every slot (lockstep tokens with a queue). Each read-out costs a coda and head weight pass whatever its rows,
    so waiting pays where those weights, not the rows, set the time (small batches, CPUs); the state rule and
    fixed r only (kl and entropy read out every pass anyway)."""
    settings.validate()
    if not model.config.is_recurrent:
        raise ValueError("depth batching needs a recurrent model; this checkpoint is static (n_recurrent = 0)")
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    if not 0.0 <= readout_share <= 1.0:
        raise ValueError(f"readout_share must be in [0, 1], got {readout_share}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt (no tokens): give it some text or add BOS")
    if not prompts:
        return
    decoder = _Decoder(model, prompts, settings, max_batch, eos_token_ids, stop, stats or DepthStats(), readout_share)
    yield from decoder.run()


def generate_text_queued(
    model: RetroForCausalLM,
    tokenizer,
    prompts: Sequence[str],
    settings: GenerationSettings,
    max_batch: int,
    stop_strings: Sequence[str] = (),
    add_bos: bool | None = None,
    max_length: int | None = None,
    readout_share: float = 0.5,
) -> list[Completion]:
    """`generate_text` with depth batching over the whole queue of prompts; completions in prompt order
    (`readout_share` as in `generate_stream`)."""
    rows, lengths, eos_ids, _ = prepare_prompts(model, tokenizer, prompts, settings, add_bos, max_length)
    stop = StopStrings(tokenizer, stop_strings) if stop_strings else None
    completions: list[Completion | None] = [None] * len(rows)
    for done in generate_stream(model, rows, settings, max_batch, eos_ids, stop, readout_share=readout_share):
        text = truncate_at_stop(tokenizer.decode(done.tokens, skip_special_tokens=True), stop_strings)
        n, i = len(done.tokens), done.index
        mean = sum(done.passes) / n if n else 0.0
        completions[i] = Completion(text, n, mean, len(rows[i]), len(rows[i]) < lengths[i])
    return completions
