"""Batch presets: YAML files that list jobs (a video, its caption, tuning settings, edits), validated in full
before anything runs. Every error names the file, the job and the key.

    defaults:                        # optional; applies to every job, a job's own values win key by key
      model: ../samples/toy-sd       # hub id, local folder or .safetensors file (relative to this file)
      lora: [style.safetensors:0.7]  # optional: LoRAs (FILE[:SCALE]), embeddings (FILE[:TOKEN]), model_config
      tune: {steps: 150, size: 64}   # TuneSettings fields (all but prompt)
      edit: {guidance: 5.0}          # EditSettings fields
      output: {size: source, side_by_side: true}   # OutputSettings fields
    jobs:
      - name: skiing                 # the run folder's name, unique in the file [default: the video's name]
        video: ../samples/man-skiing.mp4   # relative to this file
        prompt: a man is skiing
        tune: {steps: 300}           # model (and its keys), tune, edit and output may be given per job too
        edits:
          - spider man is skiing on the beach, cartoon style
          - {target: wonder woman is skiing, guidance: 10, seed: 1, name: wonder-woman}
"""

from __future__ import annotations

import os
import re
import typing
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ctxedit.errors import UsageError
from ctxedit.models.embeddings import Embedding
from ctxedit.models.lora import Lora
from ctxedit.models.spec import ModelSpec
from ctxedit.runs import slugify
from ctxedit.settings import EditSettings, OutputSettings, TuneSettings, default_model

SECTIONS = {"tune": TuneSettings, "edit": EditSettings, "output": OutputSettings}
MODEL_KEYS = ("model", "model_config", "lora", "embedding")
JOB_KEYS = ("name", "video", "prompt", *MODEL_KEYS, *SECTIONS, "edits")
EDIT_KEYS = ("target", "name", *(f.name for f in fields(EditSettings)))
NAME = re.compile(r"[\w][\w.-]*")


@dataclass(frozen=True)
class EditSpec:
    target: str
    settings: EditSettings
    name: str  # the file name in the run's edits/ folder, without .mp4


@dataclass(frozen=True)
class Job:
    preset: Path
    name: str
    video: Path
    model: ModelSpec  # hub id, or the absolute path of a local folder or file; LoRAs and embeddings absolute too
    tune: TuneSettings
    output: OutputSettings
    edits: tuple[EditSpec, ...]

    @property
    def label(self) -> str:
        return f"{self.preset.stem}/{self.name}"


def _fail(where: str, message: str) -> typing.NoReturn:
    raise UsageError(f"{where}: {message}")


def _mapping(where: str, value: object, allowed: typing.Iterable[str]) -> dict:
    if not isinstance(value, dict):
        _fail(where, f"expected a mapping of keys to values, got {type(value).__name__}")
    allowed = list(allowed)
    for key in value:
        if key not in allowed:
            _fail(where, f"unknown key {key!r}; expected one of {', '.join(allowed)}")
    return value


def _typed(where: str, value: object, hint: object) -> object:
    """`value` if it fits the type hint (int, float, str, bool, X | None); numbers written as '3e-5' (which
    YAML reads as text) become floats."""
    allowed = typing.get_args(hint) or (hint,)
    if value is None and type(None) in allowed:
        return value
    if isinstance(value, bool):
        if bool in allowed:
            return value
    elif int in allowed and isinstance(value, int):
        return value
    elif float in allowed and isinstance(value, int | float):
        return float(value)
    elif float in allowed and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            if str in allowed:  # text the settings parse themselves, e.g. a time '1:05'
                return value
    elif str in allowed and isinstance(value, str):
        return value
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    _fail(where, f"expected {names}, got {value!r}")


def _settings(where: str, cls: type, values: dict, **given):
    """An instance of the settings dataclass `cls` from checked `values`; `given` fields are not keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.name not in given]
    _mapping(where, values, names)
    checked = {key: _typed(f"{where}.{key}", value, hints[key]) for key, value in values.items()}
    try:
        return cls(**checked, **given)
    except UsageError as error:
        _fail(where, str(error))


def _text(where: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        _fail(where, f"expected non-empty text, got {value!r}")
    return value


def _path(base: Path, value: str) -> Path:
    return (base / Path(value).expanduser()).resolve()


def _model(where: str, base: Path, raw: dict, defaults: dict) -> ModelSpec:
    """The job's model: a hub id as given, or a local folder or file made absolute (a path is anything that exists
    or looks like one), with its LoRAs and embeddings (FILE or FILE:SCALE / FILE:TOKEN, made absolute)."""
    value = _text(f"{where}: model", raw.get("model", defaults.get("model", default_model())))
    path = _path(base, value)
    if value.startswith((".", "/", "~")) or path.exists():
        if not path.exists():
            _fail(f"{where}: model", f"{path} does not exist")
        value = str(path)
    config = raw.get("model_config", defaults.get("model_config"))
    if config is not None and _path(base, _text(f"{where}: model_config", config)).is_dir():
        config = str(_path(base, config))
    files = {}
    for key, parse in (("lora", Lora.parse), ("embedding", Embedding.parse)):
        entries = raw.get(key, defaults.get(key)) or []
        if not isinstance(entries, list):
            _fail(f"{where}: {key}", "expected a list of files (FILE, or FILE:SCALE / FILE:TOKEN)")
        try:
            files[key] = [parse(_text(f"{where}: {key}", entry)) for entry in entries]
        except UsageError as error:
            _fail(f"{where}: {key}", str(error).removeprefix("--lora "))
        for entry in files[key]:
            if not _path(base, entry.path).is_file():
                _fail(f"{where}: {key}", f"{_path(base, entry.path)} does not exist")
    loras = tuple(replace(lora, path=str(_path(base, lora.path))) for lora in files["lora"])
    embeddings = tuple(replace(e, path=str(_path(base, e.path))) for e in files["embedding"])
    return ModelSpec(value, config, loras=loras, embeddings=embeddings)


def _video(where: str, base: Path, value: object) -> Path:
    path = _path(base, _text(where, value))
    if not path.is_file():
        _fail(where, f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if not os.access(path, os.R_OK):
        _fail(where, f"{path} cannot be read (permission denied)")
    return path


def _edits(where: str, value: object, edit_defaults: dict) -> tuple[EditSpec, ...]:
    if not isinstance(value, list) or not value:
        _fail(where, "expected a list of target texts (or mappings with a 'target' key), at least one")
    specs: dict[str, int] = {}
    edits = []
    for i, item in enumerate(value, start=1):
        at = f"{where}[{i}]"
        item = {"target": item} if isinstance(item, str) else dict(_mapping(at, item, EDIT_KEYS))
        target = _text(f"{at}.target", item.pop("target", None))
        name = _name(f"{at}.name", item.pop("name", slugify(target)))
        if name in specs:
            _fail(at, f"writes the same file as edit {specs[name]} ({name}.mp4); give one of them a 'name'")
        specs[name] = i
        edits.append(EditSpec(target, _settings(at, EditSettings, edit_defaults | item), name))
    return tuple(edits)


def _name(where: str, value: object) -> str:
    value = _text(where, value)
    if not NAME.fullmatch(value):
        _fail(where, f"{value!r} is not a folder name (letters, digits, '.', '-', '_')")
    return value


def _job(path: Path, index: int, raw: object, defaults: dict) -> Job:
    where = f"{path}: job {index}"
    raw = _mapping(where, raw, JOB_KEYS)
    if isinstance(raw.get("name"), str):
        where = f"{path}: job {raw['name']!r}"
    base = path.parent
    video = _video(f"{where}: video", base, raw.get("video"))
    name = _name(f"{where}: name", raw.get("name", slugify(video.stem)))
    sections = {}
    for key in SECTIONS:
        own = _mapping(f"{where}: {key}", raw.get(key) or {}, [f.name for f in fields(SECTIONS[key])])
        sections[key] = (defaults.get(key) or {}) | own
    model = _model(where, base, raw, defaults)
    prompt = _text(f"{where}: prompt", raw.get("prompt"))
    return Job(
        preset=path,
        name=name,
        video=video,
        model=model,
        tune=_settings(f"{where}: tune", TuneSettings, sections["tune"], prompt=prompt),
        output=_settings(f"{where}: output", OutputSettings, sections["output"]),
        edits=_edits(f"{where}: edits", raw.get("edits"), sections["edit"]),
    )


def load_preset(path: Path) -> list[Job]:
    import yaml

    if not path.is_file():
        _fail(str(path), "no such preset file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        _fail(str(path), "not valid YAML: " + " ".join(str(error).split()))
    if data is None:
        _fail(str(path), "the file is empty; a preset needs a 'jobs' list (see presets/ for examples)")
    data = _mapping(str(path), data, ("defaults", "jobs"))
    defaults = _mapping(f"{path}: defaults", data.get("defaults") or {}, (*MODEL_KEYS, *SECTIONS))
    for key in SECTIONS:
        _mapping(f"{path}: defaults: {key}", defaults.get(key) or {}, [f.name for f in fields(SECTIONS[key])])
    jobs = data.get("jobs")
    if not isinstance(jobs, list) or not jobs:
        _fail(str(path), "expected a non-empty 'jobs' list")
    loaded = [_job(path, i, raw, defaults) for i, raw in enumerate(jobs, start=1)]
    seen = set()
    for job in loaded:
        if job.name in seen:
            _fail(f"{path}: job {job.name!r}", "two jobs have this name; names pick the run folders, make them unique")
        seen.add(job.name)
    return loaded


def load_presets(paths: list[Path]) -> list[Job]:
    """The jobs of every preset, in order; presets with the same file name would share run folders: refused."""
    stems: dict[str, Path] = {}
    for path in paths:
        if path.stem in stems and stems[path.stem].resolve() != path.resolve():
            _fail(str(path), f"has the same name as {stems[path.stem]}; their runs would share a folder, rename one")
        stems[path.stem] = path
    return [job for path in dict.fromkeys(paths) for job in load_preset(path)]


def select_jobs(jobs: list[Job], only: list[str] | None) -> list[Job]:
    """The jobs named by --only (name or preset/name), all without it."""
    if not only:
        return jobs
    unknown = [name for name in only if not any(name in (job.name, job.label) for job in jobs)]
    if unknown:
        raise UsageError(f"--only {unknown[0]!r} names no job; jobs: {', '.join(job.label for job in jobs)}")
    return [job for job in jobs if job.name in only or job.label in only]
