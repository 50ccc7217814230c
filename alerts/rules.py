"""Alert rules: the YAML format, its validation, and loading defaults plus a user file.

A rule::

    - name: battery_low                 # unique, [a-z0-9_]
      severity: warning                 # info | warning | critical
      scope: terminal                   # terminal | merchant | area | fleet
      when:                             # all must hold (facts: alerts/facts.py FACTS)
        - {fact: battery_pct, op: lt, value: 15}
        - {fact: charging, op: eq, value: false}
      clear_when:                       # optional hysteresis: resolves when ANY holds
        - {fact: battery_pct, op: ge, value: 20}
      for: 2m                           # condition must hold this long before firing
      labels: {team: field-support}
      annotations:
        summary: "Terminal {terminal_id}: battery {battery_pct}%"
        runbook: https://runbooks.example/battery

Group rules (scope merchant / area / fleet) count terminals instead::

      group: {where: [{fact: online, op: eq, value: false}], min_count: 3, min_fraction: 0.5}
      inhibits: [terminal_offline]      # those rules' alerts on member terminals stay silent

Event rules fire on a stream event (``event: integrity``) and resolve ``resolve_after``
without a new one. Errors name the file, the rule and the field.
"""

from __future__ import annotations

import hashlib
import operator
import re
import string
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from alerts.facts import EVENT_FIELDS, FACTS, GROUP_FACTS
from posflow.errors import PosflowError

__all__ = [
    "Group",
    "Predicate",
    "Rule",
    "RuleSet",
    "load_rules",
    "parse_duration",
    "parse_rules",
    "read_rules_file",
]

Op = Literal["lt", "le", "gt", "ge", "eq", "ne", "in"]
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "lt": operator.lt, "le": operator.le, "gt": operator.gt, "ge": operator.ge,
    "eq": operator.eq, "ne": operator.ne, "in": lambda have, want: have in want,
}  # fmt: skip
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """'90s', '5m', '2h', '3d', '250ms' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration, not a boolean")  # noqa: TRY004 (pydantic wants ValueError)
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value).strip())
        if match is None:
            raise ValueError(f"{value!r} is not a duration: use e.g. 30s, 5m, 2h, 3d")
        seconds = float(match.group(1)) * _UNIT[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class Predicate(_Strict):
    fact: str
    op: Op
    value: Any

    @field_validator("fact")
    @classmethod
    def _known(cls, fact: str) -> str:
        if fact not in FACTS and fact not in GROUP_FACTS:
            raise ValueError(f"unknown fact {fact!r}; known: {', '.join(sorted(FACTS))}")
        return fact

    def holds(self, facts: dict[str, Any]) -> bool:
        """False when the fact is unknown for this subject (no evidence, no alert)."""
        have = facts.get(self.fact)
        if have is None:
            return False
        try:
            return bool(_OPS[self.op](have, self.value))
        except TypeError:
            return False


class Group(_Strict):
    where: list[Predicate] = Field(min_length=1)
    min_count: int = Field(default=1, ge=1)
    min_fraction: float = Field(default=0.0, ge=0, le=1)
    clear_below: int | None = Field(default=None, ge=0, description="hysteresis on the count")


class Rule(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,62}$")
    severity: Literal["info", "warning", "critical"]
    scope: Literal["terminal", "merchant", "area", "fleet"]
    when: list[Predicate] = Field(default_factory=list)
    clear_when: list[Predicate] = Field(default_factory=list)
    group: Group | None = None
    event: Literal["integrity"] | None = None
    for_s: float = Field(default=0.0, alias="for")
    resolve_after_s: float = Field(default=86400.0, alias="resolve_after")
    inhibits: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    enabled: bool = True

    @field_validator("for_s", "resolve_after_s", mode="before")
    @classmethod
    def _duration(cls, value: object) -> float:
        return parse_duration(value)

    @model_validator(mode="after")
    def _shape(self) -> Rule:
        kinds = sum([bool(self.when), self.group is not None, self.event is not None])
        if kinds != 1:
            raise ValueError("give exactly one of 'when' (terminal), 'group' or 'event'")
        if self.group is not None and self.scope == "terminal":
            raise ValueError("a 'group' rule needs scope merchant, area or fleet")
        if self.when and self.scope != "terminal":
            raise ValueError("a 'when' rule has scope terminal (use 'group' to aggregate)")
        if self.event == "integrity" and self.scope != "merchant":
            raise ValueError("integrity events are per merchant: scope merchant")
        if "summary" not in self.annotations:
            raise ValueError("annotations.summary is required")
        known = _template_names(self)
        for key, text in self.annotations.items():
            for _, field, _, _ in string.Formatter().parse(text):
                if field is None:
                    continue
                if not re.fullmatch(r"[a-z_][a-z0-9_]*", field) or field not in known:
                    raise ValueError(f"annotations.{key}: unknown placeholder {{{field}}}")
        return self

    @property
    def inhibitable_by(self) -> str:
        return self.scope


def _template_names(rule: Rule) -> set[str]:
    base = {"rule", "severity", "subject_id", "merchant_id", "merchant_name", "value"}
    if rule.group is not None:
        return base | set(GROUP_FACTS)
    if rule.event is not None:
        return base | set(EVENT_FIELDS)
    return base | set(FACTS)


class RuleSet(_Strict):
    rules: list[Rule]

    @model_validator(mode="after")
    def _consistent(self) -> RuleSet:
        names = [r.name for r in self.rules]
        dupes = {n for n in names if names.count(n) > 1}
        if dupes:
            raise ValueError(f"rule names must be unique: {', '.join(sorted(dupes))}")
        for rule in self.rules:
            for target in rule.inhibits:
                if target not in names:
                    raise ValueError(f"rule {rule.name!r} inhibits unknown rule {target!r}")
        return self

    def by_name(self) -> dict[str, Rule]:
        return {r.name: r for r in self.rules if r.enabled}


def _where(exc: ValidationError, docs: Sequence[dict[str, Any]]) -> str:
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        rule = "?"
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            idx = loc[1]
            raw = docs[idx] if idx < len(docs) else {}
            rule = str(raw.get("name", f"#{idx + 1}")) if isinstance(raw, dict) else f"#{idx + 1}"
            loc = loc[2:]
        field = ".".join(str(p) for p in loc if not str(p).startswith("function-")) or "(rule)"
        lines.append(f"rule {rule!r} field {field!r}: {err['msg']}")
    return "; ".join(lines)


def parse_rules(text: str, source: str) -> list[Rule]:
    """Validate one YAML document; raises PosflowError naming source, rule and field."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PosflowError(f"{source}: not valid YAML: {exc}", fix="fix the syntax") from None
    if doc is None:
        return []
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise PosflowError(f"{source}: expected a mapping with a 'rules' list", fix="see README")
    try:
        return RuleSet.model_validate(doc).rules
    except ValidationError as exc:
        raise PosflowError(
            f"{source}: {_where(exc, doc['rules'])}", fix="correct the rule and save again"
        ) from None


def default_rules_text() -> str:
    return resources.files("alerts").joinpath("rules/default.yaml").read_text()


def read_rules_file(user_file: Path) -> tuple[str, str]:
    """The file's text and the SHA-256 of its bytes (what the audit trail records)."""
    try:
        data = user_file.read_bytes()
        return data.decode(), hashlib.sha256(data).hexdigest()
    except OSError as exc:
        raise PosflowError(
            f"cannot read rules file {user_file}: {exc.strerror}",
            fix="set POSFLOW_ALERTS__RULES_FILE to a readable file",
        ) from None
    except UnicodeDecodeError as exc:
        raise PosflowError(
            f"rules file {user_file} is not UTF-8 text ({exc.reason} at byte {exc.start})",
            fix="save it as UTF-8",
        ) from None


def load_rules(user_file: Path | None, text: str | None = None) -> RuleSet:
    """Shipped defaults plus the user's file; a user rule with a default's name replaces it.

    ``text``: the file's content already read (so what was hashed is what is loaded).
    """
    rules = {r.name: r for r in parse_rules(default_rules_text(), "alerts/rules/default.yaml")}
    if user_file is not None:
        if text is None:
            text = read_rules_file(user_file)[0]
        for rule in parse_rules(text, str(user_file)):
            rules[rule.name] = rule
    try:
        return RuleSet(rules=list(rules.values()))
    except ValidationError as exc:
        raise PosflowError(
            f"{user_file}: {exc.errors()[0]['msg']}", fix="correct the rule and save again"
        ) from None
