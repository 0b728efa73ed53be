"""The one training loop every method uses: data, model, loss and schedule all come from the config.

The parts, after torchvision's reference scripts and timm: :func:`vsekit.train.run.build_run` builds what a
run needs; :meth:`Trainer.train_one_epoch` and :meth:`Trainer.train_step` train, with the optimizers and the
training stage in an :class:`~vsekit.train.optim.OptimizerSet` and the run's health (collapse, non-finite steps,
unreadable images) in a :class:`~vsekit.train.monitor.TrainingHealth`, each with its own state;
:func:`vsekit.train.validate.validate` validates; :class:`~vsekit.train.checkpointing.CheckpointPolicy`
decides which checkpoints to write; :class:`~vsekit.train.logger.MetricsLogger` writes ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader

from vsekit.config import RunConfig, dump_config, validate_config
from vsekit.data.batch import Batch, text_to
from vsekit.errors import ConfigError
from vsekit.train import signals
from vsekit.train.checkpointing import LAST, CheckpointPolicy, prepare_output_dir
from vsekit.train.logger import MetricsLogger
from vsekit.train.monitor import TrainingHealth
from vsekit.train.optim import OptimizerSet
from vsekit.train.run import build_run
from vsekit.train.state import rng_state, seed_everything, set_rng_state
from vsekit.train.validate import summary, validate
from vsekit.utils import distributed
from vsekit.utils.device import resolve_device
from vsekit.utils.io import atomic_write_text
from vsekit.utils.progress import progress

log = logging.getLogger("vsekit.train")


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
        tcfg = cfg.train
        # one process per device under torchrun: rank 0 logs, validates into the log and writes checkpoints
        self.world = distributed.init_from_env(str(cfg.device))
        # rank 0; an error stops all
        distributed.run_on_main(lambda: prepare_output_dir(self.out, tcfg.init_from, resume=resume,
                                                           overwrite=overwrite))
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.device)
        if tcfg.batch_size % self.world.size:
            raise ConfigError(f"train.batch_size ({tcfg.batch_size}) is the global batch: it must be a multiple of "
                              f"the number of processes ({self.world.size})")
        seed_everything(cfg.seed)
        self.checkpoints = CheckpointPolicy(self.out, self.state_dict, tcfg.checkpoint_every_steps,
                                            metric=cfg.eval.select_metric, writes=self.world.is_main)

        resume_state, init_state = self.checkpoints.start_states(cfg, resume)
        self.run = run = build_run(cfg, weights_from=resume_state or init_state)
        self.train_corpus, self.val_corpus, self.vocab = run.train_corpus, run.val_corpus, run.vocab
        self.model, self.loss_fn = run.model.to(self.device), run.loss_fn.to(self.device)
        self.plan, self.objective = run.plan, run.objective.to(self.device)
        self.dataset, self.sampler = run.dataset, run.sampler
        if init_state is not None:
            run.init_from(init_state)
        self.batch_size = tcfg.batch_size  # global: each of the world's processes takes batch_size / world
        self.local_batch_size = tcfg.batch_size // self.world.size
        run.shard(self.world, self.local_batch_size)
        self.optim = OptimizerSet(self.model, self.loss_fn, self.objective, self.plan, self.device,
                                  amp=tcfg.amp and self.device.type == "cuda", cpu_bf16=tcfg.cpu_bf16,
                                  state=resume_state)

        self.epoch, self.batches_done, self.step, self.epoch_loss_sum = 0, 0, 0, 0.0
        self.last_parts: dict[str, torch.Tensor] = {}  # the last step's loss terms, by name
        self.history: list[dict] = []
        # per-batch diagnostics, collapse detection and recovery, non-finite steps, unreadable images
        self.health = TrainingHealth(tcfg, self.loss_fn, self.optim, self.train_corpus, self._log,
                                     lambda: self.save(LAST))
        self.budget = signals.TimeBudget(tcfg.max_minutes)
        self._stop: signals.StopSignals | None = None  # SIGTERM/SIGINT, while fit() runs
        self.stopped_by_signal: int | None = None
        if resume_state is not None:
            self.load_state_dict(resume_state)
        if self.world.is_main:
            atomic_write_text(self.out / "config.yaml", dump_config(cfg.to_dict()))
        self.logger = MetricsLogger(self.out, resume_step=self.step if resume_state is not None else None,
                                    resume_epoch=self.epoch if resume_state is not None else None,
                                    enabled=self.world.is_main)

    # -- state ---------------------------------------------------------------------------------------
    @property
    def best_rsum(self) -> float:
        return self.checkpoints.best

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint: the run's parts (:meth:`~vsekit.train.run.TrainingRun.state_dict`), the optimizers
        (:class:`~vsekit.train.optim.OptimizerSet`), the run's health (``monitor``,
        :class:`~vsekit.train.monitor.TrainingHealth`), where the run stands, the RNG."""
        return {**self.run.state_dict(), **self.optim.state_dict(), "rng": rng_state(), "epoch": self.epoch,
                "batches_done": self.batches_done, "step": self.step, "best_rsum": self.best_rsum,
                "epoch_loss_sum": self.epoch_loss_sum, "history": self.history, "monitor": self.health.state_dict(),
                "elapsed_s": self.budget.elapsed_s}

    def load_state_dict(self, s: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (``last.pt``), built for the same config and stage."""
        self.run.load_state_dict(s)
        self.optim.load_state_dict(s, self.out / LAST)
        self.epoch, self.batches_done, self.step = s["epoch"], s["batches_done"], s["step"]
        self.checkpoints.best, self.history = s["best_rsum"], list(s["history"])
        self.epoch_loss_sum = s["epoch_loss_sum"]
        self.health.load_state_dict(s.get("monitor") or {})
        self.budget.before = float(s.get("elapsed_s", 0.0))
        set_rng_state(s["rng"])
        log.info("resumed %s at epoch %d, batch %d (step %d)", self.out, self.epoch, self.batches_done, self.step)

    def out_of_time(self) -> bool:
        """Whether ``train.max_minutes`` is spent (rank 0's clock decides for every process)."""
        return self.budget.spent()

    def save(self, name: str) -> Path:
        return self.checkpoints.save(name)

    def _log(self, record: dict[str, Any]) -> None:
        self.logger.log(record, self.step)

    # -- one step ------------------------------------------------------------------------------------
    def loader(self) -> DataLoader:
        """The rest of the current epoch's batches (from :attr:`batches_done` on), each process its share."""
        self.dataset.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, start=self.batches_done * self.batch_size)
        g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + self.epoch)
        return DataLoader(self.dataset, batch_size=self.local_batch_size, sampler=self.sampler,
                          num_workers=self.cfg.data.num_workers, collate_fn=self.dataset.collate,
                          generator=g, pin_memory=self.device.type == "cuda",
                          worker_init_fn=signals.worker_init if self.cfg.data.num_workers else None)

    def train_step(self, batch: Batch) -> float | None:
        """One update on ``batch``; its loss, or None when skipped for a non-finite loss or gradient."""
        p = self.optim.forward(self._forward, batch.to(self.device))  # under torchrun through DDP
        if p.loss is None:  # an auxiliary part's loss was not finite
            self.optim.skip(distributed.tensor_fields(p.out), aux_taken=False)
            return self._nonfinite(p.local, "loss of an auxiliary part", float("nan"))
        self.last_parts = p.parts
        if not torch.isfinite(p.loss.detach()):
            self.optim.skip([p.loss], aux_taken=bool(p.aux_parts))
            return self._nonfinite(p.local, "loss", float(p.loss.detach()))
        self.health.observe(p.out, p.batch, self.last_parts)
        norm = self.optim.step(p.loss)
        if norm is not None:
            return self._nonfinite(p.local, "gradient norm", norm)
        self.health.taken()
        return float(p.loss.detach())

    def _forward(self, batch: Batch) -> _Pass:
        """From a batch to its loss: the embeddings, the auxiliary parts' own steps (a discriminator's), and the
        objective on the global batch, as one process would compute it."""
        dev = self.device
        with self.optim.autocast():
            batch = self.objective.prepare(self.model, batch, self.optim.train_mode)  # e.g. mined negatives
            neg = batch.negatives
            out = self.model.embed(batch.images, batch.text, text_to(neg.text, dev) if neg else None)
        aux_parts = self.optim.auxiliary_steps(out, batch)
        if aux_parts is None:
            return _Pass(None, {}, None, out, batch, batch)
        step_out, step_batch = out, batch
        if self.world.distributed:  # the in-batch terms see the global batch, as one process would
            step_out, step_batch = distributed.all_gather_fields(out, skip=("sim",)), batch.gather()
            step_out.sim = self.model.similarity(step_out.image_emb, step_out.caption_emb)
        loss, parts = self.objective(step_out, step_batch, (out, batch))
        parts.update(aux_parts)
        return _Pass(loss, parts, aux_parts, step_out, step_batch, batch)

    def _nonfinite(self, batch: Batch, what: str, value: float) -> None:
        return self.health.nonfinite(batch, what, value, self.epoch, self.step)

    # -- one epoch -----------------------------------------------------------------------------------
    def validate(self) -> dict[str, float]:
        metrics = validate(self.model, self.vocab, self.cfg, self.val_corpus, self.device,
                           train_captions=self.train_corpus.captions)
        self.optim.train_mode()
        return metrics

    def _steps_in_epoch(self) -> int:
        total = self.sampler.num_batches(self.batch_size)
        return min(total, self.cfg.train.max_steps_per_epoch or total)

    def _train_record(self, loss: float, rate: float) -> dict[str, Any]:
        record = {"kind": "train", "epoch": self.epoch, "step": self.step, "loss": loss,
                  "lr": self.optim.base_lr(), "pairs_per_s": rate}
        if len(self.last_parts) > 1 or self.plan.configured:
            record.update({f"term_{k}": float(v) for k, v in self.last_parts.items()})
            record["stage"] = self.optim.stage
        return {**record, **self.health.step_record()}

    def stop_requested(self) -> bool:
        """Whether SIGTERM or SIGINT asked the run to stop (:attr:`stopped_by_signal`); every process of a
        distributed run stops at the same step (the signal may reach only some of them)."""
        self.stopped_by_signal = signals.agreed_signal(self._stop, self.device)
        return self.stopped_by_signal is not None

    def train_one_epoch(self) -> bool:
        """Train the rest of the current epoch; False when the time budget or a signal
        (:attr:`stopped_by_signal`) ended it early."""
        tcfg = self.cfg.train
        total = self._steps_in_epoch()
        bar = progress(total, desc=f"epoch {self.epoch + 1}/{tcfg.epochs}", initial=self.batches_done,
                       enabled=tcfg.progress, logger=log)
        t0, seen = time.perf_counter(), 0
        with bar:
            for batch in self.loader():
                if self.batches_done >= total:
                    break
                self.health.note_skipped(batch.skipped)
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
                self.health.after_step(loss is None, self.last_parts, epoch=self.epoch, step=self.step,
                                       batches_done=self.batches_done, best=self.best_rsum)
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

    def _val_record(self, metrics: dict[str, float]) -> dict[str, Any]:
        """An epoch's validation line: metrics, mean training loss, the epoch's diagnostics, elapsed time."""
        return {"kind": "val", "epoch": self.epoch, "step": self.step,
                "train_loss": self.epoch_loss_sum / max(1, self.batches_done), **metrics,
                **self.health.epoch_record(), "elapsed_min": self.budget.elapsed_s / 60}

    def end_epoch(self) -> dict[str, float]:
        """After a full epoch: schedule step, validation, log line, checkpoints."""
        self.optim.end_epoch()
        metrics = self.validate()
        record = self._val_record(metrics)
        self.health.new_epoch()
        self.history.append(record)
        self._log(record)
        log.info("epoch %d: %s", self.epoch + 1, summary(metrics))
        self.epoch += 1
        self.batches_done, self.epoch_loss_sum = 0, 0.0
        self.checkpoints.after_epoch(metrics)
        self.health.judge_suspected_collapse(metrics, self.checkpoints.metric, self.val_corpus, epoch=self.epoch,
                                             batches_done=self.batches_done)
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
            if stage != self.optim.stage:
                self.optim.apply_stage(stage)
            self.loss_fn.set_epoch(self.epoch)
            self.objective.set_epoch(self.epoch)
            self.optim.train_mode()
            if not self.train_one_epoch():
                if self.stopped_by_signal:
                    self._stop_for_signal()
                return self._stop_for_time()
            self.end_epoch()
            if self.epoch < epochs and self.stop_requested():  # a signal during the epoch's validation
                self._stop_for_signal()
            if self.out_of_time() and self.epoch < epochs:
                log.info("train.max_minutes reached (%.1f min) after epoch %d", self.budget.elapsed_s / 60, self.epoch)
                return self._result("max_minutes")
        return self._result(None)

    def _result(self, stopped_by: str | None) -> dict[str, Any]:
        self.logger.flush()
        return {"best_rsum": self.best_rsum, "select_metric": self.checkpoints.metric, "history": self.history,
                "output_dir": str(self.out), "stopped_by": stopped_by}

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
        log.info("train.max_minutes reached (%.1f min) in epoch %d after %d batches", self.budget.elapsed_s / 60,
                 self.epoch + 1, self.batches_done)
        self.save(LAST)
        metrics = self.validate()
        record = {**self._val_record(metrics), "partial_epoch": True}
        self._log(record)
        self.history.append(record)
        self.checkpoints.after_partial_epoch(metrics)
        return self._result("max_minutes")


class _Pass(NamedTuple):
    """A step's forward pass; DDP finds the tensors it returns."""

    loss: torch.Tensor | None  # None: an auxiliary part's loss was not finite (no main loss computed)
    parts: dict[str, torch.Tensor]  # the loss terms by name, the auxiliary parts' included
    aux_parts: dict[str, torch.Tensor] | None  # the auxiliary parts' losses (empty: none took a step)
    out: Any  # the PairOutput of the global batch
    batch: Batch  # the global batch
    local: Batch  # this process's batch (its captions are named when the step is skipped)


def train(cfg: RunConfig | dict[str, Any], resume: bool = False, *, overwrite: bool = True) -> dict[str, Any]:
    return Trainer(cfg, resume=resume, overwrite=overwrite).fit()
