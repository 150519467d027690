//! Unit tests of the store: windows, coalescing, restores, opt-outs and deletions.

use super::*;
use crate::event::{Action, Click, EventBody};
use crate::window::WindowSpec;

fn store(coalesce_ms: u64) -> Store<i64> {
    let config = StoreConfig {
        state: StateSpec {
            window: WindowSpec::default(),
            user_ttl_ms: 86_400_000,
            interest_half_life_ms: 86_400_000,
            interests_tracked: 8,
        },
        allowed_lateness_ms: 60_000,
        coalesce: Duration::from_millis(coalesce_ms),
        explain_candidates: 2,
        interest_feed: InterestFeed { top_categories: 3, top_items: 3, half_life_ms: 86_400_000 },
        changelog: true,
        rescore_restored: true,
        reject_duplicates: true,
    };
    let key = Arc::new(Pseudonymizer::new(b"0123456789abcdef").unwrap());
    Store::new(config, key)
}

/// The changelog snapshot of the first user due for scoring at `now`, as a restore reads it.
fn scored_snapshot(store: &mut Store<i64>, now: Instant) -> Snapshot {
    let (due, _) = store.take_due(now, 10);
    state::decode(due[0].context.changelog.as_deref().unwrap()).unwrap()
}

fn event(user: &str, time_ms: i64) -> Event {
    Event {
        user_id: user.into(),
        event_id: compact_str::format_compact!("{user}-{time_ms}"),
        event_time_ms: time_ms,
        opt_out: false,
        body: EventBody::Click(Click {
            action: Action::View,
            item_id: "i".into(),
            category_id: "c".into(),
            price: None,
            discount: None,
            quantity: None,
        }),
    }
}

fn lineage(partition: i32, offset: i64) -> Lineage {
    Lineage { topic: "t".into(), partition, offset }
}

#[test]
fn a_burst_gives_one_scoring_with_every_token() {
    let mut store = store(100);
    let t0 = Instant::now();
    for i in 0..5 {
        let at = t0 + Duration::from_millis(i * 10);
        assert!(matches!(
            store.apply(event("u", 1_000_000 + i as i64), lineage(0, i as i64), i as i64, at),
            Applied::Accepted
        ));
    }
    assert!(store.take_due(t0 + Duration::from_millis(99), 10).0.is_empty());
    let (due, more) = store.take_due(t0 + Duration::from_millis(100), 10);
    assert!(!more);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].context.pending, [0, 1, 2, 3, 4]);
    assert_eq!(due[0].context.facts.events.len(), 5);
    assert_eq!(due[0].candidates, [3, 4]);
    assert!(store.take_due(t0 + Duration::from_secs(10), 10).0.is_empty());
}

#[test]
fn take_due_respects_the_limit() {
    let mut store = store(0);
    let now = Instant::now();
    for user in ["a", "b", "c"] {
        store.apply(event(user, 1_000), lineage(0, 0), 0, now);
    }
    assert_eq!(store.waiting(), 3);
    let (first, more) = store.take_due(now, 2);
    assert_eq!((first.len(), more, store.waiting()), (2, true, 1));
    let (rest, more) = store.take_due(now, 2);
    assert_eq!((rest.len(), more, store.waiting()), (1, false, 0));
    let sequences: Vec<u64> = first.iter().chain(&rest).map(|r| r.context.sequence).collect();
    assert_eq!(sequences, [0, 1, 2], "requests are numbered in the order they are made");
}

#[test]
fn late_events_are_rejected_per_partition() {
    let mut store = store(0);
    let now = Instant::now();
    store.apply(event("a", 10_000_000), lineage(0, 0), 0, now);
    match store.apply(event("b", 10_000_000 - 61_000), lineage(0, 1), 1, now) {
        Applied::Rejected(rejection, token) => {
            assert_eq!(rejection.reason, RejectReason::Late);
            assert_eq!(token, 1);
        }
        _ => panic!("expected late"),
    }
    let other_partition = store.apply(event("b", 10_000_000 - 61_000), lineage(1, 0), 2, now);
    assert!(matches!(other_partition, Applied::Accepted));
}

#[test]
fn delete_request_drops_state_however_late_it_comes() {
    let mut store = store(1_000);
    let now = Instant::now();
    store.apply(event("u", 10_000_000), lineage(0, 0), 0, now);
    // Far behind the partition's newest event, which would make any other event late.
    let mut erase = event("u", 1);
    erase.body = EventBody::DeleteUser;
    match store.apply(erase, lineage(0, 1), 1, now) {
        Applied::Deleted { user_key, partition, released, .. } => {
            assert_eq!(released, [0, 1], "the user's held tokens and the request's own");
            assert_eq!(partition, 0);
            assert_eq!(user_key, store.pseudonymizer.key("u"));
        }
        _ => panic!("expected a deletion"),
    }
    assert_eq!(store.users(), 0);
    assert!(store.take_all().is_empty(), "nothing left to score");

    let mut unknown = event("never-seen", 5);
    unknown.body = EventBody::DeleteUser;
    let applied = store.apply(unknown, lineage(0, 2), 2, now);
    assert!(matches!(applied, Applied::Deleted { released, .. } if released == [2]));
}

#[test]
fn a_late_opt_out_is_honoured_and_does_not_move_the_watermark() {
    let mut store = store(1_000);
    let now = Instant::now();
    store.apply(event("u", 10_000_000), lineage(0, 0), 0, now);
    store.apply(event("v", 10_000_000), lineage(0, 1), 1, now);
    let mut quit = event("u", 1);
    quit.opt_out = true;
    assert!(matches!(store.apply(quit, lineage(0, 2), 2, now), Applied::OptedOut { .. }));
    let mut future = event("v", 90_000_000_000);
    future.opt_out = true;
    assert!(matches!(store.apply(future, lineage(0, 3), 3, now), Applied::OptedOut { .. }));
    let next = store.apply(event("w", 10_000_001), lineage(0, 4), 4, now);
    assert!(
        matches!(next, Applied::Accepted),
        "an opt-out dated far ahead must not make the next event late"
    );
}

#[test]
fn opt_out_drops_state_and_releases_tokens() {
    let mut store = store(1_000);
    let now = Instant::now();
    store.apply(event("u", 1_000), lineage(0, 0), 0, now);
    let mut quit = event("u", 2_000);
    quit.opt_out = true;
    match store.apply(quit, lineage(0, 1), 1, now) {
        Applied::OptedOut { user_key, partition, released, .. } => {
            assert_eq!(released, [0, 1]);
            assert_eq!(partition, 0);
            assert_eq!(user_key, store.pseudonymizer.key("u"), "tombstone key is the pseudonym");
        }
        _ => panic!("expected opt-out"),
    }
    assert_eq!(store.users(), 0);
    assert!(store.take_all().is_empty());
}

#[test]
fn eviction_spares_dirty_and_recent_users() {
    let mut store = store(0);
    let now = Instant::now();
    store.apply(event("old", 1_000), lineage(0, 0), 0, now);
    store.take_all();
    store.apply(event("new", 1_000 + 2 * 86_400_000), lineage(0, 1), 1, now);
    let evicted = store.evict_idle();
    assert_eq!(evicted.len(), 1);
    assert_eq!(evicted[0].user_key, store.pseudonymizer.key("old"));
    assert!(store.state("old").is_none());
    assert!(store.state("new").is_some());
}

#[test]
fn requests_carry_a_snapshot_of_the_scored_state() {
    let mut store = store(0);
    let now = Instant::now();
    store.apply(event("u", 1_000), lineage(3, 7), 0, now);
    let (due, _) = store.take_due(now, 10);
    let scoring = &due[0].context;
    assert_eq!(scoring.partition, 3);
    let snapshot = state::decode(scoring.changelog.as_deref().unwrap()).unwrap();
    assert_eq!(&snapshot.state, store.state("u").unwrap());
    assert_eq!(snapshot.partition, 3);
    assert_eq!(snapshot.applied_through, [AppliedThrough { topic: "t".into(), offset: 7 }]);
    assert!(!scoring.facts.user_key.contains('u'), "requests carry the pseudonym only");
}

#[test]
fn a_changelog_record_whose_key_is_not_a_user_key_is_not_restored() {
    let mut first = store(0);
    let now = Instant::now();
    first.apply(event("u", 1_000), lineage(1, 0), 0, now);
    let snapshot = scored_snapshot(&mut first, now);

    let mut second = store(0);
    let key = second.pseudonymizer.key("u");
    let others = [key.to_uppercase(), key[1..].to_owned(), "u".to_owned()];
    let mut snapshots = vec![(key.clone(), snapshot.clone())];
    snapshots.extend(others.into_iter().map(|other| (other, snapshot.clone())));
    assert_eq!(second.restore(1, 5, snapshots), 1);
    assert_eq!(second.users(), 1);
    assert!(second.state("u").is_some(), "the user's own record is restored");
}

#[test]
fn records_read_again_after_a_restore_are_scored_but_not_applied_twice() {
    let mut first = store(0);
    let now = Instant::now();
    for offset in 0..3 {
        first.apply(event("u", 1_000 + offset), lineage(1, offset), offset, now);
    }
    let snapshot = scored_snapshot(&mut first, now);

    // The next owner restores that snapshot, then reads from an older committed offset.
    let mut second = store(0);
    let key = second.pseudonymizer.key("u");
    assert_eq!(second.restore(1, 5, [(key, snapshot.clone())]), 1);
    assert!(second.take_due(now, 10).0.is_empty(), "a restored user is clean");
    assert!(matches!(
        second.apply(event("u", 1_002), lineage(1, 2), 2, now),
        Applied::AlreadyApplied(None)
    ));
    assert!(matches!(second.apply(event("u", 1_003), lineage(1, 3), 3, now), Applied::Accepted));
    let (due, _) = second.take_due(now, 10);
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].context.pending, [2, 3]);
    assert_eq!(due[0].context.epoch, 5);
    assert_eq!(second.state("u").unwrap().applied(), snapshot.state.applied() + 1);
}

/// An event id used again after an opt-out dropped the user's state, then the partition read
/// again from its start by an owner that restored the newer state: the first record was
/// applied when it was first read, so it is already applied, not a duplicate of its successor.
#[test]
fn a_record_read_again_is_not_a_duplicate_of_a_later_record_with_its_id() {
    let mut first = store(0);
    let now = Instant::now();
    let original = event("u", 1_000);
    assert!(matches!(first.apply(original.clone(), lineage(0, 5), 5, now), Applied::Accepted));
    let quit = Event { opt_out: true, event_id: "quit".into(), ..original.clone() };
    assert!(matches!(first.apply(quit, lineage(0, 50), 50, now), Applied::OptedOut { .. }));
    let again = Event { event_time_ms: 1_001, ..original.clone() };
    assert!(matches!(first.apply(again.clone(), lineage(0, 53), 53, now), Applied::Accepted));
    let snapshot = scored_snapshot(&mut first, now);

    let mut second = store(0);
    let key = second.pseudonymizer.key("u");
    second.restore(0, 2, [(key, snapshot)]);
    assert!(matches!(
        second.apply(original.clone(), lineage(0, 5), 5, now),
        Applied::AlreadyApplied(_)
    ));
    // A record after the held one with the same id is still a duplicate.
    match second.apply(again, lineage(0, 60), 60, now) {
        Applied::Rejected(rejection, 60) => assert_eq!(rejection.reason, RejectReason::Duplicate),
        _ => panic!("a later record with a held id is a duplicate"),
    }
}

#[test]
fn revoking_a_partition_drops_only_its_users() {
    let mut store = store(1_000);
    let now = Instant::now();
    store.apply(event("a", 1_000), lineage(0, 0), 0, now);
    store.apply(event("b", 1_000), lineage(1, 0), 1, now);
    assert_eq!(store.revoke(&[1]), 1);
    assert!(store.state("a").is_some());
    assert!(store.state("b").is_none());
    let remaining = store.take_all();
    assert_eq!(remaining.len(), 1, "the dropped user's due entry is skipped");
    assert_eq!(remaining[0].context.pending, [0]);
}

#[test]
fn exactly_once_does_not_rescore_records_already_in_a_restored_state() {
    let mut first = store(0);
    let now = Instant::now();
    first.apply(event("u", 1_000), lineage(0, 4), 4, now);
    let snapshot = scored_snapshot(&mut first, now);

    let mut second = store(0);
    second.config.rescore_restored = false;
    let key = second.pseudonymizer.key("u");
    second.restore(0, 1, [(key, snapshot)]);
    match second.apply(event("u", 1_000), lineage(0, 4), 4, now) {
        Applied::AlreadyApplied(Some(token)) => assert_eq!(token, 4),
        _ => panic!("expected the token back"),
    }
    assert!(second.take_all().is_empty(), "nothing to score: its signal was committed");
}

#[test]
fn a_second_record_with_a_held_event_id_is_a_duplicate() {
    let mut store = store(0);
    let now = Instant::now();
    let first = event("u", 1_000);
    assert!(matches!(store.apply(first.clone(), lineage(0, 0), 0, now), Applied::Accepted));
    match store.apply(first.clone(), lineage(0, 1), 1, now) {
        Applied::Rejected(rejection, token) => {
            assert_eq!(rejection.reason, RejectReason::Duplicate);
            assert_eq!(token, 1);
        }
        _ => panic!("another record with the same id is a duplicate"),
    }
    let again = store.apply(first.clone(), lineage(0, 0), 2, now);
    assert!(matches!(again, Applied::AlreadyApplied(_)), "the same record read again");
    let other_user = Event { user_id: "v".into(), ..first.clone() };
    let other = store.apply(other_user, lineage(0, 2), 3, now);
    assert!(matches!(other, Applied::Accepted), "ids are per user");
    let quit = Event { opt_out: true, ..first };
    let quit = store.apply(quit, lineage(0, 3), 4, now);
    assert!(matches!(quit, Applied::OptedOut { .. }), "a privacy request is never a duplicate");
}

#[test]
fn duplicates_are_windowed_when_not_rejected() {
    let mut store = store(0);
    store.config.reject_duplicates = false;
    let now = Instant::now();
    let first = event("u", 1_000);
    store.apply(first.clone(), lineage(0, 0), 0, now);
    assert!(matches!(store.apply(first, lineage(0, 1), 1, now), Applied::Accepted));
    assert_eq!(store.state("u").map(|s| s.events().len()), Some(2));
}

#[test]
fn marks_from_the_publisher_reach_snapshots_sizes_and_deletions() {
    let mut store = store(0);
    let now = Instant::now();
    store.restore(0, 3, Vec::new());
    store.apply(event("u", 1_000), lineage(0, 1), 1, now);
    store.apply(event("v", 1_000), lineage(0, 2), 2, now);
    let key = store.pseudonymizer.key("u");
    let member = Marks { segments: vec!["ready".into()], ..Marks::default() };

    // Marks decided under an earlier epoch of the partition are ignored.
    store.set_marks(&key, 2, member.clone().boxed());
    assert_eq!(store.segment_sizes(&["ready".into()]), vec![("ready".into(), 0)]);
    store.set_marks(&key, 3, member.clone().boxed());
    let sizes = store.segment_sizes(&["ready".into(), "other".into()]);
    assert_eq!(sizes, vec![("ready".into(), 1), ("other".into(), 0)]);

    let (due, _) = store.take_due(now, 10);
    let scored = due.iter().find(|r| r.context.facts.user_key == key).expect("u is due");
    assert_eq!(scored.context.marks.as_deref(), Some(&member));
    let snapshot = state::decode(scored.context.changelog.as_ref().unwrap()).unwrap();
    assert_eq!(snapshot.marks, member);

    let delete = Event { body: EventBody::DeleteUser, ..event("u", 2_000) };
    match store.apply(delete, lineage(0, 3), 3, now) {
        Applied::Deleted { marks, .. } => assert_eq!(marks.as_deref(), Some(&member)),
        _ => panic!("a deletion"),
    }
    assert_eq!(store.segment_sizes(&["ready".into()]), vec![("ready".into(), 0)]);
}

#[test]
fn a_review_is_scored_on_its_own_only_where_the_window_holds_more() {
    use crate::event::Review;
    let mut store = store(0);
    let now = Instant::now();
    let review = |user: &str, time_ms: i64| Event {
        body: EventBody::Review(Review {
            item_id: "i".into(),
            rating: None,
            text: "broke after a week".into(),
            language: "en".into(),
        }),
        ..event(user, time_ms)
    };
    store.apply(review("alone", 1_000), lineage(0, 1), 1, now);
    store.apply(event("after-a-click", 1_000), lineage(0, 2), 2, now);
    store.apply(review("after-a-click", 2_000), lineage(0, 3), 3, now);
    store.apply(event("no-review", 1_000), lineage(0, 4), 4, now);
    let (due, _) = store.take_due(now, 10);
    let focus_of = |user: &str| {
        let key = store.pseudonymizer.key(user);
        let request = due.iter().find(|r| r.context.facts.user_key == key).expect("due");
        request.focus.clone()
    };
    assert_eq!(focus_of("alone"), None, "the window is the review alone");
    assert_eq!(focus_of("no-review"), None);
    let focus = focus_of("after-a-click").expect("the review on its own");
    assert_eq!(focus.len(), 2, "a header and the review's line: {focus:?}");
    assert!(focus[1].text.contains("broke after a week"), "{focus:?}");
}

#[test]
fn each_topic_of_a_partition_number_keeps_its_own_watermark() {
    let mut store = store(1_000);
    let now = Instant::now();
    let (clicks, reviews): (Arc<str>, Arc<str>) = ("clicks".into(), "reviews".into());
    let at = |topic: &Arc<str>, offset| Lineage { topic: topic.clone(), partition: 0, offset };
    store.apply(event("u", 10_000_000), at(&clicks, 0), 0, now);
    store.apply(event("v", 1_000), at(&reviews, 0), 1, now);
    assert_eq!(store.watermark(&clicks, 0), Some(10_000_000));
    assert_eq!(store.watermark(&reviews, 0), Some(1_000));
    assert_eq!(store.watermark(&clicks, 1), None);
    // An event far behind the clicks' watermark is late there, not on the reviews.
    let late = store.apply(event("w", 2_000), at(&clicks, 1), 2, now);
    assert!(matches!(late, Applied::Rejected(r, 2) if r.reason == RejectReason::Late));
    assert!(matches!(store.apply(event("w", 2_000), at(&reviews, 1), 3, now), Applied::Accepted));
    // A topic is known by its name, whichever `Arc` holds it (a restored state's, say).
    let named_again: Arc<str> = "clicks".into();
    assert_eq!(store.watermark(&named_again, 0), Some(10_000_000));
    store.set_watermark(&named_again, 0, 20_000_000);
    assert_eq!(store.watermark(&clicks, 0), Some(20_000_000));
    // Revoking the number forgets both topics' watermarks.
    store.revoke(&[0]);
    assert_eq!((store.watermark(&clicks, 0), store.watermark(&reviews, 0)), (None, None));
}
