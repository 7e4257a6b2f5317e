from __future__ import annotations
import asyncio, json, queue, socket, threading, time, uuid
from pathlib import Path
import torch
from contextlib import asynccontextmanager
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from llm_book.chat import stop_token_ids
from llm_book.serve.paged_cache import BlockPool
from llm_book.serve.scheduler import Request, Scheduler

class APIError(Exception):
    "An error answered in OpenAI's shape: `{\"error\": {\"message\", \"type\", \"param\", \"code\"}}` with an HTTP status."
    def __init__(self, status:int, message:str, type:str="invalid_request_error", param:str|None=None,
                 code:str|None=None, headers:dict|None=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type, param, code, headers
    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

class Engine:
    "The one background thread that owns the model and the scheduler; handlers hand it requests and await tokens."
    def __init__(self, scheduler:Scheduler, # the continuous-batching scheduler (its model and pool)
                 max_waiting:int=256, # requests queued beyond a full batch; more get 503 + Retry-After
                ):
        self.scheduler, self.max_waiting = scheduler, max_waiting
        self.inbox = queue.Queue()                 # ("submit", request, loop, asyncio.Queue) from the handlers
        self.listeners = {}                        # request -> (event loop, asyncio.Queue, tokens delivered)
        self.lock, self.num_active, self.error = threading.Lock(), 0, None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="llm_book-engine", daemon=True)

    def start(self): self.thread.start(); return self
    def stop(self):
        self.stopping.set(); self.inbox.put(None); self.thread.join(timeout=30)

    def submit(self, request:Request) -> asyncio.Queue:
        "Queue `request` (called on the event loop); its queue receives ('token', id)…, then ('done', reason)."
        with self.lock:
            if self.num_active >= self.scheduler.max_batch_size + self.max_waiting:
                raise APIError(503, "the server is at capacity; retry shortly", "server_error", code="overloaded",
                               headers={"Retry-After": "1"})
            self.num_active += 1
        events = asyncio.Queue()
        self.inbox.put(("submit", request, asyncio.get_running_loop(), events))
        return events

    def cancel(self, request:Request):
        "Cancel `request` (a client went away): the next step frees its blocks."
        self.scheduler.cancel(request); self.inbox.put(("wake",))

    def _run(self):
        while not self.stopping.is_set():
            try: item = self.inbox.get(timeout=None if not self.scheduler.has_work else 0)  # idle: sleep until work
            except queue.Empty: item = ("wake",)
            while item is not None:               # take everything that arrived
                if item[0] == "submit":
                    _, request, loop, events = item
                    self.listeners[request] = [loop, events, 0]
                    self.scheduler.submit(request)   # checked by the handler already
                try: item = self.inbox.get_nowait()
                except queue.Empty: break
            if item is None or self.stopping.is_set(): break
            try: touched = self.scheduler.step() if self.scheduler.has_work else []
            except Exception as e:                # a bug must not hang the clients: fail every request, keep serving
                self.error = e
                touched = [*self.scheduler.running, *self.scheduler.waiting]
                for request in touched: self.scheduler._finish(request, "error")
                self.scheduler.waiting.clear()
            for request in touched: self._deliver(request)

    def _deliver(self, request:Request):
        "Hand the request's new tokens (and its end) to the handler's queue on its event loop."
        listener = self.listeners.get(request)
        if listener is None: return
        loop, events, delivered = listener
        for token in request.generated[delivered:]: loop.call_soon_threadsafe(events.put_nowait, ("token", token))
        listener[2] = len(request.generated)
        if request.finished:
            loop.call_soon_threadsafe(events.put_nowait, ("done", request.finish_reason))
            del self.listeners[request]
            with self.lock: self.num_active -= 1

class TextStream:
    "Turns a growing list of token ids into text pieces; holds back a piece that ends inside a UTF-8 character."
    def __init__(self, tokenizer): self.tokenizer, self.ids, self.emitted = tokenizer, [], ""
    def add(self, token:int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"): return ""
        piece, self.emitted = text[len(self.emitted):], text
        return piece

def _number(body:dict, name:str, default, kind=(int, float)):
    "body[name] (or `default` when absent/null), checked to be a number of `kind`; APIError 400 otherwise."
    value = body.get(name)
    if value is None: return default
    if not isinstance(value, kind) or isinstance(value, bool):
        raise APIError(400, f"'{name}' must be a number, got {value!r}", param=name, code="invalid_type")
    return value

def parse_request(body, # the decoded JSON body
                  engine:Engine, # its scheduler checks the request
                  tokenizer, # turns messages or a prompt into ids
                  model_name:str, # the one model this server has
                  chat:bool, # /v1/chat/completions (messages) or /v1/completions (prompt)
                 ) -> Request:
    "Check an OpenAI request body and build the scheduler's `Request`; APIError (4xx, OpenAI's shape) if it is bad."
    if not isinstance(body, dict): raise APIError(400, "the request body must be a JSON object")
    if body.get("model") not in (None, model_name):
        raise APIError(404, f"The model '{body.get('model')}' does not exist; this server has '{model_name}'",
                       param="model", code="model_not_found")
    if _number(body, "n", 1, int) != 1: raise APIError(400, "only n=1 is supported", param="n")
    if body.get("stop"): raise APIError(400, "stop sequences are not supported; the model stops at its end-of-turn token", param="stop")
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
            raise APIError(400, "'messages' must be a non-empty list of {'role': str, 'content': str}", param="messages")
        prompt = tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                               add_generation_prompt=True)
    else:
        text = body.get("prompt")
        if isinstance(text, list) and len(text) == 1: text = text[0]
        if not isinstance(text, str) or not text: raise APIError(400, "'prompt' must be a non-empty string", param="prompt")
        prompt = tokenizer.encode(text)
    context = engine.scheduler.max_context
    if len(prompt) >= context:
        raise APIError(400, f"This model's maximum context length is {context} tokens, but the prompt has {len(prompt)} "
                       "tokens (room is needed for at least one new token)", param="messages" if chat else "prompt",
                       code="context_length_exceeded")
    max_tokens = _number(body, "max_completion_tokens", None, int)
    max_tokens = _number(body, "max_tokens", context - len(prompt) if max_tokens is None else max_tokens, int)
    if max_tokens <= 0: raise APIError(400, f"'max_tokens' must be >= 1, got {max_tokens}", param="max_tokens")
    temperature = _number(body, "temperature", 1.0)
    if temperature < 0 or temperature > 2:
        raise APIError(400, f"'temperature' must be in [0, 2], got {temperature}", param="temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1: raise APIError(400, f"'top_p' must be in (0, 1], got {top_p}", param="top_p")
    seed = _number(body, "seed", None, int)
    sampling = temperature > 0
    request = Request(prompt, min(max_tokens, context - len(prompt)), float(temperature),
                      top_p=top_p if sampling and top_p < 1 else None, stop=stop_token_ids(tokenizer), seed=seed)
    try: engine.scheduler.check(request)
    except ValueError as e: raise APIError(400, str(e)) from None
    return request

def _completion_chunk(kind:str, rid:str, created:int, model_name:str, piece:str|None, finish_reason:str|None,
                      first:bool=False) -> dict:
    "One streamed chunk: a chat delta or a completion's text."
    if kind == "chat":
        delta = {} if piece is None else ({"role": "assistant", "content": piece} if first else {"content": piece})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name, "choices": [choice]}
    choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish_reason}
    return {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": [choice]}

def create_app(model, # a model of the book (full attention), in eval mode
               tokenizer, # its tokenizer (`encode`, `decode`, `apply_chat_template`, `special_tokens`)
               model_name:str="llm_book", # the id `/v1/models` lists and requests must name (or omit)
               num_blocks:int|None=None, # KV pool blocks (default: enough for max_batch_size full contexts / 4)
               block_size:int=16, # tokens per block
               max_batch_size:int=32, # requests decoded together
               max_waiting:int=256, # requests queued beyond the batch; more get 503 + Retry-After
               max_context:int|None=None, # prompt + new tokens (default: the model's max_position_embeddings)
              ):
    "The OpenAI-compatible FastAPI app: `/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`, and the chat page at `/`."
    context = max_context or model.config.max_position_embeddings
    if num_blocks is None: num_blocks = max(max_batch_size * context // block_size // 4, -(-context // block_size))
    scheduler = Scheduler(model, BlockPool.for_model(model, num_blocks, block_size), max_batch_size, context)
    engine = Engine(scheduler, max_waiting)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="llm_book", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(_, e:APIError): return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.get("/", response_class=HTMLResponse)
    async def page(): return CHAT_PAGE.replace("__MODEL__", json.dumps(model_name))

    @app.get("/health")
    async def health():
        pool = scheduler.pool
        return {"status": "ok" if engine.thread.is_alive() else "stopped", "model": model_name,
                "running": len(scheduler.running), "waiting": len(scheduler.waiting), "steps": scheduler.num_steps,
                "blocks_used": pool.num_used, "blocks_total": pool.num_blocks, "block_size": pool.block_size}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "llm_book"}]}

    async def complete(http:HTTPRequest, kind:str):
        try: body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        request = parse_request(body, engine, tokenizer, model_name, chat=kind == "chat")
        stream = bool(body.get("stream"))
        events = engine.submit(request)                       # may raise APIError 503
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created, text = int(time.time()), TextStream(tokenizer)
        if stream:
            async def sse():
                first, finished = True, False
                try:
                    if kind == "chat":                          # OpenAI opens a chat stream with the role
                        yield f"data: {json.dumps(_completion_chunk(kind, rid, created, model_name, '', None, True))}\n\n"
                        first = False
                    while True:
                        event, value = await events.get()
                        if event == "done":
                            finished = True
                            reason = "stop" if value == "stop" else "length"
                            yield f"data: {json.dumps(_completion_chunk(kind, rid, created, model_name, None, reason))}\n\n"
                            yield "data: [DONE]\n\n"
                            return
                        piece = text.add(value)
                        if piece: yield f"data: {json.dumps(_completion_chunk(kind, rid, created, model_name, piece, None))}\n\n"
                finally:                                        # the client went away mid-stream: free its blocks
                    if not finished: engine.cancel(request)
            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        pieces, finished = [], False
        try:
            while True:
                event, value = await events.get()
                if event == "done": finished = True; break
                pieces.append(text.add(value))
        finally:
            if not finished: engine.cancel(request)
        if value == "error": raise APIError(500, f"generation failed: {engine.error}", "server_error")
        reason = "stop" if value == "stop" else "length"
        usage = {"prompt_tokens": len(request.prompt), "completion_tokens": len(request.generated),
                 "total_tokens": len(request.prompt) + len(request.generated)}
        content = "".join(pieces)
        if kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": content}, "logprobs": None, "finish_reason": reason}
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name, "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": reason}
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": [choice], "usage": usage}

    @app.post("/v1/chat/completions")
    async def chat_completions(http:HTTPRequest): return await complete(http, "chat")

    @app.post("/v1/completions")
    async def completions(http:HTTPRequest): return await complete(http, "text")

    return app

class ServerThread:
    "Run an app with uvicorn in a background thread on 127.0.0.1 (a free port by default): `with ServerThread(app) as url:`."
    def __init__(self, app, host:str="127.0.0.1", port:int=0):
        import uvicorn
        if port == 0:
            with socket.socket() as s: s.bind((host, 0)); port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline: raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self.url
    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)

def load_model(path:str|Path|None=None, # a LLaMA-architecture .gguf (default: the SmolLM2-135M-Instruct that ships)
               dtype:torch.dtype=torch.float32, # dtype of the weights
              ):
    "The model, its tokenizer and its name (the file name up to the first dot)."
    from llm_book.gguf import load_gguf, smollm2_path
    path = Path(path) if path is not None else smollm2_path()
    model, tokenizer = load_gguf(path, dtype)
    return model, tokenizer, path.name.split(".")[0]

def serve(model:str|Path|None=None, # a .gguf file (default: SmolLM2-135M-Instruct)
          host:str="127.0.0.1", # the address to bind (127.0.0.1: this machine only)
          port:int=8000, # the TCP port
          **app_kwargs, # for `create_app`: num_blocks, block_size, max_batch_size, max_waiting, max_context
         ):
    "Load the model and serve it until interrupted (`llm_book serve`)."
    import uvicorn
    loaded, tokenizer, name = load_model(model)
    print(f"llm_book serve: {name} on http://{host}:{port}  (chat page at /, API at /v1)", flush=True)
    uvicorn.run(create_app(loaded, tokenizer, name, **app_kwargs), host=host, port=port, log_level="warning")

CHAT_PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llm_book chat</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem;color:#222}
 #log{display:flex;flex-direction:column;gap:.6rem;margin-bottom:1rem}
 .msg{padding:.5rem .8rem;border-radius:.6rem;white-space:pre-wrap;max-width:85%}
 .user{background:#dbeafe;align-self:flex-end}.assistant{background:#f1f5f9;align-self:flex-start}
 form{display:flex;gap:.5rem}textarea{flex:1;font:inherit;padding:.4rem}#status{color:#666;font-size:.85rem}
</style></head><body>
<h1>llm_book chat</h1>
<div id="log"></div>
<form id="form"><textarea id="input" rows="2" placeholder="Say something…"></textarea>
<button id="send" type="submit">Send</button><button id="stop" type="button" disabled>Stop</button></form>
<p id="status">ready</p>
<script>
const MODEL = __MODEL__;
const messages = [];                       // the conversation, sent whole with every turn
let controller = null;
const $ = id => document.getElementById(id);
function bubble(role, text) {
  const div = document.createElement('div');
  div.className = 'msg ' + role; div.textContent = text; $('log').appendChild(div); return div;
}
async function send(text) {
  messages.push({role: 'user', content: text}); bubble('user', text);
  const out = bubble('assistant', ''); let reply = '';
  controller = new AbortController(); $('send').disabled = true; $('stop').disabled = false;
  $('status').textContent = 'generating…';
  try {
    const response = await fetch('/v1/chat/completions', {method: 'POST', signal: controller.signal,
      headers: {'Content-Type': 'application/json'},
      body: JSON.stringify({model: MODEL, messages, stream: true, temperature: 0.2, max_tokens: 512})});
    if (!response.ok) throw new Error((await response.json()).error.message);
    const reader = response.body.getReader(), decoder = new TextDecoder(); let buffer = '';
    for (;;) {
      const {value, done} = await reader.read(); if (done) break;
      buffer += decoder.decode(value, {stream: true});
      const events = buffer.split('\n\n'); buffer = events.pop();   // keep an incomplete event for the next read
      for (const event of events) {
        const data = event.replace(/^data: /, '');
        if (data === '[DONE]') continue;
        const delta = JSON.parse(data).choices[0].delta;
        if (delta.content) { reply += delta.content; out.textContent = reply; }
      }
    }
    $('status').textContent = 'done';
  } catch (e) {
    $('status').textContent = e.name === 'AbortError' ? 'stopped' : 'error: ' + e.message;
  } finally {
    messages.push({role: 'assistant', content: reply});   // a stopped reply stays in the conversation
    controller = null; $('send').disabled = false; $('stop').disabled = true;
  }
}
$('form').addEventListener('submit', e => {
  e.preventDefault(); const text = $('input').value.trim();
  if (text && !controller) { $('input').value = ''; send(text); }
});
$('input').addEventListener('keydown', e => {
  if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); $('form').requestSubmit(); }
});
$('stop').addEventListener('click', () => controller && controller.abort());
</script></body></html>
"""
