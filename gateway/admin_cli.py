"""Admin commands for forwarding: queue status, dead letters, requeue, route dry-runs."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gateway.config import GatewayConfig

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _engine(config: GatewayConfig) -> Any:
    from gateway.index.database import make_engine, migrate

    engine = make_engine(config.storage.database, timeout=config.storage.database_timeout)
    migrate(engine)
    return engine


def _age(since: dt.datetime | None) -> str:
    if since is None:
        return "-"
    seconds = int((dt.datetime.now(dt.UTC) - since).total_seconds())
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


def cmd_queue(config: GatewayConfig, args: argparse.Namespace) -> int:
    from gateway.index import queue

    engine = _engine(config)
    with engine.connect() as connection:
        rows = {row.destination: row for row in queue.queue_status(connection)}
        unrouted = queue.unrouted_count(connection)
    engine.dispose()
    names = [d.name for d in config.destination] + sorted(set(rows) - {
        d.name for d in config.destination})
    if args.json:
        print(json.dumps({
            "destinations": [
                {"destination": name, **_status_fields(rows.get(name))} for name in names
            ],
            "unrouted": unrouted,
        }, indent=2))
        return EXIT_OK
    print(f"{'destination':<20} {'pending':>8} {'in flight':>9} {'retrying':>8} {'dead':>6} "
          f"{'done':>8} {'oldest':>7}")
    for name in names:
        fields = _status_fields(rows.get(name))
        marker = "" if config.destination_named(name) else "  (not configured)"
        print(f"{name:<20} {fields['pending']:>8} {fields['in_flight']:>9} "
              f"{fields['retrying']:>8} {fields['dead']:>6} {fields['done']:>8} "
              f"{fields['oldest_pending_age']:>7}{marker}")
    print(f"unrouted instances: {unrouted}")
    return EXIT_OK


def _status_fields(row: Any) -> dict[str, Any]:
    if row is None:
        return {"pending": 0, "in_flight": 0, "retrying": 0, "dead": 0, "done": 0,
                "oldest_pending_age": "-"}
    return {
        "pending": row.pending, "in_flight": row.in_flight, "retrying": row.retrying,
        "dead": row.dead, "done": row.done, "oldest_pending_age": _age(row.oldest_pending),
    }


def cmd_dead_letters(config: GatewayConfig, args: argparse.Namespace) -> int:
    from gateway.index import queue

    engine = _engine(config)
    with engine.connect() as connection:
        letters = queue.dead_letters(connection, args.destination, limit=args.limit)
    engine.dispose()
    if args.json:
        print(json.dumps([asdict(letter) for letter in letters], indent=2, default=str))
        return EXIT_OK
    if not letters:
        print("no dead letters")
        return EXIT_OK
    for letter in letters:
        status = f"0x{letter.last_status:04X}" if letter.last_status is not None else "-"
        print(f"#{letter.id}  {letter.destination}  study {letter.study_instance_uid}  "
              f"instance {letter.sop_instance_uid}")
        print(f"     status {status}, {letter.attempts} attempt(s), {_age(letter.completed_at)} "
              f"ago: {letter.reason}")
    return EXIT_OK


def cmd_requeue(config: GatewayConfig, args: argparse.Namespace) -> int:
    from gateway.index import queue

    if not (args.id or args.destination or args.study):
        print("requeue needs --id, --destination or --study", file=sys.stderr)
        return EXIT_USAGE
    if args.destination and not config.destination_named(args.destination):
        print(f"no destination named {args.destination!r} in the configuration",
              file=sys.stderr)
        return EXIT_USAGE
    engine = _engine(config)
    with engine.begin() as connection:
        count = queue.requeue(
            connection, dt.datetime.now(dt.UTC), job_ids=args.id or (),
            destination=args.destination, study_instance_uid=args.study,
        )
    engine.dispose()
    print(f"requeued {count} dead letter(s)")
    return EXIT_OK


def cmd_route_test(config: GatewayConfig, args: argparse.Namespace) -> int:
    import copy

    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from gateway.morph import apply_morph
    from gateway.routing import association_facts, compile_rules, decide

    rules = compile_rules(config.route)
    status = EXIT_OK
    for name in args.files:
        try:
            dataset = dcmread(name, stop_before_pixels=True)
        except (OSError, InvalidDicomError) as exc:
            print(f"{name}: cannot read: {exc}")
            status = EXIT_FAILURE
            continue
        facts = association_facts(args.calling_ae, args.called_ae or config.node.ae_title,
                                   args.source_address)
        for condition_key in {c.key for rule in rules for c in rule.conditions}:
            if condition_key not in facts:
                facts[condition_key] = _values(dataset, condition_key)
        decision = decide(facts, rules)
        print(f"{name}:")
        if decision.unrouted:
            print("  unrouted (no route matches): kept, reported, not forwarded")
            continue
        print(f"  routes: {', '.join(decision.matched_routes)}")
        for destination, route in decision.destinations.items():
            print(f"  -> {destination} (via {route})")
            target = config.destination_named(destination)
            morphs = [rule.morph for rule in rules if rule.name == route]
            morphs += [target.morph] if target else []
            forwarded = copy.deepcopy(dataset)
            for morph in morphs:
                for change in apply_morph(forwarded, morph):
                    print(f"       {change.action:<6} {change.attribute}: "
                          f"{change.before!r} -> {change.after!r}")
    return status


def cmd_events(config: GatewayConfig, args: argparse.Namespace) -> int:
    from gateway.index import events

    engine = _engine(config)
    with engine.connect() as connection:
        recent = events.recent_events(connection, args.limit, args.study)
    engine.dispose()
    if args.json:
        print(json.dumps([asdict(event) for event in recent], indent=2, default=str))
        return EXIT_OK
    if not recent:
        print("no events")
        return EXIT_OK
    for event in recent:
        print(f"{event.created_at:%Y-%m-%d %H:%M:%S}  {event.kind:<17} v{event.version}  "
              f"study {event.study_instance_uid}")
        if event.resource_key != event.study_instance_uid:
            print(f"     instance {event.resource_key}")
        for sink, state in sorted(event.deliveries.items()):
            print(f"     -> {sink}: {state}")
    return EXIT_OK


def cmd_orders(config: GatewayConfig, args: argparse.Namespace) -> int:
    from gateway.index import orders

    engine = _engine(config)
    with engine.connect() as connection:
        recent = orders.recent_orders(connection, args.limit)
    engine.dispose()
    if args.json:
        print(json.dumps([asdict(order) for order in recent], indent=2, default=str))
        return EXIT_OK
    if not recent:
        print("no orders")
        return EXIT_OK
    for order in recent:
        matched = f"{order.matched_studies} study(ies)" if order.matched_studies else "no study yet"
        mismatch = f"  MISMATCH: {order.mismatch}" if order.mismatch else ""
        print(f"{order.updated_at:%Y-%m-%d %H:%M}  accession {order.accession_number or '-'}  "
              f"{order.modality or '-':<3} {order.procedure or '-'}  [{order.order_status or '-'}]"
              f"  {matched}{mismatch}")
    return EXIT_OK


def cmd_requeue_events(config: GatewayConfig, args: argparse.Namespace) -> int:
    from gateway.index import events

    if not (args.id or args.sink or args.study):
        print("requeue-events needs --id, --sink or --study", file=sys.stderr)
        return EXIT_USAGE
    engine = _engine(config)
    with engine.begin() as connection:
        count = events.requeue_deliveries(
            connection, dt.datetime.now(dt.UTC), ids=args.id or (), sink=args.sink,
            study_instance_uid=args.study,
        )
    engine.dispose()
    print(f"requeued {count} event delivery(ies)")
    return EXIT_OK


def _values(dataset: Any, keyword: str) -> tuple[str, ...]:
    element = dataset.get(keyword)
    if element is None or element == "":
        return ()
    if isinstance(element, (list, tuple)) or getattr(element, "VM", 1) > 1:
        return tuple(str(value) for value in element)
    return (str(element),)


def add_commands(
    commands: Any,
    with_config: Callable[[argparse.ArgumentParser], argparse.ArgumentParser],
    wrap: Callable[[Callable[[GatewayConfig, argparse.Namespace], int]], Callable[..., int]],
) -> None:
    """Register the admin commands on the main parser."""
    queue_cmd = with_config(commands.add_parser(
        "queue", help="per destination: pending, in flight, retrying, dead, oldest age"))
    queue_cmd.add_argument("--json", action="store_true", help="machine-readable output")
    queue_cmd.set_defaults(handler=wrap(cmd_queue))

    dead = with_config(commands.add_parser("dead-letters", help="list dead letters"))
    dead.add_argument("--destination", help="only this destination")
    dead.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")
    dead.add_argument("--json", action="store_true", help="machine-readable output")
    dead.set_defaults(handler=wrap(cmd_dead_letters))

    requeue = with_config(commands.add_parser(
        "requeue", help="send dead letters again (by id, destination or study)"))
    requeue.add_argument("--id", type=int, action="append", help="dead-letter id (repeatable)")
    requeue.add_argument("--destination", help="all dead letters of this destination")
    requeue.add_argument("--study", help="all dead letters of this Study Instance UID")
    requeue.set_defaults(handler=wrap(cmd_requeue))

    route = with_config(commands.add_parser(
        "route-test", help="dry run: which routes and destinations files would get"))
    route.add_argument("files", nargs="+", type=Path, help="DICOM files")
    route.add_argument("--calling-ae", default="", help="calling AE title to assume")
    route.add_argument("--called-ae", default="", help="called AE title (default: the node's)")
    route.add_argument("--source-address", default="127.0.0.1", help="peer address to assume")
    route.set_defaults(handler=wrap(cmd_route_test))

    recent = with_config(commands.add_parser(
        "events", help="recent study events and their delivery to each sink"))
    recent.add_argument("--study", help="only this Study Instance UID")
    recent.add_argument("--limit", type=int, default=50)
    recent.add_argument("--json", action="store_true")
    recent.set_defaults(handler=wrap(cmd_events))

    orders_cmd = with_config(commands.add_parser(
        "orders", help="recent HL7 orders and whether a study matched them"))
    orders_cmd.add_argument("--limit", type=int, default=50)
    orders_cmd.add_argument("--json", action="store_true")
    orders_cmd.set_defaults(handler=wrap(cmd_orders))

    again = with_config(commands.add_parser(
        "requeue-events", help="deliver dead-lettered events again (by id, sink or study)"))
    again.add_argument("--id", type=int, action="append", help="delivery id (repeatable)")
    again.add_argument("--sink", help="all dead deliveries of this sink")
    again.add_argument("--study", help="all dead deliveries of this Study Instance UID")
    again.set_defaults(handler=wrap(cmd_requeue_events))
