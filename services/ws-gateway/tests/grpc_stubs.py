"""Python stubs generated from Centrifugo's vendored protos by grpc_tools, as a backend's or an API
client's build makes them: what the gRPC tests talk to the gateway with."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

from grpc_tools import protoc

PROTO_DIR = Path(__file__).resolve().parents[3] / "proto" / "centrifugal" / "centrifugo"


@contextmanager
def generated(proto: str, out: Path) -> Iterator[tuple[ModuleType, ModuleType]]:
    """`<proto>_pb2` and `<proto>_pb2_grpc` of `<proto>.proto`, generated into `out` and imported from a
    package of their own (`<proto>_stubs`), so they shadow nothing of the gateway's."""
    args = ["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", f"--grpc_python_out={out}", f"{proto}.proto"]
    assert protoc.main(args) == 0
    package = out / f"{proto}_stubs"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in (f"{proto}_pb2.py", f"{proto}_pb2_grpc.py"):
        text = (out / name).read_text().replace(f"import {proto}_pb2 as", f"from {proto}_stubs import {proto}_pb2 as")
        (package / name).write_text(text)
    sys.path.insert(0, str(out))
    try:
        yield (
            importlib.import_module(f"{proto}_stubs.{proto}_pb2"),
            importlib.import_module(f"{proto}_stubs.{proto}_pb2_grpc"),
        )
    finally:
        sys.path.remove(str(out))
