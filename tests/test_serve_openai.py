"""The OpenAI-compatible endpoints on a causal-LM bundle: a real uvicorn server on loopback, driven by the
official `openai` client, against a tiny random Llama built here and exported by onnxruntime-genai's builder.
The LM is served by the same app as every family: auth, readiness, /health, /model-info, /metrics, reloads,
and bundle or registry sources."""

from __future__ import annotations

import gc
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import openai
import pytest

from deploy.loadtest import running_server
from serve.app import create_app
from serve.settings import ServeSettings
from serve.sources import BundleSource, RegistrySource
from tasks.release.guard import BUNDLE_FORMAT, sha256_of
from tests.tiny_llm import make_tiny_llama

CONTEXT = 2048  # long enough that a full-length generation outlasts the requests sent while it runs
MODEL = "tiny-llama"
TOKEN = "s3cret-token-for-the-lm-tests"


def build_lm_bundle(folder: Path, hf: Path | None = None, context: int = CONTEXT, name: str = MODEL) -> Path:
    """A bundle in the LM contract's format: the builder's INT4 export of the Hugging Face folder `hf` (the
    tiny random Llama by default) with its KV cache sized to `context`, plus a manifest hashing each file."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    hf = hf or make_tiny_llama(folder / "hf")
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "max_position_embeddings": context}))
    bundle = folder / "bundle"
    model_dir = bundle / "model"
    args = (name, str(hf), str(model_dir), "int4", "cpu", str(folder / "cache"))
    create_model(*args, **parse_extra_options(*args, []))
    if (hf / "generation_config.json").is_file():
        shutil.copy(hf / "generation_config.json", model_dir)
    files = {f"model/{p.relative_to(model_dir)}": sha256_of(p) for p in sorted(model_dir.rglob("*")) if p.is_file()}
    manifest = {
        "format": BUNDLE_FORMAT,
        "family": "causal_lm",
        "model_dir": "model",
        "files": files,
        "model_name": name,
        "version": None,
        "candidate": "int4",
        "max_length": context,
        "data_version": None,
        "created_at": datetime.now(UTC).isoformat(),
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return bundle


@pytest.fixture(scope="module")
def lm_bundle(tmp_path_factory) -> Path:
    return build_lm_bundle(tmp_path_factory.mktemp("lm"))


class Reference:
    """onnxruntime-genai used directly on the same model folder: what the server must reproduce."""

    def __init__(self, model_dir: Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(model_dir))
        self.tokenizer = og.Tokenizer(self.model)
        self.eos = set(self.tokenizer.eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def greedy(self, ids: list[int], n: int) -> tuple[str, int, str]:
        """(text, completion tokens, finish reason) of greedy decoding for at most `n` tokens."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + n)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        ended = bool(tokens) and tokens[-1] in self.eos
        stream = self.tokenizer.create_stream()  # as genai streams: a random model's stray bytes are dropped
        text = "".join(stream.decode(t) for t in tokens if t not in self.eos)
        return text, len(tokens), "stop" if ended else "length"


@pytest.fixture(scope="module")
def reference(lm_bundle) -> Reference:
    return Reference(lm_bundle / "model")


@pytest.fixture(scope="module")
def server(lm_bundle, tmp_path_factory):
    served = tmp_path_factory.mktemp("served") / "bundle"
    shutil.copytree(lm_bundle, served)
    app = create_app(BundleSource(served), ServeSettings(poll_seconds=0.1, auth_token=TOKEN))
    with running_server(app) as (host, port):
        yield host, port, app, served


def client(server, token: str = TOKEN) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{server[0]}:{server[1]}/v1", api_key=token, max_retries=0, timeout=60)


def call(server, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    """A plain HTTP request with the server's token (JSON in and out)."""
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    answer = httpx.request(
        method,
        f"http://{server[0]}:{server[1]}{path}",
        content=content,
        timeout=30,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    return answer.status_code, answer.json() if answer.content else {}


def stats(app) -> dict:
    return app.state.ctx.holder.model.session.stats


def test_completions_match_onnxruntime_genai_and_stream_the_same_text(server, reference):
    api = client(server)
    assert [m.id for m in api.models.list().data] == [MODEL]
    prompt = "The object model of Python"
    text, n, finish = reference.greedy(reference.encode(prompt), 12)
    got = api.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert (got.choices[0].text, got.choices[0].finish_reason) == (text, finish)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(reference.encode(prompt)), n)
    chunks = list(
        api.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len(chunks) > 3 and "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
    assert chunks[-1].usage.completion_tokens == n


def test_concurrent_requests_decode_in_one_batch_as_they_would_alone(server, reference):
    prompts = ["Assignment statements", "The import system", "Coroutines", "A with statement"]
    expected = [reference.greedy(reference.encode(p), 16)[0] for p in prompts]
    api = client(server)
    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(
            pool.map(
                lambda p: api.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0).choices[0].text,
                prompts,
            )
        )
    assert got == expected
    assert stats(server[2])["largest_batch"] > 1  # they did share engine steps


def test_chat_completions_apply_the_chat_template(server, reference):
    api = client(server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a class?"}]
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    ids = reference.encode(rendered + "<|im_start|>assistant\n")
    text, n, finish = reference.greedy(ids, 10)
    got = api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    assert (got.choices[0].message.role, got.choices[0].message.content) == ("assistant", text)
    assert (got.usage.prompt_tokens, got.usage.completion_tokens, got.choices[0].finish_reason) == (len(ids), n, finish)
    chunks = list(
        api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text


def test_stop_strings_and_seeds(server, reference):
    api = client(server)
    prompt = "Exceptions are raised"
    text, _, _ = reference.greedy(reference.encode(prompt), 24)
    stop = text[8:11]
    expected = text[: text.find(stop)]
    for stream in (False, True):
        got = api.completions.create(
            model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop], stream=stream
        )
        chunks = list(got) if stream else [got]
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert chunks[-1].choices[0].finish_reason == "stop"

    def sample(seed: int) -> str:
        got = api.completions.create(model=MODEL, prompt=prompt, max_tokens=30, temperature=1.0, seed=seed)
        return got.choices[0].text

    assert sample(7) == sample(7) != sample(8)


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"prompt": "list " * 3000}, "prompt"),
        ({"prompt": "Hello", "max_tokens": CONTEXT}, "max_tokens"),
        ({"prompt": "Hello", "temperature": "hot"}, "temperature"),
        ({"prompt": "Hello", "top_p": 0}, "top_p"),
        ({"prompt": "Hello", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "Hello", "n": 2}, "n"),
        ({"prompt": "Hello", "seed": -1}, "seed"),
        ({"prompt": ""}, "prompt"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),
    ],
)
def test_a_bad_request_is_a_400_naming_the_field(server, kwargs, param):
    api = client(server)
    create = api.chat.completions.create if "messages" in kwargs else api.completions.create
    with pytest.raises(openai.BadRequestError) as err:
        create(model=MODEL, **kwargs)
    assert err.value.param == param and err.value.type == "invalid_request_error", err.value.body
    assert api.completions.create(model=MODEL, prompt="Still", max_tokens=2).usage.completion_tokens >= 1


def test_unknown_model_malformed_json_and_the_other_families_routes(server):
    with pytest.raises(openai.NotFoundError):
        client(server).completions.create(model="gpt-4o", prompt="Hi")
    status, body = call(server, "POST", "/v1/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    for path in ("/predict", "/embed", f"/v2/models/{MODEL}/infer"):
        status, body = call(server, "POST", path, {"inputs": [[0.0]]})
        assert status == 400 and "this bundle is a causal LM: POST /v1/completions" in body["error"], (path, body)


def test_auth_health_model_info_and_metrics_as_for_every_family(server, lm_bundle):
    assert client(server).completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
    with pytest.raises(openai.AuthenticationError):
        client(server, token="wrong-token-of-sixteen").models.list()
    assert httpx.get(f"http://{server[0]}:{server[1]}/readyz").json() == {"ready": True}  # probes need no token
    files = json.loads((lm_bundle / "manifest.json").read_text())["files"]
    status, health = call(server, "GET", "/health")
    assert status == 200 and health["ready"] and health["model_sha256"] is None
    assert health["files_verified"] == len(files) > 3
    status, info = call(server, "GET", "/model-info")
    assert info["family"] == "causal_lm" and info["files_verified"] == len(files) and info["files"] == files
    assert info["batching"]["max_batch"] == 4 and "--lm-max-batch" in info["batching"]["reason"]
    assert info["generation"]["max_waiting"] == 32 and info["generation"]["generated_tokens"] > 0
    metrics = httpx.get(f"http://{server[0]}:{server[1]}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    assert 'modelforge_requests_total{endpoint="/v1/completions",status="200"}' in metrics
    assert 'family="causal_lm"' in metrics


def test_a_registry_alias_serves_an_lm_bundle(lm_bundle, reference, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    uri, previous = f"sqlite:///{tmp_path}/mlflow.db", (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    registry = MlflowClient(uri, registry_uri=uri)  # else a registry URI set earlier in the process wins
    registry.create_registered_model(MODEL)
    run = registry.create_run(registry.create_experiment("lm", artifact_location=str(tmp_path / "artifacts")))
    registry.log_artifacts(run.info.run_id, str(lm_bundle), "bundle")
    registry.create_model_version(MODEL, f"runs:/{run.info.run_id}/bundle", run.info.run_id)
    registry.set_registered_model_alias(MODEL, "champion", "1")
    mlflow.set_tracking_uri(uri)  # RegistrySource reads the process's registry, as `modelforge serve` sets it
    mlflow.set_registry_uri(uri)
    try:
        app = create_app(RegistrySource(f"models:/{MODEL}@champion"), ServeSettings())
        with running_server(app) as (host, port):
            got = client((host, port), "unused").completions.create(
                model=MODEL, prompt="Modules", max_tokens=8, temperature=0
            )
            assert got.choices[0].text == reference.greedy(reference.encode("Modules"), 8)[0]
            assert (
                app.state.ctx.holder.model.verified_files
                == json.loads((lm_bundle / "manifest.json").read_text())["files"]
            )
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])


def endless_prompt(reference: Reference, tokens: int) -> str:
    """A prompt whose greedy continuation runs the full `tokens` without an end-of-sequence token."""
    for prompt in ("The", "A class", "Objects are", "import", "def", "yield"):
        if reference.greedy(reference.encode(prompt), tokens)[2] == "length":
            return prompt
    pytest.fail("every candidate prompt ends early on this random model")


def test_full_queue_is_a_429_and_a_disconnect_stops_the_generation(lm_bundle, reference, tmp_path):
    served = shutil.copytree(lm_bundle, tmp_path / "bundle")
    app = create_app(BundleSource(served), ServeSettings(lm_max_batch=1, lm_max_waiting=0))
    long = CONTEXT - 16
    prompt = endless_prompt(reference, long)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": long, "temperature": 0, "stream": True}
    with running_server(app) as (host, port):
        api = client((host, port))

        with httpx.Client(base_url=f"http://{host}:{port}", timeout=30) as http:
            with http.stream("POST", "/v1/completions", json=body) as streaming:
                lines = streaming.iter_lines()  # held: a dropped iterator would close the connection
                next(lines)  # generating: it holds the only slot
                with pytest.raises(openai.RateLimitError) as err:
                    api.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
                assert err.value.response.headers["retry-after"] == "1" and err.value.code == "rate_limit_exceeded"
            # the client went away mid-stream: its sequence leaves the batch
            deadline = time.time() + 10
            while stats(app)["admitted"] and time.time() < deadline:
                time.sleep(0.02)
            assert stats(app)["admitted"] == 0 and stats(app)["generated_tokens"] < long / 2, stats(app)
            before = stats(app)["generated_tokens"]
            with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up
                http.post("/v1/completions", json={**body, "stream": False}, timeout=0.1)
            while stats(app)["admitted"] and time.time() < deadline:
                time.sleep(0.02)
            assert stats(app)["admitted"] == 0 and 0 < stats(app)["generated_tokens"] - before < long / 2, stats(app)
        assert api.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens == 2


def test_a_tampered_bundle_is_refused_at_start_and_at_reload(server, lm_bundle, tmp_path):
    bad = shutil.copytree(lm_bundle, tmp_path / "bad")
    tokenizer = bad / "model" / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"<|im_end|>"', '"<|im_stop|>"', 1))
    (bad / "model" / "extra.onnx").write_bytes(b"unlisted")
    with pytest.raises(RuntimeError) as err, running_server(create_app(BundleSource(bad), ServeSettings())):
        pass
    assert "BundleError" in str(err.value) and "model/tokenizer.json: sha256" in str(err.value)
    assert "model/extra.onnx is not in the manifest" in str(err.value)

    _host, _port, _app, served = server
    api = client(server)
    engines = engine_threads()
    before = api.completions.create(model=MODEL, prompt="Modules", max_tokens=8, temperature=0).choices[0].text
    weights = served / "model" / "model.onnx.data"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-4] + b"\0\0\0\0")  # changed in place, manifest untouched
        deadline = time.time() + 10
        while not (error := call(server, "GET", "/health")[1]["last_reload_error"]) and time.time() < deadline:
            time.sleep(0.05)
        assert "model/model.onnx.data: sha256" in error
        after = api.completions.create(model=MODEL, prompt="Modules", max_tokens=8, temperature=0).choices[0].text
        assert after == before  # the verified model keeps serving
    finally:
        weights.write_bytes(original)
    # a new valid manifest (a new name) is picked up by the watcher
    manifest = json.loads((served / "manifest.json").read_text())
    (served / "manifest.tmp").write_text(json.dumps({**manifest, "model_name": "tiny-llama-2"}))
    os.replace(served / "manifest.tmp", served / "manifest.json")
    deadline = time.time() + 10
    while [m.id for m in api.models.list().data] != ["tiny-llama-2"] and time.time() < deadline:
        time.sleep(0.05)
    assert [m.id for m in api.models.list().data] == ["tiny-llama-2"]
    renamed = api.completions.create(model="tiny-llama-2", prompt="Modules", max_tokens=8, temperature=0)
    assert renamed.choices[0].text == before
    (served / "manifest.tmp").write_text(json.dumps(manifest))  # leave the module's server as it was
    os.replace(served / "manifest.tmp", served / "manifest.json")
    while [m.id for m in api.models.list().data] != [MODEL] and time.time() < deadline:
        time.sleep(0.05)
    while engine_threads() > engines and time.time() < deadline + 10:
        gc.collect()
        time.sleep(0.05)
    assert engine_threads() == engines  # each replaced model's engine thread ended with it


def engine_threads() -> int:
    return sum(t.name.startswith("lm-engine-") for t in threading.enumerate())
