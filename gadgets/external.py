"""Targets for Gadgetron's external Python gadgets (gadgetron-python `f(connection)`).

Gadgetron runs `python -m gadgetron <port> gadgets.external <target>`; the connection yields
what the upstream gadgets send, `connection.send` passes items downstream. These targets run
the very same chains as the embedded server:

    <external><execute name="gadgets.external" target="zerofill" type="python"/>
        <configuration><property name="chain" value="zerofill"/></configuration></external>

Parameters in `<configuration>` (`<property name=".." value=".."/>`) override the chain's
stage parameters as `stage.parameter` (e.g. `image_finish.series_index`) and are available to
stages as context parameters. On failure an ERROR message goes to Gadgetron before CLOSE,
because gadgetron-python closes normally even after an exception.
"""
from __future__ import annotations

import logging
import struct

from .chain import ChainRepository, apply_overrides, configuration_properties, run_stages
from .context import StreamContext
from .items import Notice

log = logging.getLogger("pisf.external")
_ERROR_ID = 8


def _send_error(connection, text: str) -> None:
    raw = text.encode("utf-8")
    try:
        connection.socket.write(struct.pack("<HQ", _ERROR_ID, len(raw)) + raw)
    except OSError:
        log.exception("could not send ERROR to Gadgetron")


def run_chain(connection, chain_name: str | None = None) -> None:
    """Run a chain over a gadgetron-python connection; the chain name may come from the config."""
    properties = configuration_properties(getattr(connection, "config", None))
    chain_name = properties.get("chain", chain_name or "zerofill")
    try:
        spec = ChainRepository.shared().load(chain_name)
        apply_overrides(spec, properties)
        context = StreamContext(header=connection.header, parameters=dict(properties))
        stages = spec.build(context)
        log.info("chain %s running inside Gadgetron", spec.name)
        for output in run_stages(stages, iter(connection)):
            if isinstance(output, Notice):
                log.log(output.level, output.text)
            else:
                # Images, and anything our stages do not consume (e.g. waveforms), go downstream.
                connection.send(output)
    except Exception as exc:
        log.exception("chain %s failed", chain_name)
        _send_error(connection, f"pisf chain {chain_name!r} failed: {type(exc).__name__}: {exc}")
        raise


def zerofill(connection) -> None:
    run_chain(connection, "zerofill")


def pisf(connection) -> None:
    run_chain(connection, "pisf")


def chain(connection) -> None:
    """Generic target: the chain is named by the `chain` property of `<configuration>`."""
    run_chain(connection, None)

