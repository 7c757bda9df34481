"""`hatrt serve` (engines/server.py): a real server on 127.0.0.1 driven by the official `openai`
client: concurrent requests equal their solo runs, streamed == unstreamed, cancellation frees the
rows, bad input gets OpenAI-style 400s, overload 429 + Retry-After, backend failures stay with
their requests, and SIGTERM drains then exits 0.

Every request loop is bounded in count and time; everything listens on 127.0.0.1 only."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("tokenizers")

from engines.backends import TorchBackend, load_backend  # noqa: E402
from engines.generate import ERROR, Request, Scheduler, generate  # noqa: E402
from engines.server import ChoiceText, ServerThread, build_state  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESET = "tiny-flash"  # vocab 512
BOS, EOS = "<|bos|>", "<|eos|>"
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
DEADLINE = 60.0  # no single wait in this file exceeds this


# ============================================================================ fixtures
def _tokenizer(vocab_size: int = 400):
    import inspect
    import textwrap

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [inspect.getsource(textwrap), "héllo wörld ☃ naïve café 日本語 " * 20]
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """tiny-flash weights + a byte-level BPE tokenizer (vocab 400) with a chat template."""
    from exporter import load_model
    from exporter.checkpoint import save_checkpoint

    out = tmp_path_factory.mktemp("serve") / "tiny-chat"
    model = load_model(PRESET)
    save_checkpoint(model, model.config, out)
    tok = _tokenizer()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "add_bos_token": False,
         "chat_template": CHAT_TEMPLATE}))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.token_to_id(BOS), "eos_token_id": tok.token_to_id(EOS)}))
    return out


@pytest.fixture(scope="module")
def srv(ckpt):
    state = build_state(str(ckpt), "torch", max_batch=16, max_queue=16, prefill_chunk=16, model_id="tiny")
    with ServerThread(state) as s:
        yield s


def client(s, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=DEADLINE, **kw)


def wait_until(pred, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def metric(s, name: str) -> float:
    for line in httpx.get(s.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric {name}")


def solo(s, prompt_ids: list[int], n: int) -> list[int]:
    """engines.generate.generate on the same backend, this prompt alone, the CLI's stop rule."""
    st = s.state
    return generate(st.engine.backend, [prompt_ids], max_new_tokens=n, stop_tokens=st.text.eos)[0].tokens


def encode(s, text: str) -> list[int]:
    return s.state.text.tokenizer.encode(text)


# ============================================================================ pure units
def test_choice_text_stop_strings_hold_back_and_cut():
    """Text that may begin a stop string is held back; the stop string and what follows are cut;
    the pieces add up to the whole text (streamed == unstreamed by construction)."""
    c = ChoiceText(None, ["9 4"])  # no tokenizer: ids as text "1 9 4 ..."
    pieces = [c.push(t) for t in (1, 9)]
    assert pieces == [("1", False), (" ", False)]  # "9" may start "9 4": held back
    piece, stopped = c.push(4)
    assert stopped and piece == "" and c.text == "1 " and c.finish_reason == "stop"
    c = ChoiceText(None, ["xyz"])
    out = [c.push(t)[0] for t in (1, 2, 3)]
    assert "".join(out) + c.finish() == "1 2 3" == c.text


def test_scheduler_isolates_backend_errors():
    """Scheduler(isolate_errors=True): a failing prefill fails its request only; a failing decode
    fails the rows of that step; the scheduler keeps going. Default: the exception propagates."""
    class Flaky(TorchBackend):
        fail_decode = False

        def _run_step(self, input_ids, logits_index, cache, layer_outputs):
            if (input_ids == 511).any() or (self.fail_decode and input_ids.shape[1] == 1):
                raise RuntimeError("injected failure")
            return super()._run_step(input_ids, logits_index, cache, layer_outputs)

    backend = Flaky(load_backend(PRESET).model)
    plain = Scheduler(backend)
    plain.submit(Request([1, 511], 3))
    with pytest.raises(RuntimeError, match="injected"):
        list(plain.run())
    sch = Scheduler(backend, isolate_errors=True)
    sch.submit(Request([1, 2, 3], 4), "ok")
    sch.submit(Request([5, 511], 4), "bad")
    events = []
    for _ in range(20):
        if not sch.pending:
            break
        events += sch.step()
    bad = [e for e in events if e.row == "bad"]
    assert len(bad) == 1 and bad[0].finish_reason == ERROR and "injected failure" in bad[0].error
    assert [e.token for e in events if e.row == "ok"] == generate(backend, [[1, 2, 3]], max_new_tokens=4,
                                                                  stop_tokens=())[0].tokens
    sch.submit(Request([1, 2], 5), "a")
    sch.step()  # prefill: "a" joins the batch
    backend.fail_decode = True
    events = sch.step()
    backend.fail_decode = False
    assert [(e.row, e.finish_reason) for e in events if e.finish_reason == ERROR] == [("a", ERROR)]
    assert sch.batch_size == 0 and sch.cache is None and not sch.pending
    sch.submit(Request([1, 2, 3], 4), "again")
    assert [e.token for e in sch.run()] == generate(backend, [[1, 2, 3]], max_new_tokens=4, stop_tokens=())[0].tokens


# ============================================================================ the server
def test_models_health_metrics(srv):
    c = client(srv)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    h = httpx.get(srv.url + "/health", timeout=10)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    text = httpx.get(srv.url + "/metrics", timeout=10).text
    for name in ("hatrt_queue_depth", "hatrt_running_batch", "hatrt_tokens_per_second",
                 "hatrt_time_to_first_token_seconds_bucket", "hatrt_inter_token_latency_seconds_bucket"):
        assert name in text


def test_16_concurrent_requests_equal_their_solo_runs(srv):
    """16 concurrent greedy requests of mixed prompt lengths (1..70 tokens, prefill chunk 16) and
    max_tokens, text and token-id prompts, streamed and not: each equals its prompt run alone."""
    tok = srv.state.text.tokenizer
    words = "the quick brown fox jumps over a lazy dog while héllo wörld ☃ café 日本語 prints".split()
    jobs = []
    for i in range(16):
        n = 3 + (i * 5) % 14
        if i % 3 == 0:
            prompt = list(range(1 + i, 1 + i + (1 if i == 0 else 4 * i + 7)))  # ids, up to 70 tokens
        else:
            prompt = " ".join(words[j % len(words)] for j in range(i, i + 2 * i))
        jobs.append((prompt, n, i % 2 == 1))
    c = client(srv)

    def one(job):
        prompt, n, stream = job
        if stream:
            chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0, stream=True))
            ids = [t for ch in chunks for t in ch.choices[0].model_extra["token_ids"]]
            return "".join(ch.choices[0].text for ch in chunks), ids, chunks[-1].choices[0].finish_reason
        r = c.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0)
        return r.choices[0].text, r.choices[0].model_extra["token_ids"], r.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, jobs, timeout=DEADLINE))
    assert metric(srv, "hatrt_time_to_first_token_seconds_count") >= 16
    for (prompt, n, _), (text, ids, finish) in zip(jobs, results):
        prompt_ids = prompt if isinstance(prompt, list) else encode(srv, prompt)
        want = solo(srv, prompt_ids, n)
        assert ids == want, (prompt, n)
        assert text == tok.decode(want)
        assert finish == ("stop" if want[-1] in srv.state.text.eos else "length")


def test_greedy_equals_hatrt_generate_cli(srv, ckpt):
    """A greedy text request returns what `hatrt generate` prints for the same prompt alone."""
    from click.testing import CliRunner

    from engines.cli import main

    res = CliRunner().invoke(main, ["generate", str(ckpt), "--prompt", "def wrap(text):", "-n", "12", "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cli = json.loads(res.output)["results"][0]
    r = client(srv).completions.create(model="tiny", prompt="def wrap(text):", max_tokens=12, temperature=0)
    assert r.choices[0].model_extra["token_ids"] == cli["tokens"] and r.choices[0].text == cli["text"]


def test_streamed_equals_unstreamed_sampling_stop_and_chat(srv):
    c = client(srv)
    kw = dict(model="tiny", prompt="héllo wörld", max_tokens=16, temperature=0.9, top_p=0.9, seed=1234)
    full = c.completions.create(**kw)
    chunks = list(c.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 16
    assert [t for ch in chunks if ch.choices for t in ch.choices[0].model_extra["token_ids"]] == \
        full.choices[0].model_extra["token_ids"]
    # a stop string taken from the greedy output: cut there, streamed or not
    greedy = c.completions.create(model="tiny", prompt="héllo wörld", max_tokens=16, temperature=0).choices[0].text
    assert len(greedy) > 6
    stop = greedy[3:6]
    cut = greedy[:greedy.index(stop)]
    a = c.completions.create(model="tiny", prompt="héllo wörld", max_tokens=16, temperature=0, stop=[stop])
    b = list(c.completions.create(model="tiny", prompt="héllo wörld", max_tokens=16, temperature=0, stop=stop,
                                  stream=True))
    assert a.choices[0].text == cut == "".join(ch.choices[0].text for ch in b)
    assert a.choices[0].finish_reason == b[-1].choices[0].finish_reason == "stop"
    # chat: the template's rendering, generated greedily; streamed == unstreamed
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "wrap this text"}]
    r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0)
    rendered = f"{BOS}<|system|>be brief\n<|user|>wrap this text\n<|assistant|>"
    want = solo(srv, encode(srv, rendered), 10)
    assert r.choices[0].message.model_extra.get("token_ids", r.choices[0].model_extra.get("token_ids")) == want
    assert r.choices[0].message.content == srv.state.text.tokenizer.decode(want)
    parts = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == r.choices[0].message.content


def test_closing_a_stream_cancels_and_frees_the_row(srv):
    c = client(srv)
    eng = srv.state.engine
    cancelled0 = metric(srv, 'hatrt_requests_total{outcome="cancelled"}') if "cancelled" in httpx.get(
        srv.url + "/metrics").text else 0.0
    stream = c.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2000, temperature=0, stream=True,
                                  extra_body={"ignore_eos": True})
    got = 0
    for _ in stream:
        got += 1
        if got == 3:
            break
    assert eng.scheduler.batch_size == 1 or eng.active == 1
    stream.close()
    wait_until(lambda: eng.active == 0 and eng.scheduler.pending == 0 and eng.scheduler.batch_size == 0,
               what="the cancelled stream's row to be freed")
    assert metric(srv, "hatrt_running_batch") == 0 and metric(srv, "hatrt_active_requests") == 0
    assert metric(srv, 'hatrt_requests_total{outcome="cancelled"}') == cancelled0 + 1
    # a non-streamed request whose client gives up is cancelled too
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json={"prompt": [4, 5], "max_tokens": 2000, "temperature": 0,
                                                      "ignore_eos": True}, timeout=httpx.Timeout(10, read=1.0))
    wait_until(lambda: eng.active == 0 and eng.scheduler.batch_size == 0, what="the abandoned request to be freed")


@pytest.mark.slow
def test_long_prefill_does_not_stall_a_running_stream(srv):
    """A 400-token prompt (prefill chunk 16: 25 chunks) arriving while a stream runs: the stream
    gets a token after every chunk instead of waiting for the whole prefill."""
    c = client(srv)
    times: list[float] = []
    started = threading.Event()
    stop = threading.Event()

    def run_a():
        s = c.completions.create(model="tiny", prompt=[1, 2, 3], max_tokens=2000, temperature=0, stream=True,
                                 extra_body={"ignore_eos": True})
        for _ in s:
            times.append(time.monotonic())
            if len(times) == 2:
                started.set()
            if stop.is_set() or len(times) > 500:
                break
        s.close()

    a = threading.Thread(target=run_a, daemon=True)
    a.start()
    assert started.wait(DEADLINE)
    t0 = time.monotonic()
    r = c.completions.create(model="tiny", prompt=list(range(2, 402)), max_tokens=1, temperature=0)
    t1 = time.monotonic()
    stop.set()
    a.join(DEADLINE)
    assert r.usage.prompt_tokens == 400
    during = [t for t in times if t0 < t < t1]
    assert len(during) >= 15, f"{len(during)} tokens of the running stream during a 25-chunk prefill"
    wait_until(lambda: srv.state.engine.active == 0, what="the stream to be cancelled")


BAD = [  # (path, body, param or None, code or None)
    ("/v1/completions", {"model": "tiny"}, "prompt", None),
    ("/v1/completions", {"prompt": []}, "prompt", None),
    ("/v1/completions", {"prompt": [1, 512]}, "prompt", None),
    ("/v1/completions", {"prompt": [1, -1]}, "prompt", None),
    ("/v1/completions", {"prompt": [1], "max_tokens": 0}, "max_tokens", None),
    ("/v1/completions", {"prompt": [1], "max_tokens": "9"}, "max_tokens", None),
    ("/v1/completions", {"prompt": [1], "max_tokens": 4096}, "max_tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": [1] * 4097}, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": [1], "temperature": -0.5}, "temperature", None),
    ("/v1/completions", {"prompt": [1], "top_p": 0}, "top_p", None),
    ("/v1/completions", {"prompt": [1], "n": 2}, "n", None),
    ("/v1/completions", {"prompt": [1], "stream": "yes"}, "stream", None),
    ("/v1/completions", {"prompt": [1], "stop": [1, 2]}, "stop", None),
    ("/v1/completions", {"prompt": [1], "logprobs": 3}, "logprobs", None),
    ("/v1/completions", {"prompt": [1], "seed": 1.5}, "seed", None),
    ("/v1/completions", {"prompt": [1], "seed": 2**70}, "seed", None),
    ("/v1/chat/completions", {"messages": []}, "messages", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages[0].content", None),
]


def test_bad_input_gets_openai_style_400(srv):
    for path, body, param, code in BAD:
        r = httpx.post(srv.url + path, json=body, timeout=10)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
        assert err["param"] == param and err["message"], (body, err)
        if code:
            assert err["code"] == code
    r = httpx.post(srv.url + "/v1/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(srv.url + "/v1/completions", json={"model": "gpt-5", "prompt": [1]}, timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client(srv).completions.create(model="tiny", prompt="x", max_tokens=5000)
    assert srv.state.engine.active == 0  # nothing was admitted


def test_backend_failure_fails_that_request_only(srv):
    """A backend exception in one request's prefill: that request gets a 500 (non-streamed) or an
    error event (streamed); the concurrent one completes unchanged; the server keeps serving."""
    backend = srv.state.engine.backend
    real = backend._run_step

    def flaky(input_ids, logits_index, cache, layer_outputs):
        if (input_ids == 499).any():
            raise RuntimeError("injected failure")
        return real(input_ids, logits_index, cache, layer_outputs)

    c = client(srv)
    backend._run_step = flaky
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            good = pool.submit(c.completions.create, model="tiny", prompt=[7, 8, 9], max_tokens=8, temperature=0)
            bad = pool.submit(httpx.post, srv.url + "/v1/completions",
                              json={"prompt": [1, 499], "max_tokens": 4}, timeout=DEADLINE)
            bad_stream = pool.submit(lambda: list(c.completions.create(model="tiny", prompt=[2, 499], max_tokens=4,
                                                                       stream=True)))
            assert good.result(DEADLINE).choices[0].model_extra["token_ids"] == solo(srv, [7, 8, 9], 8)
            r = bad.result(DEADLINE)
            assert r.status_code == 500 and "injected failure" in r.json()["error"]["message"]
            with pytest.raises(openai.APIError, match="injected failure"):
                bad_stream.result(DEADLINE)
    finally:
        backend._run_step = real
    assert httpx.get(srv.url + "/health", timeout=10).status_code == 200
    assert c.completions.create(model="tiny", prompt=[7, 8, 9], max_tokens=8, temperature=0) \
        .choices[0].model_extra["token_ids"] == solo(srv, [7, 8, 9], 8)


def test_overload_gets_429_with_retry_after_and_draining_503():
    state = build_state(PRESET, "torch", max_batch=1, max_queue=1, model_id="tiny")
    with ServerThread(state) as s:
        eng = state.engine
        body = {"prompt": [1, 2, 3], "max_tokens": 2000, "temperature": 0, "stream": True, "ignore_eos": True}
        with httpx.Client(timeout=DEADLINE) as h1, httpx.Client(timeout=DEADLINE) as h2:
            with h1.stream("POST", s.url + "/v1/completions", json=body) as a, \
                    h2.stream("POST", s.url + "/v1/completions", json=body) as b:
                assert a.status_code == b.status_code == 200
                wait_until(lambda: eng.active == 2, what="two admitted requests")
                r = httpx.post(s.url + "/v1/completions", json={"prompt": [1], "max_tokens": 2}, timeout=10)
                assert r.status_code == 429 and r.headers["Retry-After"] == "1"
                assert r.json()["error"]["type"] == "rate_limit_error"
                assert metric(s, "hatrt_queue_depth") >= 1 and metric(s, "hatrt_running_batch") == 1
                with pytest.raises(openai.RateLimitError):
                    client(s).completions.create(model="tiny", prompt=[1], max_tokens=2)
        wait_until(lambda: eng.active == 0 and eng.scheduler.batch_size == 0, what="both streams cancelled")
        assert client(s).completions.create(model="tiny", prompt=[1], max_tokens=2).usage.completion_tokens == 2
        eng.start_drain()
        r = httpx.post(s.url + "/v1/completions", json={"prompt": [1], "max_tokens": 2}, timeout=10)
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert httpx.get(s.url + "/health", timeout=10).status_code == 503
        r = httpx.post(s.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]},
                       timeout=10)  # a preset has no tokenizer at all
        assert r.status_code == 400


def _free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


@pytest.mark.slow
def test_sigterm_drains_in_flight_then_exits_0():
    """SIGTERM to a `serve` subprocess while a request streams: the stream completes, new
    connections are refused, the process exits 0."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "engines.serve_cli", "serve", PRESET, "--port", str(port),
                             "--max-batch", "4", "--log-level", "warning"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up():
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()
                return False

        wait_until(up, timeout=DEADLINE, what="the server to start")
        n = 20
        texts, finish = [], None
        with httpx.stream("POST", url + "/v1/completions", timeout=DEADLINE,
                          json={"prompt": [1, 2, 3, 4, 5], "max_tokens": n, "temperature": 0, "stream": True,
                                "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ch = json.loads(line[6:])["choices"][0]
                texts.append(ch["text"])
                finish = ch["finish_reason"]
                if len(texts) == 2:
                    proc.send_signal(signal.SIGTERM)
        assert len(texts) == n and finish == "length"
        backend = load_backend(PRESET)
        want = generate(backend, [[1, 2, 3, 4, 5]], max_new_tokens=n, stop_tokens=())[0].tokens
        assert "".join(texts) == " ".join(map(str, want))
        assert proc.wait(timeout=DEADLINE) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_cli_refuses_bad_options_before_serving():
    from click.testing import CliRunner

    from engines.serve_cli import cli

    for args, message in ((["serve", "no-such-model"], "no such checkpoint"),
                          (["serve", PRESET, "--backend", "tensorrt"], "tensorrt"),  # needs an engine folder
                          (["serve", PRESET, "--max-context", "99999"], "context limit must lie in"),
                          (["serve", PRESET, "--backend", "onnxruntime"], "export directory"),
                          (["serve", PRESET, "--max-batch", "0"], "0")):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 2 and message in res.output, (args, res.output)
