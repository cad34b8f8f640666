"""Real clients' protocol behaviour, played from their documented behaviour (REFERENCE.md sections 1, 6):

- FIRE's client.py (python-ismrmrd-server): NUL-terminated strings, default config name
  `invertcontrast`, a JSON config TEXT after the header whose `parameters.config` /
  `customconfig` name the recon, CONFIG_TEXT taken as a config name.
- gadgetron_ismrmrd_client: `-Q NAME` sends QUERY (id 6: uint64 reserved, uint64 correlation id,
  uint64 length, text) then CLOSE and prints the RESPONSE (id 7); a dependency query sends a
  config and CLOSE without header.
- a Siemens OpenRecon console: CONFIG_FILE `openrecon`, header, JSON TEXT carrying every
  parameter the image's manifest declares, all values as strings.
"""
from __future__ import annotations

import base64
import json
import socket
import struct
import threading
from importlib import metadata

import numpy as np
import pytest

from gadgets.chain import ChainRepository
from gadgets.wire import protocol
from gadgets.wire.server import ReconServer
from gadgets.wire.session_config import CHAIN_KEYS, NOTED_KEYS, SHORT_NAMES
from tests.conftest import REPO
from tests.test_server_errors import (assert_error, assert_still_serving, connect, converse, frames, images,
                                      make_header, make_slice, read_until_close, texts)

pytestmark = pytest.mark.timeout(60)
MANIFEST = REPO / "docker" / "openrecon" / "OpenReconLabel.json"


# ---------------------------------------------------------------- FIRE's client.py, byte by byte

def fire_string(message_id: int, text: str) -> bytes:
    """FIRE's client appends a NUL to every string it sends (uint32 length includes it)."""
    raw = text.encode("utf-8") + b"\0"
    return struct.pack("<HI", message_id, len(raw)) + raw


def fire_config_file(name: str) -> bytes:
    return struct.pack("<H", protocol.CONFIG_FILE) + (name.encode() + b"\0").ljust(protocol.CONFIG_FILE_BYTES, b"\0")


def fire_session(config: bytes, json_config: dict | str | None, scan=None, header: str | None = None) -> bytes:
    payload = config + fire_string(protocol.HEADER, header or make_header())
    if json_config is not None:
        text = json_config if isinstance(json_config, str) else json.dumps(json_config, indent=2)
        payload += fire_string(protocol.TEXT, text)
    return payload + frames(*(scan if scan is not None else make_slice())) + protocol.frame_close()


def talk(server, payload: bytes) -> list:
    """Send while reading (as FIRE's client does, in two processes), every message up to CLOSE."""
    with connect(server) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        messages = read_until_close(sock)
        sender.join()
    return messages


def test_fire_default_name_with_json_config_naming_the_chain(server):
    """client.py -c is not given: it sends `invertcontrast` and <config>.json's parameters.config."""
    messages = talk(server, fire_session(fire_config_file("invertcontrast"),
                                         {"version": "1.1.0", "parameters": {"config": "zerofill"}}))
    assert texts(messages) == [] and isinstance(messages[-1], protocol.Close)
    [image] = images(messages)
    assert image.meta["ImageComment"] == "zero-filled FFT, RSS coil combination"


def test_fire_customconfig_wins_over_config(server):
    messages = talk(server, fire_session(fire_config_file("invertcontrast"),
                                         {"parameters": {"config": "no_such_chain", "customconfig": "zerofill"}}))
    assert texts(messages) == [] and len(images(messages)) == 1


def test_fire_empty_customconfig_is_ignored(server):
    messages = talk(server, fire_session(fire_config_file("zerofill"),
                                         {"parameters": {"config": "zerofill", "customconfig": ""}}))
    assert texts(messages) == [] and len(images(messages)) == 1


def test_fire_json_naming_an_unknown_chain_is_refused_with_the_list(server):
    messages = talk(server, fire_session(fire_config_file("invertcontrast"), {"parameters": {"config": "nope"}}))
    assert_error(messages, "unknown config 'nope'", "available:", "zerofill")


def test_fire_default_name_without_json_is_a_clear_error(server):
    messages = talk(server, fire_session(fire_config_file("invertcontrast"), None))
    assert_error(messages, "unknown config 'invertcontrast'", "zerofill")


def test_config_text_holding_a_bare_name_is_a_name(server):
    """FIRE's server treats CONFIG_TEXT as a config name (client.py -C with a one-word file)."""
    messages = talk(server, fire_session(fire_string(protocol.CONFIG_TEXT, "zerofill\n"), None))
    assert texts(messages) == [] and len(images(messages)) == 1


def test_json_parameters_reach_the_stages(server):
    parameters = {"config": "zerofill", "image_finish.series_index": "7", "fire": "True",
                  "seriesdescription": "R4_PISF", "comment": "from the JSON", "freetext": "hello"}
    messages = talk(server, fire_session(fire_config_file("invertcontrast"), {"parameters": parameters}))
    assert texts(messages) == []
    [image] = images(messages)
    assert image.image_series_index == 7
    assert image.data.dtype == np.int16                       # fire: "True" (a string) -> True
    assert image.meta["SequenceDescriptionAdditional"] == "R4_PISF"
    assert image.meta["ImageComment"] == "from the JSON"


def test_flat_json_object_is_taken_as_parameters(server):
    """`pisf replay --parameters '{...}'` sends a flat object."""
    messages = talk(server, fire_session(fire_config_file("zerofill"), {"image_finish.series_index": 3}))
    assert texts(messages) == [] and images(messages)[0].image_series_index == 3


def test_unknown_json_keys_are_reported_and_the_scan_goes_on(server):
    config = {"version": "1.1.0", "parameters": {"config": "zerofill", "options": "roi", "sendOriginal": "False",
                                                 "image_finish.no_such": 1, "nostage.x": 2},
              "invertcontrast": {"x": 1}}
    messages = talk(server, fire_session(fire_config_file("invertcontrast"), config))
    [warning] = texts(messages)
    assert warning.startswith("WARNING:")
    for key in ("options", "sendOriginal", "image_finish.no_such", "nostage.x", "invertcontrast"):
        assert key in warning, (key, warning)
    assert len(images(messages)) == 1 and isinstance(messages[-1], protocol.Close)


@pytest.mark.parametrize("parameters, fragments", [
    ({"image_finish.series_index": "abc"}, ["'image_finish.series_index'", "'abc'", "integer"]),
    ({"seriesindex": 2.5}, ["'seriesindex'", "integer"]),
    ({"fire": "maybe"}, ["'fire'", "true or false"]),
    ({"image_finish.target_percentile_value": "NaN"}, ["target_percentile_value", "finite number"]),
    ({"image_finish.data_type": "complex"}, ["image_finish", "data_type must be one of"]),
    ({"config": "pisf", "pisf_recon.model": "../../etc/passwd"}, ["pisf_recon.model", "not a path"]),
    ({"config": 5}, ["'config'", "chain name"]),
    ({"customconfig": ["zerofill"]}, ["'customconfig'", "chain name"]),
])
def test_bad_json_values_are_refused_naming_the_key(server, parameters, fragments):
    parameters = {"config": "zerofill", **parameters}
    messages = talk(server, fire_session(fire_config_file("invertcontrast"), {"parameters": parameters}))
    assert_error(messages, *fragments)
    assert_still_serving(server)


@pytest.mark.parametrize("text, fragment", [
    ('{"parameters": {"config": "zerofill",}', "does not parse"),
    ('["zerofill"]', "must be an object"),
    ('{"parameters": "zerofill"}', "'parameters' must be an object"),
])
def test_broken_json_config_is_refused(server, text, fragment):
    messages = talk(server, fire_session(fire_config_file("zerofill"), text))
    assert_error(messages, "JSON config", fragment)


def test_plain_text_after_the_header_is_only_logged(server):
    messages = talk(server, fire_session(fire_config_file("zerofill"), "scan started by the test"))
    assert texts(messages) == [] and len(images(messages)) == 1


# ---------------------------------------------------------------- gadgetron_ismrmrd_client

def query_session(server, *queries: tuple[str, int]) -> list:
    payload = b"".join(protocol.frame_query(text, correlation) for text, correlation in queries)
    return converse(server, payload + protocol.frame_close(), half_close=False)


def test_query_gadgetron_info_gets_a_response_then_close(server):
    messages = query_session(server, ("gadgetron::info", 0))
    assert [type(m).__name__ for m in messages] == ["Response", "Close"]
    info = messages[0].text
    assert messages[0].correlation_id == 0
    assert "PISF inline reconstruction server" in info and "zerofill" in info and "Python Support" in info


def test_queries_keep_their_correlation_ids(server):
    messages = query_session(server, ("gadgetron::version", 11), ("ismrmrd::version", 12), ("pisf::configs", 13),
                             ("gadgetron::info::python", 14), ("gadgetron::info::memory", 15))
    responses = [m for m in messages if isinstance(m, protocol.Response)]
    assert [r.correlation_id for r in responses] == [11, 12, 13, 14, 15]
    version, ismrmrd_version, configs, python, memory = (r.text for r in responses)
    assert version and version[0].isdigit()
    assert ismrmrd_version == metadata.version("ismrmrd")
    assert "zerofill" in configs.splitlines() and "openrecon -> pisf" in configs.splitlines()
    assert python == "1" and int(memory) > 0
    assert isinstance(messages[-1], protocol.Close)


def test_unknown_query_gets_a_text_error_naming_the_known_ones(server):
    messages = query_session(server, ("gadgetron::cuda::devices_of_mars", 3))
    text = assert_error(messages, "unknown query 'gadgetron::cuda::devices_of_mars'", "gadgetron::info")
    assert "pisf::configs" in text


def test_query_before_the_config_of_a_scan(server):
    payload = protocol.frame_query("gadgetron::version", 5) + fire_session(fire_config_file("zerofill"), None)
    messages = talk(server, payload)
    assert isinstance(messages[0], protocol.Response) and messages[0].correlation_id == 5
    assert len(images(messages)) == 1 and texts(messages) == []


def test_query_with_a_non_zero_reserved_field_is_refused(server):
    raw = b"gadgetron::info"
    frame = struct.pack("<HQQQ", protocol.QUERY, 1, 0, len(raw)) + raw
    assert_error(converse(server, frame), "QUERY with a non-zero reserved field")


def test_response_from_a_client_is_refused(server):
    payload = (protocol.frame_config_name("zerofill") + protocol.frame_header(make_header())
               + protocol.frame_response(1, "hi"))
    assert_error(converse(server, payload), "unexpected Response")


@pytest.mark.parametrize("name", ["../zerofill", "/etc/passwd", "zero fill", "a" * 200])
def test_invalid_config_name_then_close_is_refused_at_once(server, name):
    messages = converse(server, protocol.frame_config_name(name) + protocol.frame_close(), half_close=False)
    assert_error(messages, repr(name), "not a valid chain name")


def test_invalid_config_name_is_refused_before_the_header(server):
    with connect(server) as sock:
        sock.sendall(protocol.frame_config_name("../../etc/passwd"))  # no header yet: the answer comes anyway
        messages = read_until_close(sock)
    assert_error(messages, "not a valid chain name")


@pytest.mark.parametrize("config", [protocol.frame_config_name("zerofill"),
                                    protocol.frame_config_name("default_measurement_dependencies.xml"),
                                    fire_string(protocol.CONFIG_TEXT, "<gadgetronStreamConfiguration/>")])
def test_valid_names_and_config_text_keep_the_dependency_query_reply(server, config):
    messages = converse(server, config + protocol.frame_close(), half_close=False)
    assert len(messages) == 1 and isinstance(messages[0], protocol.Close), messages


# ---------------------------------------------------------------- OpenRecon

def manifest() -> dict:
    return json.loads(MANIFEST.read_text())


def console_json(**chosen: str) -> str:
    """What the console sends: every declared parameter, defaults unless chosen, all as strings."""
    values = {p["id"]: str(p.get("default", "")) for p in manifest()["parameters"]}
    values.update(chosen)
    return json.dumps({"parameters": values})


@pytest.fixture(scope="module")
def zerofill_default_server():
    """A server whose default chain is zerofill (the console's default path without the model)."""
    recon_server = ReconServer("127.0.0.1", 0, ChainRepository(REPO / "config"), io_timeout_s=30.0,
                               default_chain="zerofill")
    recon_server.start_background()
    yield recon_server
    recon_server.shutdown(wait_s=5)


def test_openrecon_name_runs_the_default_chain_with_fire_output(zerofill_default_server):
    messages = talk(zerofill_default_server,
                    fire_session(fire_config_file("openrecon"), console_json(config="openrecon")))
    assert texts(messages) == []
    [image] = images(messages)
    assert image.data.dtype == np.int16 and image.meta["Keep_image_geometry"] == "1"
    assert image.meta["SequenceDescriptionAdditional"] == "PISF"   # the manifest's default
    assert image.meta["ImageComment"] == "zero-filled FFT, RSS coil combination"


def test_openrecon_choice_and_text_parameters(server):
    """The console's `config` choice selects a chain of ours; declared parameters reach the stages."""
    messages = talk(server, fire_session(fire_config_file("openrecon"),
                                         console_json(config="zerofill", seriesdescription="PISF_R4",
                                                      freetext="patient 12")))
    assert texts(messages) == []
    [image] = images(messages)
    assert image.data.dtype == np.int16
    assert image.meta["SequenceDescriptionAdditional"] == "PISF_R4"


def test_openrecon_without_json_uses_the_default_chain(zerofill_default_server):
    messages = talk(zerofill_default_server, fire_session(fire_config_file("openrecon"), None))
    assert texts(messages) == [] and images(messages)[0].data.dtype == np.int16


def test_default_server_maps_openrecon_to_pisf(server):
    [response, _] = query_session(server, ("pisf::configs", 1))
    assert "openrecon -> pisf" in response.text.splitlines()


def test_manifest_declares_only_parameters_the_server_maps():
    label = manifest()
    assert label["general"]["id"] == "pisf"
    recon = label["reconstruction"]
    assert recon["transfer_protocol"]["protocol"] == "ISMRMRD" and recon["port"] == 9002
    assert recon["emitter"] == "raw" and recon["injector"] == "image"
    chains = ChainRepository(REPO / "config").names()
    for parameter in label["parameters"]:
        assert {"id", "label", "type", "default", "information"} <= set(parameter), parameter
        assert parameter["id"] in CHAIN_KEYS or parameter["id"] in SHORT_NAMES or parameter["id"] in NOTED_KEYS
        if parameter["type"] == "choice":
            ids = [value["id"] for value in parameter["values"]]
            assert parameter["default"] in ids
            if parameter["id"] == "config":
                assert set(ids) <= set(chains), (ids, chains)
    # the label the Dockerfile sets is this file, base64-encoded (as consoles read it)
    dockerfile = (REPO / "docker" / "Dockerfile.openrecon").read_text()
    assert "com.siemens-healthineers.magneticresonance.openrecon.metadata:1.1.0" in dockerfile
    assert json.loads(base64.b64decode(base64.b64encode(MANIFEST.read_bytes()))) == label
