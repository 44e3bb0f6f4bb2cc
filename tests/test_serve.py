"""The OpenAI-compatible server (`serve.py`, LitServe) answers through HTTP exactly what `VisualExit.generate` answers
offline on the same inputs and policy, alone and batched with other requests of other lengths and exits; refuses
bad requests with a 4xx that names the problem while answering every good one; fails at start-up naming the fix;
and finishes the requests in flight when it is stopped.

Each server runs in a subprocess on a free loopback port (once per model), with `max_batch_size` as large as the
concurrent groups sent and a long `batch_timeout`, so a concurrent group is answered as one batch whenever its
requests arrive within that window (the responses say how many requests their generate call answered).
"""

import json
import signal
import socket
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fixtures.real_format import fixture
from fixtures.serving import (
    HEADS,
    answered,
    chat_body,
    data_url,
    first_test_samples,
    launch,
    offline,
    post,
    serve,
    stop,
    streamed,
)
from PIL import Image

from benchmarks.serve_hostile import png_claiming
from dyvte import ExitHeads, ExitHeadsConfig, load_mllm
from dyvte.evaluation import PolicySettings, build_policy
from dyvte.policies.exit import StaticExit
from dyvte.prompts import chat_prompt
from dyvte.testbed import DATA_DIR

TESTBED_POLICIES = ("none", "dynamic", "fastv+dynamic", "tome", "cdpruner+dynamic")  # baselines too
MAX_TOKENS = 8


# --- the testbed server ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def testbed_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve-testbed")
    process, url, log = serve(workdir, f"heads={HEADS}", "policy=dynamic", f"policies=[{','.join(TESTBED_POLICIES)}]",
                              "max_batch_size=16", "batch_timeout=1.0", "max_tokens=16", "max_images=1",
                              "allow_exit_layer=true")
    yield process, url, log
    stop(process)


@pytest.fixture(scope="module")
def testbed_offline():
    model, processor = load_mllm("testbed")
    settings = PolicySettings(heads=ExitHeads.from_pretrained(HEADS), model=model)
    policies = {name: build_policy(name, settings) for name in TESTBED_POLICIES}
    cases = first_test_samples(8)
    return cases, {(name, i): offline(model, processor, policy, question, [image])
                   for name, policy in policies.items() for i, (question, image) in enumerate(cases)}


def test_alone_equals_offline_generate(testbed_server, testbed_offline):
    _, url, _ = testbed_server
    cases, expected = testbed_offline
    for name in TESTBED_POLICIES:
        for i in (0, 2):
            question, image = cases[i]
            text, extension = answered(post(url, chat_body(question, [image], name)))
            answer, exit_layer, stock = expected[name, i]
            assert (text, extension["exit_layer"], extension["batch_size"]) == (answer, exit_layer, 1)
            assert extension["policy"] == name and 0 <= extension["flops_saved"] < 1
            if name == "none":
                assert text == stock and exit_layer == extension["num_layers"] == 12
                assert extension["flops_saved"] == pytest.approx(0.0, abs=1e-12)


def test_batched_with_other_lengths_and_exits_equals_offline_generate(testbed_server, testbed_offline):
    _, url, _ = testbed_server
    cases, expected = testbed_offline
    jobs = [(name, i) for name in ("none", "dynamic") for i in range(len(cases))]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: post(url, chat_body(cases[job[1]][0], [cases[job[1]][1]], job[0])),
                                  jobs))
    results = {job: answered(response) for job, response in zip(jobs, responses)}
    for job, (text, extension) in results.items():
        assert (text, extension["exit_layer"]) == expected[job][:2], job
    dynamic = [results["dynamic", i][1] for i in range(len(cases))]
    assert len({e["exit_layer"] for e in dynamic}) > 1  # samples with different exits ...
    assert max(e["batch_size"] for e in dynamic) > 1  # ... answered in one batch
    assert len({response.json()["usage"]["prompt_tokens"] for response in responses}) > 1  # of different lengths


STATIC_EXITS = (0, 3, 6, 12, 1, 9, 5, 12)  # case i's exit_layer: text only, middle layers, the full model


@pytest.fixture(scope="module")
def static_exit_offline(testbed_offline):
    """(case, exit layer) -> `VisualExit.generate` alone with a static exit at that layer."""
    model, processor = load_mllm("testbed")
    cases, _ = testbed_offline
    return {(i, k): offline(model, processor, StaticExit(k), cases[i][0], [cases[i][1]])
            for i, k in enumerate(STATIC_EXITS)}


def test_exit_layer_requests_batched_with_policies_and_bad_requests_equal_offline_static_exit(
        testbed_server, testbed_offline, static_exit_offline):
    _, url, _ = testbed_server
    cases, expected = testbed_offline
    good = [("exit", i) for i in range(len(cases))] + [("dynamic", i) for i in range(3)] + [("none", 3)]
    bad = {  # an exit_layer the server refuses: (value, words its 400 must contain)
        "-1": (-1, "exit_layer=-1 is not an integer in 0..12"), "L+1": (13, "exit_layer=13 is not an integer in 0..12"),
        "2.5": (2.5, "exit_layer=2.5 is not"), "'3'": ("3", 'exit_layer="3" is not'),
        "true": (True, "exit_layer=true is not"), "with a policy": (3, "exit_layer and policy='dynamic' are both"),
    }

    def body(job):
        kind, i = job
        if kind == "exit":
            return chat_body(cases[i][0], [cases[i][1]], exit_layer=STATIC_EXITS[i])
        if kind in bad:
            return chat_body(cases[0][0], [cases[0][1]], "dynamic" if kind == "with a policy" else None,
                             exit_layer=bad[kind][0])
        return chat_body(cases[i][0], [cases[i][1]], kind)

    jobs = [job for pair in zip(good, [(kind, 0) for kind in bad] + [None] * len(good)) for job in pair if job]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = dict(zip(jobs, pool.map(lambda job: post(url, body(job)), jobs)))
    for (kind, i), response in responses.items():
        if kind in bad:
            assert response.status_code == 400 and bad[kind][1] in response.json()["detail"], (kind, response.text)
            continue
        text, extension = answered(response)
        if kind == "exit":
            answer, exit_layer, _ = static_exit_offline[i, STATIC_EXITS[i]]
            assert (text, extension["exit_layer"], extension["policy"]) == (answer, STATIC_EXITS[i], "exit_layer")
            assert exit_layer == STATIC_EXITS[i]
            if exit_layer == 12:  # the full model: the stock model's answer, nothing saved
                assert text == expected["none", i][2] and extension["flops_saved"] == pytest.approx(0.0, abs=1e-12)
            else:
                assert extension["flops_saved"] > 0
        else:
            assert (text, extension["exit_layer"]) == expected[kind, i][:2], (kind, i)
    exits = [answered(responses["exit", i])[1] for i in range(len(cases))]
    assert max(e["batch_size"] for e in exits) > 2  # requests of different exit layers answered in one generate call


def test_streaming_sends_the_same_answer_token_by_token(testbed_server, testbed_offline):
    _, url, _ = testbed_server
    cases, expected = testbed_offline
    i = next(i for i in range(len(cases)) if " " in expected["dynamic", i][0])  # an answer of several tokens
    question, image = cases[i]
    deltas, last = streamed(url, chat_body(question, [image], "dynamic"))
    answer, exit_layer, _ = expected["dynamic", i]
    assert len(deltas) > 1 and "".join(deltas) == answer
    assert last["choices"][0]["finish_reason"] == "stop" and last["dyvte"]["exit_layer"] == exit_layer


def test_openai_client_with_the_policy_field(testbed_server, testbed_offline):
    openai = pytest.importorskip("openai")  # the dev extra installs it; the HTTP tests above need nothing more
    _, url, _ = testbed_server
    cases, expected = testbed_offline
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    question, image = cases[1]
    completion = client.chat.completions.create(
        model="testbed", temperature=0, max_tokens=MAX_TOKENS, extra_body={"policy": "fastv+dynamic"},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                               {"type": "text", "text": question}]}])
    assert completion.choices[0].message.content == expected["fastv+dynamic", 1][0]
    assert completion.model_extra["dyvte"]["exit_layer"] == expected["fastv+dynamic", 1][1]


def test_bad_requests_get_a_4xx_naming_the_problem_and_every_good_one_is_answered(testbed_server, testbed_offline):
    _, url, _ = testbed_server
    cases, expected = testbed_offline
    question, image = cases[0]
    good_body = chat_body(question, [image], "dynamic")
    image_part = good_body["messages"][0]["content"][0]

    def with_url(image_url: str) -> dict:
        body = json.loads(json.dumps(good_body))
        body["messages"][0]["content"][0]["image_url"]["url"] = image_url
        return body

    no_image = json.loads(json.dumps(good_body))
    no_image["messages"][0]["content"] = no_image["messages"][0]["content"][1:]
    two_images = json.loads(json.dumps(good_body))
    two_images["messages"][0]["content"].insert(0, image_part)
    bad = {  # case: (body, status, words the error must contain); the case names the kind of refusal
        "invalid_json": (b'{"messages": [{"role": "user", "content": "what', 400, "the body is not valid JSON"),
        "bad_base64": (with_url("data:image/png;base64,@@not base64@@"), 400, "bad base64"),
        "not_an_image": (with_url(data_url(b"hello, world")), 400, "is not an image"),
        "image_too_large": (with_url(data_url(png_claiming(5000, 5000))), 413,
                            "5000x5000 = 25000000 pixels, over this server's max_image_pixels=16777216"),
        "image_too_large (over PIL's limit)": (with_url(data_url(png_claiming(40000, 40000))), 413, "decompression bomb"),
        "no_image": (no_image, 400, "no image"),
        "too_many_images": (two_images, 400, "max_images=1"),
        "unknown_policy": ({**good_body, "policy": "fastest"}, 400, "'fastest' is not served"),
        "max_tokens": ({**good_body, "max_tokens": 17}, 400, "max_tokens=17 is outside 1..16"),
        "url_not_fetched": (with_url("https://example.com/cat.png"), 400, "never fetches URLs"),
        "local_path": (with_url(str(DATA_DIR / "images" / "test_00000.png")), 400, "allow_local_paths=true"),
        # what once failed a whole batch with 500s, cost the model worker gigabytes or was ignored (issue 33):
        "bad_request (stop '')": ({**good_body, "stop": ""}, 400, "stop holds an empty string"),
        "bad_request (temperature 1e-30)": ({**good_body, "temperature": 1e-30}, 400, "temperature=1e-30 is outside"),
        "bad_request (a part whose type does not match)": (
            {**good_body, "messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}, 400,
            "messages.0.content.0.image_url: Field required"),
        "image_too_large (16000 x 1)": (with_url(data_url(Image.new("RGB", (16000, 1)))), 413,
                                        "16000x1, an aspect ratio over 200:1"),
        "max_tokens (0)": ({**good_body, "max_tokens": 0}, 400, "max_tokens=0 is outside 1..16"),
        "unsupported_field (logprobs)": ({**good_body, "logprobs": True}, 400, "logprobs=true is not supported"),
        "unsupported_field (frequency_penalty)": ({**good_body, "frequency_penalty": 1}, 400,
                                                 "frequency_penalty=1.0 is not supported"),
        "prompt_too_long": (chat_body("is it red ? " * 100, [image], "dynamic"), 400, "max_prompt_tokens=240"),
    }
    before = httpx.get(url + "/v1/dyvte/stats").json()
    jobs = [("good", good_body)]
    for kind, (body, _, _) in bad.items():
        jobs += [(kind, body), ("good", good_body)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda job: post(url, job[1]), jobs))
    for (kind, _), response in zip(jobs, responses):
        if kind == "good":
            text, extension = answered(response)
            assert (text, extension["exit_layer"]) == expected["dynamic", 0][:2]
        else:
            _, status, words = bad[kind]
            assert response.status_code == status and words in response.text, (kind, response.text)
    after = httpx.get(url + "/v1/dyvte/stats").json()
    goods = sum(kind == "good" for kind, _ in jobs)
    assert after["answered"] - before["answered"] == goods and after["in_flight"] == 0
    refused = Counter(after["refused_by_kind"])
    refused.subtract(before["refused_by_kind"])
    assert +refused == Counter(case.split(" ")[0] for case in bad)
    assert answered(post(url, good_body))[0] == expected["dynamic", 0][0]  # still serving


def test_stats_histogram_counts_every_answer(testbed_server):
    _, url, _ = testbed_server
    question, image = first_test_samples(1)[0]
    answered(post(url, chat_body(question, [image], "none")))
    stats = httpx.get(url + "/v1/dyvte/stats").json()
    assert sum(stats["histogram"].values()) == stats["answered"] > 0
    assert sum(p["requests"] for p in stats["policies"].values()) == stats["answered"]
    for policy in stats["policies"].values():
        assert policy["mean_exit_layer"] == pytest.approx(
            sum(int(k) * v for k, v in policy["histogram"].items()) / policy["requests"])
    assert stats["policies"]["none"]["histogram"] == {"12": stats["policies"]["none"]["requests"]}


def test_stopping_finishes_the_requests_in_flight(testbed_server, testbed_offline):
    """Last in this module: it stops the testbed server."""
    process, url, log = testbed_server
    cases, expected = testbed_offline
    jobs = [("dynamic", i) for i in range(3)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(post, url, chat_body(cases[i][0], [cases[i][1]], name)) for name, i in jobs]
        deadline = time.monotonic() + 60
        while httpx.get(url + "/v1/dyvte/stats").json()["in_flight"] < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        responses = [future.result() for future in futures]
    for job, response in zip(jobs, responses):
        text, extension = answered(response)
        assert (text, extension["exit_layer"]) == expected[job][:2]
    assert process.wait(60) == 0, log.read_text()[-3000:]
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/health", timeout=2)


# --- start-up failures -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_start_up_failures_name_the_fix(tmp_path):
    ExitHeads(ExitHeadsConfig(hidden_size=64, num_layers=12, head_hidden=4)).save_pretrained(tmp_path / "other")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = [  # (overrides, port, words the error must contain)
            ((f"heads={HEADS}",), port, f"port={port} on 127.0.0.1 is not free"),
            ((f"heads={tmp_path / 'other'}",), None, "do not fit the model: hidden size 64 vs the model's 96"),
            ((f"heads={tmp_path / 'none'}", "policies=[none]"), None, "need exit heads"),
            ((f"heads={HEADS}", "policies=[none,gsearch]"), None, "gsearch.path=FILE"),
            ((f"heads={HEADS}", "max_tokens=256"), None,
             "max_tokens=256 leaves no room for a prompt in the model's max_position_embeddings=256"),
        ]
        launched = [launch(tmp_path, *overrides, port=p) for overrides, p, _ in cases]
        for (process, _, log), (_, _, words) in zip(launched, cases):
            assert process.wait(120) != 0
            assert words in log.read_text(), log.read_text()[-2000:]
    assert "another port" in launched[0][2].read_text() and "heads=DIR" in launched[2][2].read_text()


# --- real-format LLaVA and Qwen2-VL folders ---------------------------------------------------------------------


@pytest.mark.slow  # a server per model folder: about a minute each on two busy cores
@pytest.mark.parametrize("name", ["llava-1.5", "qwen2-vl"])
def test_real_format_served_answers_equal_offline_generate(name, tmp_path):
    folder = fixture(name)
    model, processor = load_mllm(str(folder))
    text = model.config.get_text_config(decoder=True)
    torch.manual_seed(0)
    heads = ExitHeads(ExitHeadsConfig(hidden_size=text.hidden_size, num_layers=text.num_hidden_layers,
                                      head_hidden=8, threshold=0.5))
    heads.save_pretrained(tmp_path / "heads")
    settings = PolicySettings(heads=ExitHeads.from_pretrained(tmp_path / "heads"), model=model)
    cases = [("What is it?", [Image.new("RGB", (56, 56), "red")]),
             ("Describe the colour of this picture in one short word, please.", [Image.new("RGB", (84, 56), "green")]),
             ("What?", [Image.new("RGB", (56, 112), "blue")])]
    expected = {(policy, i): offline(model, processor, build_policy(policy, settings), question, images)
                for policy in ("none", "dynamic") for i, (question, images) in enumerate(cases)}
    process, url, _ = serve(tmp_path, f"model.name_or_path={folder}", "model.revision=null",
                              f"heads={tmp_path / 'heads'}", "policies=[none,dynamic]", "max_batch_size=6",
                              "batch_timeout=1.0")
    try:
        jobs = list(expected)
        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(lambda job: post(url, chat_body(*cases[job[1]], job[0])), jobs))
        alone = answered(post(url, chat_body(*cases[1], "dynamic")))
    finally:
        stop(process)
    for job, response in zip(jobs, responses):
        text, extension = answered(response)
        assert (text, extension["exit_layer"]) == expected[job][:2], job
        if job[0] == "none":
            assert text == expected[job][2]
    assert (alone[0], alone[1]["exit_layer"], alone[1]["batch_size"]) == (*expected["dynamic", 1][:2], 1)
    assert max(answered(r)[1]["batch_size"] for r in responses) > 1


# --- request parsing, in process ---------------------------------------------------------------------------------


def test_a_conversation_becomes_the_prompt_the_chat_template_writes():
    from dyvte.serving.requests import BadRequest, ExitChatRequest, PromptLength, RequestLimits, parse_request

    _, processor = load_mllm("testbed")
    image = Image.new("RGB", (32, 32), "red")
    request = ExitChatRequest(temperature=0, stop=["."], messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                     {"type": "text", "text": "what is it ?"}]},
        {"role": "assistant", "content": "a red square"},
        {"role": "user", "content": "and its colour ?"}])
    limits = RequestLimits(policies=("dynamic",), default_policy="dynamic", max_new_tokens=4, max_tokens=8,
                           max_prompt_tokens=200, max_images=1, max_image_pixels=96 * 96, require_image=True,
                           allow_local_paths=False, allow_exit_layer=False, num_layers=12)
    parsed = parse_request(request, limits, PromptLength(processor))
    prompt = chat_prompt(processor, parsed.question, parsed.question_images, parsed.history)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it ?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]},
                {"role": "user", "content": [{"type": "text", "text": "and its colour ?"}]}]
    assert prompt == processor.apply_chat_template(messages, add_generation_prompt=True)
    assert [i.getpixel((0, 0)) for i in parsed.images] == [(255, 0, 0)]
    assert (parsed.policy, parsed.max_new_tokens, parsed.temperature, parsed.stop) == ("dynamic", 4, 0.0, ["."])
    assert parsed.prompt_tokens == len(processor(images=parsed.images, text=[prompt])["input_ids"][0])
    big = ExitChatRequest(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(Image.new("RGB", (128, 128)))}},
        {"type": "text", "text": "what is it ?"}]}])
    with pytest.raises(BadRequest, match="128x128 = 16384 pixels, over this server's max_image_pixels=9216"):
        parse_request(big, limits, PromptLength(processor))
    thin = big.model_copy(deep=True)  # 9216 pixels as sent; the processor would resize it to 96 x 4608
    thin.messages[0].content[0].image_url.url = data_url(Image.new("RGB", (192, 4)))
    with pytest.raises(BadRequest, match="192x4, which the model's image processor resizes to 442368 pixels, over "
                                         "this server's max_image_pixels=9216"):
        parse_request(thin, limits, PromptLength(processor))


def test_exit_layer_is_refused_by_a_server_that_does_not_allow_it():
    from dyvte.serving.requests import BadRequest, ExitChatRequest, PromptLength, RequestLimits, parse_request

    _, processor = load_mllm("testbed")
    body = chat_body("what is it ?", [Image.new("RGB", (32, 32), "red")], exit_layer=3)
    limits = RequestLimits(policies=("dynamic",), default_policy="dynamic", max_new_tokens=4, max_tokens=8,
                           max_prompt_tokens=200, max_images=1, max_image_pixels=96 * 96, require_image=True,
                           allow_local_paths=False, allow_exit_layer=False, num_layers=12)
    with pytest.raises(BadRequest, match="exit_layer is not allowed by this server; .* allow_exit_layer=true") as refused:
        parse_request(ExitChatRequest.model_validate(body), limits, PromptLength(processor))
    assert refused.value.status_code == 400
    limits.allow_exit_layer = True
    parsed = parse_request(ExitChatRequest.model_validate(body), limits, PromptLength(processor))
    assert (parsed.policy, parsed.exit_layer) == ("exit_layer", 3)
