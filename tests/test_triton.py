"""`hatrt triton` (engines/triton_serve.py): the runtime served through a real Triton Inference
Server (nvidia-pytriton's tritonserver, CPU) as a decoupled model, driven with `tritonclient`:
concurrent gRPC streams equal their solo runs, HTTP generate_stream gives the same tokens, bad
input is an error response, SIGTERM exits 0. Skipped when pytriton / tritonclient are missing.
Everything listens on 127.0.0.1; every wait is bounded."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton is not installed (pip install 'hatrt[triton]')")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is not installed")
httpx = pytest.importorskip("httpx")

from engines.backends import load_backend  # noqa: E402
from engines.generate import generate  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PRESET = "tiny-flash"
MODEL = "hatrt"
DEADLINE = 120.0

pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def triton():
    http, grpc, metrics = _free_ports(3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "engines.serve_cli", "triton", PRESET, "--http-port", str(http),
                             "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--max-batch", "4",
                             "--log-level", "warning"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc}")
    try:
        end = time.monotonic() + DEADLINE
        while True:
            if proc.poll() is not None:
                pytest.fail(f"hatrt triton exited with {proc.returncode}:\n{proc.stdout.read()[-4000:]}")
            try:
                if client.is_model_ready(MODEL):
                    break
            except Exception:  # not listening yet
                pass
            if time.monotonic() > end:
                pytest.fail("Triton did not load the model in time")
            time.sleep(0.5)
        yield proc, client, f"http://127.0.0.1:{http}"
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def _input(name: str, arr: np.ndarray, dtype: str):
    i = grpcclient.InferInput(name, list(arr.shape), dtype)
    i.set_data_from_numpy(arr)
    return i


def _stream(client, prompts: list[list[int]], max_tokens: int) -> dict[str, list]:
    """Several requests on one gRPC stream at once -> {request_id: [(token, text, finish)]}."""
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    try:
        for i, ids in enumerate(prompts):
            client.async_stream_infer(MODEL, [_input("prompt_ids", np.array(ids, np.int64), "INT64"),
                                              _input("max_tokens", np.array([max_tokens], np.int32), "INT32")],
                                      request_id=str(i), enable_empty_final_response=True)
        out: dict[str, list] = {str(i): [] for i in range(len(prompts))}
        done: set[str] = set()
        end = time.monotonic() + DEADLINE
        while len(done) < len(prompts):
            result, error = events.get(timeout=max(1.0, end - time.monotonic()))
            if error is not None:
                raise AssertionError(f"stream error: {error}")
            resp = result.get_response()
            toks = result.as_numpy("token_ids")
            if toks is not None and toks.size:
                out[resp.id].append((int(toks[0]), result.as_numpy("text")[0].decode(),
                                     result.as_numpy("finish_reason")[0].decode()))
            if resp.parameters["triton_final_response"].bool_param:
                done.add(resp.id)
        return out
    finally:
        client.stop_stream()


def test_grpc_streams_equal_solo_runs_and_http_generate_stream(triton):
    proc, client, http = triton
    prompts = [[1, 2, 3, 4, 5], list(range(10, 50)), [7]]
    got = _stream(client, prompts, 10)
    backend = load_backend(PRESET)
    for i, ids in enumerate(prompts):
        want = generate(backend, [ids], max_new_tokens=10, stop_tokens=())[0].tokens
        steps = got[str(i)]
        assert [t for t, _, _ in steps] == want
        assert "".join(text for _, text, _ in steps) == " ".join(map(str, want))
        assert [f for _, _, f in steps] == [""] * 9 + ["length"]
    # Triton's HTTP generate extension: server-sent events, one per token
    with httpx.stream("POST", f"{http}/v2/models/{MODEL}/generate_stream", timeout=DEADLINE,
                      json={"prompt_ids": prompts[0], "max_tokens": 10}) as r:
        lines = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: ")]
    assert [x["token_ids"] for x in lines] == [t for t, _, _ in got["0"]]


def test_bad_input_is_an_error_response(triton):
    proc, client, http = triton
    with httpx.stream("POST", f"{http}/v2/models/{MODEL}/generate_stream", timeout=DEADLINE,
                      json={"max_tokens": 4}) as r:
        body = "".join(r.iter_lines())
    assert "prompt is required" in body
    with httpx.stream("POST", f"{http}/v2/models/{MODEL}/generate_stream", timeout=DEADLINE,
                      json={"prompt_ids": [1, 2], "max_tokens": 100000}) as r:
        body = "".join(r.iter_lines())
    assert "maximum context length" in body
    assert proc.poll() is None  # still serving
    assert _stream(client, [[3, 4]], 2)["0"][-1][2] == "length"


def test_sigterm_drains_then_exits_0(triton):
    """SIGTERM while a request streams: it completes (new requests are refused), then exit 0."""
    proc, client, http = triton
    events: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: events.put((result, error)))
    tokens = []
    try:
        client.async_stream_infer(MODEL, [_input("prompt_ids", np.array([1, 2, 3], np.int64), "INT64"),
                                          _input("max_tokens", np.array([30], np.int32), "INT32")],
                                  request_id="drain", enable_empty_final_response=True)
        end = time.monotonic() + DEADLINE
        while True:
            result, error = events.get(timeout=max(1.0, end - time.monotonic()))
            assert error is None, error
            toks = result.as_numpy("token_ids")
            if toks is not None and toks.size:
                tokens.append(int(toks[0]))
                if len(tokens) == 1:
                    proc.send_signal(signal.SIGTERM)
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
    assert tokens == generate(load_backend(PRESET), [[1, 2, 3]], max_new_tokens=30, stop_tokens=())[0].tokens
    assert proc.wait(timeout=DEADLINE) == 0
