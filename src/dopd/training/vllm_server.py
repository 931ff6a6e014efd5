"""``dopd vllm-serve``: a vLLM engine behind a small HTTP interface on loopback, the sampler of
``rollout.vllm_mode: server`` (``backends.VLLMServerBackend``).

Endpoints (one request at a time; the engine is not shared between threads):

* ``GET /health`` -> ``{"model": ...}`` once the engine is up;
* ``POST /generate``, a JSON ``vllm_engine.SamplingRequest`` -> ``{"completions": [[id, ...]],
  "log_probs": [[float, ...]]}``;
* ``POST /update_weights``, a safetensors payload of Hugging Face-named tensors ->
  ``{"seconds": ...}`` (the time the engine took to reload them).

The weights cross loopback as bytes, which is simple and fine for small students; a multi-GPU
deployment at the paper's scale would move them device to device (NCCL) instead.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

from safetensors.torch import load as load_safetensors

from dopd.config import TrainConfig
from dopd.modeling.loading import check_sources, load_model
from dopd.training.vllm_engine import (
    SamplingRequest,
    engine_for,
    engine_generate,
    engine_load_weights,
)


def serve_config(config: TrainConfig) -> None:
    """Serve ``config``'s student (built as ``dopd train`` builds it) at
    ``rollout.vllm_server_host``:``rollout.vllm_server_port``; the trainer replaces its weights
    before the first rollout."""
    tokenizer = check_sources(config)
    student = load_model(config.student, tokenizer, seed=config.seed, key="student")
    llm = engine_for(config, tokenizer, student)
    name = config.student.path or "the tiny student"
    serve(llm, name, config.rollout.vllm_server_host, config.rollout.vllm_server_port)


def serve(llm, model: str, host: str, port: int) -> None:
    """Answer requests to the engine ``llm`` (serving ``model``) until interrupted."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/health":
                return self._reply(404, {"error": f"no endpoint {self.path}"})
            self._reply(200, {"model": model})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            try:
                if self.path == "/generate":
                    completions, log_probs = engine_generate(
                        llm, SamplingRequest(**json.loads(body))
                    )
                    return self._reply(200, {"completions": completions, "log_probs": log_probs})
                if self.path == "/update_weights":
                    seconds = engine_load_weights(llm, load_safetensors(body).items())
                    return self._reply(200, {"seconds": seconds})
            except (TypeError, ValueError, KeyError) as error:  # a malformed request
                return self._reply(400, {"error": f"{type(error).__name__}: {error}"})
            self._reply(404, {"error": f"no endpoint {self.path}"})

        def _reply(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args) -> None:  # one line per request, on stderr
            print(f"vllm-serve: {format % args}", file=sys.stderr)

    server = HTTPServer((host, port), Handler)
    print(f"vllm-serve: {model} on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
