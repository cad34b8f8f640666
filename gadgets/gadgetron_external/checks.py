"""What a real Gadgetron 4.7 does with our chain XML and a scan's header, checked without it.

Learnt from running the shipped chains in Gadgetron 4.7.2 (issue 21) and from its sources:

- readers/writers: every message type that crosses a socket needs a reader on the receiving and
  a writer on the sending side. A `<distributed>` node's lists serve both the gateway (it writes
  what the distributor sends and reads what comes back) and the workers, which get the same lists
  as their own: both reader and both writer types, as Gadgetron's distributed_default.xml.
- forwarding: a worker receives the `<distributed>` node's readers, writers and inner stream, but
  an `<external>` loses `<execute target=...>`, `<connect address=...>` and its `<configuration>`
  on the way. Inner nodes must therefore be `<connect port=...>` to a persistent
  `pisf gadgetron-worker` on each worker host, with properties on its command line
  (`forwarded_to_worker` builds what a worker receives).
- noise: AcquisitionDistributor sends the noise readout (slice 0) to one worker only; the other
  slices are not prewhitened unless prewhitening runs on the gateway, before the distribution.
- NoiseAdjustGadget stores the noise covariance in a storage server under the measurement ID
  DEVICE_SUBJECT_SESSION_MEAS; without one (or with another ID form) it fails.
- the header: see gadgets/wire/validate.py (`<version>`, identity).

`check_chain` returns Findings: "error" (Gadgetron fails or silently loses data) or "note".
"""
from __future__ import annotations

import importlib
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

from ..wire.validate import gadgetron_header_problems

# Gadgetron 4.7 core readers/writers (gadgetron_core_readers/_writers) and the legacy names of
# gadgetron_mricore that its distributed_default.xml uses -> the message type they carry.
READERS = {"AcquisitionReader": "acquisition", "WaveformReader": "waveform", "ImageReader": "image",
           "BufferReader": "buffer", "IsmrmrdImageArrayReader": "image_array",
           "AcquisitionBucketReader": "bucket", "TextReader": "text",
           "GadgetIsmrmrdAcquisitionMessageReader": "acquisition", "MRIImageReader": "image"}
WRITERS = {"AcquisitionWriter": "acquisition", "WaveformWriter": "waveform", "ImageWriter": "image",
           "BufferWriter": "buffer", "IsmrmrdImageArrayWriter": "image_array",
           "AcquisitionBucketWriter": "bucket", "TextWriter": "text",
           "GadgetIsmrmrdAcquisitionMessageWriter": "acquisition", "MRIImageWriter": "image"}
# native gadgets we chain with: input -> output type
GADGET_TYPES = {"NoiseAdjustGadget": ("acquisition", "acquisition"),
                "RemoveROOversamplingGadget": ("acquisition", "acquisition"),
                "AcquisitionAccumulateTriggerGadget": ("acquisition", "bucket"),
                "BucketToBufferGadget": ("bucket", "buffer")}
DISTRIBUTORS = {"AcquisitionDistributor": "acquisition", "BufferDistributor": "buffer"}
NOISE_HANDLERS = ("NoiseAdjustGadget",)  # native; our `prewhiten` target is the other one
LOCAL_ADDRESSES = ("", "localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class Finding:
    level: str    # "error": Gadgetron fails or loses data silently; "note": a condition to meet
    where: str
    text: str

    def __str__(self) -> str:
        return f"{self.level}: {self.where}: {self.text}"


def _tag(element: ElementTree.Element) -> str:
    return element.tag.split("}")[-1]


def _child(element: ElementTree.Element, name: str) -> ElementTree.Element | None:
    return next((c for c in element if _tag(c) == name), None)


def _properties(element: ElementTree.Element | None) -> dict[str, str]:
    if element is None:
        return {}
    found = {}
    for prop in element.iter():
        if _tag(prop) == "property":
            name = prop.get("name") or (_child(prop, "name").text if _child(prop, "name") is not None else "")
            value = prop.get("value") if prop.get("value") is not None else (
                _child(prop, "value").text if _child(prop, "value") is not None else "")
            if name:
                found[name] = value or ""
    return found


class _Check:
    """One walk over a chain: the message type flowing through each stream, findings on the way."""

    def __init__(self, origin: str, import_targets: bool):
        self.origin, self.import_targets = origin, import_targets
        self.findings: list[Finding] = []
        self.noise_adjust = False

    def add(self, level: str, where: str, text: str) -> None:
        self.findings.append(Finding(level, f"{self.origin}: {where}", text))

    def kinds(self, parent: ElementTree.Element | None, group: str, table: dict, where: str) -> set[str]:
        kinds = set()
        for entry in (parent if parent is not None else []):
            classname = (_child(entry, "classname").text or "").strip() if _child(entry, "classname") is not None else ""
            if classname not in table:
                self.add("error", where, f"{group[:-1]} {classname or '(no classname)'} is not one Gadgetron "
                                         f"{'reads' if group == 'readers' else 'writes'} with (known: "
                                         f"{', '.join(sorted(table))})")
            else:
                kinds.add(table[classname])
        return kinds

    def stream(self, stream: ElementTree.Element, kind: str, where: str, noise_handled: bool,
               inner: bool = False) -> tuple[str, bool]:
        """Walk a `<stream>`; returns the type leaving it and whether noise was handled by then."""
        for number, node in enumerate(stream, 1):
            name = _tag(node)
            here = f"{where}/{name}[{number}]"
            if name == "gadget":
                classname = (_child(node, "classname").text or "").strip() if _child(node, "classname") is not None else ""
                if classname in NOISE_HANDLERS:
                    noise_handled, self.noise_adjust = True, True
                    self.add("note", here, "NoiseAdjustGadget stores the noise covariance in a storage server "
                                           "(mrd-storage-server) under the measurement ID, which must read "
                                           "DEVICE_SUBJECT_SESSION_MEAS; it fails without one")
                expected, produced = GADGET_TYPES.get(classname, (None, None))
                if expected and kind not in (expected, "unknown"):
                    self.add("error", here, f"{classname} takes {expected}s, the stream carries {kind}s here")
                kind = produced or "unknown"
            elif name == "external":
                kind, noise_handled = self.external(node, kind, here, noise_handled, inner)
            elif name == "distributed":
                kind = self.distributed(node, kind, here, noise_handled)
            elif name == "parallel":
                kind = "unknown"
        return kind, noise_handled

    def external(self, node, kind: str, here: str, noise_handled: bool, inner: bool) -> tuple[str, bool]:
        from .targets import TARGET_TYPES

        execute, connect = _child(node, "execute"), _child(node, "connect")
        if (execute is None) == (connect is None):
            self.add("error", here, "an <external> needs exactly one of <execute> and <connect>")
            return "unknown", noise_handled
        properties = _properties(_child(node, "configuration"))
        if connect is not None:
            if not (connect.get("port") or "").isdigit():
                self.add("error", here, "<connect> needs a numeric port")
            if inner and (connect.get("address") or "") not in LOCAL_ADDRESSES:
                self.add("note", here, f"Gadgetron drops address {connect.get('address')!r} when it forwards "
                                       f"this node: each worker connects to its own localhost:{connect.get('port')}")
            if inner and properties:
                self.add("error", here, f"Gadgetron drops the <configuration> ({', '.join(sorted(properties))}) "
                                        f"when it forwards this node to a worker: pass them to the worker as "
                                        f"`pisf gadgetron-worker --property NAME=VALUE`")
            if kind not in ("acquisition", "buffer", "unknown"):
                self.add("error", here, f"pisf gadgetron-worker takes acquisitions or buffers, not {kind}s")
            return "image", noise_handled
        module, target = execute.get("name", ""), execute.get("target", "")
        if inner:
            self.add("error", here, "Gadgetron drops <execute target=...> (and the <configuration>) when it "
                                    "forwards this node to a worker: its Python gets no target and the scan ends "
                                    "with no images and no error; use <connect port=...> to a pisf "
                                    "gadgetron-worker on each worker host")
        if execute.get("type", "python") != "python" or not module or not target:
            self.add("error", here, "<execute> needs name, target and type=\"python\"")
            return "unknown", noise_handled
        if self.import_targets:
            try:
                callable_target = getattr(importlib.import_module(module), target, None)
            except ImportError as exc:
                self.add("error", here, f"module {module} does not import: {exc}")
                callable_target = None
            else:
                if not callable(callable_target):
                    self.add("error", here, f"{module} has no callable {target!r}")
        if module != "gadgets.gadgetron_external.targets" or target not in TARGET_TYPES:
            return "unknown", noise_handled
        takes, gives = TARGET_TYPES[target]
        if kind not in (takes, "unknown"):
            self.add("error", here, f"target {target!r} takes {takes}s, the stream carries {kind}s here")
        return gives, noise_handled or target == "prewhiten"

    def distributed(self, node, kind: str, here: str, noise_handled: bool) -> str:
        readers = self.kinds(_child(node, "readers"), "readers", READERS, f"{here}/readers")
        writers = self.kinds(_child(node, "writers"), "writers", WRITERS, f"{here}/writers")
        distributor = _child(node, "distributor")
        classname = ""
        if distributor is not None and _child(distributor, "classname") is not None:
            classname = (_child(distributor, "classname").text or "").strip()
        sent = DISTRIBUTORS.get(classname)
        if sent is None:
            self.add("error", here, f"distributor {classname or '(none)'} is not one we know "
                                    f"({', '.join(DISTRIBUTORS)})")
            sent = kind
        elif kind not in (sent, "unknown"):
            self.add("error", here, f"{classname} distributes {sent}s, the stream carries {kind}s here")
        if sent == "acquisition" and not noise_handled:
            self.add("error", here, "the noise readout reaches only the worker of its slice (slice 0): the other "
                                    "workers' slices are not prewhitened; prewhiten on the gateway first "
                                    "(<external> target prewhiten before <distributed>)")
        inner = _child(node, "stream")
        if inner is None:
            self.add("error", here, "<distributed> has no inner <stream>")
            return "unknown"
        returned, _ = self.stream(inner, sent, f"{here}/stream", noise_handled=True, inner=True)
        # the gateway writes `sent` and reads `returned`; workers (same lists) read `sent`, write `returned`
        for message in {sent, returned} - {"unknown"}:
            if message not in readers or message not in writers:
                self.add("error", here, f"<distributed> must list a reader and a writer of {message}s (gateway and "
                                        f"workers use the same lists; Gadgetron's distributed_default.xml lists both "
                                        f"types): readers carry {sorted(readers)}, writers {sorted(writers)}")
        return returned


def check_chain(xml: str | Path | ElementTree.Element, header: str | None = None, origin: str | None = None,
                import_targets: bool = True) -> list[Finding]:
    """Every finding Gadgetron 4.7 would give the chain (and the scan's header, when given)."""
    if isinstance(xml, ElementTree.Element):
        root, origin = xml, origin or "chain"
    elif isinstance(xml, Path) or (isinstance(xml, str) and not xml.lstrip().startswith("<")):
        root, origin = ElementTree.parse(xml).getroot(), origin or Path(xml).name
    else:
        root, origin = ElementTree.fromstring(xml), origin or "chain"
    check = _Check(origin, import_targets)
    if _tag(root) != "configuration" or (root.findtext("version") or "").strip() != "2":
        check.add("error", "configuration", "Gadgetron 4.7 reads <configuration> with <version>2</version>")
    readers = check.kinds(_child(root, "readers"), "readers", READERS, "readers")
    writers = check.kinds(_child(root, "writers"), "writers", WRITERS, "writers")
    if "acquisition" not in readers:
        check.add("error", "readers", "no AcquisitionReader: Gadgetron cannot read the client's acquisitions")
    stream = _child(root, "stream")
    if stream is None:
        check.add("error", "configuration", "no <stream>")
        return check.findings
    out, _ = check.stream(stream, "acquisition", "stream", noise_handled=False)
    if out not in ("unknown", "text") and out not in writers:
        check.add("error", "writers", f"the stream ends in {out}s and no writer sends them to the client")
    if header is not None:
        for problem in gadgetron_header_problems(header, noise_adjust=check.noise_adjust):
            check.add("error", "header", problem)
    return check.findings


def errors(findings: list[Finding]) -> list[Finding]:
    return [finding for finding in findings if finding.level == "error"]


def forwarded_to_worker(distributed: ElementTree.Element) -> str:
    """The chain a worker Gadgetron receives for a `<distributed>` node, as Gadgetron 4.7 forwards
    it: the node's readers and writers, its inner stream with every `<external>` reduced to
    `<execute name type>` or `<connect port>` (no target, no address, no `<configuration>`)."""
    worker = ElementTree.Element("configuration")
    ElementTree.SubElement(worker, "version").text = "2"
    for group in ("readers", "writers"):
        source = _child(distributed, group)
        worker.append(ElementTree.fromstring(ElementTree.tostring(source)) if source is not None
                      else ElementTree.Element(group))
    stream = ElementTree.fromstring(ElementTree.tostring(_child(distributed, "stream")))
    for external in [e for e in stream.iter() if _tag(e) == "external"]:
        for child in list(external):
            if _tag(child) == "configuration":
                external.remove(child)
            elif _tag(child) == "execute":
                child.attrib.pop("target", None)
            elif _tag(child) == "connect":
                child.attrib.pop("address", None)
    worker.append(stream)
    return ElementTree.tostring(worker, encoding="unicode")
