"""Textual-inversion embeddings: new tokens in the tokenizer whose vectors the text encoder looks up.

Formats: diffusers' (one tensor named by its token), AUTOMATIC1111's (`string_to_param` in a .pt, `emb_params` in a
.safetensors). An embedding of n vectors gets the tokens TOKEN, TOKEN_1, ..., TOKEN_(n-1), and TOKEN in a prompt
stands for all of them (`prompts.expanded`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ctxedit.errors import ModelError
from ctxedit.files import verified_sha256

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Embedding:
    path: str
    token: str | None = None  # None: the token the file names, else the file's stem
    sha256: str | None = None  # a tuned run's: the file must still be that one

    @classmethod
    def parse(cls, spec: str) -> Embedding:
        """FILE or FILE:TOKEN (e.g. cat-toy.safetensors:<cat-toy>)."""
        path, _, token = spec.rpartition(":")
        if not path or "/" in token or "\\" in token or Path(spec).exists():
            return cls(spec)
        return cls(path, token)


def _vectors(path: Path) -> tuple[str | None, torch.Tensor]:
    """(the token the file names, if any; its vectors (n, width))."""
    import torch
    from safetensors.torch import load_file

    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:  # weights only: a pickle that holds anything else is refused, never run
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - every reader failure means the same to the user
        raise ModelError(f"cannot read the embedding {path} ({type(error).__name__})") from error
    state = state if isinstance(state, dict) else {}
    if {"clip_l", "clip_g"} & state.keys():
        raise ModelError(f"the embedding {path} is an SDXL one (clip_l/clip_g); ctxedit takes SD 1.x and 2.x")
    named, table = None, state.get("string_to_param", state)  # AUTOMATIC1111's .pt keeps its vectors one level down
    if "emb_params" in state:  # AUTOMATIC1111's .safetensors
        table = {"emb_params": state["emb_params"]}
    elif table is state:  # diffusers': the one tensor is named by its token
        named = next(iter(state), None)
    vectors = next(iter(table.values()), None) if isinstance(table, dict) and len(table) == 1 else None
    if isinstance(vectors, torch.Tensor):
        return named, vectors
    raise ModelError(f"{path} is not a textual-inversion embedding (one tensor, string_to_param or emb_params)")


def add_embeddings(tokenizer, text_encoder, embeddings: tuple[Embedding, ...]) -> tuple[Embedding, ...]:
    """Add each embedding's tokens and vectors (an embedding of n vectors: `tokenizer.multi_vector_tokens` says which
    n - 1 tokens follow its token, see `prompts.expanded`); the embeddings as loaded, with tokens, absolute paths and
    digests."""
    import torch

    loaded, multi = [], {}
    for embedding in embeddings:
        path = Path(embedding.path).expanduser()
        digest = verified_sha256(path, embedding.sha256, "the embedding")
        named, vectors = _vectors(path)
        vectors = vectors.detach().reshape(-1, vectors.shape[-1])
        token = embedding.token or named or path.stem
        width = text_encoder.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            raise ModelError(
                f"the embedding {path} has {vectors.shape[1]}-wide vectors, this model's text encoder {width}: "
                "it is for another base model"
            )
        tokens = [token] + [f"{token}_{i}" for i in range(1, len(vectors))]
        taken = [t for t in tokens if t in tokenizer.get_vocab()]
        if taken:
            raise ModelError(f"the token {taken[0]!r} of {path} is already a word of the tokenizer; give another: "
                             f"--embedding {path}:<{token.strip('<>')}>")  # fmt: skip
        tokenizer.add_tokens(tokens)
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        table = text_encoder.get_input_embeddings().weight
        with torch.no_grad():
            table[tokenizer.convert_tokens_to_ids(tokens)] = vectors.to(table.device, table.dtype)
        if len(tokens) > 1:
            multi[token] = tokens[1:]
        loaded.append(Embedding(str(path.resolve()), token, digest))
    tokenizer.multi_vector_tokens = multi
    return tuple(loaded)
