"""`marrowscope.stages`: the names every wire format uses stay the same, and the services,
gateway, registry and rollout agree with the enum."""

from __future__ import annotations

import importlib

import pytest

from marrowscope import registry
from marrowscope.stages import LINEAGE_UPSTREAMS, PIPELINE_MODELS, REGISTERED, SERVED, Stage
from services.gateway.config import GatewaySettings
from services.runtime.settings import ServiceSettings
from training import rollout


def test_names_and_orders_are_the_strings_they_replace():
    assert SERVED == ("segmentation", "celltype", "ensemble", "npm1", "explain")
    assert REGISTERED == ("segmentation", "celltype", "ensemble", "npm1", "nucseg", "mil")
    assert PIPELINE_MODELS == ("segmentation", "celltype", "ensemble", "npm1")
    assert LINEAGE_UPSTREAMS == ("segmentation", "celltype")
    # quoted and formatted exactly like the plain strings (error messages, env names, JSON)
    assert repr(Stage.NPM1) == "'npm1'" and f"{Stage.NPM1}" == "npm1"
    assert str([Stage.CELLTYPE]) == "['celltype']"
    assert Stage.EXPLAIN.env_prefix == "MS_EXPLAIN_"


def test_registry_names_and_followers():
    assert Stage.EXPLAIN.registered_name == "marrowscope-npm1"
    assert Stage.NUCSEG.registered_name == registry.registered_name("nucseg")
    assert registry.MODEL_KIND == {
        "segmentation": "detector",
        "celltype": "celltype",
        "ensemble": "ensemble",
        "npm1": "npm1",
        "nucseg": "nucseg",
        "mil": "mil",
    }
    assert registry.kind_of("detector") == Stage.SEGMENTATION
    assert rollout.FOLLOWERS == {"npm1": ("explain",)}
    assert not Stage.NUCSEG.served and not Stage.EXPLAIN.registered
    with pytest.raises(KeyError):
        _ = Stage.NUCSEG.grpc_port


@pytest.mark.parametrize("stage", SERVED)
def test_each_service_defaults_to_its_stage(stage: Stage):
    module = importlib.import_module(f"services.{stage}.config")
    (cls,) = (
        v
        for v in vars(module).values()
        if isinstance(v, type) and issubclass(v, ServiceSettings) and v is not ServiceSettings
    )
    settings = cls()
    assert cls.model_config["env_prefix"] == stage.env_prefix
    assert settings.model_name == stage
    assert settings.model_uri == f"models:/{stage.registered_name}@champion"
    assert (settings.grpc_port, settings.metrics_port) == (stage.grpc_port, stage.metrics_port)
    # the gateway reaches the service on its default port without any setting
    assert GatewaySettings().service_addr(stage) == f"127.0.0.1:{settings.grpc_port}"


def test_default_ports_are_distinct():
    ports = [p for s in SERVED for p in (s.grpc_port, s.metrics_port)]
    assert len(set(ports)) == len(ports)
