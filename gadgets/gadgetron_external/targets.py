"""Targets for Gadgetron's external Python gadgets (gadgetron-python `f(connection)`).

Gadgetron runs `python -m gadgetron <port> gadgets.gadgetron_external.targets <target>`; the
connection yields what the upstream gadgets send, `connection.send` passes items downstream.
These targets run the very same chains as the embedded server:

    <external><execute name="gadgets.gadgetron_external.targets" target="zerofill" type="python"/>
        <configuration><property name="chain" value="zerofill"/></configuration></external>

Parameters in `<configuration>` (`<property name=".." value=".."/>`) override the chain's
stage parameters as `stage.parameter` (e.g. `image_finish.series_index`) and are available to
stages as context parameters. On failure an ERROR message goes to Gadgetron before CLOSE,
because gadgetron-python closes normally even after an exception.
"""
from __future__ import annotations

import logging
import struct

import numpy as np

from .. import limit_blas_threads
from ..chain import ChainRepository, apply_overrides, configuration_properties, run_stages
from ..context import StreamContext
from ..items import Notice

log = logging.getLogger("pisf.external")
_ERROR_ID = 8


def _send_error(connection, text: str) -> None:
    raw = text.encode("utf-8")
    try:
        connection.socket.write(struct.pack("<HQ", _ERROR_ID, len(raw)) + raw)
    except OSError:
        log.exception("could not send ERROR to Gadgetron")


# Stages Gadgetron itself has done before BucketToBuffer (NoiseAdjust, RemoveROOversampling,
# AcquisitionAccumulateTrigger + BucketToBuffer): dropped when our chain receives ReconData.
BUFFERED_UPSTREAM = ("noise_prewhitening", "remove_oversampling", "slice_accumulator")


def _sendable(item):
    """gadgetron-python 1.4.1 writes ImageArray/ReconData with np.array(copy=False), which fails
    on numpy 2 unless the data already is complex64: convert before sending."""
    buffers = [item] if hasattr(item, "data") and hasattr(item, "headers") else []
    for bit in getattr(item, "bits", None) or []:
        buffers += [b for b in (getattr(bit, "data", None), getattr(bit, "ref", None)) if b is not None]
    for buffer in buffers:
        if isinstance(getattr(buffer, "data", None), np.ndarray) and buffer.data.dtype != np.complex64:
            buffer.data = buffer.data.astype(np.complex64)
    return item


def run_chain(connection, chain_name: str | None = None, buffers: bool = False,
              defaults: dict[str, str] | None = None) -> None:
    """Run a chain over a gadgetron-python connection; the chain name may come from the config.

    defaults: properties that apply unless the connection's `<configuration>` sets them.
    buffers: the input is Gadgetron ReconData (after BucketToBuffer); the chain's buffering stages
    are dropped and the buffers become KSpaceSlices (gadgets.gadgetron_external.recondata).
    """
    # defaults: properties of a persistent worker (pisf gadgetron-worker --property), under the config's
    properties = {**(defaults or {}), **configuration_properties(getattr(connection, "config", None))}
    chain_name = properties.get("chain", chain_name or "zerofill")
    try:
        limit_blas_threads()  # inside the try: any failure must reach Gadgetron as ERROR
        spec = ChainRepository.shared().load(chain_name)
        apply_overrides(spec, properties)
        if buffers:
            spec.stages = [(name, parameters) for name, parameters in spec.stages if name not in BUFFERED_UPSTREAM]
        context = StreamContext(header=connection.header, parameters=dict(properties))
        stages = spec.build(context)
        if buffers:
            from .recondata import ReconDataAdapter

            stages.insert(0, ReconDataAdapter(context))
        log.info("chain %s running inside Gadgetron", spec.name)
        for output in run_stages(stages, iter(connection)):
            if isinstance(output, Notice):
                log.log(output.level, output.text)
            else:
                # Images, and anything our stages do not consume (e.g. waveforms), go downstream.
                connection.send(_sendable(output))
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


def pisf_buffers(connection) -> None:
    """PISF on Gadgetron ReconData buffers (after NoiseAdjust, RemoveROOversampling,
    AcquisitionAccumulateTrigger, BucketToBuffer)."""
    run_chain(connection, "pisf", buffers=True)


def zerofill_buffers(connection) -> None:
    run_chain(connection, "zerofill", buffers=True)


def chain_buffers(connection) -> None:
    """Like `chain`, for ReconData input."""
    run_chain(connection, None, buffers=True)
