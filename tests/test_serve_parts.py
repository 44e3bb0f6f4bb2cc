"""The server's parts in process, each against an independent reference: the stop-string rule (streamed pieces
add up to the whole answer, which is the full generation cut before its first stop) with broken variants it must
catch, per-request sampling against the
distribution it should draw from (with broken variants it must reject) and its independence from batch neighbours,
the grouping of a batch by prompt length, and the model worker's second line of defence: an exception fails only
the request that caused it, and every other request gets exactly the offline answer."""

import random
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures.serving import HEADS, chat_body, first_test_samples, offline
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from transformers import StoppingCriteria

from dyvte import DynamicExit, ExitHeads, cli, load_mllm
from dyvte.configs import read_model_settings
from dyvte.serving import answers
from dyvte.serving.answers import AnswerText, RequestSampler, prompt_groups
from dyvte.serving.requests import ExitChatRequest, PromptLength, RequestLimits, parse_request
from dyvte.serving.worker import ExitChatAPI
from dyvte.testbed import DATA_DIR

ROOT = DATA_DIR.parents[2]


# --- stop strings and streaming ----------------------------------------------------------------------------------

PIECES = ["red", " red", " b", "lue", " ", "  ", "x", "ab", "b", ".", "\n", "é"]


def decode(tokens: list[int]) -> str:
    """A toy tokenizer: token i < len(PIECES) is PIECES[i]; tokens 100 and 101 are the two bytes of "€", shown as
    U+FFFD while only the first has come (as byte-level tokenizers decode)."""
    text = ""
    for i, token in enumerate(tokens):
        if token == 100:
            text += "€" if i + 1 < len(tokens) and tokens[i + 1] == 101 else "\ufffd"
        elif token != 101:
            text += PIECES[token]
    return text


def reference_answer(text: str, stops: list[str]) -> str:
    """The whole answer, as the offline generation gives it: stripped, cut before the first stop string."""
    text = text.strip()
    starts = [text.find(stop) for stop in stops if stop in text]
    return text[:min(starts)] if starts else text


def stream_mismatches(cases: int, seed: int = 0) -> list:
    """Random answers and stop strings where the streamed pieces, or the text answered once generation stopped at a
    stop string, differ from the reference answer of the whole generation."""
    rng, bad = random.Random(seed), []
    for _ in range(cases):
        tokens = []
        while len(tokens) < 12:
            tokens += [100, 101] if rng.random() < 0.1 else [rng.randrange(len(PIECES))]
        full = decode(tokens)
        stops = [full[i:i + rng.randint(1, 4)] for i in sorted(rng.sample(range(len(full)), 2))]
        stops = [s for s in stops if s] + (["zz"] if rng.random() < 0.3 else [])
        answer = AnswerText(decode, eos_ids=set(), max_new_tokens=len(tokens), stops=stops)
        pieces = []
        for token in tokens:
            answer.add(token)
            if answer.done:
                break
            pieces.append(answer.delta())
        pieces.append(answer.rest())
        expected = reference_answer(full, stops)
        if "".join(pieces) != expected or answer.text() != expected:
            bad.append((tokens, stops, pieces, expected))
    return bad


def test_streamed_pieces_add_up_to_the_whole_answer_for_every_stop():
    assert stream_mismatches(3000) == []


@pytest.mark.parametrize("broken", ["streams a stop's first characters", "streams partial characters",
                                    "streams trailing whitespace"])
def test_the_stream_check_catches_broken_settling_rules(broken, monkeypatch):
    right = answers.settled_length

    def wrong(decoded: str, stops: list[str]):
        if broken == "streams a stop's first characters":
            text = decoded.strip()
            cut = answers.earliest_stop(text, stops)
            return cut, cut < len(text)
        if broken == "streams partial characters":
            return right(decoded.replace("\ufffd", "?"), stops)
        return min(right(decoded + "\x00", stops)[0], len(decoded.lstrip())), right(decoded, stops)[1]

    monkeypatch.setattr(answers, "settled_length", wrong)
    assert stream_mismatches(3000)


def test_answers_stop_at_a_stop_string_spanning_tokens():
    tokens = [0, 2, 3, 1]  # "red" " b" "lue" " red"
    answer = AnswerText(decode, eos_ids=set(), max_new_tokens=10, stops=["d bl"])
    streamed = []
    for token in tokens:
        answer.add(token)
        streamed.append(answer.delta())
        if answer.done:
            break
    assert (streamed, answer.rest(), answer.finish_reason, len(answer.tokens)) == (["re", "", ""], "", "stop", 3)
    length = AnswerText(decode, eos_ids={9}, max_new_tokens=2, stops=[])
    for token in tokens:
        length.add(token)
    assert (length.text(), length.finish_reason) == ("red b", "length")


# --- per-request sampling -------------------------------------------------------------------------------------------

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.3, -0.5, -2.0])


def reference_distribution(temperature: float, top_p: float) -> np.ndarray:
    """softmax(logits / T) on the fewest most probable tokens whose mass reaches top_p, renormalized (numpy)."""
    z = LOGITS.numpy().astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, dtype=bool)
    mass = 0.0
    for index in order:
        keep[index] = True
        mass += p[index]
        if mass >= top_p:
            break
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def draws(temperature: float, top_p: float, count: int) -> np.ndarray:
    """How often each token is drawn by `RequestSampler` over `count` requests (seeds 0..count-1)."""
    counts = np.zeros(len(LOGITS))
    for seed in range(count):
        scores = RequestSampler([(temperature, top_p, seed)])(None, LOGITS[None].clone())
        counts[int(scores.argmax())] += 1
    return counts


def fits(counts: np.ndarray, expected: np.ndarray) -> bool:
    """Pearson's chi-square test at the 0.1% level (tokens of probability 0 must never be drawn)."""
    if (counts[expected == 0] > 0).any():
        return False
    n, support = counts.sum(), expected > 0
    statistic = (((counts - n * expected) ** 2)[support] / (n * expected[support])).sum()
    critical = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52}[int(support.sum()) - 1]
    return statistic < critical


def test_sampling_draws_from_the_tempered_nucleus_and_the_test_has_power():
    counts = draws(0.7, 0.8, 4000)
    assert fits(counts, reference_distribution(0.7, 0.8))
    assert not fits(counts, reference_distribution(1.0, 0.8))  # a sampler ignoring the temperature
    assert not fits(counts, reference_distribution(0.7, 1.0))  # a sampler ignoring top_p
    assert not fits(draws(1.0, 0.8, 4000), reference_distribution(0.7, 0.8))
    assert not fits(draws(0.7, 1.0, 4000), reference_distribution(0.7, 0.8))


def test_a_sampled_row_depends_on_its_seed_not_on_its_neighbours():
    torch.manual_seed(0)
    steps = [torch.randn(4, 50) for _ in range(20)]

    def tokens(settings, rows):
        sampler = RequestSampler(settings)
        return [sampler(None, logits[rows]).argmax(dim=-1).tolist() for logits in steps]

    alone = [t[0] for t in tokens([(1.0, 0.9, 7)], [0])]
    batched = tokens([None, (1.0, 0.9, 7), (1.0, 1.0, 8), None], [3, 0, 1, 2])
    assert [t[1] for t in batched] == alone
    assert [t[0] for t in batched] == [int(logits[3].argmax()) for logits in steps]  # greedy rows stay greedy
    assert alone != [t[0] for t in tokens([(1.0, 0.9, 8)], [0])]  # another seed, another answer


def test_prompt_groups_keep_long_prompts_from_short_ones():
    keys = ["dynamic", "none", "dynamic", "dynamic", "dynamic", "none"]
    assert prompt_groups(keys, [80, 90, 4280, 100, 160, 85]) == [[0, 3, 4], [5, 1], [2]]
    assert prompt_groups(keys, [80, 90, 4280, 100, 161, 85]) == [[0, 3], [5, 1], [4], [2]]  # over twice 80


# --- the model worker's second line of defence ------------------------------------------------------------------


@pytest.fixture(scope="module")
def worker():
    cli.register_resolvers()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("serve", overrides=[f"heads={HEADS}", "policies=[none,dynamic]", "max_tokens=16"])
    limits = RequestLimits(policies=("dynamic", "none"), default_policy="dynamic", max_new_tokens=8, max_tokens=16,
                           max_prompt_tokens=240, max_images=1, max_image_pixels=4096 ** 2, require_image=True,
                           allow_local_paths=False, allow_exit_layer=False, num_layers=12)
    api = ExitChatAPI(OmegaConf.to_container(cfg, resolve=True), read_model_settings(cfg), limits, None, 8, 0.1)
    ctrl_c = signal.getsignal(signal.SIGINT)
    api.setup("cpu")  # as in the model worker, which leaves Ctrl-C to the main process
    signal.signal(signal.SIGINT, ctrl_c)
    model, processor = load_mllm("testbed")
    cases = first_test_samples(6)
    expected = [offline(model, processor, DynamicExit(ExitHeads.from_pretrained(HEADS)), q, [image], 16)[0]
                for q, image in cases]
    requests = [parse_request(ExitChatRequest.model_validate(chat_body(q, [image], max_tokens=16, stream=i % 2 == 1)),
                              limits, PromptLength(processor)) for i, (q, image) in enumerate(cases)]
    return api, requests, expected


def answers_of(api, requests) -> list:
    """Each request's (text, finish reason) or its error, from the messages `predict` yields for the batch."""
    texts, ends = [""] * len(requests), [None] * len(requests)
    for step in api.predict(requests):
        for i, message in enumerate(step):
            if message is None or ends[i] is not None:
                continue
            if "error" in message:
                ends[i] = (message["status"], message["kind"])
                continue
            texts[i] += message["text"]
            if "finish_reason" in message:
                ends[i] = message["finish_reason"]
    return [(text, end) if isinstance(end, str) else end for text, end in zip(texts, ends)]


class FailAt(StoppingCriteria):
    """Raises at decoding step `step` (after the answers have seen its tokens), as an out-of-memory error would."""

    raised = 0

    def __init__(self, step: int):
        self.step, self.calls = step, 0

    def __call__(self, input_ids, scores, **kwargs):
        self.calls += 1
        if self.calls == self.step:
            FailAt.raised += 1
            raise RuntimeError("CUDA out of memory (simulated)")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_a_failing_request_fails_alone_and_its_batch_is_answered(worker, monkeypatch):
    api, requests, expected = worker
    poison = requests[2]
    real_generate = api.engine.generate

    def generate(**kwargs):
        if any(torch.equal(row[-len(poison_ids):], poison_ids) for row in kwargs["input_ids"]):
            raise ValueError("this request breaks generate")
        return real_generate(**kwargs)

    poison_ids = api._inputs([poison])["input_ids"][0]
    monkeypatch.setattr(api.engine, "generate", generate)
    results = answers_of(api, requests)
    assert results[2] == (500, "generate")
    assert [r[0] for i, r in enumerate(results) if i != 2] == [e for i, e in enumerate(expected) if i != 2]


def test_a_batch_that_fails_mid_stream_is_retried_alone(worker, monkeypatch):
    api, requests, expected = worker
    real_generate = api.engine.generate

    def generate(**kwargs):
        if kwargs["input_ids"].shape[0] > 1:  # the batch fails at its second decoding step; alone, nothing does
            kwargs["stopping_criteria"].append(FailAt(2))
        return real_generate(**kwargs)

    monkeypatch.setattr(api.engine, "generate", generate)
    streamed_before, real_delta = [], AnswerText.delta

    def delta(answer):
        streamed_before.append(real_delta(answer))
        return streamed_before[-1]

    monkeypatch.setattr(AnswerText, "delta", delta)
    assert [text for text, _ in answers_of(api, requests)] == expected
    assert FailAt.raised == 1 and any(streamed_before)  # it failed after text had been streamed


def test_a_request_the_processor_refuses_in_a_batch_is_refused_alone(worker, monkeypatch):
    api, requests, expected = worker
    marked = requests[0].images[0]
    real = api.processor

    class Refusing(SimpleNamespace):
        def __call__(self, *args, images=None, **kwargs):
            if images is not None and any(image is marked for image in images):
                raise ValueError("this image is refused")
            return real(*args, images=images, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(api, "processor", Refusing())
    results = answers_of(api, requests)
    assert results[0] == (400, "processor")
    assert [text for text, _ in results[1:]] == expected[1:]


# --- prompt lengths without the image processor ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["testbed", "llava-1.5", "qwen2-vl", "qwen2.5-vl", "internvl3", "llava-onevision"])
def test_prompt_length_equals_the_processors_count(name):
    """`PromptLength` (tokenizer + image sizes) against the processor run on the prompt and the images themselves,
    for every family, image sizes that resize differently, zero to two images and a conversation."""
    from fixtures.real_format import fixture

    from dyvte.loading import load_processor
    from dyvte.prompts import chat_prompt

    processor = load_mllm("testbed")[1] if name == "testbed" else load_processor(str(fixture(name)))
    count = PromptLength(processor)
    history = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is it ?"}]},
               {"role": "assistant", "content": [{"type": "text", "text": "a red square"}]}]
    sizes = [(56, 56), (224, 224), (500, 333), (30, 900), (1000, 1400)]
    cases = [([], "describe nothing at all", 0, []), ([], "what colour is it ?", 1, [sizes[1]])]
    cases += [([], "what is in the picture ?", 1, [size]) for size in sizes]
    cases += [(history, "and this one ?", 1, [sizes[0], sizes[2]]), ([], "compare them", 2, [sizes[3], sizes[4]])]
    for history_, question, question_images, image_sizes in cases:
        images = [Image.new("RGB", size, "blue") for size in image_sizes]
        prompt = chat_prompt(processor, question, question_images, history_)
        expected = len(processor(text=[prompt], images=images or None, return_tensors="np")["input_ids"][0])
        assert count(history_, question, question_images, images) == expected, (name, image_sizes)
