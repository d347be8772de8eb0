"""gRPC clients and servers of Centrifugo's services, built from the service descriptors of the generated
messages (no `_pb2_grpc.py`): the method paths, request and response types are the proto's, so a peer
generated from the same proto file is what we talk to."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

Handler = Callable[[Message, Any], Awaitable[Message]]


def message_class(descriptor: Any) -> type[Message]:
    cls: type[Message] = message_factory.GetMessageClass(descriptor)
    return cls


def unary_methods(service: ServiceDescriptor) -> dict[str, MethodDescriptor]:
    """The service's unary-unary methods by name (the streaming ones are left out: none is served)."""
    return {
        method.name: method for method in service.methods if not method.client_streaming and not method.server_streaming
    }


def client_calls(channel: grpc.aio.Channel, service: ServiceDescriptor) -> dict[str, Any]:
    """A unary multi-callable per method of `service` on `channel`, by method name."""
    calls = {}
    for name, method in unary_methods(service).items():
        request, response = message_class(method.input_type), message_class(method.output_type)
        calls[name] = channel.unary_unary(
            f"/{service.full_name}/{name}",
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )
    return calls


def generic_handler(service: ServiceDescriptor, handlers: Mapping[str, Handler]) -> grpc.GenericRpcHandler:
    """A server handler of `service` whose methods are `handlers` (by method name)."""
    methods = unary_methods(service)
    rpc_handlers = {}
    for name, handler in handlers.items():
        method = methods[name]
        request, response = message_class(method.input_type), message_class(method.output_type)
        rpc_handlers[name] = grpc.unary_unary_rpc_method_handler(
            handler, request_deserializer=request.FromString, response_serializer=response.SerializeToString
        )
    return grpc.method_handlers_generic_handler(service.full_name, rpc_handlers)
