"""The extended protocols through the shared evaluator, the CLI and validation: semantic recall and ECCV."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _configs import small_recipe_config

from vsekit.cli import main
from vsekit.config import resolve_config

RECIPES = Path(__file__).resolve().parents[1] / "vsekit" / "configs"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache):
    from vsekit.train.trainer import Trainer

    out = tmp_path_factory.mktemp("sem") / "run"
    cfg = small_recipe_config(
        "demo_vsepp", out, "data.num_images=200", "data.val_max_images=20", "train.epochs=1",
        "train.max_steps_per_epoch=3", "train.batch_size=16", "semantics.n_components=16", "eval.protocol=semantic",
        "eval.thresholds=[0.5, 0.8]", "eval.select_threshold=0.8")
    result = Trainer(cfg).fit()
    return out, result


def test_semantic_protocol_validates_a_run_and_picks_best_pt(tiny_run):
    out, result = tiny_run
    assert result["select_metric"] == "sem@0.8_rsum"
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in x][0]
    assert val["sem@0.8_rsum"] == result["best_rsum"]
    # plausible matches only add hits: each threshold's recall is at least the exact pairs'
    for d in ("i2t", "t2i"):
        assert val[f"sem@0.5_{d}_r10"] >= val[f"sem@0.8_{d}_r10"] >= val[f"sem@exact_{d}_r10"]
    assert val["sem@exact_rsum"] == pytest.approx(val["rsum"])


def test_semantic_protocol_from_the_cli(tiny_run, tmp_path, capsys):
    out, _ = tiny_run
    assert main(["eval", str(out), "--protocol", "semantic", "--out", str(tmp_path / "s.json")]) == 0
    printed = capsys.readouterr().out
    assert "LSA cos >= 0.5" in printed and "mAP@R" in printed
    saved = json.loads((tmp_path / "s.json").read_text())["metrics"]
    assert {"sem@0.5_i2t_map_at_r", "sem@0.8_t2i_rprec", "rsum", "curve"} <= set(saved)


def test_eccv_protocol_refuses_a_corpus_that_is_not_coco_5k(tiny_run, capsys):
    out, _ = tiny_run
    assert main(["eval", str(out), "--protocol", "eccv"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the 5,000 images of the Karpathy COCO test split" in err


def test_select_threshold_must_be_evaluated():
    from vsekit.config import ConfigError

    with pytest.raises(ConfigError, match="select_threshold 0.7 is not one of thresholds"):
        resolve_config(None, ["eval.protocol=semantic", "eval.thresholds=[0.5]"])


def test_protocol_names_come_from_one_registry():
    """The CLI's choices and eval.protocol's values are the registry's names."""
    from vsekit.cli import build_parser
    from vsekit.config.schema import EvalConfig
    from vsekit.eval import EVAL_PROTOCOLS

    assert list(EVAL_PROTOCOLS) == ["full", "1k5fold", "label_map", "eccv", "semantic"]
    for name in EVAL_PROTOCOLS:
        assert EvalConfig(protocol=name).protocol == name
        assert build_parser().parse_args(["eval", "ckpt.pt", "--protocol", name]).protocol == name
