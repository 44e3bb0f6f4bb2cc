"""The label pass as a Lightning `predict` run: batches of prompts in, label-cache shards out."""

import logging
import math

import lightning as L
import torch
from datasets import Features
from lightning.pytorch.callbacks import BasePredictionWriter

from .. import flops
from ..data import DEFAULT_MAX_IMAGE_PIXELS, PromptCollator, PromptDataModule, Sample, normalize_answer
from ..engine import VisualExit, generation_eos_ids, greedy_answers
from .dense_labels import LabelConfig, answer_tokens, candidate_exits, dense_labels
from .label_store import GROUP_COLUMNS, LabelStore, row_features

log = logging.getLogger(__name__)


class LabelModule(L.LightningModule):
    """Holds the frozen MLLM; `predict_step` returns one label-cache row per sample."""

    def __init__(self, model, collator: PromptCollator, config: LabelConfig, withdraw: str = "both"):
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.engine = VisualExit(model, withdraw=withdraw)
        self.collator = collator  # the prompts of the batches, for ground-truth answer tokens
        self.tokenizer = collator.processor.tokenizer
        self.eos_token_ids = generation_eos_ids(model, self.tokenizer)
        self.config = config

    def ground_truth_tokens(self, samples: list[Sample]) -> list[list[int]]:
        """The dataset answers as the tokens the model would generate (`answer_tokens`)."""
        prompts = [self.collator.prompt(s) for s in samples]
        # an unknown (empty) answer: just the EOS
        completions = [self.collator.completion(s, s.answer) if s.answer.strip() else p for s, p in zip(samples, prompts)]
        return answer_tokens(self.tokenizer, prompts, completions, self.eos_token_ids[0])

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        samples, skipped = batch["samples"], batch["skipped"]
        if not samples:
            return {"rows": None, "skipped": skipped}
        inputs = {k: v for k, v in batch.items() if k not in ("samples", "skipped")}
        config, tokenizer = self.config, self.tokenizer
        ids = [s.id for s in samples]
        ground_truth = [s.answer for s in samples]
        if config.reference == "model":
            answers = greedy_answers(self.engine, inputs, config.max_new_tokens, self.eos_token_ids)
        else:
            answers = self.ground_truth_tokens(samples)
        candidates = candidate_exits(config, ids, self.engine.num_layers)
        dense = dense_labels(self.engine, inputs, answers, candidates, config.feature_span, tokenizer.pad_token_id,
                             config.feature_groups, match_full_model=config.reference == "model")
        if config.reference == "model" and not dense.reproduces.all():
            log.info(
                "%d of %d samples: the full model, teacher-forced on its own greedy answer, predicts another token "
                "at some position (rounding in a low-precision dtype); their exits are compared with its "
                "teacher-forced predictions", int((~dense.reproduces).sum()), len(ids),
            )
        answer_text = tokenizer.batch_decode(answers, skip_special_tokens=True)
        accurate = self._accuracy(dense, inputs, samples, answer_text, candidates)
        rows = {
            "id": ids,
            "family": [s.family for s in samples],
            "answer": answer_text,
            "ground_truth": ground_truth,
            "n_text": dense.n_text.tolist(),
            "n_visual": dense.n_visual.tolist(),
            "vision_flops": flops.vision_flops(self.engine.model.config, **inputs),
            "labels": dense.labels(config.alpha).tolist(),
            "match": dense.match.tolist(),
            "ce": dense.ce.tolist(),
            "accurate": accurate.tolist(),
            "features": dense.features.numpy(),
            **{GROUP_COLUMNS[group]: values.numpy() for group, values in dense.group_features.items()},
        }
        return {"rows": rows, "skipped": skipped}

    def _accuracy(self, dense, inputs, samples, answer_text, candidates) -> torch.Tensor:
        """Does the answer with exit at `k` equal the ground truth? Exact, also where it differs from `A`.

        Where `A` is right, the exit answer is right iff it reproduces `A`; where `A` is wrong, a second
        teacher-forced pass over the ground truth says whether the exit answer is the ground truth.
        """
        if self.config.reference == "ground_truth":
            return dense.match
        ground_truth = [s.answer for s in samples]
        known = torch.tensor([bool(g.strip()) for g in ground_truth])
        right = torch.tensor([normalize_answer(a) == normalize_answer(g) for a, g in zip(answer_text, ground_truth)])
        accurate = dense.match & (known & right)[:, None]
        if (known & ~right).any():
            truth = dense_labels(
                self.engine, inputs, self.ground_truth_tokens(samples), candidates,
                self.config.feature_span, self.tokenizer.pad_token_id,
            )
            accurate |= truth.match & (known & ~right)[:, None]
        return accurate


class ShardWriter(BasePredictionWriter):
    """Buffers rows and writes a label-cache shard every `shard_size` samples, at the end, and when the run stops
    on an exception (a bad sample under `on_bad_sample=raise`, Ctrl-C): rows already labelled are never lost."""

    def __init__(self, store: LabelStore, features: Features, shard_size: int = 256):
        super().__init__(write_interval="batch")
        self.store, self.shard_size = store, shard_size
        self.features = features
        self.buffer: dict[str, list] = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        self.store.add_skipped(prediction["skipped"])
        if prediction["rows"] is None:
            return
        for key, values in prediction["rows"].items():
            self.buffer.setdefault(key, []).extend(list(values))
        if len(self.buffer["id"]) >= self.shard_size:
            self.flush(trainer.global_rank)

    def on_predict_epoch_end(self, trainer, pl_module):
        self.flush(trainer.global_rank)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        saved = len(self.buffer.get("id", []))
        try:
            self.flush(trainer.global_rank)
        except Exception as error:  # noqa: BLE001 (the run's own exception is the one to raise)
            log.error("could not save the %d buffered labelled samples to %s: %s", saved, self.store.dir, error)
            return
        done = len(self.store.done_ids())
        if isinstance(exception, KeyboardInterrupt):
            log.error("interrupted (Ctrl-C): %d labelled samples are saved in %s; rerun the same command to resume",
                      done, self.store.dir)
        else:
            log.error("the label pass stopped (%s: %s) after saving its %d labelled samples to %s (%d just "
                      "flushed); a rerun resumes from them", type(exception).__name__, exception, done,
                      self.store.dir, saved)

    def flush(self, rank: int) -> None:
        if self.buffer.get("id"):
            self.store.write_shard(self.buffer, self.features, rank)
        self.buffer = {}


def run_labels(
    model, processor, samples: list[Sample], config: LabelConfig, store: LabelStore, *, batch_size: int = 8,
    shard_size: int = 256, on_bad_sample: str = "skip", max_length: int | None = None, trainer_kwargs: dict | None = None,
    withdraw: str = "both", name: str = "labels", max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> LabelStore:
    """Label every sample not yet in `store`; a finished store that verifies is returned untouched. A damaged store
    is repaired first (`LabelStore.repair`), so only the samples of what was damaged are labelled again; `name`
    prefixes the log lines.

    Under DDP (one node or several sharing `store`'s folder) each rank labels its part of the pending samples into
    its own shards. Another process labelling the same store as the same global rank is waited for; the lock is
    per global rank (a node's LOCAL_RANK repeats on every node, and two nodes must not wait for each other)."""
    text = model.config.get_text_config(decoder=True)
    schema = row_features(text.num_hidden_layers, text.hidden_size, text.num_attention_heads, config.feature_groups)
    writer = ShardWriter(store, schema, shard_size)
    trainer = L.Trainer(
        **{"accelerator": "auto", "devices": 1, "logger": False, "enable_checkpointing": False,
           "enable_model_summary": False, **(trainer_kwargs or {})},
        callbacks=[writer],
    )
    rank = trainer.global_rank
    with store.locked(rank):
        for path, problem in store.repair(rank):
            log.warning("%s: %s %s; removed, its samples are labelled again", name, path, problem)
        if store.complete:
            log.info("%s: reusing the complete cache %s", name, store.dir)
            return store
        # read before any rank writes: no rank writes before every rank has joined the process group in predict
        done = store.done_ids() | {s["id"] for s in store.skipped()}
        pending = [s for s in samples if s.id not in done]
        if not pending:
            store.mark_complete(len(samples))
            return store
        batches = math.ceil(len(pending) / batch_size)
        if len(pending) < len(samples):
            log.info("%s: resuming %s: %d of %d samples done, %d of %d batches left", name, store.dir,
                     len(samples) - len(pending), len(samples), batches, math.ceil(len(samples) / batch_size))
        else:
            log.info("%s: labelling %d samples into %s", name, len(samples), store.dir)
        collator = PromptCollator(processor, max_length=max_length, on_bad_sample=on_bad_sample,
                                  max_image_pixels=max_image_pixels)
        trainer.predict(
            LabelModule(model, collator, config, withdraw),
            datamodule=PromptDataModule(pending, collator, batch_size=batch_size),
            return_predictions=False,
        )
        trainer.strategy.barrier("label shards written")  # DDP: every rank's last shard is in place
        if trainer.is_global_zero:
            store.mark_complete(len(samples))
        trainer.strategy.barrier("label store complete")  # DDP: no rank reads the store before rank 0 marks it
        return store
