"""The wire contract: generated code is fresh, `buf lint` is clean, every element is documented."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PROTO = PROTOS / "proxmo" / "v1" / "proxmo.proto"
BUF = ROOT / ".tools" / "node_modules" / ".bin" / "buf"
BUF_VERSION = "1.75.0"  # keep equal to the Makefile's BUF_VERSION


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("proxmo_protos_generate", PROTOS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------- generated code


def test_committed_generated_code_is_fresh():
    generator = load_generator()
    diffs = generator.stale_files(generator.generate())
    assert diffs == [], "generated code is stale; run `make proto`\n" + "".join(diffs)[:3000]


def test_stale_check_catches_a_difference(tmp_path: Path):
    generator = load_generator()
    generated = generator.generate()
    generator.write(generated, tmp_path)
    assert generator.stale_files(generated, tmp_path) == []
    edited = tmp_path / "proxmo_pb2.pyi"
    edited.write_text(edited.read_text() + "# hand edit\n")
    (tmp_path / "proxmo_pb2_grpc.py").unlink()
    diffs = generator.stale_files(generated, tmp_path)
    assert len(diffs) == 2 and "# hand edit" in diffs[0]


def test_proto_check_command_passes():
    result = subprocess.run(
        [sys.executable, str(PROTOS / "generate.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_code_lives_in_proxmo_client_v1():
    from proxmo_client.v1 import proxmo_pb2, proxmo_pb2_grpc

    assert proxmo_pb2.ComputeAdvantagesRequest.__module__ == "proxmo_client.v1.proxmo_pb2"
    assert proxmo_pb2.DESCRIPTOR.package == "proxmo.v1"
    assert proxmo_pb2.DESCRIPTOR.name == "proxmo/v1/proxmo.proto"
    assert hasattr(proxmo_pb2_grpc, "CreditAssignmentServiceServicer")
    for path in Path(proxmo_pb2.__file__).parent.glob("proxmo_pb2*"):
        text = path.read_text()
        assert "from proxmo.v1" not in text and "'proxmo.v1.proxmo_pb2'" not in text, path


# ------------------------------------------------------------------------- buf lint


def buf_binary() -> Path:
    """buf from npm (@bufbuild/buf), as `make buf` installs it; skip only without npm."""
    if not BUF.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed, so buf (@bufbuild/buf from npm) cannot be run")
        subprocess.run(
            [npm, "install", "--prefix", str(BUF.parents[2]), "--no-audit", "--no-fund",
             "--silent", "--save-exact", f"@bufbuild/buf@{BUF_VERSION}"],
            check=True, timeout=300,
        )  # fmt: skip
    return BUF


def run_buf_lint(folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(buf_binary()), "lint"], cwd=folder, capture_output=True, text=True, timeout=120
    )


def test_buf_lint_is_clean():
    result = run_buf_lint(PROTOS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_a_violation(tmp_path: Path):
    shutil.copy(PROTOS / "buf.yaml", tmp_path / "buf.yaml")
    target = tmp_path / "proxmo" / "v1" / "proxmo.proto"
    target.parent.mkdir(parents=True)
    target.write_text(PROTO.read_text().replace("uint64 total_ns = 1;", "uint64 totalNs = 1;"))
    result = run_buf_lint(tmp_path)
    assert result.returncode != 0
    assert "totalNs" in result.stdout + result.stderr


# ------------------------------------------------------------------------- documentation


def undocumented(proto: Path, include: Path) -> list[str]:
    """Every service, method, message, field, enum and enum value of ``proto`` without a
    leading comment (read from protoc's source info)."""
    from grpc_tools import protoc

    out = proto.parent / "descriptor.binpb"
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    args = ["protoc", f"-I{include}", f"-I{well_known}", "--include_source_info",
            f"--descriptor_set_out={out}", str(proto)]  # fmt: skip
    assert protoc.main(args) == 0, args
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    out.unlink()
    file = descriptors.file[-1]
    comments = {
        tuple(loc.path): loc.leading_comments.strip() for loc in file.source_code_info.location
    }
    missing: list[str] = []

    def check(path: tuple[int, ...], name: str) -> None:
        if not comments.get(path):
            missing.append(name)

    # Paths are field numbers in descriptor.proto: FileDescriptorProto.message_type = 4,
    # enum_type = 5, service = 6; DescriptorProto.field = 2, nested_type = 3, enum_type = 4;
    # EnumDescriptorProto.value = 2; ServiceDescriptorProto.method = 2.
    def check_enum(enum: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], name: str):
        check(path, name)
        for i, value in enumerate(enum.value):
            check((*path, 2, i), f"{name}.{value.name}")

    def check_message(message: descriptor_pb2.DescriptorProto, path: tuple[int, ...], name: str):
        check(path, name)
        for i, field in enumerate(message.field):
            check((*path, 2, i), f"{name}.{field.name}")
        for i, nested in enumerate(message.nested_type):
            check_message(nested, (*path, 3, i), f"{name}.{nested.name}")
        for i, enum in enumerate(message.enum_type):
            check_enum(enum, (*path, 4, i), f"{name}.{enum.name}")

    for i, message in enumerate(file.message_type):
        check_message(message, (4, i), message.name)
    for i, enum in enumerate(file.enum_type):
        check_enum(enum, (5, i), enum.name)
    for i, service in enumerate(file.service):
        check((6, i), service.name)
        for j, method in enumerate(service.method):
            check((6, i, 2, j), f"{service.name}.{method.name}")
    return missing


def test_every_element_of_the_contract_is_documented():
    assert undocumented(PROTO, PROTOS) == []


def test_documentation_check_finds_a_missing_comment(tmp_path: Path):
    text = PROTO.read_text()
    text = text.replace("  // Unique within the request; echoed in the response.\n", "")
    text = text.replace("  // The preset's scope.\n", "")
    target = tmp_path / "proxmo" / "v1" / "proxmo.proto"
    target.parent.mkdir(parents=True)
    target.write_text(text)
    assert undocumented(target, tmp_path) == [
        "Trajectory.trajectory_id",
        "Scope.SCOPE_UNSPECIFIED",
    ]
