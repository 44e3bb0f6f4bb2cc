"""Generate with visual-token exit, or compare exit policies on a dataset split.

    python infer.py image=dyvte/testbed/data/images/test_00000.png question="what digit is on the purple diamond ?"
    python infer.py task=eval policies=[none,vtw,fastv,dynamic,fastv+dynamic,gsearch,psigmoid,gsearch+dynamic]
    python infer.py task=eval policies=[none,dynamic,random,downsample,tome,visionzip,pdrop,dart] budget=[64,128,192]
    python infer.py task=eval policies=[none,dynamic] budget=[64,128,192] budget_by=flops sweeps=false
"""

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from transformers import StoppingCriteriaList

from dyvte import VisualExit, cli, flops
from dyvte.configs import check_infer_config, read_model_settings
from dyvte.data import Sample, load_image
from dyvte.evaluation import TokenClock, evaluate, write_report
from dyvte.evaluation.policy_config import policy_settings
from dyvte.policies.registry import build_policy, needs_heads
from dyvte.preflight import check_infer_inputs
from dyvte.prompts import chat_prompt

cli.register_resolvers()
log = logging.getLogger("infer")


def one_sample(cfg, engine: VisualExit, processor) -> dict:
    """`task=sample`: one question (checked present by `check_infer_config`) on one image or none."""
    image = load_image(Sample(id=str(cfg.image), image=cfg.image, question="", answer="")) if cfg.image else None
    prompt = chat_prompt(processor, cfg.question, images=int(image is not None))
    if image is None:
        log.warning("no image given: running the question text-only (nothing to withdraw)")
        inputs = processor(text=[prompt], return_tensors="pt")
    else:
        inputs = processor(images=[image], text=[prompt], return_tensors="pt")
    policy = build_policy(cfg.policy, policy_settings(cfg, engine, processor, [cfg.policy]))
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    engine.prefill(**inputs, policy=policy)  # warm-up, untimed
    clock = TokenClock()
    start = time.perf_counter()
    out = engine.generate(**inputs, policy=policy, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                          return_dict_in_generate=True, stopping_criteria=StoppingCriteriaList([clock]))
    new = out.sequences[0, ids.shape[1]:]
    (spent,), (full,) = flops.generated_prefill_flops(engine.model.config, out, mask)
    vision = sum(flops.vision_flops(engine.model.config, **inputs))
    result = {
        "answer": processor.decode(new, skip_special_tokens=True).strip(),
        "exit_layer": int(out.exit_layer[0]),
        "num_layers": engine.num_layers,
        "lm_prefill_tflops": spent / 1e12,
        "full_model_tflops": full / 1e12,
        "vision_tflops": vision / 1e12,
        "total_tflops": (spent + vision) / 1e12,
        "flops_saved": 1 - spent / full,
        "prefill_ms": 1000 * (clock.times[0] - start),  # to the first new token
        "decode_ms_per_token": (1000 * (clock.times[-1] - clock.times[0]) / (len(clock.times) - 1)
                                if len(clock.times) > 1 else None),
    }
    print(json.dumps(result, indent=2))
    return result


@hydra.main(config_path="conf", config_name="infer", version_base="1.3")
def main(cfg: DictConfig) -> None:
    check_infer_config(cfg)
    cli.quiet_libraries(cfg.verbose)
    splits = check_infer_inputs(cfg)  # paths, data, policy names and layers: before any model time
    torch.manual_seed(cfg.seed)
    model_settings = read_model_settings(cfg)
    model, processor = model_settings.load()
    engine = VisualExit(model, withdraw=model_settings.withdraw)
    if cfg.task == "sample":
        one_sample(cfg, engine, processor)
        return
    names = list(cfg.policies)
    samples = splits[cfg.split]
    samples = samples[: cfg.limit] if cfg.limit else samples
    sweep_dynamic = cfg.sweeps and Path(cfg.heads).exists()  # the threshold sweep needs heads
    budget_names = [method for method in cfg.budget_methods if needs_heads(method)] if cfg.budget else []
    settings = policy_settings(cfg, engine, processor, names + budget_names + (["dynamic"] if sweep_dynamic else []))
    results = evaluate(engine, processor, samples, names, settings, cfg.batch_size, cfg.max_new_tokens, cfg.sweeps,
                       list(cfg.sweep_thresholds), cfg.data.on_bad_sample, list(cfg.budget or []), cfg.budget_unit,
                       list(cfg.budget_methods), cfg.budget_by, cfg.budget_calibration)
    threshold = settings.heads.threshold if settings.threshold is None and settings.heads else settings.threshold
    results["settings"] = {"vtw_layer": settings.vtw_layer, "threshold": threshold, "split": cfg.split,
                           "model": cfg.model.name_or_path,
                           "gsearch_rates": settings.gsearch.rates if settings.gsearch else None,
                           "psigmoid_rates": settings.psigmoid.rates if settings.psigmoid else None,
                           "policy_settings": {name: asdict(options) for name, options in settings.options.items()}}
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    print(write_report(results, output_dir))
    log.info("results, table and plots in %s", output_dir)


def cli_main() -> None:
    """`dyvte-infer` / `python -m dyvte.infer` / the repository's `infer.py`: `-v` is `verbose=true`."""
    cli.verbose_flag()
    main()


if __name__ == "__main__":
    cli_main()
