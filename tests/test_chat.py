"""/v1/chat/completions over the fake model: the rendered prompt, the wire format (plain and streamed), `n`, `stop`,
logprobs, usage, validation, template loading and template errors; the `openai` client against an in-process
uvicorn; and (slow) a real server started with --chat-template configs/chat/plain.jinja.

The fake model's greedy output is a function of the whole prompt, so a chat completion equal to `fake_greedy` of
the expected rendered text (or to /v1/completions on that text) shows that the template rendered exactly that."""

import contextlib
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import schemathesis
import uvicorn
from fastapi.testclient import TestClient
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from serving.api.app import create_app
from serving.api.chat_template import ChatTemplateError
from serving.config import EngineConfig, Settings
from serving_helpers import (
    FAKE_INFO,
    REPO,
    FakeTokenizer,
    ServerProcess,
    fake_greedy,
    fake_parts,
    fake_settings,
    make_tiny_model,
    parse_sse,
)

TOK = FakeTokenizer()
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
# Fails in the ways a template can fail on a request's messages, chosen by the first message's content.
FAILING = (
    "{% set c = messages[0].content %}"
    "{% if c == 'refuse' %}{{ raise_exception('the first message must not say refuse') }}"
    "{% elif c == 'undefined' %}{{ messages[0].nope.deeper }}"
    "{% elif c == 'mutate' %}{{ messages.append(messages[0]) }}"
    "{% elif c == 'divide' %}{{ 1 // 0 }}"
    "{% elif c == 'empty' %}"
    "{% else %}{{ c }}{% endif %}"
)
DOCUMENTED = [status_code_conformance, content_type_conformance, response_schema_conformance,
              response_headers_conformance]
HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
HELLO_PROMPT = "<system>Be brief.\n<user>Hello\n<assistant>"


@contextlib.contextmanager
def serve(fail=None, **overrides):
    s = fake_settings(**overrides)
    loader, _ = fake_parts(EngineConfig.from_settings(s, FAKE_INFO), **({"fail": fail} if fail else {}))
    app = create_app(s, loader=loader, model_info=FAKE_INFO)
    with TestClient(app) as client:
        for _ in range(500):
            if client.get("/health").status_code == 200:
                break
            time.sleep(0.01)
        yield client


@pytest.fixture(scope="module")
def client():
    with serve(chat_template=TEMPLATE) as c:
        yield c


def chat(client, **body):
    body.setdefault("messages", HELLO)
    return client.post("/v1/chat/completions", json=body)


def greedy_text(prompt: str, n: int) -> str:
    return TOK.decode(fake_greedy(TOK.encode(prompt, allowed_special="all"), n))


def stream_chunks(client, **body) -> list:
    body.setdefault("messages", HELLO)
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = list(r.iter_lines())
    assert all(ln.startswith("data: ") for ln in lines if ln)
    payloads = parse_sse(lines)
    assert payloads[-1] == "[DONE]" and "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


# ---- the prompt and the response -------------------------------------------------------------------------------


def assert_usage(usage, prompt_tokens, completion_tokens):
    # The prefix cache may hold the start of this prompt from an earlier test (never its last token).
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert usage == {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}
    assert 0 <= cached < prompt_tokens


def test_chat_completion_renders_the_template_and_answers_openais_format(client):
    r = chat(client, model="fake-gpt2", max_tokens=6, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == "fake-gpt2" and isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": greedy_text(HELLO_PROMPT, 6)},
                                "logprobs": None, "finish_reason": "length"}]
    prompt_tokens = len(TOK.encode(HELLO_PROMPT))
    assert_usage(body["usage"], prompt_tokens, 6)
    # The same prompt as text on /v1/completions: the same greedy text.
    plain = client.post("/v1/completions", json={"prompt": HELLO_PROMPT, "max_tokens": 6, "temperature": 0}).json()
    assert plain["choices"][0]["text"] == body["choices"][0]["message"]["content"]


def test_text_parts_are_joined_and_add_generation_prompt_is_passed(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
                {"role": "assistant", "content": None, "name": "bot"}]
    r = chat(client, messages=messages, max_completion_tokens=5, temperature=0, add_generation_prompt=False)
    assert r.status_code == 200, r.text
    prompt = "<user>one\ntwo\n<assistant>\n"
    assert r.json()["choices"][0]["message"]["content"] == greedy_text(prompt, 5)
    assert r.json()["usage"]["prompt_tokens"] == len(TOK.encode(prompt))


def test_n_choices_and_seeds_match_completions(client):
    r = chat(client, n=3, max_tokens=8, temperature=1.0, seed=7)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["usage"]["completion_tokens"] == 24
    plain = client.post("/v1/completions", json={"prompt": HELLO_PROMPT, "n": 3, "max_tokens": 8, "temperature": 1.0,
                                                 "seed": 7}).json()
    assert [c["message"]["content"] for c in body["choices"]] == [c["text"] for c in plain["choices"]]
    assert chat(client, n=3, max_tokens=8, temperature=1.0, seed=7).json()["choices"] == body["choices"]


def test_stop_cuts_the_content(client):
    full = greedy_text(HELLO_PROMPT, 12)
    stop = full[5:7]
    r = chat(client, max_tokens=12, temperature=0, stop=[stop, "never"])
    choice = r.json()["choices"][0]
    assert choice["message"]["content"] == full[: full.index(stop)] and choice["finish_reason"] == "stop"
    assert chat(client, max_tokens=12, temperature=0, stop=stop).json()["choices"][0] == choice


def test_logprobs_and_top_logprobs(client):
    r = chat(client, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = fake_greedy(TOK.encode(HELLO_PROMPT), 4)
    content = choice["logprobs"]["content"]
    assert [t["token"] for t in content] == [TOK.decode([i]) for i in ids]
    assert [t["bytes"] for t in content] == [[i] for i in ids]
    for t in content:
        assert t["logprob"] <= 0 and len(t["top_logprobs"]) == 2
        assert t["top_logprobs"][0]["token"] == t["token"]  # greedy: the chosen token is the most likely
        assert t["top_logprobs"][0]["logprob"] == t["logprob"] >= t["top_logprobs"][1]["logprob"]
        assert set(t["top_logprobs"][1]) == {"token", "logprob", "bytes"}
    plain = chat(client, max_tokens=4, temperature=0, logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert [t["top_logprobs"] for t in plain] == [[]] * 4
    assert [t["logprob"] for t in plain] == [t["logprob"] for t in content]


def test_stream_sends_role_then_content_then_finish_then_usage(client):
    chunks = stream_chunks(client, max_tokens=6, temperature=0, stream_options={"include_usage": True})
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                     "finish_reason": None}]
    *content, finish, last = chunks[1:]
    assert all(set(c["choices"][0]["delta"]) == {"content"} and c["choices"][0]["finish_reason"] is None
               for c in content)
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == greedy_text(HELLO_PROMPT, 6)
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    prompt_tokens = len(TOK.encode(HELLO_PROMPT))
    assert last["choices"] == []
    assert_usage(last["usage"], prompt_tokens, 6)
    # Without include_usage no usage chunk; logprobs ride along with the content deltas.
    chunks = stream_chunks(client, max_tokens=3, temperature=0, logprobs=True, top_logprobs=1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "usage" not in chunks[-1]
    streamed = [t for c in chunks[1:-1] for t in c["choices"][0]["logprobs"]["content"]]
    whole = chat(client, max_tokens=3, temperature=0, logprobs=True, top_logprobs=1).json()
    assert streamed == whole["choices"][0]["logprobs"]["content"]


def test_stream_with_n_gives_each_choice_its_role_content_and_finish(client):
    chunks = stream_chunks(client, n=2, max_tokens=5, temperature=0)
    by_index: dict[int, list] = {0: [], 1: []}
    for c in chunks:
        (item,) = c["choices"]
        by_index[item["index"]].append(item)
    for items in by_index.values():
        assert items[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(i["delta"].get("content", "") for i in items[1:]) == greedy_text(HELLO_PROMPT, 5)
        assert items[-1]["finish_reason"] == "length" and [i["finish_reason"] for i in items[:-1]] == [None] * (
            len(items) - 1)


# ---- errors -----------------------------------------------------------------------------------------------------


def test_without_a_template_the_answer_is_400_saying_how_to_provide_one():
    with serve() as c:
        r = chat(c, max_tokens=2)
        assert r.status_code == 400
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["code"] == 400
        assert "no chat template" in err["message"] and "--chat-template FILE" in err["message"]
        assert "configs/chat/plain.jinja" in err["message"]
        # Streaming too: refused before the stream starts.
        assert chat(c, max_tokens=2, stream=True).status_code == 400


@pytest.mark.parametrize("content, says", [
    ("refuse", "the chat template refused these messages: the first message must not say refuse"),
    ("undefined", "UndefinedError"),
    ("mutate", "SecurityError"),
    ("divide", "ZeroDivisionError"),
    ("empty", "empty prompt"),
])
def test_template_errors_are_400_naming_the_problem(content, says):
    with serve(chat_template=FAILING) as c:
        for stream in (False, True):
            r = chat(c, messages=[{"role": "user", "content": content}], max_tokens=2, stream=stream)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error" and err["param"] == "messages" and says in err["message"]
        assert chat(c, messages=[{"role": "user", "content": "fine"}], max_tokens=2).status_code == 200


def test_stream_error_is_a_final_event_then_done():
    def fail(ids, pos):
        if (ids == ord("!")).any():
            raise RuntimeError("device lost")

    with serve(fail=fail, chat_template=TEMPLATE) as c:
        chunks = stream_chunks(c, messages=[{"role": "user", "content": "!"}], max_tokens=3)
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        error = chunks[-1]["error"]
        assert error["type"] == "internal_server_error" and "device lost" in error["message"]
        r = chat(c, messages=[{"role": "user", "content": "!"}], max_tokens=3)
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 1000}, "n"),
        ({"logprobs": True, "top_logprobs": 6}, "top_logprobs"),
        ({"top_logprobs": 1}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 1}, "top_logprobs"),
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_completion_tokens": 10**9}, "max_completion_tokens"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "x" * 200}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": None}]}, "messages"),
        ({"messages": [{"role": "user"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0.tool_calls"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x", "extra": 1}]}]}, "messages"),
        ({"presence_penalty": -3}, "presence_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"seed": -2}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"min_tokens": 10, "max_tokens": 5}, "min_tokens"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"logprobs": 1}, "logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),
        ({"messages": None}, "messages"),
    ],
)
def test_validation_is_400_with_param(client, body, param):
    r = chat(client, **{"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"], err


def test_ranges_and_messages_are_those_of_completions(client):
    for body in ({"temperature": 3}, {"top_p": 0}, {"presence_penalty": -3}, {"logit_bias": {"abc": 1}},
                 {"stop": ["a", "b", "c", "d", "e"]}, {"n": 0}, {"seed": -2}):
        a = chat(client, max_tokens=2, **body).json()["error"]
        b = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, **body}).json()["error"]
        assert a == b
    err = chat(client, messages=[{"role": "user", "content": "x"}], max_tokens=-1).json()["error"]
    assert err["message"] == "`max_tokens` must be >= 0, got -1"
    err = chat(client, logprobs=True, top_logprobs=6).json()["error"]
    assert err["message"] == "`top_logprobs` must be in [0, 5], got 6"
    err = chat(client, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]).json()
    assert "'image_url'" in err["error"]["message"] and "text only" in err["error"]["message"]
    err = chat(client, tools=[]).json()["error"]
    assert err["message"] == "Unrecognized request argument supplied: tools"


def test_unknown_model_is_404(client):
    r = chat(client, model="gpt-4")
    assert r.status_code == 404 and "gpt-4" in r.json()["error"]["message"]


# ---- where the template comes from ---------------------------------------------------------------------------------


def test_setting_from_flag_and_environment():
    assert Settings.from_sources(["--chat-template", "t.jinja"], environ={}).chat_template == "t.jinja"
    assert Settings.from_sources([], environ={"GPT2_CHAT_TEMPLATE": "t.jinja"}).chat_template == "t.jinja"


def test_bad_templates_stop_the_server_at_start(tmp_path):
    loader, _ = fake_parts(EngineConfig.from_settings(fake_settings(), FAKE_INFO))

    def build(**overrides):
        return create_app(fake_settings(**overrides), loader=loader, model_info=FAKE_INFO)

    with pytest.raises(ChatTemplateError, match="line 1"):
        build(chat_template="{% for m in messages %}")
    with pytest.raises(ChatTemplateError, match="no such file"):
        build(chat_template=str(tmp_path / "missing.jinja"))
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "{{ x"}')
    with pytest.raises(ChatTemplateError, match="tokenizer_config.json"):
        build(model=str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ChatTemplateError, match="not valid JSON"):
        build(model=str(tmp_path))
    assert issubclass(ChatTemplateError, ValueError)  # serving/__main__.py prints it and exits 2


def test_template_from_file_model_dir_and_override(tmp_path):
    file = tmp_path / "t.jinja"
    file.write_text("[{{ messages[-1].content }}]")
    with serve(chat_template=str(file)) as c:
        r = chat(c, max_tokens=3, temperature=0)
        assert r.json()["choices"][0]["message"]["content"] == greedy_text("[Hello]", 3)
    # The model directory's tokenizer_config.json: its template, and its bos/eos tokens (AddedToken form too).
    model = tmp_path / "model"
    model.mkdir()
    (model / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": "{{ bos_token }}{{ messages[-1].content }}{{ eos_token }}",
        "bos_token": {"content": "B", "special": True}, "eos_token": "E",
    }))
    with serve(model=str(model)) as c:
        assert chat(c, max_tokens=3, temperature=0).json()["choices"][0]["message"]["content"] == greedy_text(
            "BHelloE", 3)
    # Without bos/eos in the config: the tokenizer's <|endoftext|>, read as the special token.
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "unused"},
        {"name": "default", "template": "{{ bos_token }}{{ messages[-1].content }}"}]}))
    with serve(model=str(model)) as c:
        r = chat(c, max_tokens=3, temperature=0).json()
        assert r["choices"][0]["message"]["content"] == greedy_text("<|endoftext|>Hello", 3)
        assert r["usage"]["prompt_tokens"] == 6
    # --chat-template wins over the model's, inline text as well as a file.
    with serve(model=str(model), chat_template="({{ messages[-1].content }})") as c:
        assert chat(c, max_tokens=3, temperature=0).json()["choices"][0]["message"]["content"] == greedy_text(
            "(Hello)", 3)


def test_openapi_documents_the_route_and_its_answers(client):
    doc = client.get("/openapi.json").json()
    responses = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert set(responses) == {"200", "400", "404", "408", "413", "429", "500", "503"}
    assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
    props = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert props["top_logprobs"]["anyOf"][0]["maximum"] == 5 and props["n"]["maximum"] == 16
    operation = schemathesis.openapi.from_dict(doc)["/v1/chat/completions"]["POST"]
    for body in ({"n": 2, "logprobs": True, "top_logprobs": 2},
                 {"n": 2, "logprobs": True, "stream": True, "stream_options": {"include_usage": True}},
                 {"temperature": 3}, {"model": "gpt-4"}):
        body = {"messages": HELLO, "max_tokens": 3, **body}
        r = client.post("/v1/chat/completions", json=body)
        operation.Case(body=body, media_type="application/json").validate_response(r, checks=DOCUMENTED)


# ---- the openai client --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def uvicorn_thread(app):
    """The app behind a real uvicorn on a free port, in a thread (the `openai` client needs real HTTP)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        for _ in range(500):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def test_openai_client_chat_completions():
    s = fake_settings(chat_template=FAILING)
    loader, _ = fake_parts(EngineConfig.from_settings(s, FAKE_INFO))
    with uvicorn_thread(create_app(s, loader=loader, model_info=FAKE_INFO)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Hi there"}]
        expected = greedy_text("Hi there", 6)
        r = client.chat.completions.create(model="fake-gpt2", messages=messages, max_tokens=6, temperature=0,
                                           logprobs=True, top_logprobs=2, n=2)
        assert [c.message.content for c in r.choices] == [expected] * 2
        assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length"
        assert len(r.choices[0].logprobs.content) == 6 and len(r.choices[0].logprobs.content[0].top_logprobs) == 2
        assert r.usage.prompt_tokens == len("Hi there") and r.usage.completion_tokens == 12
        stream = client.chat.completions.create(model="fake-gpt2", messages=messages, max_completion_tokens=6,
                                                temperature=0, stream=True, stream_options={"include_usage": True},
                                                extra_body={"top_k": 5, "repetition_penalty": 1.0})
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.completion_tokens == 6
        with pytest.raises(openai.BadRequestError, match="must not say refuse"):
            client.chat.completions.create(model="fake-gpt2", messages=[{"role": "user", "content": "refuse"}])


@pytest.mark.slow
def test_real_server_with_the_example_template(tmp_path):
    """`python -m serving --chat-template configs/chat/plain.jinja` over a tiny MindSpore GPT-2 and the
    real tokenizer: the chat completion is /v1/completions on the text the example template renders."""
    model = make_tiny_model(tmp_path / "tiny")
    server = ServerProcess(model, "--max-batch-size", "2", "--prefill-chunk", "64",
                           "--chat-template", str(REPO / "configs" / "chat" / "plain.jinja"),
                           log_path=tmp_path / "server.log")
    try:
        server.wait_healthy()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
        messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Good morrow."}]
        prompt = "System: You are terse.\nUser: Good morrow.\nAssistant:"
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        assert r.choices[0].message.content == plain.choices[0].text
        assert r.usage.prompt_tokens == plain.usage.prompt_tokens
        streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                                  stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == plain.choices[0].text
    finally:
        assert server.stop() == 0
