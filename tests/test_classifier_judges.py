"""ImageNet and generic image-classifier judges, through their real loading code on a tiny ResNet."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from pytest_unlearnatk import UnlearnAtkError, get_judge
from pytest_unlearnatk.judges.hf_classifier import decide


@pytest.fixture(scope="module")
def tiny_resnet_dir(tmp_path_factory):
    """A random-weight 1000-class ResNet with ImageNet-style labels, saved like microsoft/resnet-50."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetForImageClassification

    labels = {i: f"class {i}" for i in range(1000)}
    labels.update({497: "church, church building", 569: "garbage truck, dustcart", 701: "parachute, chute", 0: "tench, Tinca tinca"})
    torch.manual_seed(0)
    model = ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=1000, id2label=labels,
                     label2id={v: k for k, v in labels.items()})
    )
    directory = tmp_path_factory.mktemp("resnet")
    model.save_pretrained(directory)
    ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=1.0).save_pretrained(directory)
    return directory


def test_rule_on_known_logits():
    logits = torch.full((1000,), -5.0)
    logits[497], logits[3] = 4.0, 3.0
    assert decide(logits, 497, top_k=1).hit
    assert not decide(logits, 3, top_k=1).hit
    assert decide(logits, 3, top_k=2).hit  # style judges: in the top k
    assert decide(logits, 497, 1).score > 0.5


def test_imagenet_judge_loads_maps_names_and_judges(tiny_resnet_dir):
    judge = get_judge({"name": "imagenet", "label": "garbage truck", "model": str(tiny_resnet_dir)})
    assert judge.settings["class_id"] == 569
    by_label_name = get_judge("imagenet", label="dustcart", model=str(tiny_resnet_dir))
    assert by_label_name.class_id == 569
    images = [Image.new("RGB", (96, 80), colour) for colour in ("red", "white")]
    verdicts = judge(images)
    # the decision equals the top-1 rule applied to the model's own logits for the same images
    inputs = judge.processor(images=images, return_tensors="pt")
    top1 = judge.classifier(**inputs).logits.argmax(-1).tolist()
    assert [v.hit for v in verdicts] == [t == 569 for t in top1]


def test_style_judge_top_k(tiny_resnet_dir):
    judge = get_judge("hf_classifier", model=str(tiny_resnet_dir), label=3, top_k=1000)
    assert all(v.hit for v in judge([Image.new("RGB", (64, 64), "blue")]))


def test_missing_classifier_and_unknown_label_are_explained(tiny_resnet_dir, tmp_path):
    with pytest.raises(UnlearnAtkError, match="could not load the image classifier 'microsoft/resnet-50'.*pass its local directory"):
        get_judge("imagenet", label="church")  # offline here: HF_HUB_OFFLINE=1
    with pytest.raises(UnlearnAtkError, match="label 'unicorn' is not one of the class names"):
        get_judge("imagenet", label="unicorn", model=str(tiny_resnet_dir))
