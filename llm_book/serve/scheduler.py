from __future__ import annotations
import itertools
from collections import deque
from dataclasses import dataclass, field
import torch
from llm_book.core.generation import check_generation_args, sample_next_token, stop_ids
from llm_book.serve.paged_cache import BlockPool, PagedKVCache, PagedSequence, PoolFullError

_request_ids = itertools.count()

@dataclass(eq=False)
class Request:
    "One generation request and its progress: the scheduler appends to `generated` and sets `finish_reason`."
    prompt: list[int] # token ids of the prompt
    max_new_tokens: int # tokens to generate at most
    temperature: float = 0.0 # 0: greedy
    top_k: int|None = None # sample among the k most likely tokens
    top_p: float|None = None # sample among the most likely tokens up to probability p
    stop: set[int] = field(default_factory=set) # ids that end the request (not included in `generated`)
    seed: int|None = None # seed of this request's own random generator
    id: int = field(default_factory=lambda: next(_request_ids))
    generated: list[int] = field(default_factory=list) # tokens chosen so far
    finish_reason: str|None = None # None while running; "stop", "length" or "cancelled"
    cancelled: bool = False # set by `Scheduler.cancel` (any thread); freed at the next step
    sequence: PagedSequence|None = None # its block table while it holds blocks
    pending: int|None = None # the last chosen token, not yet in the cache (the next decode input)
    generator: torch.Generator|None = None

    @property
    def finished(self) -> bool: return self.finish_reason is not None

class Scheduler:
    "Continuous batching: at every step retire finished requests, decode all running ones in one batch, admit new ones."
    def __init__(self, model, # a model of the book (full attention)
                 pool:BlockPool, # the paged KV cache's blocks
                 max_batch_size:int=32, # requests decoded together at most
                 max_context:int|None=None, # prompt + new tokens at most (default: the model's max_position_embeddings)
                ):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {max_batch_size!r}")
        self.model, self.pool, self.max_batch_size = model.eval(), pool, max_batch_size
        self.max_context = max_context or model.config.max_position_embeddings
        self.waiting, self.running = deque(), []
        self.num_steps = self.num_preempted = 0

    def __repr__(self): return f"Scheduler(running={len(self.running)}, waiting={len(self.waiting)}, {self.pool})"

    def check(self, request:Request):
        "Raise ValueError naming what is wrong with `request` (its settings, its prompt, the context, the pool)."
        check_generation_args(len(request.prompt), None, request.max_new_tokens, request.temperature, request.top_k,
                              request.top_p, sorted(request.stop) or None, self.model.vocab_size)
        if not request.prompt: raise ValueError("prompt is empty: give at least one token")
        if any(not isinstance(t, int) or not 0 <= t < self.model.vocab_size for t in request.prompt):
            raise ValueError(f"prompt ids must be ints in [0, vocab_size={self.model.vocab_size})")
        if len(request.prompt) >= self.max_context:
            raise ValueError(f"prompt has {len(request.prompt)} tokens; the context holds {self.max_context} "
                             "(prompt + at least one new token)")
        if self.pool.blocks_for(len(request.prompt) + 1) > self.pool.num_blocks:
            raise ValueError(f"prompt needs {self.pool.blocks_for(len(request.prompt) + 1)} blocks; "
                             f"the pool has {self.pool.num_blocks}")

    def submit(self, request:Request) -> Request:
        "Check `request` and queue it; it is admitted at a coming step when the pool has room."
        self.check(request)
        if request.seed is not None:
            request.generator = torch.Generator(self.pool.keys.device).manual_seed(request.seed)
        self.waiting.append(request)
        return request

    def cancel(self, request:Request):
        "Mark `request` cancelled (safe from any thread): its blocks return to the pool at the next step."
        request.cancelled = True

    @property
    def has_work(self) -> bool: return bool(self.waiting or self.running)

    def step(self) -> list[Request]:
        "One step: free cancelled requests, decode every running request in one batch, admit waiting ones (prefill)."
        self.num_steps += 1
        touched = self._retire_cancelled()
        with torch.inference_mode():
            if self.running: touched += self._decode()
            touched += self._admit()
        return touched

    def run(self, requests:list[Request]) -> list[Request]:
        "Submit `requests` and step until every one has finished."
        for request in requests: self.submit(request)
        while not all(r.finished for r in requests): self.step()
        return requests

    def _finish(self, request:Request, reason:str):
        "The request ends: its blocks go back to the pool."
        request.finish_reason, request.pending = reason, None
        if request.sequence is not None: request.sequence.free(); request.sequence = None
        if request in self.running: self.running.remove(request)

    def _retire_cancelled(self) -> list[Request]:
        cancelled = [r for r in [*self.running, *self.waiting] if r.cancelled and not r.finished]
        for r in cancelled:
            if r in self.waiting: self.waiting.remove(r)
            self._finish(r, "cancelled")
        return cancelled

    def _opens_block(self, request:Request) -> bool:
        "Its next token starts a new block (its blocks are full)."
        return request.sequence.length % self.pool.block_size == 0

    def _choose(self, requests:list[Request], logits) -> list[int]:
        "Each row's next token through the book's one sampler, with that request's own settings. logits: (B, V)."
        tokens = logits.argmax(-1)                                             # (B,): greedy rows are done
        for i, r in enumerate(requests):
            if r.temperature > 0:
                tokens[i] = sample_next_token(logits[i:i + 1], r.temperature, r.top_k, r.top_p, r.generator)[0]
        return tokens.tolist()                                                  # one device-to-host copy

    def _emit(self, request:Request, token:int):
        "Record the chosen token; finish the request on a stop id, its token budget, the context or the pool's size."
        if token in request.stop: return self._finish(request, "stop")
        request.generated.append(token)
        total = len(request.prompt) + len(request.generated)
        if len(request.generated) >= request.max_new_tokens or total >= self.max_context \
           or self.pool.blocks_for(total + 1) > self.pool.num_blocks:
            return self._finish(request, "length")
        request.pending = token

    def _decode(self) -> list[Request]:
        "One batched forward of every running request's pending token (preempting the newest when blocks run out)."
        needed = sum(self._opens_block(r) for r in self.running)
        while needed > self.pool.num_free:      # out of blocks: the newest request gives its blocks back and waits;
            victim = self.running.pop()         # readmitted, it is prefilled again from prompt + generated (recompute)
            needed -= self._opens_block(victim)
            victim.sequence.free()
            victim.sequence = victim.pending = None
            self.waiting.appendleft(victim)
            self.num_preempted += 1
        batch = list(self.running)
        if not batch: return []
        ids = torch.tensor([[r.pending] for r in batch], device=self.pool.keys.device)         # (B, 1)
        logits, _ = self.model(ids, cache=PagedKVCache([r.sequence for r in batch]), use_cache=True, logits_to_keep=1)
        for request, token in zip(batch, self._choose(batch, logits[:, -1])): self._emit(request, token)
        return batch

    def _admit(self) -> list[Request]:
        "Admit waiting requests in order while the batch and the pool have room; prefill each and choose its first token."
        admitted = []
        while self.waiting and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            prefix = request.prompt + request.generated          # a preempted request recomputes what it had
            headroom = sum(self._opens_block(r) for r in self.running)   # blocks the next decode step takes
            if self.pool.blocks_for(len(prefix)) + headroom > self.pool.num_free: break   # first come, first served
            self.waiting.popleft()
            request.sequence = PagedSequence(self.pool)
            ids = torch.tensor([prefix], device=self.pool.keys.device)                  # (1, T)
            logits, _ = self.model(ids, cache=PagedKVCache([request.sequence]), use_cache=True, logits_to_keep=1)
            self.running.append(request)
            self._emit(request, self._choose([request], logits[:, -1])[0])
            admitted.append(request)
        return admitted
