"""`serve`, started for real on a free loopback port and spoken to as its users would: the official `openai`
client (whole and streamed answers), raw HTTP for every bad request (OpenAI-shaped errors, never a traceback),
an API key, a full queue (429), a client that hangs up (its place is freed), SIGTERM (drains, exits 0), requests
batched together (one arriving mid-generation does not wait), the model process killed (errors, not a hang), and
a headless Chromium typing into the page."""
import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest

from tests.cli_helpers import REPO
from tests.inference_helpers import ENDLESS_PROMPT, MAX_NEW_TOKENS, Server

MODEL_ID = "demo/final"


@pytest.fixture(scope="module")
def server(demo_model):
    running = Server(demo_model["model_dir"], max_new_tokens=MAX_NEW_TOKENS, max_seq_len=64, max_body_kb=4)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def answers(demo_model):
    """generate's greedy answers to the first prompts, through the real CLI (one process for all, --file)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.cli_helpers import run_cli

    source, output = demo_model["root"] / "serve_prompts.parquet", demo_model["root"] / "serve_answers.parquet"
    pq.write_table(pa.table({"prompt": demo_model["prompts"][:8]}), source)
    run_cli("generate", dict(model_dir=demo_model["model_dir"], file=source, output=output,
                             max_new_tokens=MAX_NEW_TOKENS))
    return dict(zip(demo_model["prompts"][:8], pq.read_table(output).column("answer").to_pylist()))


def client(server, **kwargs):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0, timeout=60,
                  **kwargs)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.slow
def test_the_startup_line_names_the_url(server):
    assert server.banner.startswith(f"serving on {server.url}  (chat page: {server.url}/ , OpenAI API: {server.url}/v1")


@pytest.mark.slow
def test_the_openai_client_gets_generates_answer_with_usage(server, answers, demo_engine):
    prompt, expected = next(iter(answers.items()))
    reply = client(server).chat.completions.create(model=MODEL_ID, messages=user(prompt))
    assert reply.object == "chat.completion" and reply.model == MODEL_ID and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason == "stop"
    from config import DecodingSettings

    assert reply.usage.prompt_tokens == len(demo_engine.tokenizer(prompt)["input_ids"])  # [EOS] included
    expected_ids = demo_engine.answer_ids([prompt], DecodingSettings(max_new_tokens=MAX_NEW_TOKENS))[0]
    assert reply.usage.completion_tokens == len(expected_ids)  # the answer's tokens, without its [EOS]
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


@pytest.mark.slow
def test_a_streamed_answer_arrives_in_pieces_that_make_the_whole_answer(server, answers):
    prompt, expected = next(iter(answers.items()))
    chunks = list(client(server).chat.completions.create(model=MODEL_ID, messages=user(prompt), stream=True,
                                                         stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 2 and "".join(pieces) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= len(pieces)
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": MODEL_ID, "messages": user(prompt), "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_each_gets_its_own_greedy_answer(server, answers):
    replies, errors = {}, []

    def ask(prompt):
        try:
            replies[prompt] = client(server).chat.completions.create(model=MODEL_ID, messages=user(prompt))
        except Exception as error:  # noqa: BLE001  (reported by the assertion below)
            errors.append(error)
    steps_before = httpx.get(f"{server.url}/health").json()["steps"]
    threads = [threading.Thread(target=ask, args=(prompt,)) for prompt in answers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and {p: r.choices[0].message.content for p, r in replies.items()} == answers
    steps = httpx.get(f"{server.url}/health").json()["steps"] - steps_before
    tokens = sum(r.usage.completion_tokens + 1 for r in replies.values())  # each answer's [EOS] is a step too
    assert steps < tokens * 0.75  # one at a time would take a step per token


@pytest.mark.slow
def test_models_health_and_the_page_are_served(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL_ID and health["max_batch"] == 8
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    # Self-contained: no script, style, image or font from anywhere else (the page works offline).
    assert "http://" not in page.text and "https://" not in page.text and "src=" not in page.text
    assert json.dumps(MODEL_ID) in page.text and "getReader()" in page.text  # the model's name; streamed reads


def long_conversation(turns: int) -> list[dict]:
    history = []
    for index in range(turns):
        history += [{"role": "user", "content": f"复述：山水{index}"}, {"role": "assistant", "content": "山水" * 5}]
    return history + user("倒序：春夏")


DISTINCT = "春夏秋冬山水风花雪月日星云雨天地人心书画江河湖海红黄蓝白金木火土东南西北大小多少上下"  # 48: > 64 tokens x3
BAD_REQUESTS = [
    ("malformed JSON", b'{"model": "demo/final", "messages": [', 400, "invalid_json", None),
    ("a body that is not an object", b'[1, 2]', 400, "invalid_request", None),
    ("messages of the wrong type", {"model": MODEL_ID, "messages": "hello"}, 422, "invalid_type", "messages"),
    ("max_tokens as text", {"model": MODEL_ID, "messages": user("x"), "max_tokens": "5"}, 422, "invalid_type",
     "max_tokens"),
    ("a message without content", {"model": MODEL_ID, "messages": [{"role": "user"}]}, 422, "invalid_type",
     "messages.0.content"),
    ("no model", {"messages": user("x")}, 422, "invalid_type", "model"),
    ("empty messages", {"model": MODEL_ID, "messages": []}, 400, "empty_messages", "messages"),
    ("an unknown role", {"model": MODEL_ID, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_role",
     "messages[0].role"),
    ("a last message that is not the user's", {"model": MODEL_ID, "messages": [
        {"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, 400, "invalid_messages",
     "messages"),
    ("a last message longer than max_seq_len", {"model": MODEL_ID, "messages": user(DISTINCT * 3)}, 400,
     "context_length_exceeded", "messages"),
    ("max_tokens 0", {"model": MODEL_ID, "messages": user("x"), "max_tokens": 0}, 400, "invalid_value",
     "max_tokens"),
    ("max_tokens above the server's limit", {"model": MODEL_ID, "messages": user("x"), "max_tokens": 25}, 400,
     "invalid_value", "max_tokens"),
    ("temperature above 2", {"model": MODEL_ID, "messages": user("x"), "temperature": 3}, 400, "invalid_value",
     "temperature"),
    ("n above 1", {"model": MODEL_ID, "messages": user("x"), "n": 2}, 400, "unsupported_value", "n"),
    ("an unknown model", {"model": "gpt-4", "messages": user("x")}, 404, "model_not_found", "model"),
    ("a body over --max_body_kb", {"model": MODEL_ID, "messages": user("山" * 5000)}, 413, "request_too_large",
     None),
]


@pytest.mark.slow
@pytest.mark.parametrize("what,body,status,code,param", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_a_bad_request_gets_an_openai_shaped_error(server, what, body, status, code, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{server.url}/v1/chat/completions", content=content, timeout=30,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"] and "Traceback" not in response.text


@pytest.mark.slow
def test_a_body_sent_in_chunks_without_a_length_is_cut_at_the_limit_too(server):
    def chunks():
        yield b'{"model": "demo/final", "messages": [{"role": "user", "content": "'
        for _ in range(10):
            yield "山".encode() * 300
        yield b'"}]}'
    response = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(), timeout=30)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


@pytest.mark.slow
@pytest.mark.parametrize("method,path,status", [("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                                ("GET", "/v1/models/gpt-4", 404)])
def test_unknown_routes_and_methods_get_openai_shaped_errors(server, method, path, status):
    response = httpx.request(method, f"{server.url}{path}")
    assert response.status_code == status and response.json()["error"]["message"]


@pytest.mark.slow
def test_a_conversation_longer_than_max_seq_len_loses_its_oldest_turns(server):
    reply = client(server).chat.completions.create(model=MODEL_ID, messages=long_conversation(20))
    assert reply.usage.prompt_tokens <= 64 and reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.slow
def test_the_server_log_holds_no_traceback_after_the_bad_requests(server):
    assert "Traceback" not in server.log()


@pytest.fixture(scope="module")
def keyed_server(demo_model):
    running = Server(demo_model["model_dir"], max_new_tokens=MAX_NEW_TOKENS, api_key="s3cret")
    yield running
    running.stop()


@pytest.mark.slow
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"},
                                     {"Authorization": "bearer s3cret"}, {"Authorization": "Bearer s3cre"}])
def test_with_an_api_key_a_request_without_it_is_refused(keyed_server, headers):
    for method, path in (("POST", "/v1/chat/completions"), ("GET", "/v1/models")):
        response = httpx.request(method, f"{keyed_server.url}{path}", headers=headers,
                                 json={"model": MODEL_ID, "messages": user("x")})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.slow
def test_with_an_api_key_the_client_that_has_it_is_answered(keyed_server):
    reply = client(keyed_server, api_key="s3cret").chat.completions.create(model=MODEL_ID, messages=user("复述：春"))
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert httpx.get(f"{keyed_server.url}/health").status_code == 200  # a health check needs no key


@pytest.fixture
def one_place(endless_model):
    """A server with one place in its batch and none in its queue, over a model that answers to the limit."""
    running = Server(endless_model, max_new_tokens=4000, max_batch=1, queue_size=0)
    yield running
    running.stop()


def long_stream(server):
    """A streamed request that takes many seconds (thousands of tokens), opened and read up to its first text."""
    context = httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                           json={"model": server.model_id, "messages": user(ENDLESS_PROMPT), "stream": True})
    response = context.__enter__()
    assert response.status_code == 200
    lines = response.iter_lines()
    for line in lines:
        if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
            break
    return context, lines


def wait_for(condition, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline
        time.sleep(0.05)


@pytest.mark.slow
def test_beyond_the_batch_and_queue_a_request_gets_429_with_retry_after(one_place):
    context, _ = long_stream(one_place)
    try:
        response = httpx.post(f"{one_place.url}/v1/chat/completions", timeout=30,
                              json={"model": one_place.model_id, "messages": user("x")})
        assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
        assert response.json()["error"]["type"] == "rate_limit_error"
    finally:
        context.__exit__(None, None, None)


@pytest.mark.slow
def test_a_client_that_hangs_up_frees_its_place(one_place):
    context, _ = long_stream(one_place)
    assert httpx.get(f"{one_place.url}/health").json()["active"] == 1
    context.__exit__(None, None, None)  # the connection closes mid-stream
    wait_for(lambda: httpx.get(f"{one_place.url}/health").json()["active"] == 0, timeout=10)
    reply = httpx.post(f"{one_place.url}/v1/chat/completions", timeout=60,
                       json={"model": one_place.model_id, "messages": user("x"), "max_tokens": 5})
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 5


@pytest.mark.slow
def test_a_request_arriving_mid_generation_joins_the_batch_and_does_not_wait(endless_model):
    running = Server(endless_model, max_new_tokens=4000, max_batch=4)
    try:
        context, _ = long_stream(running)
        started = time.time()
        reply = httpx.post(f"{running.url}/v1/chat/completions", timeout=60,
                           json={"model": running.model_id, "messages": user("x"), "max_tokens": 10})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 10
        assert httpx.get(f"{running.url}/health").json()["active"] == 1  # the long one still runs
        assert time.time() - started < 10
        context.__exit__(None, None, None)
    finally:
        running.stop()


@pytest.mark.slow
def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(endless_model):
    running = Server(endless_model, max_new_tokens=400, drain_seconds=60)
    try:
        context, lines = long_stream(running)
        running.process.send_signal(__import__("signal").SIGTERM)
        rest = [line for line in lines if line]
        context.__exit__(None, None, None)
        assert rest[-1] == "data: [DONE]" and '"finish_reason": "length"' in "".join(rest)
        assert running.process.wait(30) == 0
        assert "SIGTERM: finishing the requests in flight" in running.log()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{running.url}/health")
    finally:
        running.stop()


@pytest.mark.slow
def test_the_drain_is_bounded_by_drain_seconds(endless_model):
    running = Server(endless_model, max_new_tokens=4000, drain_seconds=1)
    try:
        context, _ = long_stream(running)
        started = time.time()
        running.process.send_signal(__import__("signal").SIGTERM)
        assert running.process.wait(30) == 0 and time.time() - started < 15
        context.__exit__(None, None, None)
    finally:
        running.stop()


def model_process(server):
    """The server's model process (serving/worker.py): its python's spawned child, not the resource tracker."""
    import psutil

    for process in psutil.Process(server.process.pid).children(recursive=True):
        command = " ".join(process.cmdline())
        if "multiprocessing.spawn" in command and "resource_tracker" not in command:
            return process
    raise AssertionError("no model process under the server")


@pytest.mark.slow
def test_when_the_model_process_dies_requests_end_with_an_error_and_health_says_so(endless_model):
    running = Server(endless_model, max_new_tokens=4000)
    try:
        context, lines = long_stream(running)
        model_process(running).kill()
        rest = [line for line in lines if line]
        context.__exit__(None, None, None)
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "unavailable"
        health = httpx.get(f"{running.url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "error"
        reply = httpx.post(f"{running.url}/v1/chat/completions", timeout=30,
                           json={"model": running.model_id, "messages": user("x"), "max_tokens": 5})
        assert reply.status_code == 503 and reply.json()["error"]["code"] == "unavailable"
        assert "the model process ended with status -9" in running.log()
        assert running.terminate() == 0  # and the server still shuts down cleanly
    finally:
        running.stop()


CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.mark.slow
def test_a_person_types_into_the_page_and_sees_the_answer_stream_in(server, answers):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if not os.path.exists(CHROMEDRIVER):
        pytest.fail(f"{CHROMEDRIVER} is missing: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        browser.set_page_load_timeout(30)
        browser.get(f"{server.url}/")
        prompts = list(answers)
        for turn, prompt in enumerate(prompts[:2]):
            browser.find_element(By.ID, "message").send_keys(prompt)
            browser.find_element(By.ID, "send").click()
            WebDriverWait(browser, 60).until(
                lambda b: len(b.find_elements(By.CSS_SELECTOR, ".assistant[data-done='true']")) == turn + 1)
        bubbles = browser.find_elements(By.CSS_SELECTOR, ".turn")
        assert [b.text for b in bubbles][0::2] == prompts[:2]
        assert bubbles[1].text == answers[prompts[0]]  # the first answer, as generate gives it
        assert bubbles[3].text  # the second, with the first turn in its prompt
        assert browser.find_element(By.ID, "max_tokens").get_attribute("value") == str(MAX_NEW_TOKENS)
        assert browser.find_element(By.ID, "stop").get_attribute("disabled")  # nothing to stop now
        assert json.loads(browser.find_element(By.ID, "status").get_attribute("data-usage"))["completion_tokens"] >= 1
    finally:
        browser.quit()


@pytest.mark.slow
def test_the_serving_benchmark_runs_and_reports_its_figures(demo_model):
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "bench_serve.py"), "--smoke",
                             f"--model_dir={demo_model['model_dir']}"], capture_output=True, text=True, cwd=REPO,
                            timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "clients" not in line
            and not line.startswith("|---")]
    figures = {int(row.split("|")[1]): [cell.strip() for cell in row.split("|")[2:-1]] for row in rows}
    assert sorted(figures) == [1, 2, 4]
    for clients, (requests, complete, tokens, rate, *_rest) in figures.items():
        assert int(complete) == int(requests) > 0 and int(tokens) > 0 and float(rate.replace(",", "")) > 0
    assert "speed-up at 2 clients" in result.stdout
