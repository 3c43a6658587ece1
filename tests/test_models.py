"""Loading pipelines: directories, weights files in every supported key layout, strict errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pytest_unlearnatk import UnlearnAtkError, load_pipeline
from pytest_unlearnatk import fingerprint as fp
from pytest_unlearnatk.models import select_device, select_dtype


def _unet_state(directory: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(directory / "unet").state_dict()


def _text_encoder_state(directory: Path) -> dict[str, torch.Tensor]:
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(directory / "text_encoder").state_dict()


def _same(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(value, state[key]) for key, value in module.state_dict().items())


def test_pipeline_directory_loads_with_a_stable_fingerprint(tiny_dir, tiny_model):
    again = load_pipeline(tiny_dir)
    assert again.fingerprint == tiny_model.fingerprint
    assert re.fullmatch(r"[0-9a-f]{64}", tiny_model.fingerprint)
    assert (tiny_model.device, tiny_model.dtype) == ("cpu", "float32")
    assert tiny_model.pipeline.safety_checker is None


def test_fingerprint_follows_content_and_is_cached(tmp_path, monkeypatch):
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"one")
    first = fp.file_sha256(weights)
    opened = []
    monkeypatch.setattr(fp, "open", lambda *a, **k: opened.append(a) or open(*a, **k), raising=False)
    assert fp.file_sha256(weights) == first
    assert opened == [], "an unchanged file must not be read again"
    weights.write_bytes(b"two")
    assert fp.file_sha256(weights) != first
    assert len(opened) == 1


def test_unet_safetensors_with_diffusers_keys_replaces_only_the_unet(tmp_path, tiny_dir, other_tiny_dir):
    other_unet = _unet_state(other_tiny_dir)
    save_file(other_unet, str(tmp_path / "unet.safetensors"))
    loaded = load_pipeline(tmp_path / "unet.safetensors", base=tiny_dir)
    assert loaded.component == "unet" and loaded.base == str(tiny_dir)
    assert _same(loaded.pipeline.unet, other_unet)
    assert _same(loaded.pipeline.text_encoder, _text_encoder_state(tiny_dir))
    base_fingerprint = load_pipeline(tiny_dir).fingerprint
    assert loaded.fingerprint not in (base_fingerprint, "")


def test_unet_pt_with_prefix_and_lightning_wrapper(tmp_path, tiny_dir, other_tiny_dir):
    other_unet = _unet_state(other_tiny_dir)
    torch.save({"state_dict": {f"unet.{k}": v for k, v in other_unet.items()}}, tmp_path / "esd-unet.pt")
    loaded = load_pipeline(tmp_path / "esd-unet.pt", base=tiny_dir)
    assert _same(loaded.pipeline.unet, other_unet)


@pytest.mark.parametrize("prefix", ["", "text_model.", "text_encoder.text_model.", "model.text_model."])
def test_text_encoder_files_in_old_and_new_layouts(tmp_path, tiny_dir, other_tiny_dir, prefix):
    other_text = _text_encoder_state(other_tiny_dir)
    state = {f"{prefix}{k}": v for k, v in other_text.items()}
    state[f"{prefix}embeddings.position_ids"] = torch.arange(77).unsqueeze(0)  # transformers 4 saved this buffer
    torch.save(state, tmp_path / "text_encoder.bin")
    loaded = load_pipeline(tmp_path / "text_encoder.bin", base=tiny_dir)
    assert loaded.component == "text_encoder"
    assert _same(loaded.pipeline.text_encoder, other_text)
    assert _same(loaded.pipeline.unet, _unet_state(tiny_dir))


def test_original_ldm_unet_layout_is_converted(tmp_path, tiny_dir, other_tiny_dir):
    from diffusers import UNet2DConditionModel

    from pytest_unlearnatk.testing import original_unet_state

    other_unet = _unet_state(other_tiny_dir)
    ldm = original_unet_state(other_unet, UNet2DConditionModel.load_config(other_tiny_dir / "unet"))
    ldm["model_ema.decay"] = torch.tensor(0.999)  # a training checkpoint's EMA copy: not used, and said so
    torch.save({"state_dict": ldm}, tmp_path / "esd-compvis.ckpt")
    with pytest.warns(UserWarning, match=r"its EMA copy of the UNet \(model_ema.\*\) is not used"):
        loaded = load_pipeline(tmp_path / "esd-compvis.ckpt", base=tiny_dir)
    assert loaded.component == "unet"
    assert loaded.description == f"original-layout UNet weights (converted) over {tiny_dir}"
    assert _same(loaded.pipeline.unet, other_unet)


def test_missing_and_unexpected_keys_are_counted_with_examples(tmp_path, tiny_dir, other_tiny_dir):
    state = dict(_unet_state(other_tiny_dir))
    state.pop("conv_in.weight")
    state["conv_in.extra"] = torch.zeros(1)
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(UnlearnAtkError) as error:
        load_pipeline(tmp_path / "broken.safetensors", base=tiny_dir)
    message = str(error.value)
    assert "broken.safetensors: its keys do not match the base pipeline's unet: 1 missing" in message
    assert "['conv_in.weight']" in message and "1 unexpected (e.g. ['conv_in.extra'])" in message


def test_wrong_shapes_are_reported(tmp_path, tiny_dir):
    state = {k: torch.zeros(3, *v.shape[1:]) if v.ndim else v for k, v in _unet_state(tiny_dir).items()}
    save_file(state, str(tmp_path / "wide.safetensors"))
    with pytest.raises(UnlearnAtkError, match=r"tensors have the wrong shape .* different model size"):
        load_pipeline(tmp_path / "wide.safetensors", base=tiny_dir)


def test_unrelated_file_matches_nothing(tmp_path, tiny_dir):
    save_file({"classifier.weight": torch.zeros(2, 2)}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(UnlearnAtkError, match=r"not a format we read. Its 1 keys begin with \['classifier.weight'\]"):
        load_pipeline(tmp_path / "resnet.safetensors", base=tiny_dir)


def test_pickles_that_are_not_plain_weights_are_refused(tmp_path, tiny_dir):
    torch.save({"weights": torch.zeros(1), "when": Path("/tmp")}, tmp_path / "odd.pt")
    with pytest.raises(UnlearnAtkError, match="could not be read as a weights file.*re-save the state dict with safetensors"):
        load_pipeline(tmp_path / "odd.pt", base=tiny_dir)


def test_weights_file_needs_a_base(tmp_path):
    save_file({"conv_in.weight": torch.zeros(1)}, str(tmp_path / "unet.safetensors"))
    with pytest.raises(UnlearnAtkError, match="needs the base pipeline it was fine-tuned from: pass base="):
        load_pipeline(tmp_path / "unet.safetensors")


def test_bad_sources(tmp_path):
    with pytest.raises(UnlearnAtkError, match="no such file or directory"):
        load_pipeline(tmp_path / "missing.safetensors")
    with pytest.raises(UnlearnAtkError, match="has no model_index.json"):
        load_pipeline(tmp_path)
    with pytest.raises(UnlearnAtkError, match="neither an existing path nor a hub id"):
        load_pipeline("not a model")


def test_hub_id_offline_says_to_pass_a_local_path():
    # The hub cannot be reached here (HF_HUB_OFFLINE=1); this is the offline path users hit.
    with pytest.raises(UnlearnAtkError, match="could not fetch 'CompVis/stable-diffusion-v1-4'.*pass its local directory"):
        load_pipeline("CompVis/stable-diffusion-v1-4")


def test_device_and_dtype_selection():
    assert select_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert select_dtype("auto", "cpu") == "float32"
    assert select_dtype("auto", "cuda") == "float16"
    assert select_dtype("bf16", "cuda") == "bfloat16"
    with pytest.raises(UnlearnAtkError, match="float16 is not supported on the CPU"):
        select_dtype("fp16", "cpu")
    with pytest.raises(UnlearnAtkError, match="unknown dtype 'float8'"):
        select_dtype("float8", "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UnlearnAtkError, match="CUDA is not available"):
            select_device("cuda")


def test_xdist_workers_spread_over_the_visible_gpus():
    # pure logic: no GPU here, so the number of visible GPUs is given (torch.cuda.device_count()
    # on a real machine, which already respects CUDA_VISIBLE_DEVICES)
    from pytest_unlearnatk.models import worker_device

    assert [worker_device("auto", i, 8) for i in range(8)] == [f"cuda:{i}" for i in range(8)]
    assert [worker_device("cuda", i, 2) for i in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert worker_device("cuda:3", 5, 8) == "cuda:3"  # pinned by the user: kept
    assert worker_device("cpu", 1, 8) == "cpu"
    assert worker_device("auto", 1, 0) == "auto"  # no GPU: auto resolves to the CPU later
    assert worker_device("auto", None, 8) == "auto"  # not under xdist


def test_loaded_pipelines_use_scaled_dot_product_attention(tiny_model):
    # PyTorch's fused attention (flash / memory-efficient kernels on a GPU) in every attention layer
    pipeline = tiny_model.pipeline
    assert {type(p).__name__ for p in pipeline.unet.attn_processors.values()} == {"AttnProcessor2_0"}
    assert {type(p).__name__ for p in pipeline.vae.attn_processors.values()} == {"AttnProcessor2_0"}
    assert pipeline.text_encoder.config._attn_implementation == "sdpa"
