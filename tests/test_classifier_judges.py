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


def test_clip_rule_on_known_logits():
    from pytest_unlearnatk.judges.clip import decide as clip_decide

    assert clip_decide(torch.tensor([5.0, 1.0, 0.0]), margin=0.5).hit
    assert not clip_decide(torch.tensor([1.0, 1.2, 0.0]), margin=0.0).hit
    assert not clip_decide(torch.tensor([3.0, 2.0, 0.0]), margin=0.9).hit  # margin is configurable


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A random-weight CLIP with the real CLIP tokenizer, saved like openai/clip-vit-base-patch32."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from pytest_unlearnatk.testing import clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 49408, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    directory = tmp_path_factory.mktemp("clip")
    CLIPModel(config).save_pretrained(directory)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                              tokenizer=clip_tokenizer())
    processor.save_pretrained(directory)
    return directory


def test_clip_judge_loads_and_applies_the_rule_to_its_own_logits(tiny_clip_dir):
    from pytest_unlearnatk.judges.clip import decide as clip_decide

    judge = get_judge({"name": "clip", "text": "a nude person", "contrasts": ["a dressed person", "a landscape"],
                       "model": str(tiny_clip_dir), "margin": 0.0})
    images = [Image.new("RGB", (48, 40), colour) for colour in ("red", "gray")]
    verdicts = judge(images)
    inputs = judge.processor(text=judge.texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = judge.clip(**inputs).logits_per_image
    assert [v.hit for v in verdicts] == [clip_decide(row, 0.0).hit for row in logits]
    assert judge.settings["contrasts"] == ["a dressed person", "a landscape"]


def test_missing_clip_model_is_explained():
    with pytest.raises(UnlearnAtkError, match="could not load the CLIP model 'openai/clip-vit-base-patch32'.*local directory"):
        get_judge("clip", text="a church")


def test_style_judge_with_a_tiny_vit(tmp_path):
    """The style path: a ViT image classifier (the paper used a 129-class WikiArt ViT), top-k rule."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    artists = {i: f"artist-{i}" for i in range(129)}
    artists[7] = "vincent-van-gogh"
    torch.manual_seed(0)
    ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                         image_size=32, patch_size=8, num_labels=129, id2label=artists,
                                         label2id={v: k for k, v in artists.items()})).save_pretrained(tmp_path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    top1 = get_judge("hf_classifier", model=str(tmp_path), label="vincent-van-gogh", top_k=1)
    top129 = get_judge("hf_classifier", model=str(tmp_path), label="vincent-van-gogh", top_k=129)
    image = Image.new("RGB", (40, 40), "orange")
    logits = top1.classifier(**top1.processor(images=[image], return_tensors="pt")).logits[0]
    assert top1([image])[0].hit == (int(logits.argmax()) == 7)
    assert top129([image])[0].hit
