//! The console in a real browser. A processor scores a replay of real CDNOW purchases, with
//! real Chinese product reviews given to some of the buyers; Debian's headless Chromium
//! (installed by `scripts/setup.sh`) then loads `/console#user=<key>` and the test reads the
//! rendered DOM: every signal's distribution with non-zero counts, the user's window as a
//! timeline with the events the explanation names highlighted, and no raw user id or review
//! text anywhere. A screenshot of the page is kept under `target/test-output/console/`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use mindstream::event::{self, Event, EventBody, Format};
use mindstream::import;
use mindstream::privacy::Pseudonymizer;

use crate::support::{self, Broker, Processor};

/// CDNOW customers replayed, with all their purchases (600 events).
const CUSTOMERS: usize = 150;
/// Buyers given a review of what they bought.
const REVIEWERS: usize = 8;
/// The segment configured for the test: users with a churn risk above one half.
const SEGMENT: &str = "churning";
/// Longest wait for the processor to be ready or to finish scoring.
const PATIENCE: Duration = Duration::from_secs(120);
/// How long the scored count must stay the same before the replay counts as scored.
const SETTLED: Duration = Duration::from_secs(4);
/// Longest one Chromium run may take.
const BROWSER_LIMIT: Duration = Duration::from_secs(90);
/// Virtual time the page gets before its DOM is dumped or its screenshot taken.
const VIRTUAL_TIME_MS: u32 = 8_000;
/// Signals the replay gives every user or some of them (there are no cart events).
const EXPECTED_SIGNALS: [&str; 5] =
    ["purchase_intent", "churn_risk", "price_sensitivity", "sentiment", "service_alert"];

#[test]
fn the_console_shows_a_replay_in_a_browser() {
    let chromium = chromium();
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("events.jsonl");
    let replayed = write_input(&input);
    let broker = Broker::start();
    let http = format!("127.0.0.1:{}", support::free_port());
    let (input_topic, signals_topic) = (support::unique("clicks"), support::unique("signals"));
    let config = support::write_config(
        dir.path(),
        &broker,
        &support::unique("group"),
        &format!(
            "[[inputs]]\ntopic = \"{input_topic}\"\nformat = \"json\"\n\
             [output]\nsignals_topic = \"{signals_topic}\"\nformat = \"json\"\n\
             dlq_topic = \"{}\"\n\
             segments_topic = \"{}\"\n\
             [scoring]\ncoalesce = \"100ms\"\nexplain_candidates = 3\n\
             [http]\nlisten = \"{http}\"\n\
             [[segments]]\nname = \"{SEGMENT}\"\nrule = \"churn_risk > 0.5\"\n",
            support::unique("dlq"),
            support::unique("segments")
        ),
    );
    let mut create = support::mindstream();
    create.args(["--config", path_str(&config), "topics", "--partitions", "2"]);
    support::assert_success(&support::run_with_limit(create, Duration::from_secs(60)), "topics");

    let mut processor = Processor::start(&config, false, dir.path().join("processor.log"));
    wait_until_ready(&http, &mut processor);
    let mut replay = support::mindstream();
    replay.args(["--config", path_str(&config), "replay", "--input", path_str(&input)]);
    replay.args(["--topic", &input_topic, "--format", "json"]);
    support::assert_success(&support::run_with_limit(replay, Duration::from_secs(60)), "replay");
    wait_until_scored(&http, &mut processor);
    let overview = wait_until_sampled(&http, &mut processor);

    let (key, view) = explained_user(&http, &replayed);
    let url = format!("http://{http}/console#user={key}");
    let dom = dump_dom(&chromium, dir.path(), &url);
    check_distributions(&dom, &overview);
    check_segments(&dom, &overview);
    check_timeline(&dom, &view);
    check_nothing_raw(&dom, &replayed, &key);

    let shot = screenshot(&chromium, dir.path(), &url);
    println!("console screenshot: {}", shot.display());

    processor.signal("TERM");
    let status = processor.wait_for_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "exit after SIGTERM: {status:?}");
}

/// What was replayed: each raw user id with its events.
struct Replayed {
    by_user: BTreeMap<String, Vec<Event>>,
    /// The buyers given a review.
    reviewers: Vec<String>,
}

/// The whole purchase history of the first [`CUSTOMERS`] CDNOW customers; the first
/// [`REVIEWERS`] of them with three or more orders each also review what they bought (a real
/// review from the Chinese set), an hour after their last order.
fn write_input(path: &Path) -> Replayed {
    let data = support::sample_data();
    let events = import::events(import::Source::Cdnow, &data.join("purchases/cdnow-master.txt"))
        .expect("read the CDNOW sample");
    let mut by_user: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for event in events {
        by_user.entry(event.user_id.to_string()).or_default().push(event);
    }
    let mut by_user: BTreeMap<String, Vec<Event>> = by_user.into_iter().take(CUSTOMERS).collect();
    let reviews = import::reviews_zh(&data.join("reviews-zh")).expect("read the review sample");
    let reviewers: Vec<String> = by_user
        .iter()
        .filter(|(_, events)| events.len() >= 3)
        .map(|(user, _)| user.clone())
        .take(REVIEWERS)
        .collect();
    assert_eq!(reviewers.len(), REVIEWERS, "too few CDNOW customers with 3+ orders");
    for (user, review) in reviewers.iter().zip(reviews) {
        let orders = by_user.get_mut(user).expect("a reviewer is a buyer");
        let last = orders.iter().map(|e| e.event_time_ms).max().unwrap_or_default();
        let mut review = review.event;
        review.user_id = user.as_str().into();
        review.event_time_ms = last + 3_600_000;
        if let EventBody::Review(body) = &mut review.body {
            body.item_id = "order".into();
        }
        orders.push(review);
    }

    let mut all: Vec<&Event> = by_user.values().flatten().collect();
    all.sort_by_key(|e| e.event_time_ms);
    let mut file = std::fs::File::create(path).expect("create the input file");
    for event in all {
        let line = event::encode(Format::Json, event);
        file.write_all(&line).and_then(|()| file.write_all(b"\n")).expect("write the input");
    }
    Replayed { by_user, reviewers }
}

/// Polls `/readyz` until it answers 200.
fn wait_until_ready(http: &str, processor: &mut Processor) {
    let deadline = Instant::now() + PATIENCE;
    while support::http_get(http, "/readyz").is_none_or(|(status, _)| status != 200) {
        assert!(processor.exited().is_none(), "the processor exited\n{}", processor.log_tail());
        assert!(Instant::now() < deadline, "not ready in {PATIENCE:?}\n{}", processor.log_tail());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls the console's overview until records were observed and their count has stayed the
/// same for [`SETTLED`]; returns that overview.
fn wait_until_scored(http: &str, processor: &mut Processor) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    let mut last = (0, Instant::now());
    loop {
        let overview = get_json(http, "/console/api/overview");
        let observed = overview["records_observed"].as_u64().unwrap_or(0);
        if observed != last.0 {
            last = (observed, Instant::now());
        } else if observed > 0 && last.1.elapsed() >= SETTLED {
            return overview;
        }
        assert!(processor.exited().is_none(), "the processor exited\n{}", processor.log_tail());
        assert!(
            Instant::now() < deadline,
            "scoring did not settle in {PATIENCE:?} ({observed} records)\n{}",
            processor.log_tail()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The overview once a segment-size sample taken after scoring settled shows members (sizes
/// are sampled every 10 s).
fn wait_until_sampled(http: &str, processor: &mut Processor) -> serde_json::Value {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let overview = get_json(http, "/console/api/overview");
        let latest = overview["segment_samples"].as_array().and_then(|s| s.last()).cloned();
        if latest.is_some_and(|s| s["sizes"][SEGMENT].as_u64().unwrap_or(0) > 0) {
            return overview;
        }
        assert!(processor.exited().is_none(), "the processor exited\n{}", processor.log_tail());
        assert!(Instant::now() < deadline, "no segment members sampled: {overview}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The segment's row shows the last sampled size, the same as the overview's.
fn check_segments(dom: &str, overview: &serde_json::Value) {
    let sampled = overview["segment_samples"].as_array().and_then(|s| s.last()).cloned();
    let size = sampled.map_or(0, |s| s["sizes"][SEGMENT].as_u64().unwrap_or(0));
    let row = dom
        .split(&format!("data-segment=\"{SEGMENT}\""))
        .nth(1)
        .unwrap_or_else(|| panic!("no row for segment {SEGMENT}:\n{dom:.3000}"));
    let shown = between(row, "<span class=\"size\">", "</span>").map(str::trim);
    assert_eq!(shown, Some(size.to_string().as_str()), "the segment's size on the page");
    assert!(size > 0, "the segment has members");
}

/// The user with the longest window among those whose latest record's explanation names
/// events of the window this instance holds, reviewers first; with the console's view of them.
fn explained_user(http: &str, replayed: &Replayed) -> (String, serde_json::Value) {
    let key = Pseudonymizer::new(support::KEY.as_bytes()).expect("the test key is valid");
    let mut best: Option<((bool, usize), String, serde_json::Value)> = None;
    for user in replayed.by_user.keys() {
        let user_key = key.key(user);
        let path = format!("/console/api/users/{user_key}");
        let Some((200, body)) = support::http_get(http, &path) else { continue };
        let view: serde_json::Value = serde_json::from_str(&body).expect("a user view is JSON");
        if view["window_status"] != "held" || highlighted_ids(&view).is_empty() {
            continue;
        }
        let rank =
            (replayed.reviewers.contains(user), view["timeline"].as_array().map_or(0, Vec::len));
        if best.as_ref().is_none_or(|(best, _, _)| rank > *best) {
            best = Some((rank, user_key, view));
        }
    }
    let (_, user_key, view) = best.unwrap_or_else(|| {
        panic!("no replayed user has a window whose events the latest record's explanation names")
    });
    (user_key, view)
}

/// The event ids of a user view's timeline that some score names.
fn highlighted_ids(view: &serde_json::Value) -> BTreeSet<String> {
    let timeline = view["timeline"].as_array().into_iter().flatten();
    timeline
        .filter(|e| e["named_by"].as_array().is_some_and(|n| !n.is_empty()))
        .filter_map(|e| e["event_id"].as_str().map(str::to_owned))
        .collect()
}

/// Each signal card's name and count, as the page rendered them.
fn rendered_counts(dom: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for card in dom.split("<section class=\"signal\" data-signal=\"").skip(1) {
        let signal = card.split('"').next().unwrap_or_default().to_owned();
        let count = between(card, "<span class=\"count\">", "</span>")
            .and_then(|c| c.trim().parse().ok())
            .unwrap_or_else(|| panic!("the {signal} card has no count: {card:.400}"));
        counts.insert(signal, count);
    }
    counts
}

fn check_distributions(dom: &str, overview: &serde_json::Value) {
    assert!(dom.contains("<title>mindstream console</title>"), "not the console:\n{dom:.2000}");
    assert!(
        dom.contains("data-loaded=\"true\""),
        "the page did not finish rendering:\n{dom:.3000}"
    );
    let rendered = rendered_counts(dom);
    for signal in EXPECTED_SIGNALS {
        let count = rendered.get(signal).copied().unwrap_or(0);
        assert!(count > 0, "{signal} has no scores on the page: {rendered:?}");
    }
    let served: BTreeMap<String, u64> = overview["distributions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            (d["signal"].as_str().unwrap_or_default().to_owned(), d["total"].as_u64().unwrap_or(0))
        })
        .collect();
    assert_eq!(rendered, served, "the page's counts against the overview's");
    let bins = dom.matches("<div class=\"bin\"").count();
    assert_eq!(bins, rendered.len() * 20, "20 bins per signal card");
}

fn check_timeline(dom: &str, view: &serde_json::Value) {
    assert!(dom.contains("data-lookup=\"ok\""), "the lookup did not render:\n{dom:.3000}");
    let timeline = between(dom, "<ol id=\"timeline\">", "</ol>").expect("a timeline list");
    let events = timeline.matches("<li class=\"event").count();
    let served = view["timeline"].as_array().map_or(0, Vec::len);
    assert!(events > 0 && events == served, "{events} events rendered of {served} served");
    let highlighted: BTreeSet<String> = timeline
        .split("<li class=\"event highlighted\" data-event-id=\"")
        .skip(1)
        .map(|rest| rest.split('"').next().unwrap_or_default().to_owned())
        .collect();
    assert!(!highlighted.is_empty(), "no highlighted event in the timeline:\n{timeline}");
    assert_eq!(highlighted, highlighted_ids(view), "highlighted events against the explanation");
    assert!(timeline.contains("class=\"named-by\">named by "), "no label on the highlights");
    let scores = between(dom, "<div id=\"scores\">", "<h3>").expect("a scores block");
    assert!(scores.contains("class=\"score\" data-signal=\"purchase_intent\""), "{scores}");
}

/// No raw user id of the replay and none of the reviews' text is on the page.
fn check_nothing_raw(dom: &str, replayed: &Replayed, key: &str) {
    assert!(dom.contains(key), "the looked-up key is shown");
    let raw: Vec<&String> = replayed.by_user.keys().filter(|u| dom.contains(u.as_str())).collect();
    assert!(raw.is_empty(), "raw user ids on the page: {raw:?}");
    assert!(!dom.contains("cdnow:"), "a raw CDNOW id is on the page");
    for event in replayed.by_user.values().flatten() {
        if let EventBody::Review(review) = &event.body {
            let start: String = review.text.chars().take(8).collect();
            assert!(!dom.contains(&start), "review text {start:?} is on the page");
        }
    }
}

/// The DOM of `url` after [`VIRTUAL_TIME_MS`] of virtual time.
fn dump_dom(chromium: &Path, dir: &Path, url: &str) -> String {
    let mut command = browser(chromium, &dir.join("chromium-dom"));
    command.arg("--dump-dom").arg(url);
    let output = run_browser(command);
    assert!(output.status.success(), "chromium --dump-dom failed:\n{}", stderr(&output));
    String::from_utf8(output.stdout).expect("the DOM is UTF-8")
}

/// A screenshot of `url` at 1280x1800, saved under `target/test-output/console/`.
fn screenshot(chromium: &Path, dir: &Path, url: &str) -> PathBuf {
    let out = support::root().join("target/test-output/console");
    std::fs::create_dir_all(&out).expect("create target/test-output/console");
    let shot = out.join("console.png");
    let _ = std::fs::remove_file(&shot);
    let mut command = browser(chromium, &dir.join("chromium-shot"));
    command.arg(format!("--screenshot={}", shot.display()));
    command.args(["--window-size=1280,1800", "--hide-scrollbars"]).arg(url);
    let output = run_browser(command);
    assert!(output.status.success(), "chromium --screenshot failed:\n{}", stderr(&output));
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 20_000,
        "the screenshot {} has {size} bytes; expected a rendered page\n{}",
        shot.display(),
        stderr(&output)
    );
    let mut signature = [0u8; 8];
    let read = std::fs::File::open(&shot).and_then(|mut f| {
        use std::io::Read as _;
        f.read_exact(&mut signature)
    });
    assert!(read.is_ok() && signature == *b"\x89PNG\r\n\x1a\n", "{} is no PNG", shot.display());
    shot
}

/// Headless Chromium with a throwaway profile in `profile`.
fn browser(chromium: &Path, profile: &Path) -> Command {
    let mut command = Command::new(chromium);
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        .args(["--no-first-run", "--no-default-browser-check", "--disable-extensions"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--virtual-time-budget={VIRTUAL_TIME_MS}"));
    command
}

/// Runs Chromium in its own process group, killing the whole group past [`BROWSER_LIMIT`].
fn run_browser(mut command: Command) -> Output {
    command.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let child = command.spawn().expect("start chromium");
    let group = child.id();
    let watchdog = std::thread::spawn(move || {
        let output = child.wait_with_output();
        output.expect("wait for chromium")
    });
    let deadline = Instant::now() + BROWSER_LIMIT;
    while !watchdog.is_finished() {
        if Instant::now() > deadline {
            let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{group}")]).status();
            let output = watchdog.join().expect("the chromium waiter");
            panic!("chromium ran past {BROWSER_LIMIT:?}:\n{}", stderr(&output));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    watchdog.join().expect("the chromium waiter")
}

/// The `chromium` on the PATH.
fn chromium() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!("no `chromium` on the PATH: run scripts/setup.sh, which installs it")
        })
}

fn get_json(http: &str, path: &str) -> serde_json::Value {
    match support::http_get(http, path) {
        Some((200, body)) => serde_json::from_str(&body).expect("a JSON answer"),
        other => panic!("GET {path} answered {other:?}"),
    }
}

/// The text between the first `start` and the next `end` after it.
fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let to = text[from..].find(end)? + from;
    Some(&text[from..to])
}

fn stderr(output: &Output) -> String {
    let text = String::from_utf8_lossy(&output.stderr);
    let lines: Vec<&str> = text.lines().filter(|l| !l.contains("dbus")).collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}
