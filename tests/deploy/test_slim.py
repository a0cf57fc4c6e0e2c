"""infra/images/slim.py's trims on a scratch site-packages folder (the built images are
checked by tests/images: every module imports and every function serves)."""
from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from botocore.loaders import JSONFileLoader

from infra.images import slim


def test_botocore_json_is_gzipped_and_still_loads(tmp_path: Path) -> None:
    data = tmp_path / "botocore" / "data"
    (data / "s3" / "2006-03-01").mkdir(parents=True)
    doc = {"partitions": [{"partition": "aws", "regions": {f"r{i}": {"description": "x" * 40} for i in range(200)}}]}
    (data / "endpoints.json").write_text(json.dumps(doc, indent=2))
    (data / "s3" / "2006-03-01" / "waiters-2.json").write_text(json.dumps({"version": 2}))
    freed = slim.gzip_json(data)
    assert freed > 0
    assert sorted(p.name for p in data.rglob("*") if p.is_file()) == ["endpoints.json.gz", "waiters-2.json.gz"]
    loader = JSONFileLoader()
    assert loader.load_file(str(data / "endpoints")) == doc
    assert loader.load_file(str(data / "s3" / "2006-03-01" / "waiters-2")) == {"version": 2}


def test_type_stubs_go_and_sources_stay(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("X = 1\n")
    (pkg / "__init__.pyi").write_text("X: int\n")
    assert slim.prune_stubs(tmp_path) == len("X: int\n")
    assert [p.name for p in pkg.iterdir()] == ["__init__.py"]


@pytest.mark.parametrize(("vendored", "soname"), [
    ("libcrypto-3a0647ea.so.3", "libcrypto.so.3"),
    ("liblzma-de26b416.so.5.8.4", "liblzma.so.5"),
    ("libcom_err-55c5739a.so.3.0", "libcom_err.so.3"),
    ("libpng16-1d1ba958.so.16.58.0", "libpng16.so.16"),
    ("libfoo.so.1", None),
])
def test_original_soname_of_an_auditwheel_name(vendored: str, soname: str | None) -> None:
    assert slim.original_soname(vendored) == soname


def test_a_vendored_copy_of_a_system_library_becomes_a_link(tmp_path: Path) -> None:
    arch = sysconfig.get_config_var("MULTIARCH")
    system = Path("/usr/lib") / arch / "libz.so.1"
    assert system.exists(), "the host's zlib (every Debian system has it)"
    libs = tmp_path / "demo.libs"
    libs.mkdir()
    copy = libs / "libz-0123abcd.so.1.3.1"
    copy.write_bytes(system.read_bytes())
    unknown = libs / "libnothere-0123abcd.so.7"
    unknown.write_bytes(b"\x7fELF not a system library")
    assert slim.link_system_copies(tmp_path) == system.stat().st_size
    assert copy.is_symlink() and copy.resolve() == system.resolve()
    assert unknown.is_file() and not unknown.is_symlink()
    assert slim.link_system_copies(tmp_path) == 0  # links are left alone on a second pass
