"""The one training loop every method uses: data, model, loss and schedule all come from the config."""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from vsekit.checkpoint import load_checkpoint, save_checkpoint
from vsekit.config import dump_config
from vsekit.data.corpus import Corpus
from vsekit.data.datasets import CaptionPool, EpochSampler, ImageSource, PairDataset, collate_pairs
from vsekit.data.load import load_corpus
from vsekit.inference import Embedder
from vsekit.losses import build_loss
from vsekit.models.vse import build_model
from vsekit.text.vocab import Vocabulary
from vsekit.train.monitor import (
    ADVICE,
    CollapseDetector,
    EpochDiagnostics,
    TrainingCollapsed,
    batch_diagnostics,
    check_collapse_options,
    collapse_symptom,
    collapse_value,
)
from vsekit.train.objective import Objective, build_objective, term_weights
from vsekit.train.optim import build_optimizer, build_scheduler
from vsekit.train.stages import Freezer, StagePlan
from vsekit.utils.device import resolve_device
from vsekit.utils.io import atomic_write_text, cache_root

log = logging.getLogger("vsekit.train")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# keys of the ``data`` section that the trainer reads; the rest is the reader's spec
_LOOP_KEYS = {"train_split", "val_split", "test_split", "val_max_images", "image_size", "resize", "num_workers",
              "sample", "augment", "resize_policy"}


def load_split(cfg: dict, split: str, max_images: int | None = None) -> Corpus:
    """One split of the config's data set (its first ``max_images`` images: the field's 1,000-image dev sets)."""
    spec = {k: v for k, v in cfg["data"].items() if k not in _LOOP_KEYS and v is not None}
    if max_images:
        spec["max_images"] = int(max_images)
    return load_corpus(spec, split)


def feature_shape(corpus: Corpus) -> tuple[int, ...] | None:
    return tuple(int(x) for x in corpus.features.shape[1:]) if corpus.is_precomputed else None


class Trainer:
    """Builds everything from a resolved config and runs ``fit``. ``resume=True`` continues ``last.pt``."""

    def __init__(self, cfg: dict[str, Any], resume: bool = False) -> None:
        self.cfg = cfg
        self.out = Path(cfg["output_dir"])
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(cfg.get("device", "auto"))
        tcfg = cfg["train"]
        seed_everything(int(cfg["seed"]))

        resume_state = None
        if resume:
            last = self.out / "last.pt"
            if not last.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint {last} to resume from")
            resume_state = load_checkpoint(last)

        self.train_corpus = load_split(cfg, cfg["data"]["train_split"])
        self.val_corpus = load_split(cfg, cfg["data"]["val_split"], cfg["data"].get("val_max_images"))
        init_state = None
        if resume_state is None and tcfg.get("init_from"):
            init_state = load_checkpoint(tcfg["init_from"])  # e.g. VSE++ FT stage 2 starts from stage 1
        if resume_state is not None or init_state is not None:
            self.vocab = Vocabulary.from_dict((resume_state or init_state)["vocab"])
        else:
            self.vocab = Vocabulary.build(self.train_corpus.captions, int(cfg["text"]["min_count"]))
        self.feature_shape = feature_shape(self.train_corpus)
        self.model = build_model(cfg["model"], vocab_size=len(self.vocab), itos=self.vocab.itos,
                                 feature_shape=self.feature_shape).to(self.device)
        self.loss_fn = build_loss(cfg["loss"]).to(self.device)
        # stages: epoch ranges with their own optimizer, objective weights and frozen parts
        self.plan = StagePlan(cfg)
        stage_cfgs = self.plan.configs()
        self.objective: Objective = build_objective(
            stage_cfgs, self.loss_fn, feature_dim=int(cfg["model"]["embed_size"]),
            num_images=self.train_corpus.num_images).to(self.device)
        if "mined" in self.objective.terms and self.model.similarity_name != "cosine":
            raise ValueError("objective.mined scores pairs by cosine; it needs model.similarity: cosine")
        if init_state is not None:
            self.model.load_state_dict(init_state["model"])
            if len(self.objective.terms) and "objective" in init_state:
                self.objective.terms.load_state_dict(init_state["objective"])
            log.info("initialised the model from %s", init_state["path"])

        self.caption_vectors = None
        uses_loss = any(term_weights(c.get("objective") or {})["loss"] for c in stage_cfgs)
        if uses_loss and getattr(self.loss_fn, "requires_caption_vectors", False):
            self.caption_vectors = self._caption_vectors()

        self.max_len = cfg["text"].get("max_len")
        transform = None
        if not self.train_corpus.is_precomputed:
            from vsekit.data.images import build_transform

            d = cfg["data"]
            transform = build_transform(train=True, image_size=int(d["image_size"]), resize=d.get("resize"),
                                        augment=d.get("augment"), resize_policy=d.get("resize_policy", "short_side"))
        self.dataset = PairDataset(self.train_corpus, lambda c: self.vocab.encode(c, self.max_len),
                                   ImageSource(self.train_corpus, transform), sample=cfg["data"].get("sample", "caption"),
                                   seed=int(cfg["seed"]))
        self.sampler = EpochSampler(len(self.dataset), int(cfg["seed"]))
        self.caption_pool = CaptionPool(self.train_corpus, lambda c: self.vocab.encode(c, self.max_len)) \
            if "mined" in self.objective.terms else None
        self.batch_size = int(tcfg["batch_size"])
        self.trainable = _ModelAndLoss(self.model, self.loss_fn, self.objective.terms)
        self.freezer = Freezer()
        self.stage_index = -1
        first = self.plan.index_at(0)
        if resume_state is not None:
            first = int(resume_state.get("stage", self.plan.index_at(int(resume_state["epoch"]))))
        self._apply_stage(first)  # builds the optimizer and the LR schedule
        self.amp = bool(tcfg.get("amp", True)) and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        self.epoch, self.batches_done, self.step, self.best_rsum = 0, 0, 0, -math.inf
        self.epoch_loss_sum = 0.0
        self.last_parts: dict[str, torch.Tensor] = {}
        self.history: list[dict] = []
        # health monitoring: per-batch diagnostics, collapse detection and recovery, wall-clock budget
        self.collapse_opts = check_collapse_options(tcfg.get("collapse"))
        self.detector = CollapseDetector(int(self.collapse_opts["patience"]), float(self.collapse_opts["loss_tol"]),
                                         float(self.collapse_opts["max_mean_cos"]))
        self.diagnostics = EpochDiagnostics()
        self.last_diag: dict[str, float] = {}
        self.last_collapse_value: float | None = None  # None: not computed for this step
        max_minutes = tcfg.get("max_minutes")
        if max_minutes is not None and float(max_minutes) <= 0:
            raise ValueError(f"train.max_minutes must be > 0 (or null for no limit), got {max_minutes!r}")
        self.max_seconds = float(max_minutes) * 60 if max_minutes is not None else None
        self.elapsed_before = 0.0  # seconds of training in earlier runs of this output folder (resume)
        self._t_start = time.perf_counter()
        if resume_state is not None:
            self._restore(resume_state)
        atomic_write_text(self.out / "config.yaml", dump_config(cfg))
        self.metrics_path = self.out / "metrics.jsonl"
        self.tb = _tensorboard(self.out)

    # -- state ---------------------------------------------------------------------------------------
    def _caption_vectors(self) -> torch.Tensor:
        from vsekit.semantics import fit_or_load_caption_vectors

        s = self.cfg.get("semantics", {})
        cache = Path(s.get("cache_dir") or (cache_root() / "semantics"))
        kw = {"n_components": int(s.get("n_components", 400)), "random_state": int(s.get("random_state", 122))}
        if s.get("n_iter") is not None:
            kw["n_iter"] = int(s["n_iter"])
        vecs = fit_or_load_caption_vectors(self.train_corpus.captions, self.train_corpus.caption_ids, cache, **kw)
        return torch.from_numpy(np.array(vecs, dtype=np.float32))  # a writable copy

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
            "config": self.cfg,
            "feature_shape": list(self.feature_shape) if self.feature_shape else None,
            "monitor": {"detector": self.detector.state_dict(), "diagnostics": self.diagnostics.state_dict(),
                        "sum_until_epoch": int(getattr(self.loss_fn, "sum_until_epoch", 0))},
            "elapsed_s": self.elapsed_s,
        }
        # only runs that use them carry these, so the checkpoints of other recipes stay as they were
        if len(self.objective.terms):
            state["objective"] = self.objective.terms.state_dict()
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
        self.scaler.load_state_dict(s["scaler"])
        self.epoch, self.batches_done, self.step = s["epoch"], s["batches_done"], s["step"]
        self.best_rsum, self.history = s["best_rsum"], list(s["history"])
        self.epoch_loss_sum = s["epoch_loss_sum"]
        monitor = s.get("monitor") or {}
        self.detector.load_state_dict(monitor.get("detector") or {})
        self.diagnostics.load_state_dict(monitor.get("diagnostics") or {})
        if monitor.get("sum_until_epoch"):
            self.loss_fn.fall_back_to_sum(int(monitor["sum_until_epoch"]))
        self.elapsed_before = float(s.get("elapsed_s", 0.0))
        set_rng_state(s["rng"])
        log.info("resumed %s at epoch %d, batch %d (step %d)", self.out, self.epoch, self.batches_done, self.step)

    @property
    def elapsed_s(self) -> float:
        """Seconds of training in this output folder so far, earlier (resumed) runs included."""
        return self.elapsed_before + (time.perf_counter() - self._t_start)

    def out_of_time(self) -> bool:
        return self.max_seconds is not None and self.elapsed_s >= self.max_seconds

    def save(self, name: str) -> Path:
        return save_checkpoint(self.out / name, self.state_dict())

    def _log(self, record: dict[str, Any]) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            kind = record.get("kind", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("epoch", "step"):
                    self.tb.add_scalar(f"{kind}/{k}", v, record.get("step", self.step))

    # -- stages --------------------------------------------------------------------------------------
    def _apply_stage(self, k: int) -> None:
        """Switch to stage ``k``: encoder finetune flags, frozen prefixes, objective weights, a new optimizer
        and LR schedule (the stage's ``optim`` section; schedule epochs count from the stage's start)."""
        scfg = self.plan.config(k)
        self.freezer.release()
        for enc_name in ("image_encoder", "text_encoder"):
            enc = getattr(self.model, enc_name, None)
            flag = ((scfg.get("model") or {}).get(enc_name) or {}).get("finetune")
            if flag is not None and hasattr(enc, "set_finetune"):
                enc.set_finetune(bool(flag))
        self.freezer.freeze(scfg["train"].get("freeze") or [], self.trainable.named_parameters(),
                            self.trainable.named_parts())
        self.objective.set_weights(scfg.get("objective") or {})
        if self.objective.mining and self.caption_pool is None:
            raise ValueError("objective.mined is switched on but the trainer has no caption pool")
        self.optim_cfg = scfg["optim"]
        self.optimizer = build_optimizer(self.trainable, self.optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, self.optim_cfg)
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

    # -- loop ----------------------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        self.dataset.set_epoch(self.epoch)
        self.sampler.set_epoch(self.epoch, start=self.batches_done * self.batch_size)
        g = torch.Generator().manual_seed(int(self.cfg["seed"]) * 1000003 + self.epoch)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                          num_workers=int(self.cfg["data"].get("num_workers", 0)), collate_fn=collate_pairs,
                          generator=g, pin_memory=self.device.type == "cuda")

    def train_step(self, batch: dict[str, torch.Tensor]) -> float:
        dev = self.device
        images = batch["images"].to(dev, non_blocking=True)
        tokens, lengths = batch["tokens"].to(dev, non_blocking=True), batch["lengths"]
        image_ids = batch["image_rows"].to(dev)
        caption_vectors = None
        if self.caption_vectors is not None:
            caption_vectors = self.caption_vectors[batch["caption_idx"]].to(dev)
        negatives = None
        with torch.autocast(dev.type, dtype=torch.float16, enabled=self.amp):
            if self.objective.mining:
                negatives = self.objective.mine(self.model, images, image_ids, self.caption_pool, self._train_mode)
            out = self.model.embed(images, tokens, lengths,
                                   *((negatives.tokens.to(dev), negatives.lengths) if negatives else ()))
        loss, self.last_parts = self.objective(out, image_ids, caption_vectors=caption_vectors, negatives=negatives)
        self.last_diag = batch_diagnostics(out.sim, out.image_emb, out.caption_emb, image_ids)
        self.diagnostics.add(self.last_diag)
        self.last_collapse_value = None
        if "loss" in self.last_parts and self.collapse_opts["action"] != "off":
            self.last_collapse_value = collapse_value(self.loss_fn, out.sim, image_ids, caption_vectors)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        clip = self.optim_cfg.get("grad_clip")
        if clip:
            self.scaler.unscale_(self.optimizer)
            params = list(self.model.parameters()) + list(self.objective.terms.parameters())
            torch.nn.utils.clip_grad_norm_(params, float(clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def check_collapse(self) -> None:
        """After a step: feed the detector; when it fires, act as ``train.collapse.action`` says."""
        d, opts = self.last_diag, self.collapse_opts
        if opts["action"] == "off" or not d:
            return
        loss = float(self.last_parts["loss"]) if "loss" in self.last_parts else float("nan")
        cv = self.last_collapse_value or 0.0
        if not self.detector.update(loss, cv, d["image_mean_cos"], d["caption_mean_cos"]):
            return
        action = opts["action"]
        fallbacks = sum(e["action"] == "fallback" for e in self.detector.events)
        if action == "fallback" and fallbacks >= int(opts["max_fallbacks"]):
            action = "stop"
        event = {"epoch": self.epoch, "step": self.step, "loss": loss, "collapse_value": cv,
                 "image_mean_cos": d["image_mean_cos"], "caption_mean_cos": d["caption_mean_cos"], "action": action}
        symptom = collapse_symptom(loss, cv, d["image_mean_cos"], d["caption_mean_cos"])
        if action == "fallback":
            until = self.epoch + 1 + int(opts["fallback_epochs"])
            event["sum_of_hinges_until_epoch"] = until if self.loss_fn.fall_back_to_sum(until) else None
            factor = float(opts["lr_factor"])
            for g in self.optimizer.param_groups:
                g["lr"] *= factor
            if hasattr(self.scheduler, "base_lrs"):
                self.scheduler.base_lrs = [lr * factor for lr in self.scheduler.base_lrs]
            event["lr"] = self._base_lr()
            log.warning("step %d: %s. Falling back: %s, learning rate x%g -> %.3g.", self.step, symptom,
                        f"sum of hinges until epoch {until}" if event["sum_of_hinges_until_epoch"] else
                        "(this loss has no sum-of-hinges form)", factor, event["lr"])
        elif action == "warn":
            log.warning("step %d: %s. %s", self.step, symptom, ADVICE)
        self.detector.events.append(event)
        self._log({"kind": "collapse", **event})
        if action == "stop":
            self.save("last.pt")
            raise TrainingCollapsed(f"training stopped at step {self.step} (epoch {self.epoch + 1}): {symptom}. "
                                    f"{ADVICE} The last state is in {self.out / 'last.pt'}.")

    def validate(self) -> dict[str, float]:
        from vsekit.eval import retrieval_metrics

        ecfg = self.cfg["eval"]
        emb = Embedder(self.model, self.vocab, self.cfg, self.device, fingerprint="-")
        img, cap = emb.encode_corpus(self.val_corpus, batch_size=int(ecfg.get("batch_size", 256)))
        self._train_mode()
        return retrieval_metrics(img, cap, self.val_corpus.caption_to_image, protocol="full",
                                 similarity=self.model.similarity_name, chunk_size=int(ecfg.get("chunk_size", 1024)))

    def fit(self) -> dict[str, Any]:
        tcfg = self.cfg["train"]
        epochs = int(tcfg["epochs"])
        every = int(tcfg.get("checkpoint_every_steps") or 0)
        max_steps = tcfg.get("max_steps_per_epoch")
        log_every = max(1, int(tcfg.get("log_every", 10)))
        while self.epoch < epochs:
            stage = self.plan.index_at(self.epoch)
            if stage != self.stage_index:
                self._apply_stage(stage)
            self.loss_fn.set_epoch(self.epoch) if hasattr(self.loss_fn, "set_epoch") else None
            self._train_mode()
            loader = self._loader()
            total = math.ceil(len(self.dataset) / self.batch_size)
            if max_steps:
                total = min(total, int(max_steps))
            bar = _bar(tcfg.get("progress", True), total, self.batches_done, f"epoch {self.epoch + 1}/{epochs}")
            t0, seen, timed_out = time.perf_counter(), 0, False
            for batch in loader:
                if self.batches_done >= total:
                    break
                loss = self.train_step(batch)
                self.batches_done += 1
                self.step += 1
                seen += len(batch["lengths"])
                self.epoch_loss_sum += loss
                self.check_collapse()
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", pairs_per_s=f"{rate:.0f}")
                if self.step % log_every == 0:
                    record = {"kind": "train", "epoch": self.epoch, "step": self.step, "loss": loss,
                              "lr": self._base_lr(), "pairs_per_s": rate}
                    if len(self.last_parts) > 1 or self.plan.configured:
                        record.update({f"term_{k}": float(v) for k, v in self.last_parts.items()})
                        record["stage"] = self.stage_index
                    record.update(self.last_diag)
                    if self.last_collapse_value is not None:
                        record["collapse_value"] = self.last_collapse_value
                    self._log(record)
                if every and self.step % every == 0:
                    self.save("last.pt")
                if self.out_of_time():  # checked after a step, before the loader draws the next batch
                    timed_out = self.batches_done < total
                    break
            if bar is not None:
                bar.close()
            if timed_out:
                return self._stop_for_time()
            self.scheduler.step()
            metrics = self.validate()
            record = self._val_record(metrics)
            self.diagnostics = EpochDiagnostics()
            self.history.append(record)
            self._log(record)
            log.info("epoch %d: val rsum %.2f (R@1 i2t %.1f t2i %.1f)", self.epoch + 1, metrics["rsum"],
                     metrics["i2t_r1"], metrics["t2i_r1"])
            self.epoch += 1
            self.batches_done, self.epoch_loss_sum = 0, 0.0
            is_best = metrics["rsum"] > self.best_rsum
            if is_best:
                self.best_rsum = metrics["rsum"]
            self.save("last.pt")
            if is_best:
                self.save("best.pt")
            if self.out_of_time() and self.epoch < epochs:
                log.info("train.max_minutes reached (%.1f min) after epoch %d", self.elapsed_s / 60, self.epoch)
                return self._result("max_minutes")
        return self._result(None)

    def _val_record(self, metrics: dict[str, float]) -> dict[str, Any]:
        """An epoch's validation line: metrics, mean training loss, the epoch's diagnostics, elapsed time."""
        return {"kind": "val", "epoch": self.epoch, "step": self.step,
                "train_loss": self.epoch_loss_sum / max(1, self.batches_done), **metrics,
                **{f"train_{k}": v for k, v in self.diagnostics.means().items()},
                "elapsed_min": self.elapsed_s / 60}

    def _result(self, stopped_by: str | None) -> dict[str, Any]:
        if self.tb is not None:
            self.tb.flush()
        return {"best_rsum": self.best_rsum, "history": self.history, "output_dir": str(self.out),
                "stopped_by": stopped_by}

    def _stop_for_time(self) -> dict[str, Any]:
        """The wall-clock budget ran out mid-epoch: save the exact state (``--resume`` continues this epoch with
        a larger ``train.max_minutes``), then validate this partial epoch and keep ``best.pt`` up to date."""
        log.info("train.max_minutes reached (%.1f min) in epoch %d after %d batches", self.elapsed_s / 60,
                 self.epoch + 1, self.batches_done)
        self.save("last.pt")
        metrics = self.validate()
        record = {**self._val_record(metrics), "partial_epoch": True}
        self._log(record)
        self.history.append(record)
        if metrics["rsum"] > self.best_rsum:
            self.best_rsum = metrics["rsum"]
            self.save("best.pt")
        return self._result("max_minutes")


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

    def named_parts(self):
        """Sub-modules under the same names as :meth:`named_parameters`."""
        yield from self.model.named_modules()
        yield from self.loss.named_modules(prefix="loss")
        yield from self.terms.named_modules(prefix="objective")


def _bar(enabled: bool, total: int, initial: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="batch", leave=False, dynamic_ncols=True)


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # noqa: BLE001 - tensorboard is optional
        return None
    return SummaryWriter(str(out / "tb"))


def train(cfg: dict[str, Any], resume: bool = False) -> dict[str, Any]:
    return Trainer(cfg, resume=resume).fit()
