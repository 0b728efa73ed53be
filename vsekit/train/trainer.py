"""The one training loop every method uses: data, model, loss and schedule all come from the config.

The parts, after torchvision's reference scripts and timm: :func:`vsekit.train.run.build_run` builds what a
run needs; :meth:`Trainer.train_one_epoch` and :meth:`Trainer.train_step` train;
:func:`vsekit.train.validate.validate` validates; :class:`~vsekit.train.checkpointing.CheckpointPolicy`
decides which checkpoints to write; :class:`~vsekit.train.logger.MetricsLogger` writes ``metrics.jsonl``.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vsekit.checkpoint import CheckpointError, load_checkpoint
from vsekit.config import RunConfig, dump_config, validate_config
from vsekit.config.schema import OptimConfig
from vsekit.data.batch import Batch, text_to
from vsekit.errors import ConfigError, TrainingCollapsed, TrainingDiverged
from vsekit.eval.chance import chance_rsum
from vsekit.losses.terms import AuxiliaryUpdate, detached
from vsekit.train import signals
from vsekit.train.checkpointing import LAST, RUN_FILES, CheckpointPolicy, check_new_run, check_resume_config
from vsekit.train.logger import MetricsLogger
from vsekit.train.monitor import (
    ADVICE,
    CollapseDetector,
    EpochDiagnostics,
    batch_diagnostics,
    collapse_symptom,
    collapse_value,
)
from vsekit.train.optim import build_optimizer, build_scheduler
from vsekit.train.run import build_run
from vsekit.train.state import rng_state, seed_everything, set_rng_state
from vsekit.train.validate import validate
from vsekit.utils import distributed
from vsekit.utils.device import resolve_device
from vsekit.utils.freeze import Freezer
from vsekit.utils.io import atomic_write_text
from vsekit.utils.progress import progress

log = logging.getLogger("vsekit.train")

_ENCODERS = ("image_encoder", "text_encoder")


class Trainer:
    """Builds a run from a resolved config and trains it with :meth:`fit`. ``resume=True`` continues
    ``output_dir/last.pt`` so that the result equals an uninterrupted run (under a config that changes only
    what :data:`~vsekit.train.checkpointing.RESUMABLE_KEYS` allows). A new run in a folder that holds an
    earlier run's checkpoints replaces them when ``overwrite`` (the library's default; the command line
    refuses unless ``--overwrite``), else it is refused. SIGTERM or SIGINT during :meth:`fit` stop the run
    after the current step with its state saved (:mod:`vsekit.train.signals`)."""

    def __init__(self, cfg: RunConfig | dict[str, Any], resume: bool = False, *, overwrite: bool = True) -> None:
        # validated afresh: a RunConfig edited in place (cfg.loss = {...}) is checked like a recipe
        cfg = validate_config(cfg.to_dict() if isinstance(cfg, RunConfig) else cfg)
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        # one process per device under torchrun: rank 0 logs, validates into the log and writes checkpoints
        self.world = distributed.init_from_env(str(cfg.device))
        distributed.run_on_main(lambda: self._prepare_folder(resume, overwrite))  # rank 0; an error stops all
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        tcfg = cfg.train
        if tcfg.batch_size % self.world.size:
            raise ConfigError(f"train.batch_size ({tcfg.batch_size}) is the global batch: it must be a multiple of "
                              f"the number of processes ({self.world.size})")
        seed_everything(cfg.seed)
        self.checkpoints = CheckpointPolicy(self.out, self.state_dict, tcfg.checkpoint_every_steps,
                                            metric=cfg.eval.select_metric, writes=self.world.is_main)

        resume_state = self.checkpoints.resume_state() if resume else None
        if resume_state is not None:  # before the model is built: a changed embed_size would not fit it
            check_resume_config(resume_state["config"], cfg.to_dict(), self.out / LAST, schema=type(cfg))
        init_state = None
        if resume_state is None and tcfg.init_from:
            init_state = load_checkpoint(tcfg.init_from)  # e.g. VSE++ FT stage 2
        run = build_run(cfg, weights_from=resume_state or init_state)
        self.run = run
        self.train_corpus, self.val_corpus, self.vocab = run.train_corpus, run.val_corpus, run.vocab
        self.feature_shape, self.model, self.loss_fn = run.feature_shape, run.model.to(self.device), run.loss_fn
        self.loss_fn.to(self.device)
        self.plan, self.objective = run.plan, run.objective.to(self.device)
        self.dataset, self.sampler = run.dataset, run.sampler
        if init_state is not None:
            self.model.load_state_dict(init_state["model"])
            if len(self.objective.terms) and "objective" in init_state:
                self.objective.terms.load_state_dict(init_state["objective"])
            log.info("initialised the model from %s", init_state["path"])

        self.batch_size = tcfg.batch_size  # global: each of the world's processes takes batch_size / world
        self.local_batch_size = tcfg.batch_size // self.world.size
        if self.world.distributed:
            self.sampler.shard(self.world.rank, self.world.size, self.local_batch_size)
            self.objective.check_distributed()
            if self.model.learned_similarity:
                raise ConfigError("distributed training gathers embeddings across processes; a learned similarity "
                                  "(model.similarity with parameters) needs its encoders' contexts gathered, which "
                                  "vsekit does not do yet: train it in one process")
        # one parameter set (named as optim.lr_mult and train.freeze name them) for the optimizer, gradient
        # clipping and freezing
        self.trainable = _ModelAndLoss(self.model, self.loss_fn, self.objective.terms)
        self.freezer = Freezer()
        self.stage_index = -1
        first = self.plan.index_at(0)
        if resume_state is not None:
            first = int(resume_state.get("stage", self.plan.index_at(int(resume_state["epoch"]))))
        self._apply_stage(first)  # builds the optimizer and the LR schedule
        self.amp = tcfg.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.autocast = _autocast(self.device, self.amp, tcfg.cpu_bf16)

        self.epoch, self.batches_done, self.step = 0, 0, 0
        self.epoch_loss_sum = 0.0
        self.last_parts: dict[str, torch.Tensor] = {}
        self.history: list[dict] = []
        # health monitoring: per-batch diagnostics, collapse detection and recovery, wall-clock budget
        self.collapse_opts = tcfg.collapse
        self.detector = CollapseDetector(tcfg.collapse.patience, tcfg.collapse.loss_tol, tcfg.collapse.max_mean_cos)
        self.diagnostics = EpochDiagnostics()
        self.last_diag: dict[str, float] = {}
        self.last_collapse_value: float | None = None  # None: not computed for this step
        self.nonfinite_streak, self.nonfinite_total = 0, 0  # steps skipped for a NaN/inf loss or gradient
        self.skipped_images: set[str] = set()  # unreadable images met in training (data.skip_missing_images)
        self.max_seconds = tcfg.max_minutes * 60 if tcfg.max_minutes is not None else None
        self.elapsed_before = 0.0  # seconds of training in earlier runs of this output folder (resume)
        self._stop: signals.StopSignals | None = None  # SIGTERM/SIGINT, while fit() runs
        self.stopped_by_signal: int | None = None
        self._t_start = time.perf_counter()
        if resume_state is not None:
            self._restore(resume_state)
        if self.world.is_main:
            atomic_write_text(self.out / "config.yaml", dump_config(cfg.to_dict()))
        self.logger = MetricsLogger(self.out, resume_step=self.step if resume_state is not None else None,
                                    resume_epoch=self.epoch if resume_state is not None else None,
                                    enabled=self.world.is_main)

    def _prepare_folder(self, resume: bool, overwrite: bool) -> None:
        """Rank 0, before anything is built: the output folder exists and can be written (a probe file, so that
        a read-only folder is said now, not after the first epoch), and a new run does not silently replace an
        earlier one's checkpoints (:func:`~vsekit.train.checkpointing.check_new_run`)."""
        from vsekit.utils.io import check_writable_dir

        check_writable_dir(self.out, "output_dir")
        if not resume:
            init = Path(self.cfg.train.init_from) if self.cfg.train.init_from else None
            if overwrite and init and init.name in RUN_FILES and init.resolve().parent == self.out.resolve():
                raise ConfigError(f"train.init_from {init} lies in output_dir {self.out}, whose checkpoints a new "
                                  "run replaces: copy it elsewhere first, or choose another output_dir")
            check_new_run(self.out, overwrite=overwrite)

    # -- state ---------------------------------------------------------------------------------------
    @property
    def best_rsum(self) -> float:
        return self.checkpoints.best

    def state_dict(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "loss": self.loss_fn.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "step": self.step,
            "best_rsum": self.best_rsum,
            "epoch_loss_sum": self.epoch_loss_sum,
            "history": self.history,
            "vocab": self.vocab.to_dict(),
            "config": self.cfg.to_dict(),
            "feature_shape": list(self.feature_shape) if self.feature_shape else None,
            "text_feature_dim": self.run.text_feature_dim,
            "monitor": {"detector": self.detector.state_dict(), "diagnostics": self.diagnostics.state_dict(),
                        "sum_until_epoch": int(self.loss_fn.sum_until_epoch),
                        "nonfinite": [self.nonfinite_streak, self.nonfinite_total],
                        "skipped_images": sorted(str(m) for m in self.skipped_images)},
            "elapsed_s": self.elapsed_s,
        }
        # only runs that use them carry these, so the checkpoints of other recipes stay as they were
        if len(self.objective.terms):
            state["objective"] = self.objective.terms.state_dict()
        if self.aux:
            state["aux_optimizers"] = {name: {"optimizer": a.optimizer.state_dict(),
                                              "scheduler": a.scheduler.state_dict()} for name, a in self.aux.items()}
        if self.plan.configured:
            state["stage"] = self.stage_index
        return state

    def _restore(self, s: dict[str, Any]) -> None:
        self.model.load_state_dict(s["model"])
        self.loss_fn.load_state_dict(s["loss"])
        if len(self.objective.terms):
            self.objective.terms.load_state_dict(s["objective"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.scheduler.load_state_dict(s["scheduler"])
        for name, a in self.aux.items():
            saved = (s.get("aux_optimizers") or {}).get(name)
            if saved is None:
                raise CheckpointError(f"{self.out / LAST}: no optimizer state for the objective's {name!r} part")
            a.optimizer.load_state_dict(saved["optimizer"])
            a.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(s["scaler"])
        self.epoch, self.batches_done, self.step = s["epoch"], s["batches_done"], s["step"]
        self.checkpoints.best, self.history = s["best_rsum"], list(s["history"])
        self.epoch_loss_sum = s["epoch_loss_sum"]
        monitor = s.get("monitor") or {}
        self.detector.load_state_dict(monitor.get("detector") or {})
        self.diagnostics.load_state_dict(monitor.get("diagnostics") or {})
        if monitor.get("sum_until_epoch"):
            self.loss_fn.fall_back_to_sum(int(monitor["sum_until_epoch"]))
        self.nonfinite_streak, self.nonfinite_total = (int(v) for v in monitor.get("nonfinite", (0, 0)))
        self.skipped_images = set(monitor.get("skipped_images", ()))
        self.elapsed_before = float(s.get("elapsed_s", 0.0))
        set_rng_state(s["rng"])
        log.info("resumed %s at epoch %d, batch %d (step %d)", self.out, self.epoch, self.batches_done, self.step)

    @property
    def elapsed_s(self) -> float:
        """Seconds of training in this output folder so far, earlier (resumed) runs included."""
        return self.elapsed_before + (time.perf_counter() - self._t_start)

    def out_of_time(self) -> bool:
        """Whether ``train.max_minutes`` is spent (rank 0's clock decides for every process)."""
        if self.max_seconds is None:
            return False
        return bool(distributed.broadcast_object(self.elapsed_s >= self.max_seconds))

    def save(self, name: str) -> Path:
        return self.checkpoints.save(name)

    def _log(self, record: dict[str, Any]) -> None:
        self.logger.log(record, self.step)

    # -- stages --------------------------------------------------------------------------------------
    def _apply_stage(self, k: int) -> None:
        """Switch to stage ``k``: encoder finetune flags, frozen prefixes, objective weights, a new optimizer
        and LR schedule (the stage's ``optim`` section; schedule epochs count from the stage's start)."""
        scfg = self.plan.config(k)
        self.freezer.release()
        for enc_name in _ENCODERS:
            spec = getattr(scfg.model, enc_name)
            if "finetune" in spec:
                getattr(self.model, enc_name).set_finetune(bool(spec["finetune"]))
        self.freezer.freeze(scfg.train.freeze, self.trainable.named_parameters(), self.trainable.named_parts())
        self.objective.set_weights(scfg.objective)
        self.optim_cfg = scfg.optim
        # parts of the objective's terms with optimizers of their own (a discriminator), out of the main one
        self.aux = {}
        for term, upd in self.objective.auxiliary_updates():
            section = scfg.objective.terms.get(term, {}).get("optim") or {}
            # the stage's lr_mult names parameters of the model (image_encoder.backbone, objective.gan...), not of
            # this part: only the term's own optim section may give the part multipliers
            cfg = OptimConfig.model_validate({**scfg.optim.model_dump(), "lr_mult": {}, **section})
            opt = build_optimizer(upd.module, cfg)
            self.aux[upd.name] = _Auxiliary(upd, term, cfg, opt, build_scheduler(opt, cfg))
        owned = {id(p) for a in self.aux.values() for p in a.update.module.parameters()}
        self.optimizer = build_optimizer(self.trainable, self.optim_cfg, exclude=owned)
        self.scheduler = build_scheduler(self.optimizer, self.optim_cfg)
        self.main_params = [p for p in self.trainable.parameters() if id(p) not in owned]
        self.stage_index = k
        self._train_mode()
        if self.plan.configured:
            log.info("stage %d/%d (%s) from epoch %d: objective weights %s, frozen %s", k + 1, len(self.plan),
                     self.plan.name(k), self.plan.stages[k].start + 1, self.objective.weights,
                     self.freezer.prefixes or "-")

    def _train_mode(self) -> None:
        """Training mode, except for what is frozen (its batch norm keeps its statistics)."""
        self.model.train()
        self.objective.train()
        self.freezer.hold_eval()

    def _base_lr(self) -> float:
        groups = self.optimizer.param_groups
        return next((g["lr"] for g in groups if g.get("lr_mult") == 1.0), groups[0]["lr"])

    # -- one step ------------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        self.dataset.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, start=self.batches_done * self.batch_size)
        g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + self.epoch)
        return DataLoader(self.dataset, batch_size=self.local_batch_size, sampler=self.sampler,
                          num_workers=self.cfg.data.num_workers, collate_fn=self.dataset.collate,
                          generator=g, pin_memory=self.device.type == "cuda",
                          worker_init_fn=signals.worker_init if self.cfg.data.num_workers else None)

    def train_step(self, batch: Batch) -> float | None:
        dev = self.device
        batch = batch.to(dev)
        with self.autocast():
            batch = self.objective.prepare(self.model, batch, self._train_mode)  # e.g. mined negatives
            neg = batch.negatives
            out = self.model.embed(batch.images, batch.text, text_to(neg.text, dev) if neg else None)
        aux_parts = self._auxiliary_steps(out, batch)
        if aux_parts is None:
            return self._nonfinite(batch, "loss of an auxiliary part", float("nan"))
        step_out, step_batch = out, batch
        if self.world.distributed:  # the in-batch terms see the global batch, as one process would
            step_out, step_batch = self._gather(out), batch.gather()
        loss, self.last_parts = self.objective(step_out, step_batch, (out, batch))
        self.last_parts.update(aux_parts)
        if not torch.isfinite(loss.detach()):
            self.optimizer.zero_grad(set_to_none=True)
            if aux_parts:
                self.scaler.update()  # the auxiliary steps of this iteration were taken
            return self._nonfinite(batch, "loss", float(loss.detach()))
        self.last_diag = batch_diagnostics(step_out.sim, step_out.image_emb, step_out.caption_emb, step_batch.image_ids)
        self.diagnostics.add({**self.last_diag, **{f"term_{k}": float(v) for k, v in self.last_parts.items()
                                                   if len(self.last_parts) > 1}})
        self.last_collapse_value = None
        if "loss" in self.last_parts and self.collapse_opts.action != "off":
            self.last_collapse_value = collapse_value(self.loss_fn, step_out.sim, step_batch.image_ids,
                                                      step_batch.caption_vectors)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        distributed.average_gradients(self.main_params)
        clip = self.optim_cfg.grad_clip
        if clip or not self.amp:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.main_params, float(clip or math.inf))
            if not self.amp and not torch.isfinite(norm):  # (under AMP the scaler skips such steps itself)
                self.optimizer.zero_grad(set_to_none=True)
                return self._nonfinite(batch, "gradient norm", float(norm))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.nonfinite_streak = 0
        return float(loss.detach())

    def _auxiliary_steps(self, out, batch: Batch) -> dict[str, torch.Tensor] | None:
        """One update of each active term's own parts (a discriminator) on the detached forward pass, before
        the main loss is computed; None when a loss is not finite (the step is skipped)."""
        parts: dict[str, torch.Tensor] = {}
        active = [a for a in self.aux.values() if self.objective.active(a.term)]
        if not active:
            return parts
        frozen = detached(out)
        for a in active:
            with self.autocast():
                value = a.update.loss(frozen, batch)
            extra: dict[str, torch.Tensor] = {}
            if isinstance(value, tuple):  # (loss, {extra numbers to log})
                value, extra = value
            if not torch.isfinite(value.detach()):
                a.optimizer.zero_grad(set_to_none=True)
                return None
            a.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(value).backward()
            distributed.average_gradients(a.update.module.parameters())
            if a.cfg.grad_clip:
                self.scaler.unscale_(a.optimizer)
                torch.nn.utils.clip_grad_norm_(list(a.update.module.parameters()), float(a.cfg.grad_clip))
            self.scaler.step(a.optimizer)
            a.optimizer.zero_grad(set_to_none=True)  # the main loss's gradients into this part are not its own
            parts[a.update.name] = value.detach()
            parts.update({k: v.detach() for k, v in extra.items()})
        return parts

    def _gather(self, out):
        """The PairOutput of the global batch: every process's rows, the local ones with their gradients,
        and the similarity of the gathered embeddings."""
        fields = {f.name: getattr(out, f.name) for f in dataclass_fields(out)}
        gathered = {k: distributed.all_gather_with_grad(v) if isinstance(v, torch.Tensor) and k != "sim" else v
                    for k, v in fields.items()}
        gathered["sim"] = self.model.similarity(gathered["image_emb"], gathered["caption_emb"])
        return type(out)(**gathered)

    def _nonfinite(self, batch: Batch, what: str, value: float) -> None:
        """A step with a non-finite loss or gradient: skipped (no update), reported with the batch's captions;
        ``train.max_nonfinite_steps`` in a row stop the run."""
        self.nonfinite_streak += 1
        self.nonfinite_total += 1
        ids = self.train_corpus.caption_ids or [str(j) for j in range(self.train_corpus.num_captions)]
        shown = [ids[int(j)] for j in batch.caption_idx[:5]]
        more = len(batch.caption_idx) - len(shown)
        log.warning("step %d: the %s is %s; step skipped (captions %s%s)", self.step + 1, what, value,
                    ", ".join(shown), f" and {more} more" if more > 0 else "")
        self._log({"kind": "nonfinite", "epoch": self.epoch, "step": self.step + 1, "what": what,
                   "value": str(value), "captions": shown})
        self.nonfinite_what = what
        return None

    def check_nonfinite(self) -> None:
        """After a step: ``train.max_nonfinite_steps`` skipped steps in a row stop the run (state saved)."""
        if self.nonfinite_streak >= self.cfg.train.max_nonfinite_steps:
            self.save(LAST)
            raise TrainingDiverged(
                f"training stopped at step {self.step}: {self.nonfinite_streak} steps in a row had a non-finite "
                f"{self.nonfinite_what}. Lower optim.lr, set optim.grad_clip, switch train.amp off, or check the data "
                f"for NaN/inf features and broken captions. The last state is in {self.out / LAST}.")

    def check_collapse(self) -> None:
        """After a step: feed the detector; when it fires, act as ``train.collapse.action`` says -- at once when
        the embeddings are squeezed, after the epoch's validation when only the loss is pinned (a plateau of a
        run that still learns looks the same: :mod:`vsekit.train.monitor`)."""
        d, opts = self.last_diag, self.collapse_opts
        if opts.action == "off" or not d:
            return
        loss = float(self.last_parts["loss"]) if "loss" in self.last_parts else float("nan")
        cv = self.last_collapse_value or 0.0
        if not self.detector.update(loss, cv, d["image_mean_cos"], d["caption_mean_cos"]):
            return
        event = {"epoch": self.epoch, "step": self.step, "loss": loss, "collapse_value": cv,
                 "image_mean_cos": d["image_mean_cos"], "caption_mean_cos": d["caption_mean_cos"]}
        if self.detector.is_squeezed(d["image_mean_cos"], d["caption_mean_cos"]):
            self._act_on_collapse(event)
        elif self.detector.pending is None:
            # None before any validation (JSON has no -inf for the log line and the checkpoint)
            best = self.best_rsum
            self.detector.pending = {**event, "best_before": best if math.isfinite(best) else None}
            log.info("step %d: the loss has stayed at its collapse value (%.4g) for %d steps while the embeddings "
                     "are spread; this epoch's validation decides whether the run is still learning", self.step, cv,
                     opts.patience)

    def _judge_suspected_collapse(self, metrics: dict[str, float]) -> None:
        """After a validation: a suspected collapse is dismissed if the run is learning, acted on otherwise."""
        pending, self.detector.pending = self.detector.pending, None
        if pending is None or self.checkpoints.metric not in metrics:
            return
        value = float(metrics[self.checkpoints.metric])
        chance = None
        if self.checkpoints.metric == "rsum" and self.val_corpus.num_images:
            chance = chance_rsum(np.asarray(self.val_corpus.caption_to_image), self.val_corpus.num_images)
        best_before = pending.pop("best_before")
        if self.detector.still_learning(value, best_before, chance):
            event = {**pending, "action": "none", "validation": value, "best_before": best_before}
            self.detector.events.append(event)
            self._log({"kind": "collapse", **event})
            before = f"best before {best_before:.2f}" if best_before is not None else "first validation"
            log.info("not a collapse: the loss sat at its collapse value from step %d, but validation %s rose to "
                     "%.2f (%s): training goes on unchanged", pending["step"], self.checkpoints.metric, value, before)
            return
        self._act_on_collapse({**pending, "validation": value, "best_before": best_before})

    def _act_on_collapse(self, event: dict[str, Any]) -> None:
        opts = self.collapse_opts
        action = opts.action
        fallbacks = sum(e["action"] == "fallback" for e in self.detector.events)
        if action == "fallback" and fallbacks >= opts.max_fallbacks:
            action = "stop"
        event = {**event, "action": action}
        symptom = collapse_symptom(event["loss"], event["collapse_value"], event["image_mean_cos"],
                                   event["caption_mean_cos"])
        if action == "fallback":
            # the rest of this epoch and fallback_epochs more; decided at an epoch's end: the next ones
            until = self.epoch + (1 + opts.fallback_epochs if self.batches_done else max(1, opts.fallback_epochs))
            event["sum_of_hinges_until_epoch"] = until if self.loss_fn.fall_back_to_sum(until) else None
            factor = opts.lr_factor
            for g in self.optimizer.param_groups:
                g["lr"] *= factor
            self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
            event["lr"] = self._base_lr()
            log.warning("step %d: %s. Falling back: %s, learning rate x%g -> %.3g.", event["step"], symptom,
                        f"sum of hinges until epoch {until}" if event["sum_of_hinges_until_epoch"] else
                        "(this loss has no sum-of-hinges form)", factor, event["lr"])
        elif action == "warn":
            log.warning("step %d: %s. %s", event["step"], symptom, ADVICE)
        self.detector.events.append(event)
        self._log({"kind": "collapse", **event})
        if action == "stop":
            self.save(LAST)
            raise TrainingCollapsed(f"training stopped at step {event['step']} (epoch {event['epoch'] + 1}): "
                                    f"{symptom}. {ADVICE} The last state is in {self.out / LAST}.")

    # -- one epoch -----------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        metrics = validate(self.model, self.vocab, self.cfg, self.val_corpus, self.device,
                           train_captions=self.train_corpus.captions)
        self._train_mode()
        return metrics

    def _steps_in_epoch(self) -> int:
        total = self.sampler.num_batches(self.batch_size)
        cap = self.cfg.train.max_steps_per_epoch
        return min(total, cap) if cap else total

    def _train_record(self, loss: float, rate: float) -> dict[str, Any]:
        record = {"kind": "train", "epoch": self.epoch, "step": self.step, "loss": loss,
                  "lr": self._base_lr(), "pairs_per_s": rate}
        if len(self.last_parts) > 1 or self.plan.configured:
            record.update({f"term_{k}": float(v) for k, v in self.last_parts.items()})
            record["stage"] = self.stage_index
        record.update(self.last_diag)
        if self.last_collapse_value is not None:
            record["collapse_value"] = self.last_collapse_value
        return record

    def stop_requested(self) -> bool:
        """Whether SIGTERM or SIGINT asked the run to stop (:attr:`stopped_by_signal`); every process of a
        distributed run stops at the same step (the signal may reach only some of them)."""
        signum = self._stop.signum if self._stop is not None else None
        if self.world.distributed:
            flag = torch.tensor([signum or 0], dtype=torch.long, device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item()) or None
        self.stopped_by_signal = signum
        return signum is not None

    def train_one_epoch(self) -> bool:
        """Train the rest of the current epoch; False when the time budget or a signal
        (:attr:`stopped_by_signal`) ended it early."""
        tcfg = self.cfg.train
        total = self._steps_in_epoch()
        bar = progress(total, desc=f"epoch {self.epoch + 1}/{tcfg.epochs}", initial=self.batches_done,
                       enabled=tcfg.progress, logger=log)
        t0, seen = time.perf_counter(), 0
        with bar:
            for batch in self._loader():
                if self.batches_done >= total:
                    break
                self._note_skipped(batch.skipped)
                if batch.images is None:  # every image of the batch was unreadable
                    self.batches_done += 1
                    continue
                self.objective.set_progress(self.epoch / tcfg.epochs, (self.epoch + self.batches_done / total) / tcfg.epochs)
                loss = self.train_step(batch)
                self.batches_done += 1
                self.step += 1
                seen += len(batch)
                if loss is not None:  # None: skipped for a non-finite loss or gradient
                    self.epoch_loss_sum += loss
                    self.check_collapse()
                else:
                    self.check_nonfinite()
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix(loss=f"{loss:.3f}" if loss is not None else "skipped", pairs_per_s=f"{rate:.0f}")
                bar.update(1)
                if self.step % tcfg.log_every == 0:
                    self._log(self._train_record(loss, rate))
                self.checkpoints.after_step(self.step)
                if self.stop_requested():  # after the step, its checkpoint and its log line: saved as it is
                    return False
                if self.out_of_time():  # checked after a step, before the loader draws the next batch
                    if self.batches_done < total:
                        return False
                    break
        return True

    def _note_skipped(self, messages: list[str]) -> None:
        for m in map(str, messages):  # plain strings (a Skipped marker is a str subclass)
            if m not in self.skipped_images:
                self.skipped_images.add(m)
                log.warning("skipping an unreadable training image (data.skip_missing_images): %s", m)

    def _val_record(self, metrics: dict[str, float]) -> dict[str, Any]:
        """An epoch's validation line: metrics, mean training loss, the epoch's diagnostics, elapsed time."""
        return {"kind": "val", "epoch": self.epoch, "step": self.step,
                "train_loss": self.epoch_loss_sum / max(1, self.batches_done), **metrics,
                **{f"train_{k}": v for k, v in self.diagnostics.means().items()},
                "skipped_images": len(self.skipped_images), "nonfinite_steps": self.nonfinite_total,
                "elapsed_min": self.elapsed_s / 60}

    def end_epoch(self) -> dict[str, float]:
        """After a full epoch: schedule step, validation, log line, checkpoints."""
        self.scheduler.step()
        for a in self.aux.values():
            if self.objective.active(a.term):  # an inactive part took no step: its schedule waits
                a.scheduler.step()
        metrics = self.validate()
        record = self._val_record(metrics)
        self.diagnostics = EpochDiagnostics()
        self.history.append(record)
        self._log(record)
        if "rsum" in metrics:
            log.info("epoch %d: val rsum %.2f (R@1 i2t %.1f t2i %.1f)", self.epoch + 1, metrics["rsum"],
                     metrics["i2t_r1"], metrics["t2i_r1"])
        else:
            log.info("epoch %d: val mAP %.4f (i2t %.4f, t2i %.4f)", self.epoch + 1, metrics["map_avg"],
                     metrics["i2t_map"], metrics["t2i_map"])
        self.epoch += 1
        self.batches_done, self.epoch_loss_sum = 0, 0.0
        self.checkpoints.after_epoch(metrics)
        self._judge_suspected_collapse(metrics)
        return metrics

    # -- the run -------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train to ``train.epochs`` (or the time budget); SIGTERM/SIGINT stop it after the current step with
        the state saved, raising :class:`~vsekit.train.signals.TrainingInterrupted`."""
        with signals.StopSignals() as self._stop:
            try:
                return self._fit()
            finally:
                self._stop = None

    def _fit(self) -> dict[str, Any]:
        epochs = self.cfg.train.epochs
        while self.epoch < epochs:
            stage = self.plan.index_at(self.epoch)
            if stage != self.stage_index:
                self._apply_stage(stage)
            self.loss_fn.set_epoch(self.epoch)
            self.objective.set_epoch(self.epoch)
            self._train_mode()
            if not self.train_one_epoch():
                if self.stopped_by_signal:
                    self._stop_for_signal()
                return self._stop_for_time()
            self.end_epoch()
            if self.epoch < epochs and self.stop_requested():  # a signal during the epoch's validation
                self._stop_for_signal()
            if self.out_of_time() and self.epoch < epochs:
                log.info("train.max_minutes reached (%.1f min) after epoch %d", self.elapsed_s / 60, self.epoch)
                return self._result("max_minutes")
        return self._result(None)

    def _result(self, stopped_by: str | None) -> dict[str, Any]:
        self.logger.flush()
        return {"best_rsum": self.best_rsum, "select_metric": self.checkpoints.metric, "history": self.history,
                "output_dir": str(self.out),
                "stopped_by": stopped_by}

    def _stop_for_signal(self) -> None:
        """SIGTERM/SIGINT: save the exact state (no validation: a preempted job has seconds left) and raise."""
        signum = int(self.stopped_by_signal or 0)
        name = signals.signal_name(signum)
        log.info("%s: saving the state at step %d (epoch %d, batch %d)", name, self.step, self.epoch + 1,
                 self.batches_done)
        self.save(LAST)
        self.logger.flush()
        distributed.barrier()  # rank 0's checkpoint is complete before any process reports the stop
        raise signals.TrainingInterrupted(
            f"training stopped by {name} at step {self.step} (epoch {self.epoch + 1}); its exact state is in "
            f"{self.out / LAST}: run the same command with --resume to continue", signum)

    def _stop_for_time(self) -> dict[str, Any]:
        """The wall-clock budget ran out mid-epoch: save the exact state (``--resume`` continues this epoch with
        a larger ``train.max_minutes``), then validate this partial epoch and keep ``best.pt`` up to date."""
        log.info("train.max_minutes reached (%.1f min) in epoch %d after %d batches", self.elapsed_s / 60,
                 self.epoch + 1, self.batches_done)
        self.save(LAST)
        metrics = self.validate()
        record = {**self._val_record(metrics), "partial_epoch": True}
        self._log(record)
        self.history.append(record)
        self.checkpoints.after_partial_epoch(metrics)
        return self._result("max_minutes")


@dataclass
class _Auxiliary:
    """An objective term's part with its own optimizer and schedule (see vsekit.losses.terms)."""

    update: AuxiliaryUpdate
    term: str
    cfg: OptimConfig
    optimizer: torch.optim.Optimizer
    scheduler: Any


class _ModelAndLoss(torch.nn.Module):
    """Groups the model, a loss with parameters (InfoNCE's temperature) and the objective's own terms (the
    shared instance classifier) for one optimizer. Names: the model's own (``image_encoder.backbone...``),
    ``loss.*`` and ``objective.*``, as ``optim.lr_mult`` and ``train.freeze`` use them."""

    def __init__(self, model: torch.nn.Module, loss: torch.nn.Module, terms: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.model, self.loss = model, loss
        self.terms = terms if terms is not None else torch.nn.ModuleDict()

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        yield from self.model.named_parameters(prefix, recurse, remove_duplicate)
        yield from self.loss.named_parameters("loss", recurse, remove_duplicate)
        yield from self.terms.named_parameters("objective", recurse, remove_duplicate)

    def parameters(self, recurse: bool = True):
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_parts(self):
        """Sub-modules under the same names as :meth:`named_parameters`."""
        yield from self.model.named_modules()
        yield from self.loss.named_modules(prefix="loss")
        yield from self.terms.named_modules(prefix="objective")


def _autocast(device: torch.device, amp: bool, cpu_bf16: bool) -> Callable[[], Any]:
    """The step's autocast context: float16 on CUDA with ``train.amp``, bfloat16 on a CPU with
    ``train.cpu_bf16`` (no scaler needed: bfloat16 has float32's range), else none."""
    if device.type == "cpu" and cpu_bf16:
        if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            log.warning("train.cpu_bf16: this CPU has no bfloat16 instructions; autocast will emulate them and "
                        "run slower than float32")
        return functools.partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    return functools.partial(torch.autocast, device.type, dtype=torch.float16, enabled=amp)


def train(cfg: RunConfig | dict[str, Any], resume: bool = False, *, overwrite: bool = True) -> dict[str, Any]:
    return Trainer(cfg, resume=resume, overwrite=overwrite).fit()
