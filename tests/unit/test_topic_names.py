"""Topic names are spelled once, in ``posflow.topics``; the composition layer asks it."""

from __future__ import annotations

import ast
from dataclasses import astuple

from posflow.settings import KafkaSettings
from posflow.topics import pipeline_topics, topic_names
from tests.conftest import ROOT
from tests.unit.test_layers import COMPOSITION, modules


def test_the_pipeline_topics_are_exactly_the_named_ones() -> None:
    kafka = KafkaSettings(topic_prefix="lt1a2b3c")
    names = {spec.name for spec in pipeline_topics(kafka)}
    assert names == set(astuple(topic_names(kafka)))
    assert topic_names(kafka).txn == "lt1a2b3c.txn.v1"


def test_the_composition_layer_never_spells_a_topic_name() -> None:
    spelled = []
    for name, path in modules(ROOT).items():
        if not any(name == c or name.startswith(c + ".") for c in COMPOSITION):
            continue
        for node in ast.walk(ast.parse(path.read_text("utf-8"), str(path))):
            # f-string parts are constants too
            if isinstance(node, ast.Constant) and ".v1" in str(node.value):
                spelled.append(f"{name} line {node.lineno}: {node.value!r}")
    assert not spelled, spelled
