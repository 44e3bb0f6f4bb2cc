"""`python -m benchmarks.profile_heads`: where one exit-head evaluation spends its time at the LLaVA-7B width
(batch 1, 640 prompt tokens). For evidence only: nothing here is used by the library.

- `DynamicExit.before_layer` = `head_features` (masked mean over the prompt as one bmm, + last token) + head MLP
  + softmax, split into its two parts;
- the head MLP at head_hidden 2048 (DyVTE's) vs 512.
"""

import argparse
import json
import time

import torch

from dyvte.engine import PrefillState, SubBatch, feature_tokens, head_features
from dyvte.heads import ExitHeads, ExitHeadsConfig
from dyvte.policies import DynamicExit


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

    heads = ExitHeads(ExitHeadsConfig(d, 2, 2048)).eval().requires_grad_(False)
    small = ExitHeads(ExitHeadsConfig(d, 2, 512)).eval().requires_grad_(False)
    policy = DynamicExit(heads, threshold=2.0, force=True)
    state = PrefillState(Engine(), torch.zeros(b, n, dtype=torch.long), mask, visual)
    policy.reset(state)
    features = head_features(sub, tokens, n)
    with torch.no_grad():
        out = {
            "shape": {"batch": b, "tokens": n, "hidden": d, "threads": args.threads},
            "before_layer": per_call_ms(lambda: policy.before_layer(1, sub, state), args.repeats),
            "head_features": per_call_ms(lambda: head_features(sub, tokens, n), args.repeats),
            "head_mlp_2048": per_call_ms(lambda: heads.exit_probability(0, features), args.repeats),
            "head_mlp_512": per_call_ms(lambda: small.exit_probability(0, features), args.repeats),
        }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
