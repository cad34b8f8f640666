"""Shared fixtures: an embedded server on a free loopback port, data paths, generated raw files."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from gadgets.chain import ChainRepository
from gadgets.wire.server import ReconServer

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
SIEMENS_RAW = SHARED_DATA / "siemens_skyra_R3_14ch.h5"


@pytest.fixture(scope="session")
def server():
    """One embedded server for the whole session (each test gets its own connections)."""
    recon_server = ReconServer("127.0.0.1", 0, ChainRepository(REPO / "config"), io_timeout_s=30.0)
    recon_server.start_background()
    yield recon_server
    recon_server.shutdown(wait_s=5)


@pytest.fixture(scope="session")
def shepp_logan_raw(tmp_path_factory) -> Path:
    """Raw data written by Debian's ismrmrd-tools generator (a writer we did not write)."""
    tool = shutil.which("ismrmrd_generate_cartesian_shepp_logan")
    if tool is None:
        pytest.skip("ismrmrd_generate_cartesian_shepp_logan not installed (Debian package ismrmrd-tools)")
    path = tmp_path_factory.mktemp("shepp") / "shepp_logan.h5"
    subprocess.run([tool, "-m", "128", "-c", "8", "-a", "2", "-r", "2", "-w", "24", "-C", "-n", "0.05",
                    "-o", str(path)], check=True, capture_output=True, cwd=path.parent)
    return path


@pytest.fixture
def siemens_raw() -> Path:
    if not SIEMENS_RAW.is_file():
        pytest.skip("../shared/data is absent")
    return SIEMENS_RAW


def shipped_chain_text(name: str, **overrides: dict) -> str:
    """A shipped chain (config/NAME.yaml) as CONFIG_TEXT, with `gadget={parameter: value}` overrides."""
    chain = yaml.safe_load((REPO / "config" / f"{name}.yaml").read_text())
    for stage in chain["stages"]:
        stage.update(overrides.get(stage["gadget"], {}))
    chain["name"] = f"{name}-test"
    return yaml.safe_dump(chain)
