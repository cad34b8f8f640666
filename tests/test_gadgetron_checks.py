"""What real Gadgetron 4.7 checks, without it: the headers we write, the chain XML, the forwarding.

The checks (gadgets/wire/validate.py, gadgets/gadgetron_external/checks.py) must pass our
simulated and converted files and every shipped chain (tests/test_gadgetron_chains.py runs the
chains against a scan header), and must find what Gadgetron 4.7.2 did to the chains and files of
issue 21: `<version>` refused, NoiseAdjust's measurement ID, the distributed node's lists, the
dropped `<execute target>` and `<configuration>`, the noise readout reaching one worker only.
"""
from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest

from gadgets.context import parse_header
from gadgets.gadgetron_external.checks import check_chain, errors, forwarded_to_worker
from gadgets.wire.client import read_raw, replay
from gadgets.wire.validate import (ScanIdentity, find_ismrmrd_schema, gadgetron_header_problems, header_version,
                                   identity_problems, version_problem, xsd_problems)
from tools.rawdata.cfl import write_cfl
from tools.rawdata.convert import convert
from tools.rawdata.simulate import simulate

REPO = Path(__file__).resolve().parent.parent
CIMAX_TWIX = REPO.parent / "shared" / "data" / "siemens_cimax_phantom_16ch_twix.dat"


def assert_gadgetron_ready(header: str) -> None:
    """No <version>, the identity written out and consistent, and valid against ismrmrd.xsd."""
    assert header_version(header) is None
    assert gadgetron_header_problems(header, noise_adjust=True) == []
    assert identity_problems(parse_header(header), complete=True) == []
    pytest.importorskip("xmlschema")
    if find_ismrmrd_schema() is None:
        pytest.skip("no ismrmrd.xsd (Debian package ismrmrd-schema)")
    assert xsd_problems(header) == []


def test_simulated_header_is_one_gadgetron_accepts(tmp_path):
    result = simulate(tmp_path / "sim.h5", matrix=32, coils=2, accel=2, acs=8, seed=7)
    header, _ = read_raw(tmp_path / "sim.h5")
    assert header == result["header_xml"]
    assert parse_header(header).measurementInformation.measurementID == "PISF-SIM_PHANTOM-7_PISF-SIM_7"
    assert_gadgetron_ready(header)


def test_converted_array_header_is_one_gadgetron_accepts(tmp_path):
    rng = np.random.default_rng(0)
    kspace = rng.standard_normal((32, 24, 1, 4)) + 1j * rng.standard_normal((32, 24, 1, 4))  # READ, PHS1, 1, COIL
    write_cfl(tmp_path / "my_scan", kspace)
    result = convert(tmp_path / "my_scan.cfl", tmp_path / "out.h5", log=None, warn=lambda text: None)
    identity = ScanIdentity.from_measurement_id(parse_header(result["header_xml"]).measurementInformation.measurementID)
    assert identity.device == "PISF-BART" and identity.patient == "my-scan" and identity.study == "PISF-CONVERT"
    assert_gadgetron_ready(result["header_xml"])


def test_converted_twix_has_the_ids_siemens_to_ismrmrd_forms(tmp_path):
    if not CIMAX_TWIX.is_file():
        pytest.skip("../shared/data is absent")
    result = convert(CIMAX_TWIX, tmp_path / "cimax.h5", log=None, warn=lambda text: None)
    header = parse_header(result["header_xml"])
    # DeviceSerialNumber _ IRIS.RECOMPOSE PatientID (PatientLOID is empty) _ StudyLOID _ MeasUID
    assert header.measurementInformation.measurementID == (
        "213010_2024.02.06-16:49:04-STD-1.3.12.2.1107.5.2.63_1.3.12.2.1107.5.2.63.213010.30000024020211075500200000009_131")
    assert header.acquisitionSystemInformation.deviceID == "213010"
    assert_gadgetron_ready(result["header_xml"])


# ------------------------------------------------------------------------------ the checks can fail
def test_header_checks_find_what_gadgetron_refused(tmp_path):
    simulate(tmp_path / "sim.h5", matrix=32, coils=2, accel=2, acs=8, seed=7)
    good, _ = read_raw(tmp_path / "sim.h5")
    as_before = good.replace("<ismrmrdHeader xmlns=\"http://www.ismrm.org/ISMRMRD\">",
                             "<ismrmrdHeader xmlns=\"http://www.ismrm.org/ISMRMRD\">\n <version>1</version>")
    assert header_version(as_before) == 1 and "XML header version does not match" in version_problem(as_before)
    assert gadgetron_header_problems(as_before) != []
    own = as_before.replace("<version>1</version>", "<version>14</version>")
    assert version_problem(own) is None  # ISMRMRD 1.14's own version passes
    # the IDs our simulator and the twix converter wrote before: NoiseAdjust cannot store noise under them
    for old_id in ("PISF_SIM_0", "213010_131"):
        header = good.replace("PISF-SIM_PHANTOM-7_PISF-SIM_7", old_id)
        assert any("DEVICE_SUBJECT_SESSION_MEAS" in p for p in gadgetron_header_problems(header, noise_adjust=True))
        assert gadgetron_header_problems(header) == []  # only NoiseAdjust cares
    inconsistent = good.replace("<patientID>PHANTOM-7</patientID>", "<patientID>SOMEONE</patientID>")
    assert any("differs" in p for p in identity_problems(parse_header(inconsistent), complete=True))


def test_xsd_check_refuses_what_the_schema_does(tmp_path):
    pytest.importorskip("xmlschema")
    if find_ismrmrd_schema() is None:
        pytest.skip("no ismrmrd.xsd (Debian package ismrmrd-schema)")
    simulate(tmp_path / "sim.h5", matrix=32, coils=2, accel=2, acs=8, seed=7)
    good, _ = read_raw(tmp_path / "sim.h5")
    no_conditions = good.replace(good[good.index(" <experimentalConditions>"):
                                      good.index("</experimentalConditions>") + len("</experimentalConditions>")], "")
    assert any("experimentalConditions" in p for p in xsd_problems(no_conditions))
    bad_position = good.replace("<patientPosition>HFS</patientPosition>", "<patientPosition>UP</patientPosition>")
    assert xsd_problems(bad_position) != []


def test_server_warns_of_a_version_gadgetron_refuses_and_still_reconstructs(server, shepp_logan_raw):
    """Debian's generator writes <version>8</version>: accepted here, refused by Gadgetron 4.7."""
    result = replay(shepp_logan_raw, *server.address, config="zerofill", timeout_s=60)
    assert result.closed and result.error is None and len(result.images) == 4
    assert len(result.texts) == 1 and result.texts[0].startswith("WARNING: the ISMRMRD header has <version>8")


OLD_DISTRIBUTED = """<configuration><version>2</version>
  <readers><reader><dll>gadgetron_core_readers</dll><classname>AcquisitionReader</classname></reader></readers>
  <writers><writer><dll>gadgetron_core_writers</dll><classname>ImageWriter</classname></writer></writers>
  <stream><distributed>
    <readers><reader><dll>gadgetron_core_readers</dll><classname>ImageReader</classname></reader></readers>
    <writers><writer><dll>gadgetron_core_writers</dll><classname>AcquisitionWriter</classname></writer></writers>
    <distributor><name>D</name><dll>gadgetron_core_distributed</dll><classname>AcquisitionDistributor</classname>
      <property name="parallel_dimension" value="slice"/></distributor>
    <stream><external>
      <execute name="gadgets.gadgetron_external.targets" target="pisf" type="python"/>
      <configuration><property name="image_finish.series_index" value="2"/></configuration>
    </external></stream>
  </distributed></stream></configuration>"""


def test_chain_checks_find_what_gadgetron_did_to_the_old_distributed_chain():
    found = [str(f) for f in errors(check_chain(OLD_DISTRIBUTED, origin="old"))]
    assert any("must list a reader and a writer of acquisitions" in f for f in found), found
    assert any("must list a reader and a writer of images" in f for f in found), found
    assert any("drops <execute target=...>" in f for f in found), found
    assert any("noise readout reaches only the worker" in f for f in found), found
    worker = ElementTree.fromstring(forwarded_to_worker(ElementTree.fromstring(OLD_DISTRIBUTED).find("stream/distributed")))
    execute = worker.find("stream/external/execute")
    assert execute.get("target") is None and worker.find("stream/external/configuration") is None


def test_chain_checks_on_connect_nodes_and_noise_adjust():
    shipped = (REPO / "config" / "gadgetron_pisf_distributed.xml").read_text()
    with_address = shipped.replace('<connect port="18000"/>', '<connect port="18000" address="gpu-host"/>')
    assert [f.level for f in check_chain(with_address)] == ["note"]  # the address is dropped on the way
    with_properties = shipped.replace('<connect port="18000"/>', '<connect port="18000"/><configuration>'
                                      '<property name="chain" value="zerofill"/></configuration>')
    assert any("drops the <configuration> (chain)" in str(f) for f in errors(check_chain(with_properties)))
    buffers = (REPO / "config" / "gadgetron_pisf_buffers.xml").read_text()
    old_buffers = buffers.replace(buffers[buffers.index("        <external>"):buffers.index("        <gadget>")],
                                  "<gadget><name>NoiseAdjust</name><dll>gadgetron_mricore</dll>"
                                  "<classname>NoiseAdjustGadget</classname></gadget>")
    assert [f.level for f in check_chain(old_buffers)] == ["note"]
    header = good_header_with_id("PISF_SIM_0")
    assert any("DEVICE_SUBJECT_SESSION_MEAS" in str(f) for f in errors(check_chain(old_buffers, header=header)))
    wrong_order = buffers.replace('target="pisf_buffers"', 'target="pisf"')
    assert any("takes acquisitions, the stream carries buffers" in str(f) for f in errors(check_chain(wrong_order)))


def good_header_with_id(measurement_id: str) -> str:
    import ismrmrd.xsd as xsd

    from tools.rawdata.kspace_stream import header_for

    header = xsd.CreateFromDocument(header_for(2, 16, 16))
    header.measurementInformation = xsd.measurementInformationType(measurementID=measurement_id,
                                                                   patientPosition=xsd.patientPositionType.HFS)
    return xsd.ToXML(header)
