"""Every rpc of every service in the contract has a handler; an rpc without one stops start-up."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
from google.protobuf.descriptor import ServiceDescriptor

import weightsmith.v1
from weightsmith_server import app
from weightsmith_server.api import model_servicer, training_servicer, weight_servicer
from weightsmith_server.api.handlers import service_handler


def _contract_services() -> list[ServiceDescriptor]:
    services = []
    for module in pkgutil.iter_modules(weightsmith.v1.__path__):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(f"weightsmith.v1.{module.name}").DESCRIPTOR
            services.extend(descriptor.services_by_name.values())
    return services


SERVICERS = {
    model_servicer.SERVICE.full_name: model_servicer.ModelServicer,
    weight_servicer.SERVICE.full_name: weight_servicer.WeightServicer,
    training_servicer.SERVICE.full_name: training_servicer.TrainingServicer,
}


def test_the_server_registers_every_service_of_the_contract() -> None:
    assert sorted(s.full_name for s in _contract_services()) == sorted(app.SERVICE_NAMES)
    assert sorted(SERVICERS) == sorted(app.SERVICE_NAMES)


@pytest.mark.parametrize(
    ("service", "method"),
    [(s, m.name) for s in _contract_services() for m in s.methods],
    ids=lambda value: getattr(value, "name", value),
)
def test_every_rpc_has_a_servicer_method(service: ServiceDescriptor, method: str) -> None:
    servicer = SERVICERS[service.full_name]
    assert callable(getattr(servicer, method, None)), f"{servicer.__name__} lacks {method}"


def test_a_missing_handler_fails_at_registration() -> None:
    class Partial:
        async def GetModel(self, request: object, context: object) -> None: ...

    with pytest.raises(TypeError, match="CreateModel"):
        service_handler(model_servicer.SERVICE, Partial())


def test_an_override_for_an_unknown_rpc_fails_at_registration() -> None:
    servicer = model_servicer.ModelServicer(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="NoSuchRpc"):
        service_handler(model_servicer.SERVICE, servicer, request_deserializers={"NoSuchRpc": bytes})


def _servicer_methods() -> list[tuple[str, ast.AsyncFunctionDef]]:
    methods = []
    for module in (model_servicer, weight_servicer, training_servicer):
        tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            methods.extend(
                (f"{cls.name}.{f.name}", f) for f in cls.body if isinstance(f, ast.AsyncFunctionDef)
            )
    return methods


@pytest.mark.parametrize(("name", "method"), _servicer_methods(), ids=[n for n, _ in _servicer_methods()])
def test_servicer_methods_only_decode_call_and_encode(name: str, method: ast.AsyncFunctionDef) -> None:
    """No branching or error handling in servicers: codecs decide, operations act, interceptors map errors."""
    branches = [type(n).__name__ for n in ast.walk(method) if isinstance(n, ast.If | ast.Try | ast.While)]
    assert not branches, f"{name} has {branches}"
    assert len(method.body) <= 4, f"{name} has {len(method.body)} statements"
