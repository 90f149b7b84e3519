"""The models users have: single-file checkpoints, LoRAs, embeddings, SD 2.x v-prediction; and refusals of the rest.
Every format is built from the tiny model in code (tests/checkpoints.py), offline."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from checkpoints import write_lora, write_single_file, write_v_model
from safetensors.torch import save_file
from typer.testing import CliRunner

from ctxedit import editing
from ctxedit.cli import app
from ctxedit.errors import ModelError, UsageError
from ctxedit.models import formats
from ctxedit.models.embeddings import Embedding
from ctxedit.models.lora import Lora
from ctxedit.models.sd import load_sd
from ctxedit.models.spec import ModelSpec
from ctxedit.runs import Run
from ctxedit.settings import EditSettings, TuneSettings
from ctxedit.tuned import load_tuned
from ctxedit.tuning import tune_video

CPU = torch.device("cpu")
PROMPT = "a man is skiing"


def load(spec: ModelSpec):
    return load_sd(spec, CPU, torch.float32)


def unet_output(sd, prompt: str = PROMPT) -> tuple[torch.Tensor, torch.Tensor]:
    text = sd.encode_text([prompt])
    with torch.no_grad():
        return text, sd.unet(torch.linspace(-2, 2, 4 * 8 * 8).reshape(1, 4, 8, 8), 500, text).sample


@pytest.fixture(scope="module")
def single_file(tiny_model, tmp_path_factory) -> Path:
    return write_single_file(tiny_model, tmp_path_factory.mktemp("files") / "tiny.safetensors")


def test_a_single_file_checkpoint_loads_offline_as_its_folder_does(tiny_model, single_file):
    sd, folder = load(ModelSpec(str(single_file), config=str(tiny_model))), load(ModelSpec(str(tiny_model)))
    for name in ("unet", "vae", "text_encoder"):
        ours, theirs = getattr(sd, name).state_dict(), getattr(folder, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert sd.source.sha256 and sd.source.config == str(tiny_model) and sd.source.path == str(single_file)
    with pytest.raises(ModelError, match="does not fit the sd-v1 architecture.*--model-config"):
        load(ModelSpec(str(single_file)))  # detected as SD 1.x, whose shipped config is full size


def test_the_shipped_configs_are_sd_1_and_2_and_the_tokenizer_is_clips():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    counts = {}
    for family in formats.FAMILIES:
        folder = formats.config_folder(family)
        with torch.device("meta"):
            parts = (
                UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            )
        counts[family] = tuple(sum(p.numel() for p in part.parameters()) for part in parts)
        assert parts[0].config.sample_size * 8 == (768 if family == "sd-v2-768-v" else 512)  # native size
        tokenizer = formats.tokenizer(folder)
        assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
        assert tokenizer.pad_token == ("<|endoftext|>" if family == "sd-v1" else "!")
    assert counts["sd-v1"] == (859_520_964, 83_653_863, 123_060_480)  # SD 1.5's UNet, VAE and CLIP ViT-L text tower
    assert counts["sd-v2-768-v"] == (865_910_724, 83_653_863, 340_387_840)  # SD 2.1's, OpenCLIP ViT-H's
    scheduler = "scheduler/scheduler_config.json"
    prediction = {f: json.loads((formats.CONFIGS / f / scheduler).read_text())["prediction_type"] for f in counts}
    assert prediction == {"sd-v1": "epsilon", "sd-v2-base": "epsilon", "sd-v2-768-v": "v_prediction"}


def header_file(path: Path, shapes: dict[str, tuple[int, ...]]) -> Path:
    save_file({name: torch.zeros(shape, dtype=torch.float16) for name, shape in shapes.items()}, str(path))
    return path


UNET = "model.diffusion_model."
CHECKPOINTS = {  # the keys (and shapes) that say what a checkpoint is, as in the real files (0: not stored)
    "SDXL": {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (8,)},
    "SD3": {f"{UNET}joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,), f"{UNET}pos_embed": (1, 36864, 0)},
    "Flux": {"double_blocks.0.img_attn.norm.key_norm.scale": (8,), "img_in.weight": (8, 64)},
    "a video model": {
        "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.pos_encoder.pe":
            (1, 32, 8),
        "mid_block.motion_modules.0.temporal_transformer.norm.bias": (8,),
    },
    "an inpainting model": {f"{UNET}input_blocks.0.0.weight": (8, 9, 3, 3)},
    "a video model (Stable Video Diffusion)": {
        f"{UNET}input_blocks.0.0.weight": (8, 8, 3, 3), f"{UNET}input_blocks.1.0.time_stack.in_layers.0.weight": (8,),
        f"{UNET}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (640, 1024),
    },
    "a model whose UNet takes 5 input channels": {
        f"{UNET}input_blocks.0.0.weight": (8, 5, 3, 3),
        f"{UNET}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (640, 1024),
    },
}  # fmt: skip


@pytest.mark.parametrize("kind", CHECKPOINTS)
def test_other_architectures_are_refused_from_the_header_before_any_work(kind, tmp_path):
    path = header_file(tmp_path / "model.safetensors", CHECKPOINTS[kind])
    with pytest.raises(
        ModelError, match=f"is {re.escape(kind)}.*does not support; it takes Stable Diffusion 1.x and 2.x"
    ):
        load(ModelSpec(str(path)))


def test_sd2_files_are_detected_and_pickles_refused(tmp_path):
    v2, conv_in = f"{UNET}input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", f"{UNET}input_blocks.0.0.weight"
    two = header_file(tmp_path / "two.safetensors", {v2: (640, 1024), conv_in: (8, 4, 3, 3)})
    assert formats.family(two) == "sd-v2-768-v"
    assert formats.family(header_file(tmp_path / "one.safetensors", {v2: (640, 768), conv_in: (8, 4, 3, 3)})) == "sd-v1"
    assert formats.family(tmp_path / "two.safetensors", "sd-v2-base") == "sd-v2-base"
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"not read")
    with pytest.raises(ModelError, match=r"pickle checkpoint \(.ckpt\).*convert it to .safetensors"):
        load(ModelSpec(str(pickle)))


PIPELINES = {  # model_index.json class -> what the refusal calls it
    "StableDiffusionXLPipeline": "SDXL", "StableDiffusion3Pipeline": "SD3", "FluxPipeline": "Flux",
    "StableVideoDiffusionPipeline": "a video model", "AnimateDiffPipeline": "a video model",
    "StableDiffusionInpaintPipeline": "an inpainting model",
}  # fmt: skip


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_other_diffusers_folders_are_refused_by_their_pipeline_class(pipeline, tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": pipeline}))
    with pytest.raises(ModelError, match=f"is {PIPELINES[pipeline]}.*does not support"):
        load(ModelSpec(str(tmp_path)))


def test_a_tiny_sdxl_folder_is_refused_before_its_weights_are_read(tmp_path):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
    )  # fmt: skip
    unet.save_pretrained(tmp_path / "unet")
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"never read")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelError, match="is SDXL"):
        load(ModelSpec(str(tmp_path)))


@pytest.mark.parametrize("kohya", [False, True], ids=["peft", "kohya"])
def test_a_lora_at_scale_0_is_no_lora_bit_for_bit_and_at_1_changes_unet_and_text(tiny_model, tmp_path, kohya):
    path = write_lora(tiny_model, tmp_path / "style.safetensors", kohya)
    without = unet_output(load(ModelSpec(str(tiny_model))))
    at = {scale: unet_output(load(ModelSpec(str(tiny_model), loras=(Lora(str(path), scale),)))) for scale in (0, 1)}
    assert all(torch.equal(a, b) for a, b in zip(at[0], without, strict=True))
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(at[1], without, strict=True))


def test_lora_and_embedding_specs_parse_paths_with_colons():
    assert Lora.parse("style.safetensors:0.7") == Lora("style.safetensors", 0.7)
    assert Lora.parse("C:/loras/style.safetensors") == Lora("C:/loras/style.safetensors")
    assert Embedding.parse("cat.pt:<cat-toy>") == Embedding("cat.pt", "<cat-toy>")
    assert Embedding.parse("dir:x/cat.pt") == Embedding("dir:x/cat.pt")


@pytest.mark.parametrize("layout", ["diffusers", "a1111"])
def test_an_embeddings_token_changes_the_prompts_encoding_and_stands_for_all_its_vectors(tiny_model, tmp_path, layout):
    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    path = tmp_path / ("cat.safetensors" if layout == "diffusers" else "cat.pt")
    if layout == "diffusers":
        save_file({"<cat>": vectors}, str(path))
    else:
        torch.save({"string_to_param": {"*": vectors}, "name": "cat"}, path)
    sd = load(
        ModelSpec(str(tiny_model), embeddings=(Embedding(str(path), None if layout == "diffusers" else "<cat>"),))
    )
    plain = load(ModelSpec(str(tiny_model)))
    assert sd.source.embeddings[0].token == "<cat>" and sd.tokenizer.multi_vector_tokens == {
        "<cat>": ["<cat>_1", "<cat>_2"]
    }
    ids = sd.tokenizer("a <cat> <cat>_1 <cat>_2 is skiing").input_ids
    assert ids[2:5] == sd.tokenizer.convert_tokens_to_ids(["<cat>", "<cat>_1", "<cat>_2"])
    assert torch.equal(sd.text_encoder.get_input_embeddings().weight[ids[2:5]], vectors)
    with torch.no_grad():  # the token in a prompt stands for the three
        expanded = sd.text_encoder(sd.tokenizer("a <cat> <cat>_1 <cat>_2 is skiing", padding="max_length",
                                                max_length=77, return_tensors="pt").input_ids)[0]  # fmt: skip
    assert torch.equal(sd.encode_text(["a <cat> is skiing"]), expanded)
    assert not torch.equal(sd.encode_text(["a <cat> is skiing"]), plain.encode_text(["a <cat> is skiing"]))
    assert torch.equal(sd.encode_text([PROMPT]), plain.encode_text([PROMPT]))  # other prompts as before
    with pytest.raises(ModelError, match="already a word of the tokenizer"):
        load(ModelSpec(str(tiny_model), embeddings=(Embedding(str(path), "a</w>"),)))


def test_a_tuned_run_keeps_its_parameters_apart_from_its_lora_and_refuses_changed_files(
    skiing, tiny_model, single_file, tmp_path
):
    """Tuned on a single file with a LoRA and an embedding: the trained parameters are the ones a run without a
    LoRA has (names and count), --lora-scale 0 edits with exactly the model without it, and a changed file is
    refused at edit time in one line."""
    files = tmp_path / "files"
    shutil.copytree(single_file.parent, files)
    lora = write_lora(tiny_model, files / "style.safetensors", kohya=True)
    embedding = files / "cat.safetensors"
    save_file({"<cat>": torch.randn(2, 32)}, str(embedding))
    spec = ModelSpec(str(files / "tiny.safetensors"), str(tiny_model), loras=(Lora(str(lora), 0.8),),
                     embeddings=(Embedding(str(embedding)),))  # fmt: skip
    run, plain = Run(tmp_path / "run"), Run(tmp_path / "plain")
    settings = TuneSettings(prompt="a <cat> is skiing", frames=2, stride=4, size=32, steps=2)
    tune_video(skiing, settings, run, spec, device="cpu")
    record = run.read_record()["model"]
    assert [(entry["scale"], len(entry["sha256"])) for entry in record["loras"]] == [(0.8, 64)]
    assert record["embeddings"][0]["token"] == "<cat>" and record["sha256"] and record["config"] == str(tiny_model)
    tune_video(skiing, settings, plain, ModelSpec(str(tiny_model), embeddings=spec.embeddings), device="cpu")
    from safetensors.torch import load_file

    assert load_file(str(run.tuned_path)).keys() == load_file(str(plain.tuned_path)).keys()
    tuned = load_tuned(run, device="cpu")
    tuned.use(EditSettings(lora_scale="0"))
    with_lora_off = unet_output(tuned.sd, "a <cat> is skiing")
    bare = load_tuned(plain, device="cpu")
    from ctxedit.models.trained import load_trained

    load_trained(run.tuned_path, bare.model, bare.adapter)  # the LoRA run's parameters on the model without it
    # Not bit for bit: the single file's weights, equal to the folder's, lie at other memory alignments, and the CPU
    # kernels round differently (7e-7, with or without a LoRA); a LoRA at 0 is exact (the test above).
    for ours, theirs in zip(with_lora_off, unet_output(bare.sd, "a <cat> is skiing"), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert not torch.equal(tuned.source_text, tuned.cached_text)  # the source prompt follows the text encoder's LoRA

    runner = CliRunner()
    ok = runner.invoke(app, ["edit", "--run", str(run.root), "--target", "a <cat> is skiing on the moon", "--steps",
                             "2", "--lora-scale", "0.5", "--device", "cpu"])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert run.read_record()["edits"][-1]["settings"]["lora_scale"] == "0.5"
    for changed in (lora, files / "tiny.safetensors"):
        original = changed.read_bytes()
        changed.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        result = runner.invoke(app, ["edit", "--run", str(run.root), "--target", "x", "--device", "cpu"])
        assert result.exit_code == 1 and "has changed since the run was tuned" in result.output
        assert len(result.output.strip().splitlines()) == 1
        changed.write_bytes(original)
    (files / "tiny.safetensors").rename(files / "moved.safetensors")
    result = runner.invoke(app, ["edit", "--run", str(run.root), "--target", "x", "--device", "cpu"])
    assert result.exit_code == 1 and "does not exist; the run was tuned with it" in result.output


def test_a_batch_job_matches_its_run_when_it_leaves_the_architecture_and_token_to_be_found(tmp_path):
    record = {"model": {"id": "/m/model.safetensors", "config": "sd-v1", "loras": [],
                        "embeddings": [{"path": "/e/cat.pt", "token": "<cat>", "sha256": "0"}]}}  # fmt: skip
    assert ModelSpec("/m/model.safetensors", embeddings=(Embedding("/e/cat.pt"),)).differences(record) == []
    other = ModelSpec("/m/model.safetensors", "sd-v2-base", embeddings=(Embedding("/e/cat.pt", "<dog>"),))
    assert [line.split(":")[0] for line in other.differences(record)] == ["model config", "embeddings"]


def test_a_missing_lora_or_embedding_and_bad_embedding_files_are_one_line_errors(skiing, tiny_model, tmp_path):
    runner = CliRunner()
    for flag in ("--lora", "--embedding"):
        result = runner.invoke(app, ["tune", str(skiing), "--prompt", "x", "--model", str(tiny_model), flag,
                                     str(tmp_path / "typo.safetensors"), "--run", str(tmp_path / "run")])  # fmt: skip
        assert result.exit_code == 1 and result.output.strip().endswith("typo.safetensors does not exist")
    for name, content in (("list.pt", [1, 2]), ("tensor.pt", torch.ones(3, 32)), ("two.pt", {"a": 1, "b": 2})):
        torch.save(content, tmp_path / name)
        with pytest.raises(ModelError, match="is not a textual-inversion embedding"):
            load(ModelSpec(str(tiny_model), embeddings=(Embedding(str(tmp_path / name)),)))
    torch.save({"string_to_param": {"cat": torch.ones(1, 32)}}, tmp_path / "other-key.pt")  # not "*": still read
    load(ModelSpec(str(tiny_model), embeddings=(Embedding(str(tmp_path / "other-key.pt")),)))


def test_an_embeddings_token_is_one_word_in_the_prompts_alignment(tiny_model, tmp_path):
    from ctxedit.prompts import parse_target, word_tokens

    save_file({"<cat>": torch.randn(2, 32)}, str(tmp_path / "cat.safetensors"))
    tokenizer = load(ModelSpec(str(tiny_model), embeddings=(Embedding(str(tmp_path / "cat.safetensors")),))).tokenizer
    words = word_tokens(tokenizer, "a <cat>is skiing")
    assert words[:3] == [("a", [1]), ("<cat>", [2, 3]), ("is", [4, 5])]
    target = parse_target(tokenizer, "a <cat> is skiing", "a <cat> is running")
    assert min(target.changed) > 5  # the changed word comes after the embedding's two tokens
    assert parse_target(tokenizer, "a <cat> is skiing", "a <cat> is skiing").changed == []
    assert parse_target(tokenizer, "a <cat> is skiing", "a (<cat>:1.5) is skiing").weights == {2: 1.5, 3: 1.5}


@pytest.fixture(scope="module")
def v_model(tmp_path_factory) -> Path:
    return write_v_model(tmp_path_factory.mktemp("models") / "tiny-v")


def test_a_v_prediction_model_tunes_on_v_and_reconstructs_exactly(skiing, v_model, tmp_path, monkeypatch):
    """Tuning's loss is on v; inversion then sampling with the source prompt reconstructs as for eps models."""
    from ctxedit import tuning

    targets = []
    original = tuning.training_target
    monkeypatch.setattr(tuning, "training_target", lambda *a: targets.append(a[-1]) or original(*a))
    run = Run(tmp_path / "run")
    tune_video(skiing, TuneSettings(prompt=PROMPT, frames=3, stride=4, size=32, steps=3, adapter_lr=1e-2), run,
               ModelSpec(str(v_model)), device="cpu")  # fmt: skip
    assert targets == ["v_prediction"] * 3
    tuned = load_tuned(run, device="cpu")
    assert tuned.sd.prediction == "v_prediction" and tuned.sd.native_size == 32
    settings = EditSettings(steps=5, guidance=7.5)
    source = editing.source_pass(tuned, settings)
    assert (editing.edit_latents(tuned, source, PROMPT, settings) - tuned.x0).abs().max() < 1e-4


def test_a_preset_takes_a_single_file_loras_embeddings_and_a_numeric_lora_scale(skiing, single_file, tmp_path):
    from ctxedit.presets import load_preset

    lora, embedding = tmp_path / "style.safetensors", tmp_path / "cat.safetensors"
    lora.write_bytes(b"checked when loaded"), embedding.write_bytes(b"checked when loaded")
    preset = tmp_path / "p.yaml"
    preset.write_text(
        f"jobs:\n  - video: {skiing}\n    prompt: a <cat> is skiing\n    model: {single_file}\n"
        "    model_config: sd-v1\n    lora: [style.safetensors:0.7]\n    embedding: ['cat.safetensors:<cat>']\n"
        "    edits: [{target: a <cat> is running, lora_scale: 0.5}]\n"
    )
    [job] = load_preset(preset)
    assert job.model == ModelSpec(str(single_file), "sd-v1", loras=(Lora(str(lora), 0.7),),
                                  embeddings=(Embedding(str(embedding), "<cat>"),))  # fmt: skip
    assert job.edits[0].settings.lora_scale == "0.5"
    preset.write_text(preset.read_text().replace("style.safetensors:0.7", "style.safetensors:lots"))
    with pytest.raises(UsageError, match="p.yaml: job 1: lora: takes FILE or FILE:SCALE"):
        load_preset(preset)
