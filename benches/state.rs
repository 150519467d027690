//! State size: bytes per active user and process RSS with many users in the store.
//!
//! Fills a real [`Store`] through the same `apply` path the processor uses with synthetic
//! click events, with the window shape and TTL of the shipped model card and the processor's
//! allocator, then reports the store's own size estimate per user and the growth of the
//! process's resident set.
//!
//! `cargo bench --bench state -- [USERS] [EVENTS]`: USERS defaults to 1,000,000; EVENTS is the
//! number of events per user, or `taobao` (the default) to draw each user's count from the
//! per-user event counts of the real Taobao slice (`.tools/data` or `../shared/data`).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use mindstream::event::{Action, Click, Event, EventBody};
use mindstream::window::Lineage;
use rand::{Rng, SeedableRng};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let default_users = if common::quick() { 10_000 } else { 1_000_000 };
    let users: u64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(default_users);
    let counts = match args.get(1).map(String::as_str) {
        None | Some("taobao") => taobao_counts(),
        Some(n) => vec![n.parse::<u64>().expect("EVENTS is a number or `taobao`")],
    };
    let mut store = common::processor_store();
    let topic: Arc<str> = "clicks".into();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);

    let rss_before = common::rss_bytes();
    let started = Instant::now();
    let mut events = 0u64;
    let now = Instant::now();
    for user in 0..users {
        let count = counts[rng.random_range(0..counts.len())];
        for i in 0..count {
            let event = click(user, i, events);
            let partition = (user % 12) as i32;
            let lineage = Lineage { topic: topic.clone(), partition, offset: events as i64 };
            store.apply(event, lineage, (), now);
            events += 1;
        }
        // Scored: no pending work held, as for a user at rest.
        if user % 4096 == 4095 {
            drop(store.take_all());
        }
    }
    drop(store.take_all());
    let elapsed = started.elapsed();
    let rss_after = common::rss_bytes();

    let held = store.users() as u64;
    let state_bytes = store.state_bytes() as u64;
    let rss_growth = rss_after.saturating_sub(rss_before);
    println!("| measure | value |");
    println!("|---|---|");
    println!("| users in state | {held} |");
    println!("| events applied | {events} ({:.2} per user) |", events as f64 / users as f64);
    println!("| apply rate | {:.0} events/s |", events as f64 / elapsed.as_secs_f64());
    println!("| state estimate per user | {} bytes |", state_bytes / held.max(1));
    println!("| RSS before | {:.1} MiB |", mib(rss_before));
    println!("| RSS after | {:.1} MiB |", mib(rss_after));
    println!("| RSS growth per user | {} bytes |", rss_growth / held.max(1));
}

/// Events per user in the real Taobao slice, one entry per user.
fn taobao_counts() -> Vec<u64> {
    let events = common::taobao_events();
    let mut per_user: HashMap<String, u64> = HashMap::new();
    for event in events {
        *per_user.entry(event.user_id.to_string()).or_default() += 1;
    }
    let mut counts: Vec<u64> = per_user.into_values().collect();
    counts.sort_unstable();
    counts
}

fn click(user: u64, index: u64, sequence: u64) -> Event {
    let action = match (user + index) % 10 {
        0 => Action::Cart,
        1 => Action::Fav,
        2 if index > 2 => Action::Buy,
        _ => Action::View,
    };
    Event {
        user_id: compact_str::format_compact!("user-{user}"),
        event_id: compact_str::format_compact!("e{sequence}"),
        // In arrival order, 10 ms apart, from 2017-11-25: nothing late, nothing idle.
        event_time_ms: 1_511_568_000_000 + sequence as i64 * 10,
        opt_out: false,
        body: EventBody::Click(Click {
            action,
            item_id: compact_str::format_compact!(
                "{}",
                1_000_000 + (user * 7919 + index * 104_729) % 4_000_000
            ),
            category_id: compact_str::format_compact!("{}", 1_000_000 + (user + index) % 9_000),
            price: None,
            discount: None,
            quantity: None,
        }),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
