"""Generate (or check) the Python code of the proxmo wire contract.

``python protos/generate.py``
    writes clients/python/src/proxmo_client/v1/proxmo_pb2.py, proxmo_pb2.pyi, proxmo_pb2_grpc.py.
``python protos/generate.py --check``
    generates into a temporary folder and fails (exit 1, with a diff) when the committed files
    differ: CI's stale check. Writes nothing.

grpcio-tools emits ``from proxmo.v1 import proxmo_pb2`` and registers the messages under the
module ``proxmo.v1.proxmo_pb2``. The service package is itself called ``proxmo``, so both are
rewritten to ``proxmo_client.v1``: the generated code must not claim the top-level name ``proxmo``.
The descriptor's file name stays ``proxmo/v1/proxmo.proto`` (what reflection and buf see).
"""

from __future__ import annotations

import argparse
import difflib
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_FILES = ("proxmo/v1/proxmo.proto",)
OUTPUT_DIR = ROOT / "clients" / "python" / "src" / "proxmo_client" / "v1"
GENERATED_NAMES = ("proxmo_pb2.py", "proxmo_pb2.pyi", "proxmo_pb2_grpc.py")

# (old, new) textual rewrites, applied to every generated file.
IMPORT_REWRITES = (
    ("from proxmo.v1 import proxmo_pb2", "from proxmo_client.v1 import proxmo_pb2"),
    ("'proxmo.v1.proxmo_pb2'", "'proxmo_client.v1.proxmo_pb2'"),
)


def run_protoc(out_dir: Path) -> None:
    """Run grpcio-tools' bundled protoc (same version as the committed code) into ``out_dir``."""
    from grpc_tools import protoc  # imported here so `--help` works without grpcio-tools

    include_dir = Path(protoc.__file__).resolve().parent / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include_dir}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(PROTO_ROOT / name) for name in PROTO_FILES),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")


def generate() -> dict[str, str]:
    """Return {file name: final text} for every generated file, imports rewritten."""
    with tempfile.TemporaryDirectory(prefix="proxmo-proto-") as tmp:
        tmp_dir = Path(tmp)
        run_protoc(tmp_dir)
        produced = tmp_dir / "proxmo" / "v1"
        texts: dict[str, str] = {}
        for name in GENERATED_NAMES:
            text = (produced / name).read_text(encoding="utf-8")
            for old, new in IMPORT_REWRITES:
                text = text.replace(old, new)
            if "from proxmo.v1 " in text or "import proxmo.v1" in text:
                raise SystemExit(f"{name}: an import of proxmo.v1 survived the rewrite")
            texts[name] = text
        return texts


def stale_files(generated: dict[str, str], out_dir: Path = OUTPUT_DIR) -> list[str]:
    """Unified diffs (one string per file) between fresh code and what is in ``out_dir``."""
    diffs = []
    for name, fresh in generated.items():
        path = out_dir / name
        committed = path.read_text(encoding="utf-8") if path.exists() else ""
        if committed != fresh:
            diff = difflib.unified_diff(
                committed.splitlines(keepends=True),
                fresh.splitlines(keepends=True),
                fromfile=f"committed/{name}",
                tofile=f"generated/{name}",
                n=1,
            )
            diffs.append("".join(diff) or f"{name}: missing\n")
    return diffs


def write(generated: dict[str, str], out_dir: Path = OUTPUT_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in generated.items():
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        shutil.move(tmp, out_dir / name)  # atomic: a reader never sees half a file
    init = out_dir / "__init__.py"
    if not init.exists():
        init.write_text('"""Generated code of proxmo.v1 (`make proto`)."""\n', encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="fail when the committed code is stale; write nothing"
    )
    args = parser.parse_args(argv)
    generated = generate()
    if args.check:
        diffs = stale_files(generated)
        if diffs:
            sys.stdout.write("".join(d[:4000] for d in diffs))
            print(
                f"\nSTALE: {len(diffs)} generated file(s) in {OUTPUT_DIR.relative_to(ROOT)} differ "
                "from protos/; run `make proto` and commit the result.",
                file=sys.stderr,
            )
            return 1
        print(f"proto-check: generated code in {OUTPUT_DIR.relative_to(ROOT)} is up to date")
        return 0
    write(generated)
    print(f"proto: wrote {', '.join(generated)} to {OUTPUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
