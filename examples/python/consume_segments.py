"""Follow mindstream's segment changes: who entered or left which campaign segment.

    python consume_segments.py --bootstrap localhost:9092 --group campaigns --from-beginning

Reads `output.segments_topic` written as JSON (`output.format = "json"`). Each record is keyed
`<user key>/<segment>`; its value is a SegmentChange:

    {"user_key": "...", "segment": "loyal", "change": "entered", "version": 1511658000005,
     "model_version": "...", "scores": {"churn_risk": 0.11, ...}, "interests": {...},
     "produced_at_ms": ...}

An empty value (a tombstone) means the user was deleted, opted out, expired, or the segment
was removed from the configuration: the user is no longer in it.

Prints one line per change and, on exit, the size of every segment seen. With
`--idle-exit SECONDS` it stops after that long without a new record; otherwise on Ctrl-C.
Needs `confluent-kafka` (benches/python/requirements.txt).
"""

import argparse
import json
import sys
import time
from collections import defaultdict

from confluent_kafka import Consumer, KafkaException


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    parser.add_argument("--topic", default="mindstream-segments")
    parser.add_argument("--group", default="mindstream-segments-example")
    parser.add_argument(
        "--from-beginning",
        action="store_true",
        help="start at the oldest record when the group has no committed offset",
    )
    parser.add_argument(
        "--idle-exit",
        type=float,
        metavar="SECONDS",
        help="exit once no record has come for this long after partitions were assigned",
    )
    parser.add_argument(
        "-X",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any librdkafka consumer property, e.g. -X security.protocol=SSL",
    )
    return parser.parse_args()


def consumer_config(args):
    config = {
        "bootstrap.servers": args.bootstrap,
        "group.id": args.group,
        "auto.offset.reset": "earliest" if args.from_beginning else "latest",
    }
    for pair in args.extra:
        key, _, value = pair.partition("=")
        config[key] = value
    return config


class Segments:
    """Current membership, rebuilt from the changes."""

    def __init__(self):
        # Highest version applied per record key. Delivery is at least once, so a record can
        # come twice, and after a restart an older one can follow a newer one: a change whose
        # version is not above the key's is a duplicate or stale, and is dropped.
        self.versions = {}
        self.members = defaultdict(set)

    def apply(self, key, value):
        """Applies one record; returns the line to print, or None for a dropped one."""
        user_key, _, segment = key.rpartition("/")
        if not value:
            # A tombstone carries no version: the user is out of the segment, and a later
            # record for the key (a returning user starts afresh) is taken as it comes.
            self.versions.pop(key, None)
            self.members[segment].discard(user_key)
            return f"removed {segment} user={user_key}"
        change = json.loads(value)
        version = change["version"]
        if version <= self.versions.get(key, -1):
            return None
        self.versions[key] = version
        if change["change"] == "entered":
            self.members[segment].add(user_key)
        else:
            self.members[segment].discard(user_key)
        scores = " ".join(f"{name}={score:.2f}" for name, score in sorted(change["scores"].items()))
        return f"{change['change']} {segment} user={user_key} version={version} {scores}"

    def summary(self):
        sizes = " ".join(f"{name}={len(users)}" for name, users in sorted(self.members.items()))
        return f"segment sizes: {sizes or 'none seen'}"


def main():
    args = parse_args()
    # When the idle clock started: at the assignment (joining a group can take a while), then
    # at each record.
    quiet_since = None

    def on_assign(consumer, partitions):
        nonlocal quiet_since
        quiet_since = time.monotonic()

    consumer = Consumer(consumer_config(args))
    consumer.subscribe([args.topic], on_assign=on_assign)
    segments = Segments()
    try:
        while True:
            message = consumer.poll(0.5)
            if message is None:
                quiet = time.monotonic() - quiet_since if quiet_since else 0.0
                if args.idle_exit and quiet > args.idle_exit:
                    break
                continue
            if message.error():
                raise KafkaException(message.error())
            quiet_since = time.monotonic()
            line = segments.apply(message.key().decode(), message.value())
            if line:
                print(line)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    print(segments.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
