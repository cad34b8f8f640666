"""Chains: an ordered list of stages described in YAML, built against one stream's context.

    name: zerofill
    stages:
      - gadget: noise_prewhitening
      - gadget: image_finish
        data_type: ushort        # every other key is a parameter of that stage

A stage is a class `Stage(context, **parameters)` whose instances are called with an iterator
of items and yield items. The same chain runs in the embedded server and inside Gadgetron.
"""
from __future__ import annotations

import importlib
import os
import re
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import yaml

from .context import InputError, StreamContext

# gadget name -> "module:Class" (modules imported on first use, so chains load only what they need)
GADGETS = {
    "noise_prewhitening": "gadgets.noise:NoisePrewhitening",
    "remove_oversampling": "gadgets.oversampling:RemoveOversampling",
    "slice_accumulator": "gadgets.accumulate:SliceAccumulator",
    "reference_prep": "gadgets.reference_prep:ReferencePrep",
    "zerofill_recon": "gadgets.zerofill:ZeroFilledRecon",
    "pisf_recon": "gadgets.pisf:PisfRecon",
    "grappa_recon": "gadgets.classical:GrappaRecon",
    "sense_recon": "gadgets.classical:SenseRecon",
    "classical_recon": "gadgets.classical:ClassicalChoiceRecon",
    "image_finish": "gadgets.finish:ImageFinish",
}

DEFAULT_CONFIG_DIR = Path(__file__).resolve().parent.parent / "config"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ConfigError(ValueError):
    """A chain cannot be found or is malformed; the text goes to the client."""


def is_valid_name(name: str) -> bool:
    """A config name as clients may send it: letters, digits, `_.-`, no separators, no `..`."""
    name = name.strip().rstrip("\0")
    return bool(_NAME.match(name)) and ".." not in name


@dataclass
class ChainSpec:
    name: str
    stages: list[tuple[str, dict[str, Any]]]
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)

    @staticmethod
    def from_mapping(mapping: Any, origin: str) -> "ChainSpec":
        if not isinstance(mapping, dict) or not isinstance(mapping.get("stages"), list):
            raise ConfigError(f"{origin}: a chain needs a 'stages' list")
        stages = []
        for number, entry in enumerate(mapping["stages"], 1):
            if not isinstance(entry, dict) or "gadget" not in entry:
                raise ConfigError(f"{origin}: stage {number} needs a 'gadget' key")
            parameters = {k: v for k, v in entry.items() if k != "gadget"}
            if entry["gadget"] not in GADGETS:
                raise ConfigError(f"{origin}: stage {number}: unknown gadget {entry['gadget']!r} "
                                  f"(known: {', '.join(sorted(GADGETS))})")
            stages.append((entry["gadget"], parameters))
        return ChainSpec(name=str(mapping.get("name", origin)), stages=stages,
                         description=str(mapping.get("description", "")))

    def stage_classes(self):
        for gadget, parameters in self.stages:
            module_name, class_name = GADGETS[gadget].split(":")
            yield gadget, getattr(importlib.import_module(module_name), class_name), parameters

    def warm_up(self) -> None:
        """Let stages with expensive set-up (model sessions) do it now rather than on the first scan."""
        for _, stage_class, parameters in self.stage_classes():
            if hasattr(stage_class, "warm_up"):
                stage_class.warm_up(**parameters)

    def build(self, context: StreamContext) -> list:
        stages = []
        for gadget, stage_class, parameters in self.stage_classes():
            try:
                stages.append(stage_class(context, **parameters))
            except TypeError as exc:
                raise ConfigError(f"chain {self.name!r}, gadget {gadget!r}: {exc}") from None
            except (ConfigError, InputError):
                raise
            except Exception as exc:
                # e.g. a missing or corrupt model file: the client must hear which stage and why
                # (a FileNotFoundError is an OSError, which the server would take for a broken connection)
                raise ConfigError(f"chain {self.name!r}, gadget {gadget!r} could not be set up: "
                                  f"{type(exc).__name__}: {exc}") from None
        return stages


def run_stages(stages: list, items: Iterable) -> Iterator:
    """Compose the stages over an item iterator; returns the iterator of output items."""
    stream = iter(items)
    for stage in stages:
        stream = stage(stream)
    return stream


def parse_chain_text(text: str, origin: str, repository: "ChainRepository | None" = None) -> ChainSpec:
    """A chain from YAML text, or from a Gadgetron XML chain that executes one of our targets
    (whose chain is then looked up in `repository`)."""
    stripped = text.strip().rstrip("\0")
    if stripped.startswith("<"):
        return _chain_from_gadgetron_xml(stripped, origin, repository or ChainRepository.shared())
    try:
        mapping = yaml.safe_load(stripped)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin}: not valid YAML: {exc}") from None
    return ChainSpec.from_mapping(mapping, origin)


def safe_xml(text: str, origin: str) -> ElementTree.Element:
    """Parse XML from a client, refusing DTDs and entities (no entity expansion, no external fetch)."""
    if re.search(r"<!(DOCTYPE|ENTITY)", text, re.IGNORECASE):
        raise ConfigError(f"{origin}: XML with a DOCTYPE or ENTITY declaration is refused")
    try:
        return ElementTree.fromstring(text)
    except ElementTree.ParseError as exc:
        raise ConfigError(f"{origin}: XML does not parse: {exc}") from None


def configuration_properties(config) -> dict[str, str]:
    """`<property name=.. value=..>` elements under a Gadgetron `<configuration>` (ElementTree)."""
    if config is None:
        return {}
    properties = {}
    for element in config.iter():
        if element.tag.split("}")[-1] == "property" and element.get("name"):
            properties[element.get("name")] = element.get("value", element.text or "")
    return properties


def _coerce(value: str) -> Any:
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def apply_overrides(spec: ChainSpec, properties: dict[str, str]) -> None:
    """Properties named `gadget.parameter` override that stage's parameter (typed as in YAML)."""
    for key, value in properties.items():
        if "." not in key:
            continue
        gadget, parameter = key.split(".", 1)
        for name, parameters in spec.stages:
            if name == gadget:
                parameters[parameter] = _coerce(value)


def _chain_from_gadgetron_xml(text: str, origin: str, repository: "ChainRepository") -> ChainSpec:
    """A Gadgetron chain whose `<external>` executes one of our targets runs that chain here.

    Target `zerofill`/`pisf` name the chain; a `chain` property (required for target `chain`) names another.
    """
    root = safe_xml(text, origin)
    for external in root.iter():
        if external.tag.split("}")[-1] != "external":
            continue
        execute = next((e for e in external.iter() if e.tag.split("}")[-1] == "execute"), None)
        if execute is None or not execute.get("name", "").startswith("gadgets."):
            continue
        configuration = next((e for e in external.iter() if e.tag.split("}")[-1] == "configuration"), None)
        properties = configuration_properties(configuration)
        target = execute.get("target", "")
        if target == "prewhiten":
            continue  # our prewhitening ahead of Gadgetron's own gadgets: every chain here prewhitens anyway
        # `X_buffers` targets run chain X on Gadgetron's buffers; sent to our own server (which
        # buffers itself) the same chain runs on the acquisitions.
        if target.endswith("_buffers"):
            target = target[:-len("_buffers")]
        # as in gadgets.gadgetron_external.targets.run_chain: a `chain` property names the chain
        # for every target
        spec = repository.load(properties.get("chain", target))
        apply_overrides(spec, properties)
        return spec
    raise ConfigError(f"{origin}: this Gadgetron XML chain runs none of our targets "
                      f"(expected <execute name=\"gadgets.gadgetron_external.targets\" target=\"CHAIN\" "
                      f"type=\"python\"/>)")


class ChainRepository:
    """Resolves config names (CONFIG_FILE messages) to chains inside one directory, and only there."""

    _shared: "ChainRepository | None" = None

    def __init__(self, directory: Path | str = DEFAULT_CONFIG_DIR):
        self.directory = Path(directory).resolve()

    @classmethod
    def shared(cls) -> "ChainRepository":
        if cls._shared is None:
            cls._shared = ChainRepository(os.environ.get("PISF_CONFIG_DIR", DEFAULT_CONFIG_DIR))
        return cls._shared

    def names(self) -> list[str]:
        """Chains offered here: the YAML files that describe stages (training configs live alongside)."""
        names = []
        for path in sorted(self.directory.glob("*.yaml")):
            if path.resolve().parent != self.directory:
                continue  # a symlink out of the directory: load() refuses it, so it is not offered
            try:
                mapping = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError):
                continue
            if isinstance(mapping, dict) and "stages" in mapping:
                names.append(path.stem)
        return names

    def load(self, name: str) -> ChainSpec:
        name = name.strip().rstrip("\0")
        # A name is a name: no separators, no parent references, nothing absolute.
        if not is_valid_name(name):
            raise ConfigError(f"config {name!r} is not a valid chain name")
        stem = name
        for suffix in (".yaml", ".xml"):
            if stem.endswith(suffix):
                stem = stem[:-len(suffix)]
                break
        for candidate in (self.directory / f"{stem}.yaml", self.directory / f"{stem}.xml"):
            resolved = candidate.resolve()
            if resolved.parent != self.directory or not resolved.is_file():
                continue  # symlinks out of the directory are ignored
            text = resolved.read_text(encoding="utf-8")
            spec = parse_chain_text(text, origin=candidate.name, repository=self)
            if candidate.suffix == ".yaml":
                spec.name = stem
            return spec
        raise ConfigError(f"unknown config {name!r}; available: {', '.join(self.names()) or 'none'}")
