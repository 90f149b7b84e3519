"""Random-weight Stable Diffusion 1.x models in the real diffusers format: a tiny one for tests and CPU
benchmarks, and SD 1.5's full architecture for shape checks (on the meta device) and GPU benchmarks.

The tiny model has the same classes and folder layout as SD 1.5 (so `--model FOLDER` loads it like real
weights) in a few MB: VAE scale factor 2, a two-level UNet with cross-attention at full latent resolution,
a 2-layer CLIP text encoder over a character-level vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

SD15_UNET = dict(  # SD 1.5's UNet; the rest are diffusers' defaults
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(  # CLIP ViT-L/14's text tower (over a small vocabulary)
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
)
SD_SCHEDULER = dict(
    beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
    steps_offset=1,
)  # fmt: skip


def _character_vocab() -> dict[str, int]:
    """Byte-level BPE vocabulary without merges: every lowercase printable character, inside and ending a word."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    chars = sorted({chr(c).lower() for c in range(33, 127)})
    tokens = specials + chars + [c + "</w>" for c in chars]
    return {token: i for i, token in enumerate(tokens)}


def _text_encoder(vocab: dict[str, int], **sizes):
    from transformers import CLIPTextConfig, CLIPTextModel

    end = vocab["<|endoftext|>"]
    config = CLIPTextConfig(
        vocab_size=len(vocab),
        max_position_embeddings=77,
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=end,
        pad_token_id=end,
        **sizes,
    )
    return CLIPTextModel(config)


def _tokenizer(vocab: dict[str, int]):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def write_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """Write a random tiny SD-format model (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from ctxedit.models.sd import quiet_hf_libraries

    quiet_hf_libraries()
    torch.manual_seed(seed)
    vocab = _character_vocab()
    tokenizer = _tokenizer(vocab)
    text_encoder = _text_encoder(
        vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(**SD_SCHEDULER)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


CAPTION_WORDS = "a red green blue circle square triangle and on gray background".split()


def write_tiny_blip(folder: Path, seed: int = 0, favour: str | None = None) -> Path:
    """A random tiny BLIP captioning model and its processor (BERT word tokenizer over a few shapes words);
    `favour` biases its output layer so that it writes that word."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *CAPTION_WORDS]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    torch.manual_seed(seed)
    text = dict(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=40, bos_token_id=5, pad_token_id=0, sep_token_id=3,
                eos_token_id=3)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    model = BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16))
    if favour is not None:
        with torch.no_grad():
            model.text_decoder.cls.predictions.bias[words.index(favour)] += 100.0
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random tiny CLIP model (vision and text towers) and its processor (the tiny SD model's tokenizer)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    vocab = _character_vocab()
    end = vocab["<|endoftext|>"]
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=end, pad_token_id=end)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                  patch_size=8)  # fmt: skip
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=images, tokenizer=_tokenizer(vocab)).save_pretrained(folder)
    return folder


def random_sd15(device, dtype):
    """SD 1.5's architecture with random weights, as a StableDiffusion (for benchmarks; no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from ctxedit.models.sd import StableDiffusion, quiet_hf_libraries
    from ctxedit.models.spec import ModelSource

    quiet_hf_libraries()
    vocab = _character_vocab()
    parts = [UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE), _text_encoder(vocab, **SD15_TEXT)]
    unet, vae, text = (m.to(device=device, dtype=dtype).requires_grad_(False).eval() for m in parts)
    tokenizer = _tokenizer(vocab)
    source = ModelSource("random-sd15", "", None)
    return StableDiffusion(vae, text, tokenizer, unet, DDIMScheduler(**SD_SCHEDULER), source, device, dtype)
