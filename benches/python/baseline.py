#!/usr/bin/env python3
"""The processor's job done the usual way in Python, as the end-to-end bench's baseline.

One process, one loop: a confluent-kafka consumer reads JSON events, each event is decoded
and checked as the processor checks it, its user id pseudonymised and its text scrubbed, and
it is added to the user's window kept in a dict. The window is rendered as model text,
tokenized with the `tokenizers` package and scored with `onnxruntime` (one session on the
CPU, `--threads` intra-op threads, 1 by default), in one model call per event: the whole window plus, for explanations, the
window with each of the newest events left out. The calibrated scores become a signal record
(the processor's JSON record schema) produced to the signal topic, keyed by user key.

Nothing is coalesced or batched across events, so every event costs a full scoring. Windows,
rendering, token budget and calibration follow the processor's code (src/window, src/render.rs,
src/tokenize.rs, src/model), so that for the same window both compute the same scores.
`--dump FILE` writes one JSON line per scoring for that comparison: `user_key`, the record's
lineage `partition` and `offset` (its newest event by event time, as the processor's records
have it), `version` (the per-user record version, as the processor computes it) and the
calibrated `scores` of every head for the whole window. The processor may score several events
of a user at once; its record then matches the baseline's line with the same user key and
version.

    baseline.py --brokers HOST:PORT --topic T --signals-topic S --group G \
        --model-dir models --events N [--threads N] [--dump FILE]

The pseudonymisation secret comes from MINDSTREAM_PSEUDONYM_KEY, as for the processor. At the
end one JSON line goes to stdout: events read, scored and rejected, and the rate over the time
from the first record read to the last signal record acknowledged by the broker.

Shortcomings, by design of a baseline: no dead-letter topic (rejected records are counted
only), no state changelog, offsets auto-committed by the client rather than after delivery,
and idle users are never evicted (their state restarts after the model's TTL, as the
processor's would, but stays in memory).
"""

import argparse
import bisect
import hashlib
import hmac
import json
import math
import os
import re
import struct
import sys
import time

import numpy as np
import onnxruntime as ort
from confluent_kafka import Consumer, KafkaError, Producer
from tokenizers import Tokenizer

# The processor's defaults for what the model card does not fix (src/config/mod.rs).
ALLOWED_LATENESS_MS = 3_600_000
EXPLAIN_CANDIDATES = 8
EXPLAIN_TOP = 3
INTEREST_HALF_LIFE_MS = 7 * 86_400_000
INTERESTS_TRACKED = 32
INTERESTS_TOP = 5
KEY_ENV = "MINDSTREAM_PSEUDONYM_KEY"

# Event validation limits (src/event/mod.rs).
MAX_ID_BYTES = 256
MAX_QUANTITY = 10_000
ACTIONS = ("view", "cart", "fav", "buy", "remove_cart")


# ---------------------------------------------------------------------------------------------
# Numbers as the processor's Rust computes them.


def f32(x):
    """`x as f32`: round to the nearest single-precision value; too large becomes infinite."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def round_away(x):
    """Rust's `round`: halves go away from zero (Python's `round` goes to even)."""
    if not math.isfinite(x):
        return x
    whole = float(math.trunc(x))
    if abs(x - whole) >= 0.5:
        whole += math.copysign(1.0, x)
    return whole


def saturating_int(x, bits):
    """Rust's float-to-integer `as` cast: truncates, saturates, NaN becomes 0."""
    if math.isnan(x):
        return 0
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if x <= low:
        return low
    if x >= high:
        return high
    return math.trunc(x)


def powi(base, exponent):
    """`f64::powi` as the compiler lowers it: square-and-multiply, reciprocal for negatives."""
    reciprocal = exponent < 0
    result = 1.0
    while True:
        if exponent & 1:
            result *= base
        exponent = -((-exponent) // 2) if exponent < 0 else exponent // 2
        if exponent == 0:
            break
        base *= base
    return 1.0 / result if reciprocal else result


# ---------------------------------------------------------------------------------------------
# Decoding (src/event/json.rs, src/event/mod.rs).


class Rejected(Exception):
    """A record the processor would send to its dead-letter topic; the reason code is args[0]."""


class _Pairs(list):
    """A JSON object as its key/value pairs, so that repeated keys can be seen."""


STRING_FIELDS = ("user_id", "event_id", "kind", "action", "item_id", "category_id", "query",
                 "sort", "text", "language")
KNOWN_FIELDS = frozenset(STRING_FIELDS + ("event_time", "opt_out", "price", "discount",
                                          "quantity", "rating"))
_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_JSON_WHITESPACE_AND_FF = b" \t\n\r\x0c"


def _not_json(name):
    raise ValueError(f"{name} is not JSON")


def _integer(value, low, high):
    if type(value) is not int or not low <= value <= high:
        raise Rejected("invalid_field")
    return value


def _number(value):
    if type(value) is int:
        try:
            value = float(value)
        except OverflowError:
            raise Rejected("malformed") from None
    if type(value) is not float:
        raise Rejected("invalid_field")
    if not math.isfinite(value):
        raise Rejected("malformed")
    return value


def _typed(fields):
    """Checks every known field's JSON type as the processor's typed decoding does."""
    for name in STRING_FIELDS:
        value = fields.get(name)
        if value is not None and type(value) is not str:
            raise Rejected("invalid_field")
        if value is not None and _SURROGATE.search(value):
            raise Rejected("malformed")
    checks = {
        "event_time": lambda v: _integer(v, -(1 << 63), (1 << 63) - 1),
        "quantity": lambda v: _integer(v, 0, (1 << 32) - 1),
        "rating": lambda v: _integer(v, 0, 255),
        "price": _number,
        "discount": _number,
    }
    for name, check in checks.items():
        if fields.get(name) is not None:
            fields[name] = check(fields[name])
    if fields.get("opt_out") is not None and type(fields["opt_out"]) is not bool:
        raise Rejected("invalid_field")
    return fields


def _parse(payload):
    """The record's known fields, or Rejected when it is not a JSON object of the right types."""
    if not payload or not payload.lstrip(_JSON_WHITESPACE_AND_FF).startswith(b"{"):
        raise Rejected("malformed")
    try:
        pairs = json.loads(payload.decode("utf-8"), object_pairs_hook=_Pairs,
                           parse_constant=_not_json)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Rejected("malformed") from None
    fields = {}
    for name, value in pairs:
        if name in KNOWN_FIELDS:
            if name in fields:
                raise Rejected("invalid_field")
            fields[name] = value
    return _typed(fields)


def _check_id(value, required):
    if not value:
        if required:
            raise Rejected("missing_field")
        return
    size = len(value) if value.isascii() else len(value.encode("utf-8"))
    if size > MAX_ID_BYTES or _CONTROL.search(value):
        raise Rejected("invalid_field")


def _required(fields, name):
    value = fields.get(name)
    if value is None:
        raise Rejected("missing_field")
    return value


def decode_event(payload):
    """The event as a dict of its fields, or Rejected with the processor's reason code."""
    f = _parse(payload)
    kind = _required(f, "kind")
    if kind == "click":
        action = _required(f, "action")
        if action not in ACTIONS:
            raise Rejected("invalid_field")
    elif kind == "search":
        _required(f, "query")
    elif kind == "review":
        _required(f, "text")
    else:
        raise Rejected("unknown_kind")
    time_ms = _required(f, "event_time")

    _check_id(f.get("user_id"), True)
    _check_id(f.get("event_id"), True)
    if time_ms <= 0:
        raise Rejected("invalid_field")
    if kind == "click":
        _check_id(f.get("item_id"), True)
        _check_id(f.get("category_id"), False)
        if f.get("price") is not None and f["price"] < 0.0:
            raise Rejected("invalid_field")
        if f.get("discount") is not None and not 0.0 <= f["discount"] < 1.0:
            raise Rejected("invalid_field")
        if f.get("quantity") is not None and not 1 <= f["quantity"] <= MAX_QUANTITY:
            raise Rejected("invalid_field")
    elif kind == "search":
        _check_id(f.get("category_id"), False)
    else:
        _check_id(f.get("item_id"), True)
        if f.get("rating") is not None and not 1 <= f["rating"] <= 5:
            raise Rejected("invalid_field")
    return f


# ---------------------------------------------------------------------------------------------
# Privacy (src/privacy.rs): keyed user keys and scrubbed text.


class Pseudonymizer:
    """HMAC-SHA-256 of the user id; the key is the first 16 bytes of the MAC, in hex."""

    def __init__(self, secret):
        if len(secret) < 16:
            raise SystemExit(f"baseline: {KEY_ENV} is shorter than 16 bytes")
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)

    def key(self, user_id):
        mac = self._mac.copy()
        mac.update(user_id.encode("utf-8"))
        return mac.digest()[:16].hex()


# The processor's patterns use Unicode digits (`\d`), ASCII word boundaries and, where they
# are case-insensitive, Unicode simple case folding, which adds the Kelvin sign and the long s
# to the ASCII letters. Python's `\b` and IGNORECASE differ, so both are spelled out here.
_W = "[0-9A-Za-z_]"
_B = f"(?:(?<={_W})(?!{_W})|(?<!{_W})(?={_W}))"
_LETTER = "a-zA-Z\u017f\u212a"
EMAIL = re.compile(
    f"[{_LETTER}0-9._%+\\-]+@[{_LETTER}0-9\\-]+(?:\\.[{_LETTER}0-9\\-]+)*\\.[{_LETTER}]{{2,}}")
CN_ID = re.compile(f"{_B}[1-9]\\d{{5}}(?:19|20)\\d{{2}}\\d{{7}}[0-9xX]{_B}")
DIGIT_RUN = re.compile(f"{_B}\\d(?:[ \\-]?\\d){{12,18}}{_B}")
PHONE = re.compile(
    f"(?:\\+?86[ \\-]?)?{_B}1[3-9]\\d(?:[ \\-]?\\d{{4}}){{2}}{_B}"
    "|\\+\\d{1,3}[ \\-.]?(?:\\(\\d{1,4}\\)[ \\-.]?)?\\d{2,4}(?:[ \\-.]?\\d{2,4}){1,4}"
    f"|\\(?{_B}\\d{{3}}\\)?[ \\-.]\\d{{3}}[ \\-.]\\d{{4}}{_B}")
_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)


def luhn_ok(text):
    digits = [ord(c) - 48 for c in text if "0" <= c <= "9"]
    if len(digits) < 13:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return total % 10 == 0


def cn_id_checksum_ok(text):
    raw = text.encode("utf-8")
    if len(raw) != 18 or not all(48 <= b <= 57 for b in raw[:17]):
        return False
    total = sum((b - 48) * w for b, w in zip(raw[:17], _ID_WEIGHTS))
    return b"10X98765432"[total % 11] == raw[17:].upper()[0]


def scrub(text):
    text = EMAIL.sub("[email]", text)
    text = CN_ID.sub(lambda m: "[id]" if cn_id_checksum_ok(m[0]) else m[0], text)
    text = DIGIT_RUN.sub(lambda m: "[card]" if luhn_ok(m[0]) else m[0], text)
    return PHONE.sub("[phone]", text)


_BLANKS = str.maketrans("\n\r\t", "   ")


def bounded(text, max_chars):
    return scrub(text).translate(_BLANKS)[:max_chars]


# ---------------------------------------------------------------------------------------------
# Windows (src/window/mod.rs, src/window/store.rs).


class WindowEvent:
    """An event as the window keeps it: ids, time, scrubbed and bounded detail, lineage."""

    __slots__ = ("event_id", "time_ms", "item_id", "category_id", "kind", "action", "price",
                 "discount", "quantity", "query", "sort", "rating", "text", "lineage")

    def __init__(self, f, lineage, max_text_chars):
        self.event_id = f["event_id"]
        self.time_ms = f["event_time"]
        self.kind = f["kind"]
        self.lineage = lineage
        self.action = self.price = self.discount = self.rating = None
        self.quantity = 1
        self.query = self.sort = self.text = ""
        if self.kind == "click":
            self.item_id, self.category_id = f["item_id"], f.get("category_id") or ""
            self.action = f["action"]
            self.price = None if f.get("price") is None else f32(f["price"])
            self.discount = None if f.get("discount") is None else f32(f["discount"])
            self.quantity = f.get("quantity") or 1
        elif self.kind == "search":
            self.item_id, self.category_id = "", f.get("category_id") or ""
            self.query = bounded(f["query"], max_text_chars)
            self.sort = f.get("sort") or ""
        else:
            self.item_id, self.category_id = f["item_id"], ""
            self.rating = f.get("rating")
            self.text = bounded(f["text"], max_text_chars)

    def interest_weight(self):
        if self.kind != "click":
            return 1.0
        return {"view": 1.0, "fav": 2.0, "cart": 3.0, "buy": 4.0, "remove_cart": 0.5}[self.action]


def decay(age_ms, half_life_ms):
    if age_ms <= 0:
        return 1.0
    return f32(0.5 ** (age_ms / max(half_life_ms, 1)))


class UserState:
    """One user's window (oldest first), lifetime counters and decayed category interests."""

    __slots__ = ("events", "times", "started_ms", "first_seen_ms", "newest_ms", "applied",
                 "lifetime_buys", "interests")

    def __init__(self, time_ms):
        self.events, self.times = [], []
        self.started_ms = self.first_seen_ms = self.newest_ms = time_ms
        self.applied = self.lifetime_buys = 0
        self.interests = []

    def apply(self, event, window, ttl_ms):
        """Adds `event` in event-time order and trims; returns the state (new after a TTL gap)."""
        state = self
        if event.time_ms - self.newest_ms > ttl_ms:
            state = UserState(event.time_ms)
        state._decay_to(event.time_ms)
        state._add_interest(event)
        state.applied += 1
        state.lifetime_buys += event.action == "buy"
        state.first_seen_ms = min(state.first_seen_ms, event.time_ms)
        at = bisect.bisect_right(state.times, event.time_ms)
        state.events.insert(at, event)
        state.times.insert(at, event.time_ms)
        state._trim(window)
        return state

    def _trim(self, window):
        drop = max(0, len(self.events) - window["max_events"])
        newest = self.times[-1]
        while drop < len(self.times) and newest - self.times[drop] > window["span_ms"]:
            drop += 1
        if drop:
            del self.events[:drop], self.times[:drop]

    def _decay_to(self, time_ms):
        if time_ms <= self.newest_ms:
            return
        factor = decay(time_ms - self.newest_ms, INTEREST_HALF_LIFE_MS)
        for interest in self.interests:
            interest[1] = f32(interest[1] * factor)
        self.newest_ms = time_ms

    def _add_interest(self, event):
        """Adds to the category's counter; a new category displaces the weakest when full (as
        the processor's vector does, by moving the last entry into its place)."""
        category = event.category_id
        if not category:
            return
        add = f32(event.interest_weight()
                  * decay(self.newest_ms - event.time_ms, INTEREST_HALF_LIFE_MS))
        for interest in self.interests:
            if interest[0] == category:
                interest[1] = f32(interest[1] + add)
                return
        if len(self.interests) >= INTERESTS_TRACKED:
            weakest = min(range(len(self.interests)), key=lambda i: self.interests[i][1])
            if not self.interests[weakest][1] < add:
                return
            self.interests[weakest] = self.interests[-1]
            self.interests.pop()
        self.interests.append([category, add])

    def version(self):
        return max(self.started_ms, 0) + self.applied

    def top_interests(self):
        total = 0.0
        for _, weight in self.interests:
            total = f32(total + weight)
        if total <= 0.0:
            return []
        ranked = sorted(self.interests, key=lambda i: (-i[1], i[0]))[:INTERESTS_TOP]
        return [{"category_id": c, "weight": f32(w / total)} for c, w in ranked]


# ---------------------------------------------------------------------------------------------
# Rendering (src/render.rs).

BUCKETS = [
    (0, "0s"), (5_000, "5s"), (30_000, "30s"), (60_000, "1m"), (300_000, "5m"),
    (900_000, "15m"), (1_800_000, "30m"), (3_600_000, "1h"), (10_800_000, "3h"),
    (21_600_000, "6h"), (43_200_000, "12h"), (86_400_000, "1d"), (172_800_000, "2d"),
    (345_600_000, "4d"), (604_800_000, "7d"), (1_209_600_000, "14d"), (2_592_000_000, "30d"),
    (5_184_000_000, "60d"), (7_776_000_000, "90d"), (15_552_000_000, "180d"),
    (31_536_000_000, "1y"),
]
_FLOORS = [floor for floor, _ in BUCKETS]


def duration(ms):
    at = bisect.bisect_right(_FLOORS, max(ms, 0))
    return BUCKETS[max(at - 1, 0)][1]


def round_price(price):
    """Two significant digits, no trailing zeros; `price` holds a single-precision value."""
    if price <= 0.0:
        return "0"
    log = f32(math.log10(price))
    magnitude = saturating_int(math.floor(log) if math.isfinite(log) else log, 32)
    step = powi(10.0, magnitude - 1)
    rounded = round_away(price / step) * step
    if magnitude >= 1:
        return str(saturating_int(round_away(rounded), 64))
    text = f"{rounded:.{1 - magnitude}f}"
    return text.rstrip("0").rstrip(".")


def render_line(event, gap_ms, item):
    out = ["+", duration(gap_ms)]
    category = f" c{event.category_id}" if event.category_id else ""
    numbered = f" i{item}" if item is not None else ""
    if event.kind == "click":
        out += [" ", event.action, category, numbered]
        if event.price is not None:
            out.append(f" ${round_price(event.price)}")
        if event.discount is not None:
            percent = saturating_int(round_away(f32(event.discount * 100.0)), 64)
            out.append(f" -{percent}%")
        if event.quantity > 1:
            out.append(f" x{event.quantity}")
    elif event.kind == "search":
        out.append(f' search "{event.query}"')
        if event.sort:
            out.append(f" sort {event.sort}")
        out.append(category)
    else:
        out += [" review", numbered, ": ", event.text]
    out.append("\n")
    return "".join(out)


def render(state):
    """The header, then one line per window event: `[(text, event index or None)]`."""
    age = state.newest_ms - state.first_seen_ms
    header = (f"user {duration(age)} old, {state.lifetime_buys} orders, "
              f"{state.applied} events\n")
    segments = [(header, None)]
    items = {}
    previous = state.times[0]
    for index, event in enumerate(state.events):
        gap, previous = event.time_ms - previous, event.time_ms
        item = None
        if event.item_id:
            item = items.setdefault(event.item_id, len(items) + 1)
        segments.append((render_line(event, gap, item), index))
    return segments


def summary(event):
    """An event as an explanation names it: kind or action, and category; never its text."""
    if event.kind == "click":
        out = event.action
    elif event.kind == "search":
        out = "search"
    else:
        out = "review" if event.rating is None else f"review rating {event.rating}"
    return out + (f" c{event.category_id}" if event.category_id else "")


# ---------------------------------------------------------------------------------------------
# Tokens and scores (src/tokenize.rs, src/model/batcher.rs, src/model/scorer.rs).


def encode_window(tokenizer, segments, max_tokens):
    """The header's ids, then as many of the newest events' ids as fit in `max_tokens` (the
    newest cut at the end when not even it fits); returns the ids and each kept event's span."""
    header, events = [], []
    for text, index in segments:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        if index is None:
            header.extend(ids)
        else:
            events.append((index, ids))
    header = header[:max_tokens]
    budget = max_tokens - len(header)
    keep = len(events)
    while keep > 0 and len(events[keep - 1][1]) <= budget:
        budget -= len(events[keep - 1][1])
        keep -= 1
    if keep == len(events) and budget > 0 and events:
        events[-1] = (events[-1][0], events[-1][1][:budget])
        keep -= 1
    ids, spans = header, {}
    for index, event_ids in events[keep:]:
        start = len(ids)
        ids = ids + event_ids
        spans[index] = (start, len(ids))
    return ids, spans


class Model:
    """The ONNX graph on `threads` CPU threads (0: ONNX Runtime's default, one per core), with
    the card's Platt scaling applied to its scores."""

    def __init__(self, model_dir, card, threads=1):
        path = os.path.join(model_dir, card["onnx_file"])
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != card["onnx_sha256"]:
            raise SystemExit(f"baseline: {path} has SHA-256 {digest}, the card says "
                             f"{card['onnx_sha256']}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        if "scores" not in {o.name for o in self.session.get_outputs()}:
            raise SystemExit(f"baseline: {path} has no `scores` output; graphs whose heads are "
                             "in the model card are not supported here")
        inputs = {i.name for i in self.session.get_inputs()}
        self.position_ids = "position_ids" in inputs
        names = [s["name"] for s in card["signals"]]
        platt = {p["signal"]: (p["a"], p["b"]) for p in card.get("calibration") or []}
        self.platt = [platt[name] for name in names] if platt else None

    def score(self, sequences):
        """Calibrated scores, `[len(sequences)][signals]`, sequences padded on the right."""
        width = max(1, max(len(s) for s in sequences))
        ids = np.zeros((len(sequences), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, tokens in enumerate(sequences):
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        feed = {"input_ids": ids, "attention_mask": mask}
        if self.position_ids:
            feed["position_ids"] = np.where(mask == 1, np.arange(width, dtype=np.int64), 0)
        (raw,) = self.session.run(["scores"], feed)
        return [[self._calibrate(k, v) for k, v in enumerate(row)] for row in raw.tolist()]

    def _calibrate(self, column, raw):
        if self.platt is None:
            return raw
        a, b = self.platt[column]
        p = min(max(raw, 1e-7), 1.0 - 1e-7)
        return f32(1.0 / (1.0 + math.exp(-(a * math.log(p / (1.0 - p)) + b))))


# ---------------------------------------------------------------------------------------------
# Signal records (src/signals.rs, src/model/card.rs).


def applies(condition, events):
    if condition == "always":
        return True
    if condition == "has_click":
        return any(e.kind == "click" for e in events)
    if condition == "has_cart":
        return any(e.action == "cart" for e in events)
    if condition == "has_review":
        return any(e.kind == "review" for e in events)
    if condition == "has_price":
        return any(e.price is not None or e.discount is not None or "price" in e.sort
                   for e in events)
    if condition == "review_of_bought_item":
        bought = set()
        for e in events:
            if e.action == "buy":
                bought.add(e.item_id)
            elif e.kind == "review" and e.item_id in bought:
                return True
        return False
    raise SystemExit(f"baseline: unknown applies_when `{condition}` in the model card")


def explained(spec, value, deltas, events):
    ranked = sorted(deltas, key=lambda d: (-abs(d[1]), -d[0]))[:EXPLAIN_TOP]
    top = [{"event_id": events[i].event_id, "event_time_ms": events[i].time_ms,
            "summary": summary(events[i]), "delta": delta} for i, delta in ranked]
    return {"signal": spec["name"], "value": value, "status": spec["status"], "top_events": top}


def signal_scores(card, events, full, without, kept):
    seen = [events[i] for i in kept]
    scores = []
    for column, spec in enumerate(card["signals"]):
        if applies(spec["applies_when"], seen):
            deltas = [(i, f32(full[column] - w[column])) for i, w in without]
            scores.append(explained(spec, full[column], deltas, events))
    alert = next((s for s in card.get("derived", []) if s["name"] == "service_alert"), None)
    names = [s["name"] for s in card["signals"]]
    if alert and "sentiment" in names and applies(alert["applies_when"], seen):
        sentiment = names.index("sentiment")

        def rule(skip, row):
            rest = [events[i] for i in kept if i != skip]
            return f32(1.0 - row[sentiment]) if applies("review_of_bought_item", rest) else 0.0

        value = rule(None, full)
        deltas = [(i, f32(value - rule(i, w))) for i, w in without]
        scores.append(explained(alert, value, deltas, events))
    return scores


def signal_record(card, user_key, state, full, without, kept):
    events = state.events
    newest = events[-1]
    return {
        "user_key": user_key,
        "version": state.version(),
        "model_version": card["model_version"],
        "window_start_ms": events[0].time_ms,
        "window_end_ms": newest.time_ms,
        "event_count": len(events),
        "scores": signal_scores(card, events, full, without, kept),
        "interests": state.top_interests(),
        "lineage": {"topic": newest.lineage[0], "partition": newest.lineage[1],
                    "offset": newest.lineage[2]},
        "produced_at_ms": time.time_ns() // 1_000_000,
    }


# ---------------------------------------------------------------------------------------------
# The loop.


class Baseline:
    """Everything one event passes through, from its bytes to its signal record."""

    def __init__(self, model_dir, secret, threads=1):
        with open(os.path.join(model_dir, "model.json"), encoding="utf-8") as f:
            self.card = json.load(f)
        self.window = self.card["window"]
        self.ttl_ms = self.card["user_ttl_ms"]
        self.max_tokens = self.card["max_tokens"]
        self.tokenizer = Tokenizer.from_file(
            os.path.join(model_dir, self.card.get("tokenizer_file") or "tokenizer.json"))
        self.model = Model(model_dir, self.card, threads)
        self.names = [s["name"] for s in self.card["signals"]]
        self.key = Pseudonymizer(secret)
        self.users = {}
        self.newest = {}
        self.counts = {"events": 0, "scored": 0, "rejected": 0, "opted_out": 0}

    def handle(self, topic, partition, offset, payload):
        """One record: the signal record it leads to, or None (rejected or opted out)."""
        self.counts["events"] += 1
        try:
            fields = decode_event(payload)
        except Rejected:
            self.counts["rejected"] += 1
            return None
        time_ms = fields["event_time"]
        newest = self.newest.get((topic, partition))
        if newest is not None and time_ms < newest - ALLOWED_LATENESS_MS:
            self.counts["rejected"] += 1
            return None
        self.newest[(topic, partition)] = time_ms if newest is None else max(newest, time_ms)

        user_key = self.key.key(fields["user_id"])
        if fields.get("opt_out"):
            self.users.pop(user_key, None)
            self.counts["opted_out"] += 1
            return None
        event = WindowEvent(fields, (topic, partition, offset), self.window["max_text_chars"])
        state = self.users.get(user_key) or UserState(time_ms)
        state = self.users[user_key] = state.apply(event, self.window, self.ttl_ms)
        self.counts["scored"] += 1
        return self.score(user_key, state)

    def score(self, user_key, state):
        """The whole window and its leave-one-out variants in one model call."""
        ids, spans = encode_window(self.tokenizer, render(state), self.max_tokens)
        count = len(state.events)
        left_out = [i for i in range(max(0, count - EXPLAIN_CANDIDATES), count) if i in spans]
        sequences = [ids] + [ids[:spans[i][0]] + ids[spans[i][1]:] for i in left_out]
        rows = self.model.score(sequences)
        without = list(zip(left_out, rows[1:]))
        kept = sorted(spans)
        return signal_record(self.card, user_key, state, rows[0], without, kept), rows[0]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--signals-topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--model-dir", default="models")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads (0: one per core)")
    parser.add_argument("--events", type=int, required=True,
                        help="stop after this many records (0: when every partition is read)")
    parser.add_argument("--dump", help="write each scoring's calibrated scores here (JSON lines)")
    parser.add_argument("--idle-timeout", type=float, default=60.0,
                        help="give up after this many seconds without a record (counted "
                             "from the partition assignment on)")
    return parser.parse_args()


class Run:
    """The Kafka side of one run: the consumer with what it has read, the producer with what the
    broker has acknowledged, and the clock."""

    def __init__(self, args):
        self.args = args
        self.assigned, self.at_end = set(), set()
        self.first = self.last_delivery = None
        self.last_record = time.perf_counter()
        self.failed = 0
        self.consumer = Consumer({
            "bootstrap.servers": args.brokers,
            "group.id": args.group,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            # A group join takes about half the session timeout on the test broker.
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        })
        self.consumer.subscribe([args.topic], on_assign=self._assigned, on_revoke=self._revoked)
        # The delivery settings of the processor's producer (src/sink.rs).
        self.producer = Producer({
            "bootstrap.servers": args.brokers,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "partitioner": "murmur2_random",
        })

    def _assigned(self, _consumer, partitions):
        self.assigned.update((p.topic, p.partition) for p in partitions)
        self.last_record = time.perf_counter()

    def _revoked(self, _consumer, partitions):
        for p in partitions:
            self.assigned.discard((p.topic, p.partition))
            self.at_end.discard((p.topic, p.partition))

    def _delivered(self, err, _message):
        self.last_delivery = time.perf_counter()
        if err is not None:
            self.failed += 1

    def finished(self, read):
        if self.args.events:
            return read >= self.args.events
        return bool(self.assigned) and self.at_end >= self.assigned

    def next_record(self, read):
        """The next record, or None after a poll with nothing to handle."""
        message = self.consumer.poll(0.5)
        if message is None:
            if time.perf_counter() - self.last_record > self.args.idle_timeout:
                raise SystemExit(f"baseline: no record for {self.args.idle_timeout} s after "
                                 f"{read} of {self.args.events}")
            return None
        where = (message.topic(), message.partition())
        if message.error():
            if message.error().code() != KafkaError._PARTITION_EOF:
                raise SystemExit(f"baseline: consumer error: {message.error()}")
            self.at_end.add(where)
            return None
        self.at_end.discard(where)
        self.last_record = time.perf_counter()
        self.first = self.first or self.last_record
        return message

    def publish(self, record):
        while True:
            try:
                self.producer.produce(self.args.signals_topic, key=record["user_key"],
                                      value=json.dumps(record), on_delivery=self._delivered)
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)

    def close(self):
        """Waits for every signal record's acknowledgement and leaves the group."""
        left = self.producer.flush(60)
        self.consumer.close()
        if left or self.failed:
            raise SystemExit(f"baseline: {left} signal records undelivered, {self.failed} failed")


def dump_line(names, record, full):
    lineage = record["lineage"]
    return json.dumps({"user_key": record["user_key"], "partition": lineage["partition"],
                       "offset": lineage["offset"], "version": record["version"],
                       "scores": dict(zip(names, full))}) + "\n"


def main():
    args = parse_args()
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)
    secret = os.environb.get(KEY_ENV.encode())
    if secret is None:
        raise SystemExit(f"baseline: set {KEY_ENV} to the pseudonymisation secret")
    started = time.perf_counter()
    baseline = Baseline(args.model_dir, secret, args.threads)
    counts = baseline.counts
    dump = open(args.dump, "w", encoding="utf-8") if args.dump else None
    run = Run(args)

    while not run.finished(counts["events"]):
        message = run.next_record(counts["events"])
        if message is None:
            continue
        scored = baseline.handle(message.topic(), message.partition(), message.offset(),
                                 message.value())
        if scored is not None:
            record, full = scored
            run.publish(record)
            if dump:
                dump.write(dump_line(baseline.names, record, full))
    run.close()
    if dump:
        dump.close()

    seconds = (run.last_delivery or time.perf_counter()) - run.first if run.first else 0.0
    print(json.dumps({
        **counts,
        "seconds": round(seconds, 3),
        "events_per_s": round(counts["events"] / seconds, 1) if seconds else None,
        "first_record_to_last_produce_s": round(seconds, 3),
        "wall_s": round(time.perf_counter() - started, 3),
    }))


if __name__ == "__main__":
    main()
