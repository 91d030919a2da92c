"""Python code generated from ``proto/eft/v1/eft.proto`` (package ``eft.v1``).

``eft_pb2``, ``eft_pb2_grpc`` and ``eft_pb2.pyi`` are written by the package build
(``setup.py``'s ``build_py`` step runs ``grpc_tools.protoc``), so an install or an editable
install of the project always matches the .proto; they are not in git and never edited.
"""
