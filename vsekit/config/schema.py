"""The typed config of a run: every section a pydantic model, every default written once, here or in the
signature of the registered component a section names.

Why pydantic: FastAPI (the server) already depends on it, it validates nested sections with exact error
locations (``train.collapse.patience``), and a model with ``extra="forbid"`` turns a typo into an error
instead of a silent default. A section that names a registered component is declared so by its field's type,
``Annotated[dict, Component(REGISTRY)]`` (:class:`vsekit.registry.Component`): its options are checked
against that component's signature, also those of the components inside a component's options
(``objective.terms.level_ranking.loss``); recipe merging finds these sections the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vsekit.data.images import TransformConfig
from vsekit.data.sources import SOURCES, DataConfig, DemoData, data_config
from vsekit.errors import ConfigError
from vsekit.eval.protocols import EVAL_PROTOCOLS
from vsekit.losses import LOSSES, MINED_LOSS, OBJECTIVE_TERMS
from vsekit.losses.dualpath import MINED_POOL_SIZE
from vsekit.models import IMAGE_ENCODERS, TEXT_ENCODERS
from vsekit.models.similarity import SIMILARITY_NETWORKS, check_similarity_spec
from vsekit.registry import Component, validate_section
from vsekit.semantics.lsa import DEFAULT_N_COMPONENTS, DEFAULT_RANDOM_STATE
from vsekit.utils.io import cache_root

CONFIG_FORMAT = 2
# the bound on the tokens of any one caption (text.max_tokens): captions of the field are 10 to 50 tokens long
DEFAULT_MAX_TOKENS = 128
# the largest train/eval batch: beyond it a typo (batch_size=100000000) would allocate tens of gigabytes
MAX_BATCH_SIZE = 1 << 16
# numpy seeds are 32-bit
MAX_SEED = 2**32


class Section(BaseModel):
    # allow_inf_nan=False: every float of every section is finite (a learning rate of inf or a margin of nan
    # is a config error naming its key, not a run of NaN losses)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


MAX_TOKENS_LIMIT = 1 << 20


class TextConfig(Section):
    min_count: int = Field(4, ge=1, description="words seen fewer times in the training captions are <unk>")
    # every caption, in training, encoding and search, is cut to this many tokens (with a warning): a caption
    # of a million words would otherwise cost seconds and gigabytes. text.max_len, when set, is the tighter cut
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=1, le=MAX_TOKENS_LIMIT,
                            description="bound on the tokens of any caption; longer ones are cut, with a warning")
    max_len: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT, description="captions are cut to this many words")

    @model_validator(mode="before")
    @classmethod
    def _bound_follows_max_len(cls, data: Any) -> Any:
        """A config that sets a ``max_len`` above the default bound and no ``max_tokens`` (one written before
        ``max_tokens`` existed) raises the bound to it."""
        if isinstance(data, dict) and "max_tokens" not in data:
            max_len = data.get("max_len")
            if isinstance(max_len, int) and not isinstance(max_len, bool) and \
                    DEFAULT_MAX_TOKENS < max_len <= MAX_TOKENS_LIMIT:
                return {**data, "max_tokens": max_len}
        return data

    @field_validator("max_len")
    @classmethod
    def _max_len_within_bound(cls, v: int | None, info: ValidationInfo) -> int | None:
        bound = info.data.get("max_tokens")
        if v is not None and bound is not None and v > bound:
            raise ValueError(f"{v} words is more than text.max_tokens ({bound}), the bound on every caption; "
                             f"raise text.max_tokens to {v} too")
        return v


class ModelConfig(Section):
    embed_size: int = Field(1024, ge=1)
    # a registered similarity function (cosine | order | euclidean), or a similarity network with its options,
    # e.g. {name: sgr, sim_dim: 256, sgr_step: 3} (vsekit.models.similarity)
    similarity: Annotated[str | dict[str, Any], Component(SIMILARITY_NETWORKS, check=check_similarity_spec,
                                                       kind="similarity function or network")] = "cosine"
    use_abs: bool = False  # abs() of both embeddings (order embeddings)
    image_encoder: Annotated[dict[str, Any], Component(IMAGE_ENCODERS)] = Field(
        default_factory=lambda: {"name": "precomp"})
    text_encoder: Annotated[dict[str, Any], Component(TEXT_ENCODERS)] = Field(default_factory=lambda: {"name": "gru"})


class InstanceConfig(Section):
    image_weight: float = 0.0
    text_weight: float = 0.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)  # before the shared classifier
    bias: bool = True
    num_classes: int | None = Field(None, ge=2)  # null: the number of training images
    init_std: float = Field(0.001, gt=0.0)


def _number(typ: type, least: float = float("-inf")):
    """The check of an owner's key holding a number (``weight``, ``pool_size``): converted to ``typ``."""

    def check(value: Any, where: str) -> Any:
        try:
            value = typ(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(inf)
            kind = "an integer" if typ is int else "a number"
            raise ConfigError(f"{where}: expected {kind}, got {value!r}") from None
        if value < least:
            raise ConfigError(f"{where}: must be >= {least}, got {value}")
        return value

    return check


def _term_optim(value: Any, where: str) -> dict[str, Any] | None:
    """A term's ``optim``: options over the stage's optimizer for the term's own parts (None: the stage's)."""
    if isinstance(value, dict):
        validate_section(OptimConfig, {**OptimConfig().model_dump(), **value}, where)
    elif value is not None:
        raise ConfigError(f"{where}: expected a mapping of optimizer options, got {value!r}")
    return value


class LabelTermConfig(Section):
    """ACMR's label classifier shared by both modalities (needs class labels in the data)."""

    weight: float = 0.0
    num_classes: int | None = Field(None, ge=2)  # null: from the training labels


class AdversarialConfig(Section):
    """ACMR's modality discriminator behind gradient reversal (``vsekit.losses.adversarial``)."""

    weight: float = 0.0
    hidden: list[int] | None = None  # null: [d/2, d/4] as ACMR
    activation: Literal["none", "tanh", "relu"] = "none"
    schedule: Literal["dann", "constant"] = "dann"  # λ_p = 2/(1+exp(-γp)) - 1, or a constant λ
    gamma: float = Field(10.0, gt=0.0)
    lam: float = Field(1.0, ge=0.0)  # the constant λ, or the scale of the DANN schedule
    progress: Literal["epoch", "step"] = "epoch"  # p = epoch / epochs (the ACMR demo) or per step (DANN)


class TripletConfig(Section):
    """ACMR's label-based triplet constraints, hardest different-label negatives in the batch."""

    weight: float = 0.0
    margin: float = Field(0.1, ge=0.0)
    distance: Literal["sq_euclidean", "cosine"] = "sq_euclidean"
    mine_in: Literal["embedding", "input"] = "embedding"


class EmbeddingTermConfig(Section):
    """A ranking loss on the cosine similarities of the embeddings, beside the ``loss`` on the model's own scores.
    For a model with a similarity network (SGRAF), whose loss trains only the network's scores, this is what
    trains the pooled embeddings that a search index shortlists with (``vsekit.index``)."""

    weight: float = 0.0
    loss: Annotated[dict[str, Any], Component(LOSSES)] = Field(
        default_factory=lambda: {"name": "hinge", "margin": 0.2, "reduction": "sum"})


#: the terms with a section of their own (``objective.<name>``), in the order the objective adds them up
BUILTIN_TERMS = ("instance", "mined", "label", "triplet", "embedding", "adversarial")
_WEIGHT_KEYS = ("weight", "image_weight", "text_weight")


class ObjectiveConfig(Section):
    """The training objective (``vsekit.train.objective``): ``loss_weight`` x the ``loss`` section plus the
    weighted terms. Every term is an ``OBJECTIVE_TERMS`` entry (:meth:`term_sections` lists them all); the
    built-in ones keep a typed section of their own (``objective.instance``, ...), the others sit under
    ``terms``."""

    loss_weight: float = 1.0  # the in-batch ranking loss of the ``loss`` section
    instance: InstanceConfig = Field(default_factory=InstanceConfig)
    label: LabelTermConfig = Field(default_factory=LabelTermConfig)
    adversarial: AdversarialConfig = Field(default_factory=AdversarialConfig)
    triplet: TripletConfig = Field(default_factory=TripletConfig)
    embedding: EmbeddingTermConfig = Field(default_factory=EmbeddingTermConfig)
    # ranking with one mined hard-negative caption per anchor: ``name`` is the one such loss (dualpath_rank);
    # its options beside ``weight`` and ``pool_size``, the number of random training captions scored per step
    mined: Annotated[dict[str, Any], Component(
        OBJECTIVE_TERMS, entry="mined", kind="mined-negative loss",
        own={"weight": _number(float), "pool_size": _number(int, least=1)})] = Field(
        default_factory=lambda: {"name": MINED_LOSS, "weight": 0.0, "pool_size": MINED_POOL_SIZE})
    # registered terms (``vsekit.losses.terms.OBJECTIVE_TERMS``) by name: {weight, optim, the term's options}
    terms: Annotated[dict[str, dict[str, Any]], Component(
        OBJECTIVE_TERMS, keyed=True, own={"weight": _number(float), "optim": _term_optim})] = Field(
        default_factory=dict)

    @field_validator("terms")
    @classmethod
    def _not_built_in(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in v:
            if name in BUILTIN_TERMS:
                raise ValueError(f"{name!r} is a built-in term with a section of its own: set objective.{name}")
        return v

    def term_sections(self) -> dict[str, dict[str, Any]]:
        """Every term's section by name (weights included): the built-in terms first, then ``terms``."""
        own = {n: getattr(self, n) for n in BUILTIN_TERMS}
        return {**{n: s if isinstance(s, dict) else s.model_dump() for n, s in own.items()}, **self.terms}

    def term_weight(self, name: str) -> float:
        """The weight of term ``name`` (the instance term's: the first non-zero of its two); 0 when unset."""
        section = self.term_sections().get(name) or {}
        return next((float(section[k]) for k in _WEIGHT_KEYS if section.get(k)), 0.0)

    def weights(self) -> dict[str, float]:
        """The weight of every value the objective adds up (the instance term has one per path)."""
        out = {"loss": float(self.loss_weight)}
        for name, section in self.term_sections().items():
            if name == "instance":
                out.update(instance_image=float(section["image_weight"]), instance_text=float(section["text_weight"]))
            else:
                out[name] = float(section.get("weight", 0.0) or 0.0)
        return out


class SemanticsConfig(Section):
    """LSA caption vectors of LSEH (``vsekit.semantics``)."""

    n_components: int = Field(DEFAULT_N_COMPONENTS, ge=1)
    n_iter: int | None = Field(None, ge=1)  # randomized-SVD power iterations (null: vsekit's default)
    random_state: int = Field(DEFAULT_RANDOM_STATE, ge=0, lt=MAX_SEED)  # a NumPy seed: 32 bits
    cache_dir: str | None = None  # default: $VSEKIT_CACHE/semantics

    def lsa_params(self) -> dict[str, int]:
        """The keyword arguments of the LSA fit (``n_iter`` only when set: else the library's default)."""
        out = {"n_components": self.n_components, "random_state": self.random_state}
        return {**out, "n_iter": self.n_iter} if self.n_iter is not None else out

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else cache_root() / "semantics"


Beta = Annotated[float, Field(ge=0.0, lt=1.0)]  # an Adam moment decay


class OptimConfig(Section):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    betas: tuple[Beta, Beta] = (0.9, 0.999)  # adam, adamw (ACMR: beta1 = 0.5)
    momentum: float = Field(0.9, ge=0.0)  # sgd
    nesterov: bool = True  # sgd
    grad_clip: float | None = Field(2.0, gt=0.0)  # max global gradient norm; null: no clipping
    lr_decay_every: int | None = Field(15, ge=1)  # lr * factor ** (epoch // n) (VSE++ / LSEH)
    lr_decay_factor: float = Field(0.1, gt=0.0)
    lr_milestones: list[int] | None = None  # decay after these epochs instead (set lr_decay_every: null)
    lr_mult: dict[str, Annotated[float, Field(ge=0.0)]] = Field(default_factory=dict)  # name prefix -> lr multiplier

    @field_validator("name", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one_schedule(self) -> OptimConfig:
        if self.lr_decay_every and self.lr_milestones:
            raise ValueError("set lr_decay_every or lr_milestones, not both (set the other to null)")
        return self


class CollapseConfig(Section):
    """``train.collapse``: detection of collapsed embeddings and what to do (``vsekit.train.monitor``)."""

    action: Literal["off", "warn", "fallback", "stop"] = "fallback"
    patience: int = Field(50, ge=1)  # consecutive collapsed steps before acting
    loss_tol: float = Field(0.02, ge=0.0)  # collapsed: |loss - collapse value| <= loss_tol * collapse value,
    max_mean_cos: float = Field(0.98, le=1.0)  # or a modality's mean pairwise cosine above this
    lr_factor: float = Field(0.1, gt=0.0, le=1.0)  # fallback: lr multiplied by this
    fallback_epochs: int = Field(1, ge=0)  # fallback: sum of hinges for the rest of the epoch and this many
    max_fallbacks: int = Field(3, ge=0)  # after this many fallbacks, stop instead

    @field_validator("action", mode="before")
    @classmethod
    def _yaml_off(cls, v: Any) -> Any:
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


class EncoderFinetune(Section):
    finetune: bool


class StageModel(Section):
    image_encoder: EncoderFinetune | None = None
    text_encoder: EncoderFinetune | None = None


class StageTrain(Section):
    freeze: list[str] = Field(default_factory=list)


class StageConfig(Section):
    """One entry of ``train.stages``: its epochs and what it overrides for them (``vsekit.train.stages``).

    ``optim`` and ``objective`` are partial sections merged into the run's; the merged config of every
    stage is validated as a whole when the run is resolved.
    """

    name: str | None = None
    epochs: int = Field(ge=1)
    optim: dict[str, Any] = Field(default_factory=dict)
    objective: dict[str, Any] = Field(default_factory=dict)
    train: StageTrain | None = None
    model: StageModel | None = None

    def overrides(self) -> dict[str, Any]:
        """The overrides as a partial config (only what the stage sets)."""
        out = self.model_dump(exclude_unset=True, exclude={"name", "epochs"}, exclude_none=True)
        return {k: v for k, v in out.items() if v != {}}


class TrainConfig(Section):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(128, ge=1, le=MAX_BATCH_SIZE)  # the global batch; more than the data: a warning
    amp: bool = True  # mixed precision on CUDA (float16 with a gradient scaler)
    # bfloat16 autocast on a CPU: opt-in; ~1.7-2x faster steps where the CPU has bf16 instructions (AVX512-BF16,
    # AMX), with the effect on rsum measured in benchmarks/README.md; validation and evaluation stay float32
    cpu_bf16: bool = False
    log_every: int = Field(10, ge=1)  # steps between metrics.jsonl lines
    checkpoint_every_steps: int = Field(0, ge=0)  # also save last.pt every N steps (0: at epoch ends only)
    max_steps_per_epoch: int | None = Field(None, ge=1)
    init_from: str | None = None  # start from this checkpoint's weights (e.g. VSE++ FT stage 2)
    progress: bool = True  # a live bar on a terminal, plain lines in a file or pipe
    freeze: list[str] = Field(default_factory=list)  # parameter/module name prefixes kept frozen
    stages: list[StageConfig] = Field(default_factory=list)
    max_minutes: float | None = Field(None, gt=0.0)  # wall-clock budget: stop cleanly, save, validate
    # a step whose loss or gradient is not finite is skipped and reported; this many in a row stop the run
    max_nonfinite_steps: int = Field(10, ge=1)
    collapse: CollapseConfig = Field(default_factory=CollapseConfig)

    @model_validator(mode="after")
    def _stages_cover_epochs(self) -> TrainConfig:
        total = sum(s.epochs for s in self.stages)
        if self.stages and self.epochs > total:
            raise ValueError(f"train.epochs ({self.epochs}) is more than the stages' epochs together ({total}); "
                             f"set train.epochs to {total} or lengthen a stage")
        return self


class EvalConfig(Section):
    # validation protocol (`vsekit eval --protocol` for tests): exact pairs (full, 1k5fold) or label relevance
    # (eccv: only when validating on COCO's 5K test images, which the field does not do)
    protocol: Literal[tuple(EVAL_PROTOCOLS)] = "full"  # the registry's names
    # protocol semantic: LSA-cosine thresholds at which a caption counts as a plausible match; the
    # select_threshold's rsum picks best.pt
    thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.6, 0.7, 0.8, 0.9])
    select_threshold: float = 0.7

    @property
    def select_metric(self) -> str:
        """The validation metric that picks best.pt: rsum; the mean of the two mAPs for label_map; the mean
        ECCV Caption mAP@R for eccv; the semantic rsum at ``select_threshold`` for semantic."""
        return {"label_map": "map_avg", "eccv": "eccv_map_at_r",
                "semantic": f"sem@{self.select_threshold:g}_rsum"}.get(self.protocol, "rsum")

    @model_validator(mode="after")
    def _select_threshold_is_evaluated(self) -> EvalConfig:
        if self.protocol == "semantic" and self.select_threshold not in self.thresholds:
            raise ValueError(f"select_threshold {self.select_threshold} is not one of thresholds {self.thresholds}")
        return self
    chunk_size: int = Field(1024, ge=1, le=MAX_BATCH_SIZE)
    batch_size: int = Field(256, ge=1, le=MAX_BATCH_SIZE)


class RunConfig(Section):
    """A resolved recipe. ``to_dict()`` is what is saved as ``config.yaml`` and inside every checkpoint."""

    config_format: int = CONFIG_FORMAT
    name: str = "run"
    seed: int = Field(0, ge=0, lt=MAX_SEED)  # seeds Python, NumPy (32-bit) and torch
    device: str = "auto"
    output_dir: str = "runs/${name}"
    data: Annotated[SerializeAsAny[DataConfig], Component(SOURCES, key="format", check=data_config,
                                                          own=dict.fromkeys(DataConfig.model_fields))] = Field(
        default_factory=DemoData)
    transform: TransformConfig = Field(default_factory=TransformConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    loss: Annotated[dict[str, Any], Component(LOSSES)] = Field(default_factory=lambda: {"name": "hinge"})
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    semantics: SemanticsConfig = Field(default_factory=SemanticsConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
