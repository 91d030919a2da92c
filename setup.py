"""Build hook: generate the gRPC Python code from ``proto/eft/v1/eft.proto``.

Everything else about the package is in ``pyproject.toml``. The generated modules go into
``eft_router/api/`` in the source tree, so regular and editable installs both carry them,
and the import path inside them is ``eft_router.api`` (the .proto is mapped to that virtual
path for protoc).
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTO = ROOT / "proto" / "eft" / "v1" / "eft.proto"


def generate_grpc_code() -> None:
    from grpc_tools import protoc

    args = [
        "grpc_tools.protoc",
        f"-Ieft_router/api={PROTO.parent}",
        f"-I{Path(protoc.__file__).parent / '_proto'}",  # google/protobuf/*.proto
        f"--python_out={ROOT}",
        f"--pyi_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        str(PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")


class BuildPyWithProto(build_py):
    def run(self) -> None:
        generate_grpc_code()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProto})
