"""Careless and hostile clients against a served testbed, over loopback: concurrent mixes of good and bad requests
(every good one answered exactly as `VisualExit.generate` answers offline, every bad one its own 4xx naming the
problem), clients that hold connections (slow headers, slow or oversized bodies, clients that leave), streamed and
whole answers with stop strings that span tokens, seeds, the memory of the model worker, and the stats: every
request counted in exactly one outcome. The cases are `benchmarks.serve_hostile`'s (which measures the table in
docs/serving.md on the default limits); here the server runs with small ones, so each test is bounded."""

import json
import random
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fixtures.serving import (
    HEADS,
    answered,
    chat_body,
    first_test_samples,
    launch,
    model_worker,
    offline,
    stop,
    streamed,
    wait_until_healthy,
)

from benchmarks.serve_hostile import MemoryWatch, hostile_bodies, hostile_clients, send
from dyvte import DynamicExit, ExitHeads, NoExit, load_mllm

LIMITS = {"max_tokens": 16, "max_image_pixels": 1_000_000, "max_request_bytes": 8_000_000, "read_timeout": 3,
          "idle_timeout": 1}


@pytest.fixture(scope="module")
def model():
    return load_mllm("testbed")


@pytest.fixture(scope="module")
def served(tmp_path_factory, model):
    """(server process, its URL, test samples, their offline answers): greedy, 16 tokens, under both policies for the
    first 8 samples and under `dynamic` for the multi-word answers among the first 40 (computed while the server
    starts)."""
    process, url, log = launch(tmp_path_factory.mktemp("serve-hostile"), f"heads={HEADS}", "policies=[none,dynamic]",
                               "max_batch_size=8", "batch_timeout=0.3", *(f"{k}={v}" for k, v in LIMITS.items()))
    policies = {"dynamic": DynamicExit(ExitHeads.from_pretrained(HEADS)), "none": NoExit()}
    cases = first_test_samples(40)
    jobs = [(name, i) for name in policies for i in range(8)]
    jobs += [("dynamic", i) for i in range(8, 40) if cases[i][0].startswith("list")]
    answers = {(name, i): offline(*model, policies[name], cases[i][0], [cases[i][1]], 16)[:2] for name, i in jobs}
    wait_until_healthy(process, url, log)
    yield process, url, cases, answers
    stop(process)


def stats(url: str) -> dict:
    return httpx.get(url + "/v1/dyvte/stats").json()


def settled_stats(url: str, limit_s: float = 30) -> dict:
    """The stats once no request is in flight (a client that left is counted when its response ends)."""
    deadline = time.monotonic() + limit_s
    while (now := stats(url))["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.1)
    return now


def outcome_counts(summary: dict) -> Counter:
    return Counter({k: summary[k] for k in ("requests", "answered", "refused", "failed", "abandoned")})


def test_every_bad_request_gets_its_4xx_and_every_good_one_its_offline_answer(served, model):
    _, url, cases, answers = served
    goods = [("good", (policy, i), chat_body(*cases[i][:1], [cases[i][1]], policy, max_tokens=16, stream=stream))
             for i in range(8) for policy, stream in (("dynamic", False), ("none", False), ("dynamic", True))]
    bad = [("bad", case, case.body) for case in hostile_bodies(16, LIMITS["max_image_pixels"], model[1].image_processor)]
    jobs = goods + bad
    random.Random(0).shuffle(jobs)
    before = stats(url)

    def run(job):
        kind, _, body = job
        if kind == "good" and body.get("stream"):
            deltas, last = streamed(url, body)
            return "".join(deltas), last["dyvte"]
        response = send(url + "/v1/chat/completions", body)
        return answered(response) if kind == "good" else response

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(run, jobs))
    for (kind, key, _), result in zip(jobs, results):
        if kind == "good":
            assert (result[0], result[1]["exit_layer"]) == answers[key], key
        else:
            assert result.status_code == key.status, (key.name, result.status_code, result.text)
            assert key.words is None or key.words in result.text, (key.name, result.text)
    after = settled_stats(url)
    delta = outcome_counts(after)
    delta.subtract(outcome_counts(before))
    allowed = sum(case.status == 200 for _, case, _ in bad)
    assert dict(delta) == {"requests": len(jobs), "answered": len(goods) + allowed, "refused": len(bad) - allowed,
                           "failed": 0, "abandoned": 0}
    assert after["requests"] == sum(after[k] for k in ("answered", "refused", "failed", "abandoned", "in_flight"))
    assert max(result[1]["batch_size"] for (kind, _, _), result in zip(jobs, results) if kind == "good") > 1


def test_clients_that_hold_connections_are_cut_off_and_counted(served):
    process, url, cases, _ = served
    port = int(url.rsplit(":", 1)[1])
    before = settled_stats(url)
    clients = hostile_clients(port, LIMITS["read_timeout"], LIMITS["idle_timeout"], LIMITS["max_request_bytes"])
    (slow_head, head_s), (stalled, stalled_s), (slow_body, slow_s), (declared, _), (chunked, _), *_ = clients.values()
    # cut off at the limit, not when the client is done (which would take it 500 s, forever and 115 s)
    assert slow_head == "closed" and LIMITS["read_timeout"] <= head_s < LIMITS["read_timeout"] + 10
    assert stalled.startswith("HTTP/1.1 408") and LIMITS["idle_timeout"] <= stalled_s < LIMITS["idle_timeout"] + 10
    assert slow_body.startswith("HTTP/1.1 408") and LIMITS["read_timeout"] <= slow_s < LIMITS["read_timeout"] + 10
    assert declared.startswith("HTTP/1.1 413") and chunked.startswith("HTTP/1.1 413")
    after = settled_stats(url)
    refused = Counter(after["refused_by_kind"])
    refused.subtract(before["refused_by_kind"])
    assert +refused == Counter({"body_timeout": 2, "body_too_large": 2})
    assert after["abandoned"] - before["abandoned"] == 2  # the stream it left and the answer it gave up on
    assert after["requests"] - before["requests"] == 6  # the slow head never became a request
    assert process.poll() is None and answered(send(url + "/v1/chat/completions",
                                                     chat_body(cases[0][0], [cases[0][1]])))


def test_streamed_and_whole_answers_agree_for_stops_that_span_tokens(served):
    _, url, cases, answers = served
    lists = [i for name, i in answers if name == "dynamic" and len(answers[name, i][0].split()) >= 3][:3]
    assert lists, "no multi-word answer among the first test samples"
    jobs = []
    for i in lists:
        text = answers["dynamic", i][0]
        space = text.index(" ")
        for stops in ([text[space - 2:space + 3]],  # the end of one word and the start of the next
                      [text[-3:] + "x"],  # started at the end, never completed
                      ["zz", text[space + 1:space + 3], text[1:3]],  # a later stop that matches earlier
                      [text], [" "], [text[-2:]]):
            jobs.append((i, stops))

    def whole_and_streamed(job):
        i, stops = job
        body = chat_body(cases[i][0], [cases[i][1]], "dynamic", max_tokens=16, stop=stops)
        whole = send(url + "/v1/chat/completions", body).json()
        deltas, last = streamed(url, body)
        return whole["choices"][0]["message"]["content"], "".join(deltas), whole["choices"][0]["finish_reason"], last

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(whole_and_streamed, jobs))
    for (i, stops), (whole, stream, finish_reason, last) in zip(jobs, results):
        text = answers["dynamic", i][0]
        starts = [text.find(s) for s in stops if s in text]
        assert whole == stream == (text[:min(starts)] if starts else text), (text, stops, whole, stream)
        assert finish_reason == last["choices"][0]["finish_reason"]
        assert finish_reason == "stop" or not starts


def test_a_seed_gives_the_same_sample_alone_and_beside_other_requests(served):
    _, url, cases, _ = served
    question, image = cases[next(i for i in range(len(cases)) if cases[i][0].startswith("list"))]
    body = chat_body(question, [image], "dynamic", max_tokens=16, temperature=1.5, seed=11)
    alone = send(url + "/v1/chat/completions", body).json()
    neighbours = [chat_body(q, [im], "dynamic", max_tokens=16, temperature=1.0, seed=s) for s, (q, im) in
                  enumerate(cases[:5])] + [chat_body(q, [im], "none") for q, im in cases[5:8]]
    batch_sizes = []
    for _ in range(5):  # until LitServe's batching window puts it beside others (it may open on it alone)
        with ThreadPoolExecutor(9) as pool:
            batched = list(pool.map(lambda b: send(url + "/v1/chat/completions", b).json(), [body, *neighbours]))
        assert batched[0]["choices"] == alone["choices"]
        batch_sizes.append(batched[0]["dyvte"]["batch_size"])
        if batch_sizes[-1] > 1:
            break
    assert max(batch_sizes) > 1, batch_sizes
    assert alone["dyvte"]["seed"] == 11
    seeds = [send(url + "/v1/chat/completions", {**body, "seed": seed}).json() for seed in range(6)]
    assert len({s["choices"][0]["message"]["content"] for s in seeds}) > 1  # the seed matters
    unseeded = send(url + "/v1/chat/completions", {k: v for k, v in body.items() if k != "seed"}).json()
    replayed = send(url + "/v1/chat/completions", {**body, "seed": unseeded["dyvte"]["seed"]}).json()
    assert replayed["choices"] == unseeded["choices"]


def test_a_long_prompt_is_answered_apart_from_short_ones(served):
    _, url, cases, answers = served
    long_question = cases[0][0] + " " + " ".join(["please answer the question about the image ."] * 12)
    jobs = [chat_body(q, [im], "dynamic", max_tokens=16) for q, im in cases[:6]]
    jobs.append(chat_body(long_question, [cases[0][1]], "dynamic", max_tokens=16))
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda b: send(url + "/v1/chat/completions", b).json(), jobs))
    lengths = [r["usage"]["prompt_tokens"] for r in results]
    assert lengths[-1] > 2 * max(lengths[:-1])
    for i, result in enumerate(results[:-1]):
        assert (result["choices"][0]["message"]["content"], result["dyvte"]["exit_layer"]) == answers["dynamic", i]
        assert result["dyvte"]["batch_size"] <= 6
    assert results[-1]["dyvte"]["batch_size"] == 1


def test_images_at_the_limits_cost_the_model_worker_little_and_thin_ones_nothing(served, model):
    process, url, _, _ = served
    worker = model_worker(process)
    cases = {case.name: case for case in hostile_bodies(16, LIMITS["max_image_pixels"], model[1].image_processor)}
    allowed = [case for case in cases.values() if case.status == 200]
    refused = [cases["16000 x 1 PNG (131 bytes)"], cases["1 x 32000 PNG (211 bytes)"]]
    with MemoryWatch({"worker": worker}) as watch, ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda c: send(url + "/v1/chat/completions", c.body).status_code, refused * 4))
    assert statuses == [413] * 8 and watch.growth_mb()["worker"]["peak"] < 5  # never reached the worker
    with MemoryWatch({"worker": worker}) as watch, ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda c: send(url + "/v1/chat/completions", c.body).status_code, allowed * 4))
    assert statuses == [200] * 8
    assert watch.growth_mb()["worker"]["peak"] < 150, watch.growth_mb()  # 8 images of at most 1,000,000 pixels


def test_streaming_chunks_are_valid_openai_chunks(served):
    _, url, cases, _ = served
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json=chat_body(cases[0][0], [cases[0][1]], "dynamic", stream=True)) as response:
        lines = [line for line in response.iter_lines() if line]
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[-1]["usage"]["completion_tokens"] >= 1
