"""What a client says about the reconstruction it wants: config name, JSON parameters, aliases.

Three client styles reach the same chains:

- gadgetron_ismrmrd_client: CONFIG_FILE with a chain name, or CONFIG_TEXT with a Gadgetron XML
  chain (see gadgets.chain).
- FIRE's client.py (python-ismrmrd-server): CONFIG_FILE (default name `invertcontrast`), or a
  CONFIG_TEXT that FIRE servers take as a name; then the header; then, optionally, a TEXT with
  a JSON config: `{"version": ..., "parameters": {...}}`. `parameters.config` replaces the
  config name and a non-empty `parameters.customconfig` replaces it again.
- Siemens OpenRecon consoles: CONFIG_FILE `openrecon`, the header, then a TEXT with the JSON
  parameters the image's manifest declares (docker/openrecon/), every value sent as a string.

JSON parameters -> chain (the documented mapping; docs/PROTOCOL.md "JSON parameters"):

| key | becomes |
|---|---|
| `config`, `customconfig` | the chain name (as FIRE's server does) |
| `STAGE.PARAMETER` | that stage's parameter, e.g. `image_finish.series_index`, `pisf_recon.threads` |
| `seriesdescription` | `image_finish.sequence_description_additional` (text added to the console's series description) |
| `seriesindex` | `image_finish.series_index` |
| `comment` | `image_finish.comment` |
| `fire` | `image_finish.fire` (int16 images with FIRE meta) |
| `freetext` | noted in the server log (FIRE/OpenRecon convention), no effect |

Values are typed by the stage parameter's default ("True"/"False"/"1"/"0" for booleans, numbers
from strings), since FIRE and OpenRecon send strings; a value that does not convert is refused
with an error naming the key. Keys that match nothing are reported to the client in a TEXT
`WARNING:` and ignored; keys of the mapping that the selected chain has no stage for are logged
only (a console sends every declared parameter whatever the chain). Parameters that name files
(`model`, `*_path`, `*_file`, `*_dir`) take bare file names only: the client cannot point the
server at a path.

The name `openrecon` (what an OpenRecon console sends) runs the server's default chain with
FIRE-style image output (`image_finish.fire = true`).
"""
from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..chain import ChainRepository, ChainSpec, ConfigError, is_valid_name, parse_chain_text

OPENRECON_NAME = "openrecon"
DEFAULT_NAME = "default"  # `pisf replay` without -c: the server's default chain, images as that chain makes them
CHAIN_KEYS = ("config", "customconfig")
SHORT_NAMES = {
    "seriesdescription": "image_finish.sequence_description_additional",
    "seriesindex": "image_finish.series_index",
    "comment": "image_finish.comment",
    "fire": "image_finish.fire",
}
NOTED_KEYS = ("freetext",)
_FILE_PARAMETER = re.compile(r"^(model|.*_(path|file|dir))$")


@dataclass
class ClientJson:
    """The JSON config TEXT, split into what selects the chain and what parametrises it."""
    parameters: dict[str, Any] = field(default_factory=dict)
    ignored_top_level: list[str] = field(default_factory=list)
    text: str = ""

    @property
    def config_name(self) -> str | None:
        """parameters.customconfig when non-empty, else parameters.config, else None (FIRE's rule)."""
        custom = self.parameters.get("customconfig")
        if isinstance(custom, str) and custom.strip():
            return custom.strip()
        config = self.parameters.get("config")
        if isinstance(config, str) and config.strip():
            return config.strip()
        return None


def looks_like_json(text: str) -> bool:
    return text.lstrip().startswith(("{", "["))


def parse_client_json(text: str) -> ClientJson:
    """The TEXT after the header as a JSON config (ConfigError when it is JSON-like but broken).

    `{"parameters": {...}, ...}` is the FIRE/OpenRecon form (other top-level keys besides
    `version` are reported as ignored); a flat object is taken as the parameters themselves.
    """
    try:
        document = json.loads(text.strip().rstrip("\0"))
    except ValueError as exc:
        raise ConfigError(f"the JSON config (TEXT after the header) does not parse: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigError(f"the JSON config (TEXT after the header) must be an object, "
                          f"not {type(document).__name__}")
    if "parameters" in document:
        parameters = document["parameters"]
        if not isinstance(parameters, dict):
            raise ConfigError("the JSON config's 'parameters' must be an object of key: value")
        ignored = sorted(k for k in document if k not in ("parameters", "version"))
        client = ClientJson(dict(parameters), ignored, text)
    else:
        client = ClientJson(dict(document), [], text)
    for key in CHAIN_KEYS:
        value = client.parameters.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"JSON parameter {key!r} = {value!r}: a chain name (text) is expected")
    return client


# ---------------------------------------------------------------- typing of values

def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"JSON parameter {key!r} = {value!r}: expected true or false")


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"JSON parameter {key!r} = {value!r}: expected an integer")
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"JSON parameter {key!r} = {value!r}: expected an integer") from None
    if not as_float.is_integer():
        raise ConfigError(f"JSON parameter {key!r} = {value!r}: expected an integer")
    return int(as_float)


def _float(key: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"JSON parameter {key!r} = {value!r}: expected a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"JSON parameter {key!r} = {value!r}: expected a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"JSON parameter {key!r} = {value!r}: expected a finite number")
    return number


def _kind(parameter: inspect.Parameter) -> str:
    """'bool', 'int', 'float', 'list', 'str' or 'any' from the default, else the annotation."""
    default = parameter.default
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, (list, tuple)):
        return "list"
    annotation = str(parameter.annotation)
    for kind in ("bool", "int", "float"):
        if re.search(rf"\b{kind}\b", annotation) and "str" not in annotation:
            return kind
    if isinstance(default, str) or annotation.strip("'\"") == "str":
        return "str"
    return "any"


def coerce(key: str, parameter: inspect.Parameter, value: Any) -> Any:
    """The client's value typed like the stage parameter, or ConfigError naming the key."""
    kind = _kind(parameter)
    if value is None:
        if parameter.default is None:
            return None
        raise ConfigError(f"JSON parameter {key!r}: null is not allowed here")
    if kind == "bool":
        return _bool(key, value)
    if kind == "int":
        return _int(key, value)
    if kind == "float":
        return _float(key, value)
    if kind == "list":
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return value
        raise ConfigError(f"JSON parameter {key!r} = {value!r}: expected a list of names or a comma-separated string")
    if isinstance(value, (dict, list)):
        raise ConfigError(f"JSON parameter {key!r} = {value!r}: expected a single value")
    if kind == "str" or isinstance(value, str):
        value = str(value)
        name = key.rsplit(".", 1)[-1]
        if _FILE_PARAMETER.match(name) and (not is_valid_name(value) or "/" in value or "\\" in value):
            raise ConfigError(f"JSON parameter {key!r} = {value!r}: a file name is expected here, not a path")
        return value
    return value


# ---------------------------------------------------------------- applying parameters to a chain

def stage_parameters(spec: ChainSpec) -> dict[str, dict[str, inspect.Parameter]]:
    """gadget name -> {parameter name: inspect.Parameter} of the chain's stage classes."""
    known = {}
    for gadget, stage_class, _ in spec.stage_classes():
        signature = inspect.signature(stage_class.__init__)
        known[gadget] = {name: p for name, p in signature.parameters.items()
                         if name not in ("self", "context") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return known


@dataclass
class Applied:
    applied: dict[str, Any] = field(default_factory=dict)     # stage.parameter -> typed value
    unknown: list[str] = field(default_factory=list)          # keys that match nothing: told to the client
    not_in_chain: list[str] = field(default_factory=list)     # mapped keys without a stage in this chain: logged
    noted: dict[str, Any] = field(default_factory=dict)       # freetext and the like: logged

    def warning(self, chain: str) -> str | None:
        if not self.unknown:
            return None
        return (f"WARNING: JSON parameters not used by chain {chain!r}: {', '.join(self.unknown)} "
                f"(known: config, customconfig, {', '.join(SHORT_NAMES)}, {', '.join(NOTED_KEYS)} "
                f"and STAGE.PARAMETER)")


def apply_parameters(spec: ChainSpec, parameters: dict[str, Any], declared_elsewhere: tuple[str, ...] = ()) -> Applied:
    """Set the chain's stage parameters from client parameters (typed, checked); see module docs.

    `declared_elsewhere`: keys that are valid for the client but not for this mapping (they are
    neither applied nor reported).
    """
    known = stage_parameters(spec)
    result = Applied()
    for key, value in parameters.items():
        if key in CHAIN_KEYS or key in declared_elsewhere:
            continue
        if key in NOTED_KEYS:
            result.noted[key] = value
            continue
        target = SHORT_NAMES.get(key, key)
        if "." not in target:
            result.unknown.append(key)
            continue
        gadget, name = target.split(".", 1)
        if gadget not in known:
            (result.not_in_chain if key in SHORT_NAMES else result.unknown).append(key)
            continue
        if name not in known[gadget]:
            result.unknown.append(key)
            continue
        typed = coerce(key, known[gadget][name], value)
        for stage_name, stage_parameters_ in spec.stages:
            if stage_name == gadget:
                stage_parameters_[name] = typed
        result.applied[target] = typed
    return result


# ---------------------------------------------------------------- selecting the chain

@dataclass
class Selection:
    spec: ChainSpec
    requested: str            # what the client asked for (name, or "CONFIG_TEXT")
    openrecon: bool = False   # an OpenRecon console: FIRE-style output


def select_chain(repository: ChainRepository, config_name: str | None, config_text: str | None,
                 client_json: ClientJson | None, aliases: dict[str, str]) -> Selection:
    """The chain for a session from its CONFIG message and JSON config (FIRE's precedence)."""
    openrecon = config_name is not None and config_name.strip().lower() == OPENRECON_NAME
    name = config_name
    if client_json is not None and client_json.config_name is not None:
        name, config_text = client_json.config_name, None
    if name is None and config_text is not None:
        bare = config_text.strip().rstrip("\0").strip()
        if is_valid_name(bare) and "\n" not in bare:
            name = bare   # FIRE treats CONFIG_TEXT as a config name
        else:
            return Selection(parse_chain_text(config_text, origin="CONFIG_TEXT", repository=repository),
                             "CONFIG_TEXT", openrecon)
    assert name is not None
    target = aliases.get(name.strip().lower(), name)
    spec = repository.load(target)
    if target != name:
        spec.description = f"{name} -> {target}: {spec.description}"
    return Selection(spec, name, openrecon or name.strip().lower() == OPENRECON_NAME)
