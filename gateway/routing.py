"""Routing: which destinations a received instance must be forwarded to.

Pure: a decision is a function of the instance's header values, the association facts
and the ordered rules. No sockets, no database. Every matching route adds its
destinations; a matching route marked ``final`` stops the evaluation; an instance no
route matches is *unrouted* (kept, counted and reported, never dropped).
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import tag_for_keyword

from gateway.addresses import Network, in_networks
from gateway.config import ASSOCIATION_MATCH_KEYS, MatchValue, MorphConfig, RouteConfig
from gateway.dicom.header import Header

Values = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Condition:
    """One ``key = pattern`` of a route's ``match`` table."""

    key: str
    texts: tuple[str, ...] = ()
    regex: re.Pattern[str] | None = None
    networks: tuple[Network, ...] = ()

    def holds(self, values: Values) -> bool:
        """True when any of the attribute's values matches (``""`` matches absent/empty)."""
        if self.networks:
            return any(in_networks(value, self.networks) for value in values)
        if self.regex is not None:
            return any(self.regex.search(value) for value in values)
        if not values:
            return "" in self.texts
        return any(fnmatch.fnmatchcase(value, text) for value in values for text in self.texts)


def compile_condition(key: str, value: MatchValue) -> Condition:
    if isinstance(value, dict):
        return Condition(key, regex=re.compile(value["regex"]))
    texts = (value,) if isinstance(value, str) else tuple(value)
    if key == "source_address":
        return Condition(key, networks=tuple(ipaddress.ip_network(t, strict=False) for t in texts))
    return Condition(key, texts=texts)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    destinations: tuple[str, ...]
    conditions: tuple[Condition, ...]
    final: bool = False
    morph: MorphConfig = field(default_factory=MorphConfig)

    def matches(self, facts: Mapping[str, Values]) -> bool:
        return all(condition.holds(facts.get(condition.key, ())) for condition in self.conditions)


def compile_rules(routes: Iterable[RouteConfig]) -> tuple[Rule, ...]:
    """Rules in file order, ready to evaluate."""
    return tuple(
        Rule(
            name=route.name,
            destinations=tuple(route.destinations),
            conditions=tuple(compile_condition(k, v) for k, v in route.match.items()),
            final=route.final,
            morph=route.morph,
        )
        for route in routes
    )


def header_keywords(rules: Iterable[Rule]) -> frozenset[str]:
    """The DICOM keywords the rules look at (the receive path reads these too)."""
    return frozenset(
        condition.key
        for rule in rules
        for condition in rule.conditions
        if condition.key not in ASSOCIATION_MATCH_KEYS
    )


def header_tags(rules: Iterable[Rule]) -> frozenset[int]:
    tags = (tag_for_keyword(keyword) for keyword in header_keywords(rules))
    return frozenset(int(tag) for tag in tags if tag is not None)


@dataclass(frozen=True, slots=True)
class RoutingDecision:
    """Destinations (each with the first route that sent it there) and matched routes."""

    destinations: Mapping[str, str]
    matched_routes: tuple[str, ...]
    morphs: Mapping[str, MorphConfig] = field(default_factory=dict)
    """Route name -> its morphing, for the matched routes that morph."""

    @property
    def unrouted(self) -> bool:
        return not self.destinations


def decide(facts: Mapping[str, Values], rules: Sequence[Rule]) -> RoutingDecision:
    """Evaluate *rules* in order against *facts* (keywords and association keys)."""
    destinations: dict[str, str] = {}
    matched: list[str] = []
    morphs: dict[str, MorphConfig] = {}
    for rule in rules:
        if not rule.matches(facts):
            continue
        matched.append(rule.name)
        if not rule.morph.is_empty():
            morphs[rule.name] = rule.morph
        for destination in rule.destinations:
            destinations.setdefault(destination, rule.name)
        if rule.final:
            break
    return RoutingDecision(destinations, tuple(matched), morphs)


def association_facts(calling_ae: str, called_ae: str, source_address: str) -> dict[str, Values]:
    return {
        "calling_ae": (calling_ae,),
        "called_ae": (called_ae,),
        "source_address": (source_address,),
    }


def header_facts(header: Header, keywords: Iterable[str]) -> dict[str, Values]:
    """The values of *keywords* in *header*, for :func:`decide`."""
    facts: dict[str, Values] = {}
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is not None:
            facts[keyword] = header.values(int(tag))
    return facts


def make_router(rules: Sequence[Rule]) -> Callable[[Header, Any], RoutingDecision]:
    """The ingest router for *rules*: header and sender in, decision out."""
    keywords = header_keywords(rules)

    def route(header: Header, sender: Any) -> RoutingDecision:
        facts = association_facts(sender.calling_ae, sender.called_ae, sender.peer_address)
        facts.update(header_facts(header, keywords))
        return decide(facts, rules)

    return route
