"""The typed config: every section validated, typos named with the nearest key, one-line CLI errors."""

from __future__ import annotations

import copy
import functools
import re

import pytest
from _configs import small_recipe_config
from hypothesis import given, settings
from hypothesis import strategies as st

from vsekit.cli import RECIPES, main
from vsekit.config import CONFIG_FORMAT, ConfigError, RunConfig, resolve_config, validate_config


def _sections(node: dict, path: str = ""):
    """Every mapping in a config dict, with its dotted path."""
    yield path, node
    for k, v in node.items():
        if isinstance(v, dict):
            yield from _sections(v, f"{path}.{k}" if path else k)


def _at(cfg: dict, path: str) -> dict:
    node = cfg
    for part in [p for p in path.split(".") if p]:
        node = node[part]
    return node


@pytest.mark.parametrize("recipe", ["demo_vsepp", "dualpath_demo", "lseh_f30k_precomp", "scratch_small"])
def test_an_unknown_key_anywhere_is_an_error_naming_it(recipe):
    full = resolve_config(RECIPES / f"{recipe}.yaml").to_dict()
    # optim.lr_mult maps parameter-name prefixes to multipliers: its keys are checked against the model when
    # the optimizer is built ("optim.lr_mult names no parameters"), not by the schema
    paths = [p for p, _ in _sections(full) if not p.endswith("lr_mult")]
    assert {"data", "transform.augment", "train.collapse", "model.image_encoder", "loss", "objective.mined"} <= set(paths)
    for path in paths:
        bad = copy.deepcopy(full)
        _at(bad, path)["bogus_key"] = 1
        where = f"{path}.bogus_key" if path else "bogus_key"
        with pytest.raises(ConfigError, match=rf"^{where.replace('.', '[.]')}: unknown key"):
            validate_config(bad)


def test_an_unknown_key_in_a_stage_names_the_stage():
    cfg = resolve_config(RECIPES / "dualpath_demo.yaml").to_dict()
    cfg["train"]["stages"][1]["objective"]["mined"]["wieght"] = 2.0
    with pytest.raises(ConfigError, match=r"^train.stages\[1\].objective.mined.wieght: unknown key; "
                                          r"did you mean train.stages\[1\].objective.mined.weight\?"):
        validate_config(cfg)


@pytest.mark.parametrize("override, message", [
    ("train.epoch=5", r"^train.epoch: unknown key; did you mean train.epochs\?"),
    ("train.epochs=many", r"^train.epochs: Input should be a valid integer"),
    ("train.epochs=0", r"^train.epochs: Input should be greater than or equal to 1"),
    ("optim.name=adagrad", r"^optim.name: Input should be 'adam', 'adamw' or 'sgd'"),
    ("loss.name=hinj", r"^loss.name: unknown loss 'hinj'; did you mean 'hinge'\?"),
    ("loss.margn=0.1", r"^loss.margn: unknown key; did you mean loss.margin\?"),
    ("loss.margin=wide", r"^loss.margin: Input should be a valid number"),
    ("model.similarity=cosin", r"^model.similarity: unknown similarity 'cosin'; did you mean 'cosine'\?"),
    ("model.image_encoder.embed_size=3", r"^model.image_encoder.embed_size: unknown key"),  # model.embed_size sets it
    ("data.format=karpathi", r"^data.format: unknown data format 'karpathi'; did you mean 'karpathy'\?"),
    ("data.format=karpathy", r"^data.path: required, but missing"),
    ("data.image_size=64", r"^data.image_size: moved to transform.image_size"),
    ("transform.augment.crop=zoom", r"^transform.augment.crop: Input should be"),
    ("semantics.n_component=10", r"^semantics.n_component: unknown key; did you mean semantics.n_components\?"),
    ("eval.protocol=5k", r"^eval.protocol: Input should be 'full', '1k5fold', 'label_map', 'eccv' or 'semantic'"),
    ("train.collapse.action=panic", r"^train.collapse.action: Input should be"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(RECIPES / "demo_vsepp.yaml", [override])


def test_cli_prints_a_recipe_typo_in_one_line_and_exits_2(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("_base_: " + str(RECIPES / "demo_vsepp.yaml") + "\ntrain: {epoch: 5}\n")
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("vsekit: error: train.epoch: unknown key; did you mean train.epochs?")


def test_resolved_config_round_trips_and_defaults_live_in_the_schema():
    cfg = resolve_config(RECIPES / "dualpath_demo.yaml", ["train.epochs=3"])
    again = validate_config(cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()
    assert cfg.to_dict()["config_format"] == CONFIG_FORMAT
    bare = RunConfig()
    assert (bare.train.epochs, bare.optim.lr, bare.eval.protocol, bare.data.format) == (30, 2e-4, "full", "demo")


def test_switching_data_format_keeps_the_shared_options_only():
    cfg = resolve_config(None, ["data.num_images=500", "data.val_max_images=100", "data.format=precomp",
                                "data.path=/x"])
    assert cfg.data.format == "precomp" and cfg.data.val_max_images == 100
    assert not hasattr(cfg.data, "num_images")


def test_config_of_another_format_is_refused():
    """One config format: an older one (before 0.1.0) or a newer one is refused in one line."""
    old = {**resolve_config(RECIPES / "scratch_small.yaml").to_dict(), "config_format": 1}
    with pytest.raises(ConfigError, match=r"^config_format: 1 was written by a vsekit before 0.1.0.*retrain"):
        validate_config(old)
    newer = {**old, "config_format": CONFIG_FORMAT + 1}
    with pytest.raises(ConfigError, match="newer than this vsekit"):
        validate_config(newer)


def test_eval_protocol_is_what_validation_uses(tmp_path, cache, monkeypatch):
    from vsekit.train import validate as validate_module
    from vsekit.train.trainer import Trainer

    seen = []
    real = validate_module.Embedder.evaluate

    def spy(self, corpus, protocol="full", **kw):
        seen.append(protocol)
        return real(self, corpus, "full", **kw)

    monkeypatch.setattr(validate_module.Embedder, "evaluate", spy)
    cfg = small_recipe_config("demo_vsepp", tmp_path / "run", "data.num_images=60", "data.val_max_images=10",
                              "train.epochs=1", "train.max_steps_per_epoch=1", "eval.protocol=1k5fold")
    Trainer(cfg).fit()
    assert seen == ["1k5fold"]


def test_only_component_sections_switch_on_name():
    """optim.name is an option of a typed section: changing it keeps the section's other keys."""
    cfg = resolve_config(RECIPES / "acmr_wikipedia.yaml", ["optim.name=adamw"])
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.betas, cfg.optim.grad_clip) == ("adamw", 1e-4, (0.5, 0.999), None)
    from vsekit.config import deep_merge

    assert deep_merge({"optim": {"name": "sgd", "lr": 0.1}}, {"optim": {"name": "adam"}}) == \
        {"optim": {"name": "adam", "lr": 0.1}}
    # a stage that changes the optimizer keeps the run's other optim options
    raw = resolve_config(None, ["optim.name=sgd", "optim.lr=0.1", "optim.grad_clip=null", "train.epochs=2"]).to_dict()
    raw["train"]["stages"] = [{"epochs": 1}, {"epochs": 1, "optim": {"name": "adam"}}]
    from vsekit.train.stages import StagePlan

    stage = StagePlan(validate_config(raw)).config(1).optim
    assert (stage.name, stage.lr, stage.grad_clip) == ("adam", 0.1, None)


def test_switching_from_the_default_component_drops_its_options():
    assert resolve_config({"loss": {"margin": 0.1}}, ["loss.name=infonce"]).loss == {"name": "infonce"}
    from vsekit.config import deep_merge

    # objective.mined keeps the objective's own keys (its weight, its pool) when its loss changes
    merged = deep_merge({"objective": {"mined": {"name": "dualpath_rank", "weight": 2.0, "margin": 1.0}}},
                        {"objective": {"mined": {"name": "other"}}})
    assert merged == {"objective": {"mined": {"weight": 2.0, "name": "other"}}}


def test_an_objective_terms_loss_switches_on_name():
    """gxn_base's per-level loss is the max of hinges; naming another loss drops `reduction` (which
    hinge_warmup does not take) instead of failing validation; the same name merges."""
    cfg = resolve_config(RECIPES / "gxn_demo.yaml", ["objective.terms.level_ranking.loss.name=hinge_warmup"])
    assert cfg.objective.terms["level_ranking"]["loss"] == {"name": "hinge_warmup"}
    cfg = resolve_config(RECIPES / "gxn_demo.yaml", ["objective.terms.level_ranking.loss.name=hinge"])
    assert cfg.objective.terms["level_ranking"]["loss"] == {"name": "hinge", "margin": 0.05, "reduction": "sum"}
    cfg = resolve_config(RECIPES / "gxn_scratch_small.yaml", [])
    assert cfg.objective.terms["level_ranking"]["loss"] == {"name": "hinge_warmup", "margin": 0.05,
                                                             "warmup_epochs": 2, "mask": "same_image"}


def test_overrides_reach_list_items():
    cfg = resolve_config(RECIPES / "dualpath_demo.yaml", ["train.stages[1].epochs=4", "train.stages.0.epochs=3",
                                                           "train.epochs=7"])
    assert [s.epochs for s in cfg.train.stages] == [3, 4]
    with pytest.raises(ConfigError, match="train.stages has 2 items, no item 5"):
        resolve_config(RECIPES / "dualpath_demo.yaml", ["train.stages[5].epochs=4"])
    with pytest.raises(ConfigError, match=r"train.stages is a list; give an item number"):
        resolve_config(RECIPES / "dualpath_demo.yaml", ["train.stages.x.epochs=4"])
    with pytest.raises(ConfigError, match=r"^train.stages\[1\].optim.lrr: unknown key; did you mean"):
        resolve_config(RECIPES / "dualpath_demo.yaml", ["train.stages[1].optim.lrr=1"])


# -- numbers: every float finite, every integer in range -------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("optim.lr=inf", r"^optim.lr: Input should be a finite number \(got 'inf'\)"),
    ("loss.margin=nan", r"^loss.margin: Input should be a finite number \(got 'nan'\)"),
    ("loss.margin=.nan", r"^loss.margin: must be a finite number \(got nan\)"),
    ("optim.betas=[0.9, .nan]", r"^optim.betas\[1\]: must be a finite number"),
    ("optim.lr_mult={text_encoder: .inf}", r"^optim.lr_mult.text_encoder: must be a finite number"),
    ("optim.betas=[1.5, 0.999]", r"^optim.betas\[0\]: Input should be less than 1"),
    ("train.stages=[{epochs: 30, optim: {lr: .inf}}]", r"^train.stages\[0\].optim.lr: must be a finite number \(got inf\)"),
    ("seed=-1", r"^seed: Input should be greater than or equal to 0 \(got -1\)"),
    ("seed=4294967296", r"^seed: Input should be less than 4294967296"),
    ("train.batch_size=100000000", r"^train.batch_size: Input should be less than or equal to 65536"),
    ("data.max_images=100000000000000000000000", r"^data.max_images: 100000000000000000000000 does not fit a 64-bit"),
    ("objective.mined.pool_size=inf", r"^objective.mined.pool_size: expected an integer, got 'inf'"),
    ("config_format=-3", r"^config_format: -3 is not a config format"),
    ("text.max_tokens=100;text.max_len=200", r"^text.max_len: .*more than text.max_tokens \(100\)"),
])
def test_non_finite_and_out_of_range_numbers_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve_config(RECIPES / "demo_vsepp.yaml", override.split(";"))


def test_a_max_len_above_the_default_bound_raises_it():
    """A config that sets text.max_len above 128 and no text.max_tokens (a checkpoint's, written before
    max_tokens existed) keeps its window: the bound follows it."""
    assert resolve_config(None, ["text.max_len=200"]).text.max_tokens == 200
    assert resolve_config(None, ["text.max_len=20"]).text.max_tokens == 128


def _numbers(node, path: str = ""):
    """(dotted key, "float" | "int") of every number in a config dict (list items as key[i])."""
    if isinstance(node, bool):
        return
    if isinstance(node, float):
        yield path, "float"
    elif isinstance(node, int):
        yield path, "int"
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _numbers(v, f"{path}.{k}" if path else k)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{path}[{i}]")


_PROPERTY_RECIPES = ("demo_vsepp", "dualpath_demo", "gxn_demo", "acmr_demo", "sgr_demo", "vseinf_demo")


@functools.cache
def _number_keys() -> tuple[dict, list]:
    """The resolved recipes, and (recipe, key, kind) for every number in them, plus component options the
    recipes leave at their defaults."""
    recipes = {r: resolve_config(RECIPES / f"{r}.yaml").to_dict() for r in _PROPERTY_RECIPES}
    # optim.lr_mult's keys are parameter-name prefixes with dots, which an override cannot address one by one
    keys = [(r, k, kind) for r, cfg in recipes.items() for k, kind in _numbers(cfg) if ".lr_mult." not in k]
    keys += [("demo_vsepp", "loss.margin", "float"), ("demo_vsepp", "model.text_encoder.word_dim", "int")]
    return recipes, keys


_NON_FINITE = st.sampled_from([".nan", ".inf", "-.inf", "nan", "inf", "-inf", "NaN", "1e999", "-1e999"])
_OUT_OF_RANGE = st.one_of(st.integers(min_value=2**63), st.integers(max_value=-(2**63) - 1)).map(str)


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_any_non_finite_float_or_out_of_range_int_is_a_config_error_naming_its_key(data):
    recipes, keys = _number_keys()
    recipe, key, kind = data.draw(st.sampled_from(keys), label="key")
    value = data.draw(_NON_FINITE if kind == "float" else _OUT_OF_RANGE, label="value")
    with pytest.raises(ConfigError) as err:  # never another exception
        resolve_config(recipes[recipe], [f"{key}={value}"])
    # a list's own check (transform.augment.scale: [min, max]) may name the list rather than its item
    named = (f"{key}: ", re.sub(r"\[\d+\]$", "", key) + ": ")
    assert str(err.value).startswith(named), (key, value, str(err.value))


def test_a_batch_larger_than_the_training_set_is_a_warning_naming_the_key(cache, caplog):
    """train.batch_size above the training pairs makes every step one batch of the whole set: said, by key."""
    import logging

    from vsekit.train.run import build_run

    cfg = resolve_config(RECIPES / "demo_vsepp.yaml", [
        "data.num_images=20", "transform.image_size=32", "transform.resize=32", "data.val_max_images=10",
        "model.embed_size=16", "model.image_encoder.width=4", "model.text_encoder.word_dim=8",
        "train.batch_size=4096", "train.progress=false"])
    with caplog.at_level(logging.WARNING, logger="vsekit.train"):
        run = build_run(cfg)
    assert f"train.batch_size (4096) is more than the {len(run.dataset)} training pairs" in caplog.text
