"""Every way erased models are published, built here from tiny pipelines and loaded back.

LoRA files are written with PEFT (the adapter applied by PEFT itself is the reference the fused
load must reproduce) in the diffusers, PEFT and kohya key layouts; single-file checkpoints with our
own inverse of diffusers' original-layout conversion (pytest_unlearnatk.testing). Nothing is
mocked and nothing is downloaded.
"""

from __future__ import annotations

import fnmatch
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pytest_unlearnatk import LazyModel, UnlearnAtkError, load_pipeline
from pytest_unlearnatk.formats import detect, shapes_of
from pytest_unlearnatk.models import describe_model, model_fingerprint
from pytest_unlearnatk.testing import build_tiny_sd2_pipeline, original_checkpoint

pytest_plugins = ["pytester"]


IDS = torch.tensor([[49406, 320, 1929, 539, 320, 2972] + [49407] * 71])
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]  # conv1: a convolution LoRA too
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
UNET_RANK, UNET_ALPHA, TEXT_RANK, TEXT_ALPHA = 4, 8.0, 2, 1.0  # alpha != rank: the file's alpha must be used


def outputs(pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """Text-encoder hidden states and the UNet's prediction for fixed inputs."""
    size = pipeline.unet.config.sample_size
    latents = torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = pipeline.text_encoder(IDS)[0]
        return hidden, pipeline.unet(latents, 500, encoder_hidden_states=hidden).sample


def same_outputs(a, b, atol: float = 1e-5) -> bool:
    return all(torch.allclose(x, y, atol=atol) for x, y in zip(outputs(a), outputs(b)))


@pytest.fixture(scope="module")
def adapted(tiny_dir):
    """The tiny pipeline with random LoRA adapters injected by PEFT, and their state dicts (PEFT names)."""
    pytest.importorskip("peft", reason="the LoRA tests write their files with PEFT (pip install -e '.[test]')")
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipeline = load_pipeline(tiny_dir).pipeline
    torch.manual_seed(7)
    inject_adapter_in_model(LoraConfig(r=UNET_RANK, lora_alpha=UNET_ALPHA, target_modules=UNET_TARGETS,
                                       init_lora_weights="gaussian"), pipeline.unet)
    inject_adapter_in_model(LoraConfig(r=TEXT_RANK, lora_alpha=TEXT_ALPHA, target_modules=TEXT_TARGETS,
                                       init_lora_weights="gaussian"), pipeline.text_encoder)
    with torch.no_grad():
        for module in (pipeline.unet, pipeline.text_encoder):
            for name, parameter in module.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero (no change); make the adapter do something
                    parameter.normal_(0, 0.2)
    return pipeline, get_peft_model_state_dict(pipeline.unet), get_peft_model_state_dict(pipeline.text_encoder)


def peft_scale(pipeline, scale: float) -> None:
    """Scale every injected adapter the way PEFT itself does (the reference for lora_scale)."""
    from peft.tuners.lora import LoraLayer

    for module in (pipeline.unet, pipeline.text_encoder):
        for layer in module.modules():
            if isinstance(layer, LoraLayer):
                layer.set_scale("default", scale)


def kohya_layout(unet: dict, text: dict) -> dict:
    """Our conversion of PEFT names to kohya's: module path with '_' for '.', lora_down/lora_up, alpha."""
    out = {}
    for prefix, state, alpha in (("lora_unet_", unet, UNET_ALPHA), ("lora_te_text_model_", text, TEXT_ALPHA)):
        for key, value in state.items():
            module, which = re.fullmatch(r"(.*)\.lora_([AB])\.weight", key).groups()
            name = prefix + module.replace(".", "_")
            out[f"{name}.{'lora_down' if which == 'A' else 'lora_up'}.weight"] = value.contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


@pytest.fixture(scope="module")
def lora_files(adapted, tmp_path_factory):
    """One LoRA in each layout: diffusers (save_lora_weights), PEFT (PeftModel.save_pretrained), kohya."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    pipeline, unet, text = adapted
    root = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        root / "diffusers", unet_lora_layers={k: v.contiguous() for k, v in unet.items()},
        text_encoder_lora_layers={k: v.contiguous() for k, v in text.items()},
        unet_lora_adapter_metadata={"r": UNET_RANK, "lora_alpha": UNET_ALPHA},
        text_encoder_lora_adapter_metadata={"r": TEXT_RANK, "lora_alpha": TEXT_ALPHA},
    )
    # PEFT's own layout holds one model: the UNet adapter, written by a PeftModel around a fresh UNet
    from diffusers import UNet2DConditionModel

    fresh = UNet2DConditionModel.from_config(pipeline.unet.config)
    peft_model = get_peft_model(fresh, LoraConfig(r=UNET_RANK, lora_alpha=UNET_ALPHA, target_modules=UNET_TARGETS))
    result = set_peft_model_state_dict(peft_model, {f"base_model.model.{k}": v for k, v in unet.items()})
    assert not result.unexpected_keys
    peft_model.save_pretrained(root / "peft")
    save_file(kohya_layout(unet, text), str(root / "kohya.safetensors"))
    return {"diffusers": root / "diffusers" / "pytorch_lora_weights.safetensors",
            "peft": root / "peft" / "adapter_model.safetensors", "kohya": root / "kohya.safetensors"}


@pytest.fixture(scope="module")
def unet_only_reference(tiny_dir, adapted):
    """The tiny pipeline with only the UNet adapter of ``adapted`` (what the PEFT-layout file holds)."""
    pipeline = load_pipeline(tiny_dir).pipeline
    pipeline.unet = adapted[0].unet
    return pipeline


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_lora_files_load_as_peft_applies_them(tiny_dir, adapted, lora_files, layout):
    loaded = load_pipeline(lora_files[layout], base=tiny_dir)
    assert loaded.component == "lora"
    assert same_outputs(loaded.pipeline, adapted[0])
    unet_modules = len(adapted[1]) // 2
    assert loaded.description == (f"LoRA rank {TEXT_RANK}-{UNET_RANK} on unet ({unet_modules} modules) and "
                                  f"text_encoder ({len(adapted[2]) // 2} modules), {layout} layout, over {tiny_dir}, "
                                  "scale 1.0")


OLD_TEXT_NAMES = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}


def older_diffusers_layout(unet: dict, text: dict, style: str) -> dict:
    """The attention adapters of a LoRA in the key names older diffusers versions wrote: ``lora.down``
    (PEFT-less LoRA layers), ``lora_linear_layer`` (text encoders) or attention processors
    (``attn1.processor.to_q_lora.down``)."""
    out = {}
    for component, state in (("unet", unet), ("text_encoder", text)):
        for key, value in state.items():
            module, which = re.fullmatch(r"(.*)\.lora_([AB])\.weight", key).groups()
            head, _, last = module.removesuffix(".0").rpartition(".")
            if last not in ("to_q", "to_k", "to_v", "to_out", *OLD_TEXT_NAMES):
                continue  # these layouts carried attention adapters only
            direction = "down" if which == "A" else "up"
            prefix = f"{component}.text_model." if component == "text_encoder" else "unet."
            if style == "processor":
                name = f"{head}.processor.{OLD_TEXT_NAMES.get(last, last)}_lora.{direction}.weight"
            else:
                name = f"{module}.{'lora_linear_layer' if style == 'linear_layer' else 'lora'}.{direction}.weight"
            out[prefix + name] = value.contiguous()
    return out


def test_older_diffusers_key_names_load_like_the_current_ones(tiny_dir, adapted, tmp_path):
    _, unet, text = adapted
    attention = r"\.(to_[qkv]|to_out\.0|[qkv]_proj|out_proj)\.lora_"
    current = {f"{c}.{k}": v.contiguous() for c, state in (("unet", unet), ("text_encoder", text))
               for k, v in state.items() if re.search(attention, k)}
    save_file(current, str(tmp_path / "current.safetensors"))
    reference = load_pipeline(tmp_path / "current.safetensors", base=tiny_dir)
    assert not same_outputs(reference.pipeline, load_pipeline(tiny_dir).pipeline)
    for style in ("lora", "linear_layer", "processor"):
        save_file(older_diffusers_layout(unet, text, style), str(tmp_path / f"{style}.safetensors"))
        older = load_pipeline(tmp_path / f"{style}.safetensors", base=tiny_dir)
        assert older.description.split(", diffusers layout")[0] == reference.description.split(", diffusers layout")[0]
        assert same_outputs(older.pipeline, reference.pipeline, atol=0), style


def test_peft_layout_reads_alpha_from_adapter_config(tiny_dir, lora_files, unet_only_reference):
    config = json.loads((lora_files["peft"].parent / "adapter_config.json").read_text())
    assert config["lora_alpha"] == UNET_ALPHA != config["r"]
    loaded = load_pipeline(lora_files["peft"], base=tiny_dir)
    assert same_outputs(loaded.pipeline, unet_only_reference)
    assert loaded.description.startswith(f"LoRA rank {UNET_RANK} on unet (")
    assert ", peft layout, over " in loaded.description


def test_lora_scale_follows_peft_and_zero_is_the_base(tiny_dir, adapted, lora_files):
    pipeline = adapted[0]
    try:
        peft_scale(pipeline, 0.5)
        half = load_pipeline(lora_files["kohya"], base=tiny_dir, lora_scale=0.5)
        assert same_outputs(half.pipeline, pipeline)
    finally:
        peft_scale(pipeline, 1.0)
    zero = load_pipeline(lora_files["diffusers"], base=tiny_dir, lora_scale=0)
    assert same_outputs(zero.pipeline, load_pipeline(tiny_dir).pipeline, atol=0)
    assert zero.description.endswith(", scale 0.0")


def test_lora_fingerprint_holds_the_file_and_the_scale(tiny_dir, lora_files):
    kohya = lora_files["kohya"]
    one, half = model_fingerprint(kohya, tiny_dir), model_fingerprint(kohya, tiny_dir, lora_scale=0.5)
    assert one == model_fingerprint(kohya, tiny_dir, lora_scale=1) != half
    assert one != model_fingerprint(lora_files["diffusers"], tiny_dir)  # same adapter, other bytes: another key
    lazy = LazyModel(str(kohya), base=str(tiny_dir), lora_scale=0.5)
    assert lazy.fingerprint == half and not lazy.is_loaded
    assert lazy.description == describe_model(kohya, tiny_dir, 0.5) and not lazy.is_loaded  # told from keys only
    assert lazy.load().fingerprint == half and lazy.load().description == lazy.description


def test_lora_scale_is_checked(tiny_dir, lora_files):
    with pytest.raises(UnlearnAtkError, match=r"lora_scale=nan: give a finite number"):
        load_pipeline(lora_files["kohya"], base=tiny_dir, lora_scale=float("nan"))
    with pytest.raises(UnlearnAtkError, match="a LoRA scale .* applies only to a LoRA file"):
        load_pipeline(tiny_dir, lora_scale=0.5)


def test_lora_for_another_model_names_the_modules_it_misses(tiny_dir, tmp_path):
    state = {"lora_unet_down_blocks_5_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 32),
             "lora_unet_down_blocks_5_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2)}
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(UnlearnAtkError, match=r"1 of its 1 LoRA modules are not in the base pipeline "
                                              r"\(e.g. \['unet: lora_unet_down_blocks_5_attentions_0_proj_in'\]\)"):
        load_pipeline(tmp_path / "other.safetensors", base=tiny_dir)


def test_unrecognized_file_lists_the_formats_and_the_keys(tmp_path, tiny_dir):
    save_file({f"classifier.layer{i}.weight": torch.zeros(1) for i in range(10)}, str(tmp_path / "resnet.safetensors"))
    with pytest.raises(UnlearnAtkError) as error:
        load_pipeline(tmp_path / "resnet.safetensors", base=tiny_dir)
    message = str(error.value)
    assert "resnet.safetensors: not a format we read. Its 10 keys begin with ['classifier.layer0.weight'" in message
    assert message.count("classifier.layer") == 8  # the first 8 keys
    for name in ("LoRA, kohya layout", "LoRA, PEFT layout", "original single-file checkpoint",
                 "UNet / text-encoder weights", "diffusers pipeline directory"):
        assert f"  - {name}: " in message


@pytest.fixture(scope="module")
def full_checkpoint(other_tiny_dir, tmp_path_factory) -> Path:
    """The 'other' tiny pipeline as one original-layout single-file checkpoint."""
    path = tmp_path_factory.mktemp("single") / "erased.safetensors"
    save_file(original_checkpoint(load_pipeline(other_tiny_dir).pipeline), str(path))
    return path


def test_single_file_checkpoint_uses_all_its_components(tiny_dir, other_tiny_dir, full_checkpoint):
    found = detect(shapes_of(load_file(str(full_checkpoint))), full_checkpoint)
    assert (found.kind, found.components) == ("checkpoint", ("unet", "vae", "text_encoder"))
    loaded = load_pipeline(full_checkpoint, base=tiny_dir)  # the base gives the configs; the weights are the file's
    source = load_pipeline(other_tiny_dir).pipeline
    for name in ("unet", "vae", "text_encoder"):
        theirs = getattr(source, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in getattr(loaded.pipeline, name).state_dict().items()), name
    assert loaded.description == f"original single-file checkpoint (unet, vae, text_encoder), configs from {tiny_dir}"
    assert loaded.fingerprint == model_fingerprint(full_checkpoint, tiny_dir)


def test_single_file_checkpoint_as_the_base_of_a_lora(tiny_dir, full_checkpoint, lora_files, tmp_path):
    # a checkpoint with no base reads the configs of the pipeline directory it sits in
    home = tmp_path / "sd"
    shutil.copytree(tiny_dir, home)
    shutil.copy(full_checkpoint, home / "erased.safetensors")
    alone = load_pipeline(home / "erased.safetensors")
    lora = load_pipeline(lora_files["kohya"], base=home / "erased.safetensors")
    by_hand = load_pipeline(home / "erased.safetensors").pipeline
    from pytest_unlearnatk.lora import fuse_lora
    from pytest_unlearnatk.models import read_state_dict

    state = read_state_dict(lora_files["kohya"])
    fuse_lora(by_hand, state, detect(shapes_of(state), lora_files["kohya"]), lora_files["kohya"], 1.0)
    assert same_outputs(lora.pipeline, by_hand, atol=0)
    assert not same_outputs(lora.pipeline, alone.pipeline)
    assert lora.fingerprint == model_fingerprint(lora_files["kohya"], home / "erased.safetensors")


def test_single_file_checkpoint_without_configs_says_what_to_pass(full_checkpoint, tmp_path):
    lonely = tmp_path / "erased.safetensors"
    shutil.copy(full_checkpoint, lonely)
    with pytest.raises(UnlearnAtkError, match=r"needs the configs of a local diffusers pipeline .*\(we never download "
                                              r"them\): pass --unlearn-base=DIR"):
        load_pipeline(lonely)


def test_single_file_checkpoint_with_a_broken_vae_fails_naming_it(tiny_dir, full_checkpoint, tmp_path):
    state = load_file(str(full_checkpoint))
    state.pop("first_stage_model.decoder.conv_in.weight")
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(UnlearnAtkError, match=r"broken.safetensors: its keys do not match the vae configured by .*: 1 missing "
                                              r"\(e.g. \['decoder.conv_in.weight'\]\)"):
        load_pipeline(tmp_path / "broken.safetensors", base=tiny_dir)


# --- Stable Diffusion 2.x: v-prediction, OpenCLIP text encoder, its own image size ---------------


@pytest.fixture(scope="module")
def sd2_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sd2")
    return build_tiny_sd2_pipeline(root / "erased", seed=0), build_tiny_sd2_pipeline(root / "base", seed=1)


def test_sd2_single_file_checkpoint_with_open_clip_names(sd2_dirs, tmp_path):
    erased, base = sd2_dirs
    source = load_pipeline(erased).pipeline
    path = tmp_path / "sd2-erased.ckpt"
    torch.save({"state_dict": original_checkpoint(source)}, path)  # OpenCLIP layout, one extra text layer
    loaded = load_pipeline(path, base=base)
    assert loaded.pipeline.scheduler.config.prediction_type == "v_prediction"
    assert same_outputs(loaded.pipeline, source, atol=1e-6)


def test_sd2_attack_regresses_on_the_velocity_and_renders_at_the_models_size(sd2_dirs, tmp_path):
    """The attack's loss on a v-prediction model is the MSE to v = sqrt(a) eps - sqrt(1 - a) x0, computed
    here by hand from what the UNet was given; renders are 16 latents x 8 = 128 px, the model's size."""
    from PIL import Image

    from pytest_unlearnatk import Renderer, RenderSettings, get_preset, run_gate
    from pytest_unlearnatk.attacks.unlearndiffatk import encode_target
    from pytest_unlearnatk.render import noise_schedule
    from pytest_unlearnatk.tokens import TokenLayout

    erased = load_pipeline(sd2_dirs[0])
    pipeline = erased.pipeline
    Image.new("RGB", (128, 128), (200, 30, 30)).save(tmp_path / "0.png")  # the target image of case 0
    calls = []  # (input latents, timesteps, prediction) of every UNet call

    def record(module, args, kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        calls.append((args[0].detach().clone(), args[1], sample.detach().float().clone()))

    hook = pipeline.unet.register_forward_hook(record, with_kwargs=True)
    try:
        result = run_gate(erased, [{"case_number": 0, "prompt": "a red square", "evaluation_seed": 1}],
                          lambda images: [False] * len(images), budget=get_preset("smoke", num_timesteps=1,
                          steps_per_timestep=2, seed=3), target_dir=tmp_path, render=RenderSettings(steps=2),
                          batch_size=1)
    finally:
        hook.remove()
    trace = result.cases[0].loss_trace
    steps = [call for call in calls if call[0].shape[0] == 1]  # renders run prompt and empty prompt together
    assert len(trace) == 2 and len(steps) == 2
    latent = encode_target(pipeline, Image.open(tmp_path / "0.png"))
    for (noisy, timestep, prediction), loss in zip(steps, trace):
        alpha = noise_schedule(pipeline)[int(timestep[0])]
        noise = (noisy.float() - alpha.sqrt() * latent) / (1 - alpha).sqrt()
        velocity = alpha.sqrt() * noise - (1 - alpha).sqrt() * latent
        assert math.isclose(torch.nn.functional.mse_loss(prediction, velocity).item(), loss, rel_tol=1e-4)
        assert not math.isclose(torch.nn.functional.mse_loss(prediction, noise).item(), loss, rel_tol=1e-2)
    layout = TokenLayout.from_pipeline(pipeline)
    content = pipeline.tokenizer("a red square", add_special_tokens=False).input_ids
    image = Renderer(pipeline, RenderSettings(steps=2)).render(layout.sequence(content), seed=0, guidance=7.5)
    assert image.size == (128, 128)


# --- the plugin: --unlearn-lora-scale, and the "what was loaded" line in every report -----------


def test_plugin_loads_a_lora_with_its_scale_and_says_so_everywhere(pytester, tiny_dir, lora_files, tmp_path):
    pytester.makepyfile(test_gate='''
        from pytest_unlearnatk import unlearn_attack

        @unlearn_attack(concept="circle", prompts=["a red circle"], judge=lambda images: [False] * len(images),
                        max_asr=0.0, attack="no_attack", render={"steps": 2})
        def test_resists():
            pass
        ''')
    report = tmp_path / "report"
    line = (f"LoRA rank {TEXT_RANK}-{UNET_RANK} on unet (*) and text_encoder (*), kohya layout, over {tiny_dir}, "
            "scale 0.5")
    args = [f"--unlearn-model={lora_files['kohya']}", f"--unlearn-base={tiny_dir}", "--unlearn-lora-scale=0.5",
            f"--unlearn-report={report}", f"--unlearn-store={tmp_path / 'store'}", "-p", "no:cacheprovider"]
    result = pytester.runpytest(*args)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"model kohya.safetensors: {line}"])
    record = json.loads((report / "unlearnatk-report.json").read_text())["gates"][0]
    assert fnmatch.fnmatchcase(record["model_description"], line)
    assert f"loaded: {record['model_description']}" in (report / "index.html").read_text()
    # another scale is another model: nothing is reused from the store
    again = pytester.runpytest(*args[:2], "--unlearn-lora-scale=0.25", *args[3:])
    again.stdout.fnmatch_lines(["*1 computed, 0 from store*", "model kohya.safetensors: *scale 0.25"])
    wrong = pytester.runpytest(*args[:2], "--unlearn-lora-scale=inf", *args[3:])
    assert wrong.ret != 0
    wrong.stderr.fnmatch_lines(["*--unlearn-lora-scale*give a finite number*"])


def test_single_file_checkpoint_read_with_another_architectures_configs_says_so(sd2_dirs, full_checkpoint):
    with pytest.raises(UnlearnAtkError, match=rf"erased.safetensors: .*{re.escape(str(sd2_dirs[1]))}.*"
                                              "(same architecture|SD 1.x vs 2.x)"):
        load_pipeline(full_checkpoint, base=sd2_dirs[1])  # an SD 1 file, SD 2 configs


def test_a_lora_is_no_base(tiny_dir, lora_files):
    with pytest.raises(UnlearnAtkError, match=r"the base .*kohya.safetensors holds LoRA rank 2-4 on unet \(44 modules\) "
                                              r"and text_encoder \(10 modules\), kohya layout, scale 1.0, which goes "
                                              r"over a base itself"):
        load_pipeline(lora_files["diffusers"], base=lora_files["kohya"])


def test_sd2_gate_renders_targets_and_candidates_at_the_models_size(sd2_dirs, tmp_path):
    """A whole gate on the SD-2-shaped pair: the base renders the target, the model the plain prompt and
    the candidate, all at 128 px (the configs' 16 latents x 8), with the v-prediction schedule."""
    from PIL import Image

    from pytest_unlearnatk import RenderSettings, get_preset, run_gate

    erased, base = (load_pipeline(d) for d in sd2_dirs)
    judged = []

    def judge(images):
        judged.extend(image.size for image in images)
        return [False] * len(images)

    result = run_gate(erased, [{"case_number": 0, "prompt": "a red square", "evaluation_seed": 1}], judge, base=base,
                      budget=get_preset("smoke", num_timesteps=1, steps_per_timestep=1), render=RenderSettings(steps=2),
                      image_dir=tmp_path, batch_size=1)
    case = result.cases[0]
    assert judged == [(128, 128), (128, 128)]  # the plain prompt, then the one candidate
    assert {kind: Image.open(tmp_path / name).size for kind, name in case.images.items()} == {
        "target": (128, 128), "plain": (128, 128), "adversarial": (128, 128)}
