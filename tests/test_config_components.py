"""Component sections are declared once, in the schema: validation and merging find them by walking it, every
typo at any depth fails when the config is resolved, and docs/config.md lists them from the same declaration."""

from __future__ import annotations

from pathlib import Path

import pytest

from vsekit.cli import RECIPES, main
from vsekit.config import ConfigError, RunConfig, deep_merge, resolve_config
from vsekit.registry import component_of, model_of

DOCS = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def component_sections(model=RunConfig, where: str = "", when: str = "", seen: frozenset = frozenset()):
    """Every component section of the schema, found by walking it: (dotted key, component, the choice it exists
    for, e.g. ``model.image_encoder.name: two_level``), also those in a component's options."""
    for name, info in model.model_fields.items():
        key = f"{where}.{name}" if where else name
        comp = component_of(info)
        if comp is not None:
            yield key, comp, when
            entries = [] if comp.check is not None else [comp.entry] if comp.entry else comp.registry.names()
            for entry in (e for e in entries if (comp.registry, e) not in seen):  # two_level may hold two_level
                yield from component_sections(comp.registry.options_model(entry), f"{key}.{entry}" if comp.keyed
                                              else key, when if comp.keyed else f"{key}.{comp.key}: {entry}",
                                              seen | {(comp.registry, entry)})
        elif (sub := model_of(info.annotation)) is not None:
            yield from component_sections(sub, key, when, seen)


def component_table() -> str:
    """docs/config.md's table of the component sections, made from the schema."""
    rows = ["| section | names a registered | chosen by | exists when |", "|---|---|---|---|"]
    for key, comp, when in component_sections():
        chosen = "each key" if comp.keyed else f"`{comp.key}`"
        rows.append(f"| `{key}` | {comp.kind or comp.registry.kind} | {chosen} | {f'`{when}`' if when else ''} |")
    return "\n".join(rows)


@pytest.mark.parametrize("recipe, override, key", [
    ("demo_vsepp", "loss.marign=0.1", "loss.margin"),  # depth 1: a section of the run
    ("demo_vsepp", "model.image_encoder.widht=4", "model.image_encoder.width"),  # depth 2
    ("sgr_demo", "objective.embedding.loss.marign=0.1", "objective.embedding.loss.margin"),  # depth 3
    ("gxn_demo", "objective.terms.level_ranking.loss.marign=0.1",  # a component inside a component's options
     "objective.terms.level_ranking.loss.margin"),
    ("gxn_demo", "model.text_encoder.encoder.word_dimm=8", "model.text_encoder.encoder.word_dim"),
])
def test_a_typo_at_any_depth_fails_in_resolve_config_naming_the_full_key(recipe, override, key):
    typo = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        resolve_config(RECIPES / f"{recipe}.yaml", [override])
    assert str(err.value) == f"{typo}: unknown key; did you mean {key}?"


def test_a_typo_in_a_stages_nested_component_names_the_stage():
    stage = "{epochs: 5, objective: {terms: {level_ranking: {loss: {marign: 1}}}}}"
    with pytest.raises(ConfigError, match=r"^train.stages\[0\].objective.terms.level_ranking.loss.marign: unknown key; "
                                          r"did you mean train.stages\[0\].objective.terms.level_ranking.loss.margin\?"):
        resolve_config(RECIPES / "gxn_demo.yaml", ["train.epochs=5", f"train.stages=[{stage}]"])


def test_a_nested_typo_is_reported_before_any_data_is_read(tmp_path, capsys):
    """The data set does not exist: the run fails on the typo, in one line, not on the missing data."""
    code = main(["train", str(RECIPES / "gxn_demo.yaml"), "data.format=precomp", f"data.path={tmp_path / 'none'}",
                 "objective.terms.level_ranking.loss.marign=0.1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("vsekit: error: objective.terms.level_ranking.loss.marign: unknown key")


def test_merging_finds_nested_components_by_walking_the_schema():
    """A two-level encoder's inner encoder is a component: naming another one drops the old one's options."""
    base = {"model": {"image_encoder": {"name": "two_level", "encoder": {"name": "cnn", "backbone": "resnet18"}}}}
    merged = deep_merge(base, {"model": {"image_encoder": {"encoder": {"name": "precomp"}}}})
    assert merged["model"]["image_encoder"] == {"name": "two_level", "encoder": {"name": "precomp"}}
    cfg = resolve_config(RECIPES / "gxn_demo.yaml", ["model.text_encoder.encoder.name=bow"])
    assert cfg.model.text_encoder["encoder"] == {"name": "bow"}


def test_every_component_section_is_found_by_the_walk():
    keys = {key for key, _, _ in component_sections()}
    assert {"data", "model.similarity", "model.image_encoder", "model.text_encoder", "loss", "objective.mined",
            "objective.embedding.loss", "objective.terms", "objective.terms.level_ranking.loss",
            "model.image_encoder.encoder", "model.text_encoder.encoder"} <= keys


def test_docs_list_the_component_sections_from_the_schema():
    text = DOCS.read_text(encoding="utf-8")
    listed = text.split("<!-- component sections: begin -->\n")[1].split("\n<!-- component sections: end -->")[0]
    assert listed == component_table(), "docs/config.md: paste this test's component_table() between the markers"
