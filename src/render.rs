//! The window as model text.
//!
//! A window renders to a header line (customer age, orders, events seen) followed by one line
//! per event, oldest first:
//!
//! ```text
//! user 3d old, 2 orders, 14 events
//! +0s view c4756105 i1 $12
//! +2m cart c4756105 i1 $12
//! +1h search "red shoes" sort price_asc
//! +3d review i1: strap broke after a week
//! ```
//!
//! Durations and prices are bucketed so that the vocabulary stays small; items are numbered
//! by first appearance in the window (`i1`, `i2`, ...) because raw item ids carry no meaning a
//! model could learn across shops. A review's star rating is not rendered: ratings are the
//! label the sentiment head learns from, so the model reads sentiment from the text alone.
//! Text was scrubbed when the event entered the window.
//! The format is versioned by [`RENDER_VERSION`]; a model trained on another version is
//! refused at load time.

use std::fmt::Write;

use crate::window::{Detail, UserState, WindowEvent};

/// Version of the text format; stored in the model card.
pub const RENDER_VERSION: u32 = 1;

/// One line of model text and the window event it came from (`None` for the header).
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub text: String,
    pub event: Option<usize>,
}

/// Renders the user's window: the header, then one segment per event in window order.
pub fn render(state: &UserState) -> Vec<Segment> {
    let events = state.events();
    let mut segments = Vec::with_capacity(events.len() + 1);
    let age = state.newest_ms() - state.first_seen_ms();
    segments.push(Segment {
        text: format!(
            "user {} old, {} orders, {} events\n",
            duration(age),
            state.lifetime_buys(),
            state.applied()
        ),
        event: None,
    });

    let mut items: Vec<&str> = Vec::new();
    let mut previous = events.front().map_or(0, |e| e.event_time_ms);
    for (index, event) in events.iter().enumerate() {
        let gap = event.event_time_ms - previous;
        previous = event.event_time_ms;
        let item = item_number(&mut items, &event.item_id);
        segments.push(Segment { text: line(event, gap, item), event: Some(index) });
    }
    segments
}

fn item_number<'a>(items: &mut Vec<&'a str>, item_id: &'a str) -> Option<usize> {
    if item_id.is_empty() {
        return None;
    }
    match items.iter().position(|known| *known == item_id) {
        Some(i) => Some(i + 1),
        None => {
            items.push(item_id);
            Some(items.len())
        }
    }
}

fn line(event: &WindowEvent, gap_ms: i64, item: Option<usize>) -> String {
    let mut out = format!("+{}", duration(gap_ms));
    match &event.detail {
        Detail::Click { action, price, discount, quantity } => {
            let _ = write!(out, " {}", action.as_str());
            push_category(&mut out, &event.category_id);
            push_item(&mut out, item);
            if let Some(price) = price {
                let _ = write!(out, " ${}", round_price(*price));
            }
            if let Some(discount) = discount {
                let _ = write!(out, " -{}%", (discount * 100.0).round() as i64);
            }
            if *quantity > 1 {
                let _ = write!(out, " x{quantity}");
            }
        }
        Detail::Search { query, sort } => {
            let _ = write!(out, " search \"{query}\"");
            if !sort.is_empty() {
                let _ = write!(out, " sort {sort}");
            }
            push_category(&mut out, &event.category_id);
        }
        Detail::Review { text, .. } => {
            out.push_str(" review");
            push_item(&mut out, item);
            let _ = write!(out, ": {text}");
        }
    }
    out.push('\n');
    out
}

fn push_category(out: &mut String, category: &str) {
    if !category.is_empty() {
        let _ = write!(out, " c{category}");
    }
}

fn push_item(out: &mut String, item: Option<usize>) {
    if let Some(item) = item {
        let _ = write!(out, " i{item}");
    }
}

/// A short description of an event for explanations: kind, action, category; never text.
pub fn summary(event: &WindowEvent) -> String {
    let mut out = match &event.detail {
        Detail::Click { action, .. } => action.as_str().to_owned(),
        Detail::Search { .. } => "search".to_owned(),
        Detail::Review { rating: Some(r), .. } => format!("review rating {r}"),
        Detail::Review { rating: None, .. } => "review".to_owned(),
    };
    push_category(&mut out, &event.category_id);
    out
}

/// Log-spaced duration buckets; a duration renders as the largest bucket not above it.
const BUCKETS: [(i64, &str); 21] = [
    (0, "0s"),
    (5_000, "5s"),
    (30_000, "30s"),
    (60_000, "1m"),
    (300_000, "5m"),
    (900_000, "15m"),
    (1_800_000, "30m"),
    (3_600_000, "1h"),
    (10_800_000, "3h"),
    (21_600_000, "6h"),
    (43_200_000, "12h"),
    (86_400_000, "1d"),
    (172_800_000, "2d"),
    (345_600_000, "4d"),
    (604_800_000, "7d"),
    (1_209_600_000, "14d"),
    (2_592_000_000, "30d"),
    (5_184_000_000, "60d"),
    (7_776_000_000, "90d"),
    (15_552_000_000, "180d"),
    (31_536_000_000, "1y"),
];

/// The bucket label of a duration in milliseconds.
pub fn duration(ms: i64) -> &'static str {
    let at = BUCKETS.partition_point(|(floor, _)| *floor <= ms.max(0));
    BUCKETS[at.saturating_sub(1)].1
}

/// A price rounded to two significant digits, without trailing zeros.
fn round_price(price: f32) -> String {
    if price <= 0.0 {
        return "0".into();
    }
    let magnitude = price.log10().floor() as i32;
    let step = 10f64.powi(magnitude - 1);
    let rounded = (f64::from(price) / step).round() * step;
    if magnitude >= 1 {
        format!("{}", rounded.round() as i64)
    } else {
        let decimals = (1 - magnitude) as usize;
        let text = format!("{rounded:.decimals$}");
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Action, Click, Event, EventBody, Review, Search};
    use crate::window::{Lineage, StateSpec, WindowSpec};

    fn spec() -> StateSpec {
        StateSpec {
            window: WindowSpec::default(),
            user_ttl_ms: 365 * 86_400_000,
            interest_half_life_ms: 86_400_000,
            interests_tracked: 8,
        }
    }

    fn at(minutes: i64, body: EventBody) -> WindowEvent {
        let event = Event {
            user_id: "u".into(),
            event_id: compact_str::format_compact!("e{minutes}"),
            event_time_ms: 1_500_000_000_000 + minutes * 60_000,
            opt_out: false,
            body,
        };
        let lineage = Lineage { topic: "t".into(), partition: 0, offset: 0 };
        WindowEvent::from_event(&event, lineage, &spec().window).expect("a windowed kind")
    }

    fn click(action: Action, item: &str, price: Option<f64>) -> EventBody {
        EventBody::Click(Click {
            action,
            item_id: item.into(),
            category_id: "42".into(),
            price,
            discount: None,
            quantity: None,
        })
    }

    #[test]
    fn renders_header_and_lines() {
        let spec = spec();
        let mut state = UserState::new(at(0, click(Action::View, "x", Some(12.49))), &spec);
        state.apply(at(2, click(Action::Cart, "x", Some(12.49))), &spec);
        state.apply(at(3, click(Action::Buy, "y", None)), &spec);
        let search = Search {
            query: "red shoes".into(),
            sort: "price_asc".into(),
            category_id: Default::default(),
        };
        state.apply(at(70, EventBody::Search(search)), &spec);
        let review = Review {
            item_id: "y".into(),
            rating: Some(2),
            text: "call 13812345678".into(),
            language: "en".into(),
        };
        state.apply(at(4 * 24 * 60, EventBody::Review(review)), &spec);
        let text: String = render(&state).into_iter().map(|s| s.text).collect();
        let want = "user 4d old, 1 orders, 5 events\n\
                    +0s view c42 i1 $12\n\
                    +1m cart c42 i1 $12\n\
                    +1m buy c42 i2\n\
                    +1h search \"red shoes\" sort price_asc\n\
                    +2d review i2: call [phone]\n";
        assert_eq!(text, want);
    }

    #[test]
    fn durations_and_prices_bucket() {
        assert_eq!(duration(-5), "0s");
        assert_eq!(duration(4_999), "0s");
        assert_eq!(duration(90_000), "1m");
        assert_eq!(duration(40 * 86_400_000), "30d");
        assert_eq!(duration(i64::MAX), "1y");
        assert_eq!(round_price(1234.0), "1200");
        assert_eq!(round_price(12.49), "12");
        assert_eq!(round_price(4.56), "4.6");
        assert_eq!(round_price(0.456), "0.46");
        assert_eq!(round_price(0.0), "0");
    }
}
