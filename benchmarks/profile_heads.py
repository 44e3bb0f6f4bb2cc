"""`python -m benchmarks.profile_heads`: where one exit-head evaluation spends its time at the LLaVA-7B width
(batch 1, 640 prompt tokens), and what two cheaper variants would save. For evidence only: nothing here is used by
the library.

- `DynamicExit.before_layer` = `head_features` (masked mean over the prompt + last token) + head MLP + softmax;
- `head_features` as written (elementwise multiply, then sum: a [b, n, d] temporary) vs the same mean as one
  batched matrix-vector product (`torch.bmm` with the normalised weights), which is numerically the same;
- the head MLP at head_hidden 2048 (DyVTE's) vs 512.
"""

import argparse
import json
import time

import torch

from dyvte.features import feature_tokens, head_features
from dyvte.heads import ExitHeads
from dyvte.policies import DynamicExit, PrefillState
from dyvte.subbatch import SubBatch


def head_features_bmm(sub: SubBatch, tokens: torch.Tensor, prompt_length: int) -> torch.Tensor:
    """`dyvte.features.head_features` with the masked mean as one bmm (no [b, n, d] temporary)."""
    index = sub.index.clamp(min=0, max=prompt_length - 1)
    in_prompt = sub.valid & (sub.index < prompt_length)
    weights = (in_prompt & tokens[sub.rows[:, None], index]).to(sub.hidden.dtype)
    weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)
    mean = torch.bmm(weights[:, None, :], sub.hidden).squeeze(1)
    last_slot = (sub.index == prompt_length - 1).int().argmax(dim=1)
    last = sub.hidden[torch.arange(len(sub), device=index.device), last_slot]
    return torch.cat([mean, last], dim=-1)


def per_call_ms(fn, repeats: int) -> dict:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"median_ms": times[len(times) // 2], "min_ms": times[0], "max_ms": times[-1], "n": repeats}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=640)
    parser.add_argument("--visual", type=int, default=576)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    b, n, d = args.batch, args.tokens, args.hidden
    visual = torch.zeros(b, n, dtype=torch.bool)
    visual[:, 4 : 4 + args.visual] = True
    mask = torch.ones(b, n, dtype=torch.long)
    text = mask.bool() & ~visual & (visual.long().cumsum(dim=1) > 0)
    tokens = feature_tokens(text)
    sub = SubBatch(torch.arange(b), torch.randn(b, n, d), torch.arange(n).expand(b, n), torch.zeros(b, n, 128),
                   torch.zeros(b, n, 128))

    class Adapter:
        def text_mask(self, *args):
            return text

    class Engine:
        adapter = Adapter()

    heads = ExitHeads(d, 2, 2048).eval().requires_grad_(False)
    small = ExitHeads(d, 2, 512).eval().requires_grad_(False)
    policy = DynamicExit(heads, threshold=2.0, force=True)
    state = PrefillState(Engine(), torch.zeros(b, n, dtype=torch.long), mask, visual)
    features = head_features(sub, tokens, n)
    with torch.no_grad():
        out = {
            "shape": {"batch": b, "tokens": n, "hidden": d, "threads": args.threads},
            "before_layer": per_call_ms(lambda: policy.before_layer(1, sub, state), args.repeats),
            "head_features": per_call_ms(lambda: head_features(sub, tokens, n), args.repeats),
            "head_features_bmm": per_call_ms(lambda: head_features_bmm(sub, tokens, n), args.repeats),
            "bmm_max_abs_diff": float((head_features_bmm(sub, tokens, n) - features).abs().max()),
            "head_mlp_2048": per_call_ms(lambda: heads.exit_probability(0, features), args.repeats),
            "head_mlp_512": per_call_ms(lambda: small.exit_probability(0, features), args.repeats),
        }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
