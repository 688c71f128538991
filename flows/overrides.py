"""`key=value` overrides written into params.yaml, as `dvc exp run -S` does, keeping comments.

The file is changed only when the result validates, so a typo never leaves params.yaml broken.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable
from pathlib import Path

import yaml
from ruamel.yaml import YAML

from bit_core.config import ConfigError, Params, parse_params
from bit_core.io import atomic_path


PRESETS = Path(__file__).resolve().parents[1] / "presets"


def list_presets() -> list[str]:
    """Names of the recipes in presets/ (cifar10, imagenet, ...)."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


# A preset decides the whole experiment: these sections go back to their defaults before its
# values are written, all but the host's own settings (where downloads are kept, how the nodes
# of a run meet), so nothing an earlier preset or -S left (data.shots, train.processes, a mirror
# of another data set) changes what it trains.
RECIPE_SECTIONS = ("data", "model", "weights", "train")
HOST_SETTINGS = {"weights": {"cache_dir"},
                 "train": {"rdzv_endpoint", "rdzv_id", "join_timeout", "peer_timeout"}}


def _override(section: str, key: str, value: object) -> str:
    return (f"{section}.{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
            .removesuffix("\n..."))


def preset_overrides(name: str) -> list[str]:
    """A preset file as ``section.key=value`` overrides (values in YAML flow style), after the
    defaults of everything else it decides (:data:`RECIPE_SECTIONS`)."""
    if name not in list_presets():  # a name, never a path (`-P ../params` is no recipe)
        raise ConfigError(f"unknown preset {name!r}: choose one of {', '.join(list_presets())}")
    path = PRESETS / f"{name}.yaml"
    sections = yaml.safe_load(path.read_text()) or {}
    if not isinstance(sections, dict) or not all(isinstance(v, dict) for v in sections.values()):
        raise ConfigError(f"preset {path} is not sections of settings (data:, train:, ...): fix "
                          "it as the other presets are written")
    defaults = [_override(section, key, field.get_default(call_default_factory=True))
                for section in RECIPE_SECTIONS
                for key, field in Params.model_fields[section].annotation.model_fields.items()
                if key not in HOST_SETTINGS.get(section, ())]
    return defaults + [_override(section, key, value)
                       for section, values in sections.items() for key, value in values.items()]


def parse_override(text: str) -> tuple[list[str], object]:
    """``train.batch=64`` -> (["train", "batch"], 64); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not key=value (e.g. train.batch=64)")
    try:
        return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML: close its brackets "
                          "or quotes, or quote it whole") from None


def _flow(value):
    """Lists and mappings written inline (``[30, 200]``), like the hand-written file."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, list):
        seq = CommentedSeq(_flow(v) for v in value)
        seq.fa.set_flow_style()
        return seq
    if isinstance(value, dict):
        mapping = CommentedMap((k, _flow(v)) for k, v in value.items())
        mapping.fa.set_flow_style()
        return mapping
    return value


def apply_overrides(path: Path, overrides: Iterable[str]) -> Params:
    """Set each ``section.key=value`` in params.yaml; validate; write atomically; return params."""
    from bit_core.config import load_params, load_params_text

    overrides = list(overrides)
    path = Path(path)
    if not overrides:
        return load_params(path)
    rt = YAML()
    rt.preserve_quotes = True
    rt.representer.add_representer(type(None), lambda r, _: r.represent_scalar(
        "tag:yaml.org,2002:null", "null"))  # `key: null`, as written by hand, not `key:`
    load_params_text(path)  # one line when the file is missing or not YAML, as load_params says
    doc = rt.load(path.read_text())
    for text in overrides:
        keys, value = parse_override(text)
        node = doc
        for depth, key in enumerate(keys[:-1]):
            if not isinstance(node.get(key), dict):
                shown = ".".join(keys[:depth + 1])
                raise ConfigError(
                    f"override {text!r}: no section {key!r} in {path}" if key not in node else
                    f"override {text!r}: {shown} is not a section: set it whole, e.g. "
                    f"-S '{shown}=<value>'")
            node = node[key]
        node[keys[-1]] = _flow(value)
    buffer = io.StringIO()
    rt.dump(doc, buffer)
    params = parse_params(yaml.safe_load(buffer.getvalue()), str(path))
    target = Path(os.path.realpath(path))  # a linked params.yaml stays a link, to new text
    with atomic_path(target) as tmp:
        tmp.write_text(buffer.getvalue())
        tmp.chmod(stat.S_IMODE(target.stat().st_mode))  # 0600 stays 0600 (it may hold a password)
    return params
