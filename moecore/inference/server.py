"""HTTP text generation server: Megatron-LM's ``PUT /api`` and OpenAI's ``POST /v1/completions``.

:func:`create_app` wraps any engine with ``generate(prompts, params)``, ``tokenizer``
(``tokenize``, ``detokenize``, ``eod``) and ``max_sequence_length`` in a Flask app; requests
reach the engine through one :class:`GenerationQueue` thread. Client mistakes get a 4xx JSON
body ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape, on both APIs) naming
the field; an engine failure gets a 500 with its message and the server keeps serving. Flask is
an optional extra: ``pip install -e ".[serve]"``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

try:
    from flask import Flask, jsonify, request
    from werkzeug.exceptions import HTTPException
    from werkzeug.serving import BaseWSGIServer, make_server
except ImportError as _err:
    raise ImportError(f"the text generation server needs Flask ({_err}): "
                      'pip install -e ".[serve]"') from _err

from moecore.inference import server_megatron, server_openai
from moecore.inference.server_fields import RequestError
from moecore.inference.server_queue import GenerationQueue

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20
QUEUE_KEY = "moecore_generation_queue"


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return jsonify(body), status


def _json_body() -> Any:
    # Parsed whatever the Content-Type (curl -d sends form-encoded by default).
    raw = request.get_data(cache=False)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RequestError(f"the request body is not valid JSON: {err}") from None


def _params(sampling_params: Callable[..., Any], kwargs: dict) -> Any:
    try:
        return sampling_params(**kwargs)
    except ValueError as err:  # the engine's own checks of a combination of fields
        raise RequestError(f"invalid sampling parameters: {err}") from None


def _register_errors(app: Flask) -> None:
    @app.errorhandler(RequestError)
    def _request_error(err: RequestError):
        return _error(err.status, err.message, err.param, err.code)

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):  # 404, 405, 413 as JSON like the rest
        return _error(err.code or 500, f"{err.name}: {err.description}")

    @app.errorhandler(Exception)
    def _server_error(err: Exception):
        log.exception("request %s %s failed", request.method, request.path)
        return _error(500, f"generation failed: {type(err).__name__}: {err}")


def create_app(engine: Any, model_name: str = "moecore", *,
               sampling_params: Callable[..., Any], max_batch_size: int = 128,
               batch_requests: bool = True) -> Flask:
    """The Flask app serving ``engine`` under ``model_name``.

    ``sampling_params`` builds the engine's parameters from keyword arguments (the engine's
    ``SamplingParams`` class). ``max_batch_size`` bounds the sequences of one request and of
    one batched engine call; ``batch_requests=False`` gives each request its own call.
    """
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    queue = GenerationQueue(engine, max_batch_size, batch=batch_requests)
    app.extensions[QUEUE_KEY] = queue
    tokenizer, max_len = engine.tokenizer, engine.max_sequence_length
    _register_errors(app)

    @app.route("/api", methods=["PUT"])
    def megatron_generate():
        req = server_megatron.parse(_json_body(), tokenizer, max_len, max_batch_size)
        if not req.no_log:
            log.info("PUT /api from %s: %d prompts", request.remote_addr, len(req.prompts))
        completions = queue.generate(req.prompts, _params(sampling_params, req.params))
        return jsonify(server_megatron.respond(req, completions, tokenizer))

    @app.route("/v1/completions", methods=["POST"])
    @app.route("/completions", methods=["POST"])
    def openai_completions():
        req = server_openai.parse(_json_body(), tokenizer, max_len, max_batch_size, model_name)
        completions = queue.generate(req.rows, _params(sampling_params, req.params))
        return jsonify(server_openai.respond(req, completions, tokenizer, model_name))

    @app.route("/v1/models", methods=["GET"])
    def openai_models():
        return jsonify({"object": "list", "data": [
            {"id": model_name, "object": "model", "owned_by": "moecore",
             "max_model_len": max_len}]})

    return app


def make_http_server(app: Flask, host: str, port: int) -> BaseWSGIServer:
    """A threaded HTTP server for ``app`` (port 0: a free one, see ``.port``); not started."""
    return make_server(host, port, app, threaded=True)


def serve(app: Flask, host: str, port: int) -> None:
    """Serve ``app`` until interrupted, then let the generation queue finish its requests."""
    server = make_http_server(app, host, port)
    log.info("serving on http://%s:%d (PUT /api, POST /v1/completions)", host, server.port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        app.extensions[QUEUE_KEY].close()
