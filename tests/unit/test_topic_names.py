"""Topic names are spelled once, in ``posflow.topics``; the composition layer asks it."""

from __future__ import annotations

import ast
from typing import get_args

from posflow.settings import KafkaSettings
from posflow.topics import TopicKind, pipeline_topics, topic_name
from tests.conftest import ROOT
from tests.unit.test_layers import COMPOSITION, modules


def test_the_pipeline_topics_are_exactly_the_named_kinds() -> None:
    kafka = KafkaSettings(topic_prefix="lt1a2b3c")
    names = {spec.name for spec in pipeline_topics(kafka)}
    assert names == {topic_name(kafka, kind) for kind in get_args(TopicKind)}
    assert topic_name(kafka, "txn") == "lt1a2b3c.txn.v1"


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
