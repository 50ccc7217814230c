"""Pure parts of the alert engine's access control: who a caller is, what gets recorded."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from alerts.access import Caller, _claimed_actor
from alerts.rules import load_rules, read_rules_file
from posflow.errors import PosflowError
from posflow.security.apiauth import Principal
from posflow.security.roles import Action, Role, Target


@pytest.mark.parametrize(
    ("header", "actor"),
    [
        (None, "anonymous"),
        ("", "anonymous"),
        ("Basic abc", "anonymous"),
        ("Bearer not-a-key", "anonymous"),
        ("Bearer pf_0123456789abcdef_" + "A" * 43, "api-key:0123456789abcdef"),
        ("bearer   pf_0123456789abcdef_" + "b" * 43, "api-key:0123456789abcdef"),
    ],
)
def test_an_unauthenticated_caller_is_named_by_the_key_id_it_claims_never_the_secret(
    header: str | None, actor: str
) -> None:
    assert _claimed_actor(header) == actor


def test_a_callers_record_names_key_role_source_label_and_claimed_client() -> None:
    caller = Caller(Principal("abc", Role.SUPPORT_LEAD, None, "alice"), "alerts-api:10.0.0.7",
                    "cli:alice@ops-1")  # fmt: skip
    entry = caller.audit(Action.SILENCE_MANAGE, Target("silence", "s1"), {"matchers": ["a=b"]})
    assert (entry.actor, entry.role, entry.action, entry.target, entry.source, entry.outcome) == (
        "api-key:abc", "support_lead", "silence.manage", "silence:s1", "alerts-api:10.0.0.7", "ok",
    )  # fmt: skip
    assert entry.detail == {"matchers": ["a=b"], "key_label": "alice", "client": "cli:alice@ops-1"}
    assert caller.name == "api-key:abc (alice)"
    bare = Caller(Principal("abc", Role.SUPPORT_AGENT), "alerts-api:::1", None)
    assert bare.name == "api-key:abc"
    assert bare.audit(Action.ALERT_ACKNOWLEDGE, "alert:x", outcome="failed").detail == {}


def test_the_hash_recorded_is_of_the_bytes_that_were_loaded(tmp_path: Path) -> None:
    f = tmp_path / "rules.yaml"
    f.write_text("rules:\n  - {name: x_paper, severity: info, scope: terminal,\n"
                 "     when: [{fact: printer_paper, op: eq, value: out}],\n"
                 "     annotations: {summary: paper}}\n")  # fmt: skip
    text, sha = read_rules_file(f)
    assert sha == hashlib.sha256(f.read_bytes()).hexdigest()
    assert "x_paper" in load_rules(f, text).by_name()
    # The text given is what is loaded, not what the file holds by then.
    f.write_text("rules: []\n")
    assert "x_paper" in load_rules(f, text).by_name()
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(PosflowError, match="is not UTF-8 text"):
        read_rules_file(f)
    with pytest.raises(PosflowError, match="cannot read rules file"):
        read_rules_file(tmp_path / "missing.yaml")
