"""Half precision without a GPU: tuning and editing run in bf16 and fp16 autocast on the CPU (GradScaler included),
the trained parameters stay fp32, attention maps stay fp32, and direct inversion still gives the source back."""

import pytest
import torch
from safetensors.torch import load_file

from ctxedit import editing
from ctxedit.attention import Control
from ctxedit.runs import Run
from ctxedit.settings import EditSettings, TuneSettings
from ctxedit.tuned import load_tuned
from ctxedit.tuning import tune_video

PROMPT = "a man is skiing"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("precision", list(DTYPES))
def test_tune_and_edit_in_half_precision_on_the_cpu(precision, skiing, tiny_model, tmp_path, monkeypatch):
    run = Run(tmp_path / precision)
    settings = TuneSettings(prompt=PROMPT, frames=2, stride=4, size=32, steps=2, adapter_lr=1e-2)
    tune_video(skiing, settings, run, str(tiny_model), device="cpu", precision=precision)
    assert run.read_record()["runtime"] == {"device": "cpu", "precision": str(DTYPES[precision]).removeprefix("torch.")}
    assert all(t.dtype == torch.float32 for t in load_file(str(run.tuned_path)).values())  # fp32 master weights

    tuned = load_tuned(run, device="cpu", precision=precision)
    assert tuned.sd.dtype == DTYPES[precision]
    dtypes = []
    real = Control.cross_attention
    monkeypatch.setattr(Control, "cross_attention", lambda self, layer, maps, frames: dtypes.append(maps.dtype)
                        or real(self, layer, maps, frames))  # fmt: skip
    edit = EditSettings(steps=3, guidance=5.0, realign="auto")  # structure kept, blending, re-weighting
    source = editing.source_pass(tuned, edit)
    assert source.store and all(t.dtype == torch.float16 for t in source.store.values())
    back = editing.edit_latents(tuned, source, PROMPT, edit)
    assert (back - tuned.x0).abs().max() < 1e-4
    edited = editing.edit_latents(tuned, source, "a man is skiing on the moon", edit)
    assert torch.isfinite(edited).all() and (edited - tuned.x0).abs().max() > 1e-2
    assert dtypes and set(dtypes) == {torch.float32}  # recorded, blended and re-weighted in fp32
