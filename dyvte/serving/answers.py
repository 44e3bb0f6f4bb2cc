"""A request's answer while it is generated, in the model worker.

- `answer_text` is the one rule that decides an answer's text: the decoded tokens, stripped, cut before the earliest
  stop string. `AnswerText` streams only the part of it that no later token can change (`settled_length`), so the
  streamed pieces always add up to the text a non-streaming request gets.
- `RequestSampler` samples each sampled row of a batch with its own `torch.Generator`, seeded by its request: a
  sampled answer depends on its seed and its own logits, never on its batch neighbours.
- `AnswerFeed` hands each decoding step's tokens to the answers and stops each row when its answer is complete.
- `prompt_groups` splits a batch into generate calls by prompt length, shortest first.
"""

import torch
from transformers import LogitsProcessor, StoppingCriteria

#: A generate call pads every prompt to its longest; a prompt more than this many times longer than the group's
#: shortest starts a new group (answered after the shorter ones), so a long prompt never stalls short ones.
MAX_PADDING_RATIO = 2


def earliest_stop(text: str, stops: list[str]) -> int:
    """Where the first stop string in `text` starts (len(text) if none does)."""
    return min((i for i in (text.find(stop) for stop in stops) if i >= 0), default=len(text))


def answer_text(decoded: str, stops: list[str]) -> str:
    """An answer's text: the decoded tokens (special tokens skipped), stripped, cut before the earliest stop."""
    text = decoded.strip()
    return text[:earliest_stop(text, stops)]


def settled_length(decoded: str, stops: list[str]) -> tuple[int, bool]:
    """How much of the final answer is known from the tokens decoded so far (`decoded`, its leading whitespace
    stripped: the answer's first characters), and whether the answer is complete (a stop string cut it).

    Not known yet: trailing whitespace (stripped if the answer ends there), a trailing partial character (U+FFFD until
    its last byte comes), and anything from where a stop string could still match, on characters still to come or on
    that trailing whitespace. A complete stop string ends the answer unless one starting earlier could still match."""
    text = decoded.lstrip().rstrip("\ufffd")
    certain = text.rstrip()
    cut = earliest_stop(certain, stops)
    longest = max(map(len, stops), default=0)
    pending = min((i for i in range(max(0, len(certain) - longest + 1), len(text)) for stop in stops
                   if i + len(stop) > len(certain) and stop.startswith(text[i:i + len(stop)])), default=len(certain))
    return min(cut, pending, len(certain)), cut < len(certain) and cut <= pending


class AnswerText:
    """One request's answer as it grows: its tokens up to the first end-of-sequence token (or `max_new_tokens`, or a
    complete stop string), its text by `answer_text`, the part of it streamed so far, and why it finished."""

    def __init__(self, decode, eos_ids: set[int], max_new_tokens: int, stops: list[str], sent: str = ""):
        self.decode, self.eos_ids, self.max_new_tokens, self.stops = decode, eos_ids, max_new_tokens, stops
        self.tokens: list[int] = []
        self.sent = sent  # a retried request keeps what its first try streamed
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def add(self, token: int) -> None:
        if self.done:
            return
        self.tokens.append(token)
        if token in self.eos_ids or (self.stops and settled_length(self.decode(self.tokens), self.stops)[1]):
            self.finish_reason = "stop"
        elif len(self.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"

    def text(self) -> str:
        return answer_text(self.decode(self.tokens), self.stops)

    def delta(self) -> str:
        """The settled text not streamed yet ("" while nothing new is settled)."""
        decoded = self.decode(self.tokens)
        return self._advance(decoded.lstrip()[:settled_length(decoded, self.stops)[0]])

    def rest(self) -> str:
        """The whole answer's text not streamed yet (the answer is complete)."""
        return self._advance(self.text())

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # cannot happen for prefix-stable decoding; never send a contradiction
            return ""
        new = text[len(self.sent):]
        self.sent = text if new else self.sent
        return new


class RequestSampler(LogitsProcessor):
    """Samples the rows of a batch whose request asked for it, each from its own generator.

    `settings[i]` is None for a greedy row (its scores pass through) or `(temperature, top_p, seed)`: the row's next
    token is drawn from softmax(scores / temperature) restricted to the smallest set of tokens whose probability
    reaches top_p, with a `torch.Generator` seeded by `seed`, and its scores become 0 there and -inf elsewhere, so
    the greedy decoding step that follows picks it. Run with `do_sample=False`."""

    def __init__(self, settings: list[tuple[float, float, int] | None]):
        self.settings = settings
        self.generators: dict[int, torch.Generator] = {}

    def _generator(self, row: int, seed: int, device: torch.device) -> torch.Generator:
        if row not in self.generators:
            self.generators[row] = torch.Generator(device=device).manual_seed(seed % 2**64)
        return self.generators[row]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        for row, setting in enumerate(self.settings):
            if setting is None:
                continue
            temperature, top_p, seed = setting
            probabilities = torch.softmax(scores[row].float() / temperature, dim=-1)
            token = nucleus_sample(probabilities, top_p, self._generator(row, seed, scores.device))
            scores[row] = float("-inf")
            scores[row, token] = 0.0
        return scores


def nucleus_sample(probabilities: torch.Tensor, top_p: float, generator: torch.Generator) -> int:
    """A token drawn from `probabilities` (vocab,) restricted to the most probable tokens whose total reaches
    `top_p` (at least one)."""
    sorted_probabilities, order = probabilities.sort(descending=True)
    before = sorted_probabilities.cumsum(0) - sorted_probabilities  # the mass of the more probable tokens
    kept = sorted_probabilities.masked_fill(before >= top_p, 0.0)
    kept[0] = sorted_probabilities[0]
    return int(order[torch.multinomial(kept, 1, generator=generator)])


class AnswerFeed(StoppingCriteria):
    """Hands each decoding step's new tokens (one per row) to the answers, then to `on_step` (the streaming side);
    a row stops when its answer is complete."""

    def __init__(self, answers: list[AnswerText], on_step):
        self.answers, self.on_step = answers, on_step

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for answer, token in zip(self.answers, input_ids[:, -1].tolist()):
            answer.add(token)
        self.on_step()
        return torch.tensor([answer.done for answer in self.answers], device=input_ids.device)


def prompt_groups(keys: list, lengths: list[int]) -> list[list[int]]:
    """The rows of a batch in generate calls: rows with the same key (the policy), by prompt length, a new group
    where a prompt is more than `MAX_PADDING_RATIO` times the group's shortest; groups ordered shortest first."""
    groups: list[list[int]] = []
    for key in dict.fromkeys(keys):
        rows = sorted((i for i, k in enumerate(keys) if k == key), key=lambda i: lengths[i])
        for row in rows:
            if groups and keys[groups[-1][0]] == key and lengths[row] <= MAX_PADDING_RATIO * lengths[groups[-1][0]]:
                groups[-1].append(row)
            else:
                groups.append([row])
    return sorted(groups, key=lambda group: lengths[group[0]])
