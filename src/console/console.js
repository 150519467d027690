// The mindstream console. Polls /console/api/overview every two seconds and draws each
// signal's distribution and the segment sizes over time; looks a pseudonymised key up through
// /console/api/users/{key} and draws the latest scores, the interests and the window as a
// timeline, with the events the explanations name highlighted. A URL ending in #user=<key>
// looks that key up on load. Everything shown comes from those two answers and is set as
// text, never as markup. The body's data-loaded turns "true" once the first overview and the
// lookup asked for on load have been drawn.
"use strict";

(function () {
  const POLL_MS = 2000;
  const USER_KEY = /^[0-9a-f]{32}$/;
  const WINDOW_STATUS = {
    held: "held on this instance",
    not_held: "not held on this instance",
    unavailable: "unavailable: the processor did not answer in time",
  };

  const loading = { overview: true, lookup: false };
  // One card per signal, kept across polls so that the page does not flicker.
  const cards = new Map();

  function byId(id) {
    return document.getElementById(id);
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) {
      node.className = className;
    }
    if (text !== undefined) {
      node.textContent = String(text);
    }
    return node;
  }

  function markLoaded() {
    if (!loading.overview && !loading.lookup) {
      document.body.dataset.loaded = "true";
    }
  }

  function time(ms) {
    const date = new Date(ms);
    if (!Number.isFinite(ms) || Number.isNaN(date.getTime())) {
      return String(ms);
    }
    return date.toISOString().replace("T", " ").replace(/\.\d{3}Z$/, " UTC");
  }

  function signed(value) {
    return (value >= 0 ? "+" : "\u2212") + Math.abs(value).toFixed(3);
  }

  // ---- the overview: distributions and segments

  async function pollOverview() {
    const status = byId("overview-status");
    try {
      const response = await fetch("/console/api/overview", { cache: "no-store" });
      if (!response.ok) {
        throw new Error("HTTP " + response.status);
      }
      const overview = await response.json();
      drawDistributions(overview);
      drawSegments(overview);
      byId("records-observed").textContent = String(overview.records_observed);
      byId("updated").textContent = time(Date.now());
      status.textContent = "";
      document.body.dataset.overview = "ok";
    } catch (err) {
      status.textContent = "(overview unavailable: " + err.message + ")";
      document.body.dataset.overview = "error";
    } finally {
      loading.overview = false;
      markLoaded();
      setTimeout(pollOverview, POLL_MS);
    }
  }

  function drawDistributions(overview) {
    const box = byId("distributions");
    if (overview.distributions.length === 0) {
      return;
    }
    const empty = box.querySelector(".empty");
    if (empty) {
      empty.remove();
    }
    for (const distribution of overview.distributions) {
      let card = cards.get(distribution.signal);
      if (!card) {
        card = signalCard(distribution.signal, overview.bins);
        cards.set(distribution.signal, card);
        box.append(card);
      }
      fillCard(card, distribution, overview.bins);
    }
  }

  function signalCard(signal, bins) {
    const card = el("section", "signal");
    card.dataset.signal = signal;
    const title = el("h3");
    title.append(el("span", "name", signal), " ", el("span", "count", "0"), " scores");
    const histogram = el("div", "histogram");
    for (let i = 0; i < bins; i += 1) {
      const bin = el("div", "bin");
      bin.append(el("div", "bar"));
      histogram.append(bin);
    }
    const axis = el("div", "axis");
    axis.append(el("span", "", "0"), el("span", "", "0.5"), el("span", "", "1"));
    card.append(title, histogram, axis, el("p", "stats"));
    return card;
  }

  function fillCard(card, distribution, bins) {
    const counts = distribution.counts;
    const highest = Math.max(1, ...counts);
    let weighted = 0;
    card.querySelectorAll(".bin").forEach((bin, i) => {
      const count = counts[i] || 0;
      const low = i / bins;
      const high = (i + 1) / bins;
      bin.dataset.count = String(count);
      bin.title = low.toFixed(2) + "\u2013" + high.toFixed(2) + ": " + count;
      bin.firstChild.style.height = ((100 * count) / highest).toFixed(1) + "%";
      weighted += count * (low + high) / 2;
    });
    card.querySelector(".count").textContent = String(distribution.total);
    const mean = distribution.total > 0 ? (weighted / distribution.total).toFixed(2) : "\u2013";
    card.querySelector(".stats").textContent = "mean \u2248 " + mean;
  }

  function drawSegments(overview) {
    const box = byId("segments");
    const samples = overview.segment_samples;
    const names = overview.segments.slice();
    for (const sample of samples) {
      for (const name of Object.keys(sample.sizes)) {
        if (!names.includes(name)) {
          names.push(name);
        }
      }
    }
    box.replaceChildren();
    if (names.length === 0) {
      box.append(el("p", "empty", "no segments configured"));
      return;
    }
    if (samples.length === 0) {
      box.append(el("p", "empty", "no samples yet"));
      return;
    }
    for (const name of names) {
      box.append(segmentRow(name, samples));
    }
    const axis = el("div", "segment-axis");
    axis.append(el("span", "", time(samples[0].at_ms)));
    axis.append(el("span", "", time(samples[samples.length - 1].at_ms)));
    box.append(axis);
  }

  function segmentRow(name, samples) {
    const sizes = samples.map((sample) => sample.sizes[name] || 0);
    const highest = Math.max(1, ...sizes);
    const row = el("div", "segment");
    row.dataset.segment = name;
    const label = el("div", "label");
    label.append(el("span", "name", name), " ", el("span", "size", sizes[sizes.length - 1]));
    const series = el("div", "series");
    samples.forEach((sample, i) => {
      const point = el("div", "point");
      point.style.height = ((100 * sizes[i]) / highest).toFixed(1) + "%";
      point.title = time(sample.at_ms) + ": " + sizes[i];
      series.append(point);
    });
    row.append(label, series);
    return row;
  }

  // ---- the lookup

  function keyFromHash() {
    const key = new URLSearchParams(location.hash.slice(1)).get("user");
    return key ? key.trim() : null;
  }

  async function lookUp(key) {
    const status = byId("lookup-status");
    const user = byId("user");
    if (!USER_KEY.test(key)) {
      user.hidden = true;
      status.textContent = "a user key is 32 lowercase hex digits";
      document.body.dataset.lookup = "error";
      return;
    }
    status.textContent = "looking up\u2026";
    try {
      const response = await fetch("/console/api/users/" + key, { cache: "no-store" });
      if (response.status === 404) {
        user.hidden = true;
        status.textContent = "no recent record and no window for this key on this instance";
        document.body.dataset.lookup = "not-found";
        return;
      }
      if (!response.ok) {
        throw new Error("HTTP " + response.status);
      }
      drawUser(await response.json());
      user.hidden = false;
      status.textContent = "";
      document.body.dataset.lookup = "ok";
    } catch (err) {
      user.hidden = true;
      status.textContent = "lookup failed: " + err.message;
      document.body.dataset.lookup = "error";
    }
  }

  function drawUser(view) {
    const record = view.record;
    const facts = ["key " + view.user_key];
    if (record) {
      facts.push("record version " + record.version, "model " + record.model_version);
      facts.push(record.event_count + " events scored", "produced " + time(record.produced_at_ms));
    }
    byId("user-facts").textContent = facts.join(" \u00b7 ");
    drawScores(record);
    drawInterests(record);
    byId("window-status").textContent = "(" + (WINDOW_STATUS[view.window_status] || "") + ")";
    drawTimeline(view.timeline);
  }

  function drawScores(record) {
    const box = byId("scores");
    box.replaceChildren();
    if (!record) {
      box.append(el("p", "empty", "no recent record on this instance"));
      return;
    }
    for (const score of record.scores) {
      const row = el("div", "score");
      row.dataset.signal = score.signal;
      const bar = el("span", "bar");
      const fill = el("span", "fill");
      fill.style.width = (100 * Math.min(1, Math.max(0, score.value))).toFixed(1) + "%";
      bar.append(fill);
      const head = el("div", "head");
      head.append(el("span", "name", score.signal), bar);
      head.append(el("span", "value", score.value.toFixed(3)), el("span", "status", score.status));
      const named = el("ul", "named");
      for (const top of score.top_events) {
        const item = el("li", "", top.event_id + " \u00b7 " + top.summary + " \u00b7 ");
        item.dataset.eventId = top.event_id;
        item.append(el("span", "delta", signed(top.delta)));
        named.append(item);
      }
      row.append(head, named);
      box.append(row);
    }
  }

  function drawInterests(record) {
    const list = byId("interests");
    list.replaceChildren();
    const interests = record ? record.interests : [];
    const items = record && record.interest_items ? record.interest_items : [];
    if (interests.length === 0 && items.length === 0) {
      list.append(el("li", "empty", "none"));
    }
    for (const interest of interests) {
      const entry = el("li", "interest", "category " + interest.category_id + " ");
      entry.append(el("span", "weight", interest.weight.toFixed(3)));
      list.append(entry);
    }
    for (const interest of items) {
      const text = "item " + interest.item_id + " (" + interest.category_id + ") ";
      const entry = el("li", "interest-item", text);
      entry.append(el("span", "weight", interest.weight.toFixed(3)));
      list.append(entry);
    }
  }

  function drawTimeline(timeline) {
    const list = byId("timeline");
    list.replaceChildren();
    if (timeline.length === 0) {
      list.append(el("li", "empty", "no window events"));
    }
    for (const entry of timeline) {
      const item = el("li", "event");
      item.dataset.eventId = entry.event_id;
      item.append(el("time", "time", time(entry.event_time_ms)), el("span", "kind", entry.kind));
      item.append(el("span", "summary", entry.summary), el("span", "event-id", entry.event_id));
      if (entry.item_id) {
        item.append(el("span", "item", "item " + entry.item_id));
      }
      if (entry.named_by.length > 0) {
        item.classList.add("highlighted");
        item.dataset.namedBy = entry.named_by.map((n) => n.signal).join(" ");
        const names = entry.named_by.map((n) => n.signal + " " + signed(n.delta));
        item.append(el("span", "named-by", "named by " + names.join(", ")));
      }
      list.append(item);
    }
  }

  function start() {
    byId("lookup-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const key = byId("user-key").value.trim();
      history.replaceState(null, "", "#user=" + encodeURIComponent(key));
      lookUp(key);
    });
    window.addEventListener("hashchange", () => {
      const key = keyFromHash();
      if (key) {
        byId("user-key").value = key;
        lookUp(key);
      }
    });
    const initial = keyFromHash();
    if (initial) {
      byId("user-key").value = initial;
      loading.lookup = true;
      lookUp(initial).finally(() => {
        loading.lookup = false;
        markLoaded();
      });
    }
    pollOverview();
  }

  start();
})();
