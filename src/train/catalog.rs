//! The signals of the default model: what each means, where its labels come from, and the
//! label functions over point-in-time examples.

use crate::event::{Action, Event, EventBody};
use crate::model::card::{AppliesWhen, SignalSpec, Status};
use crate::train::dataset::{LabelInput, Labeller};

/// Output positions of the heads.
pub const PURCHASE_INTENT: usize = 0;
pub const CART_ABANDONMENT: usize = 1;
pub const CHURN_RISK: usize = 2;
pub const SENTIMENT: usize = 3;
pub const PRICE_SENSITIVITY: usize = 4;
pub const OUTPUTS: usize = 5;

/// Horizon of the click-stream labels.
pub const CLICK_HORIZON_MS: i64 = 20 * 60_000;
/// Horizon of the churn label (no activity within it).
pub const CHURN_HORIZON_MS: i64 = 90 * 86_400_000;
/// Horizon within which the next purchase decides the price label.
pub const PRICE_HORIZON_MS: i64 = 180 * 86_400_000;

fn spec(
    name: &str,
    meaning: &str,
    label_source: &str,
    status: Status,
    applies_when: AppliesWhen,
    horizon: Option<&str>,
    trained_on: &[&str],
) -> SignalSpec {
    SignalSpec {
        name: name.into(),
        meaning: meaning.into(),
        label_source: label_source.into(),
        status,
        applies_when,
        horizon: horizon.map(Into::into),
        trained_on: trained_on.iter().map(|s| s.to_string()).collect(),
    }
}

/// The heads, in output order.
pub fn head_signals() -> Vec<SignalSpec> {
    vec![
        spec(
            "purchase_intent",
            "probability that the user buys within 20 minutes of the window's newest event",
            "a buy event by the user within the horizon after the window (Taobao click stream)",
            Status::Stable,
            AppliesWhen::HasClick,
            Some("20m"),
            &["taobao"],
        ),
        spec(
            "cart_abandonment",
            "for a window holding a cart event: probability of no purchase within 20 minutes",
            "no buy event within the horizon after a window with a cart (Taobao click stream)",
            Status::Stable,
            AppliesWhen::HasCart,
            Some("20m"),
            &["taobao"],
        ),
        spec(
            "churn_risk",
            "probability that the user has no activity within 90 days",
            "no purchase within the horizon after the window (CDNOW purchase log)",
            Status::Experimental,
            AppliesWhen::HasClick,
            Some("90d"),
            &["cdnow"],
        ),
        spec(
            "sentiment",
            "probability that the window's reviews are positive",
            "review labels: the file of the Chinese set, 4-5 stars in the English set",
            Status::Stable,
            AppliesWhen::HasReview,
            None,
            &["reviews-zh", "reviews-en"],
        ),
        spec(
            "price_sensitivity",
            "for a window with prices: probability that the next purchase is cheaper per unit \
             than the median purchase",
            "unit price of the next purchase within 180 days below the training-period median \
             (CDNOW purchase log)",
            Status::Experimental,
            AppliesWhen::HasPrice,
            Some("180d"),
            &["cdnow"],
        ),
    ]
}

/// Signals derived by rule.
pub fn derived_signals() -> Vec<SignalSpec> {
    vec![spec(
        "service_alert",
        "1 - sentiment for a review of an item the user bought earlier in the window: \
         route to customer care",
        "rule over the sentiment head and the window's purchases",
        Status::Experimental,
        AppliesWhen::ReviewOfBoughtItem,
        None,
        &[],
    )]
}

fn is_buy(event: &Event) -> bool {
    matches!(&event.body, EventBody::Click(c) if c.action == Action::Buy)
}

fn within<'a>(input: &'a LabelInput<'a>, horizon_ms: i64) -> impl Iterator<Item = &'a Event> {
    let end = input.time_ms + horizon_ms;
    input.future.iter().copied().take_while(move |e| e.event_time_ms <= end)
}

fn observed(input: &LabelInput<'_>, horizon_ms: i64) -> bool {
    input.time_ms + horizon_ms <= input.data_end_ms
}

/// Labels of the click-stream set.
pub fn click_labellers() -> Vec<Labeller> {
    vec![
        Labeller {
            signal: PURCHASE_INTENT,
            horizon_ms: CLICK_HORIZON_MS,
            applies_when: AppliesWhen::HasClick,
            label: Box::new(|input| {
                observed(input, CLICK_HORIZON_MS)
                    .then(|| within(input, CLICK_HORIZON_MS).any(is_buy))
            }),
        },
        Labeller {
            signal: CART_ABANDONMENT,
            horizon_ms: CLICK_HORIZON_MS,
            applies_when: AppliesWhen::HasCart,
            label: Box::new(|input| {
                observed(input, CLICK_HORIZON_MS)
                    .then(|| !within(input, CLICK_HORIZON_MS).any(is_buy))
            }),
        },
    ]
}

/// Labels of the purchase-log set; `median_unit_price` is taken over the training period.
pub fn purchase_labellers(median_unit_price: f64) -> Vec<Labeller> {
    vec![
        Labeller {
            signal: CHURN_RISK,
            horizon_ms: CHURN_HORIZON_MS,
            applies_when: AppliesWhen::HasClick,
            label: Box::new(|input| {
                observed(input, CHURN_HORIZON_MS)
                    .then(|| within(input, CHURN_HORIZON_MS).next().is_none())
            }),
        },
        Labeller {
            signal: PRICE_SENSITIVITY,
            horizon_ms: PRICE_HORIZON_MS,
            applies_when: AppliesWhen::HasPrice,
            label: Box::new(move |input| {
                let next = within(input, PRICE_HORIZON_MS).find(|e| is_buy(e))?;
                match &next.body {
                    EventBody::Click(c) => c.price.map(|p| p < median_unit_price),
                    _ => None,
                }
            }),
        },
    ]
}

/// Median unit price of the buys before `before_ms`.
pub fn median_unit_price(events: &[Event], before_ms: i64) -> Option<f64> {
    let mut prices: Vec<f64> = events
        .iter()
        .filter(|e| e.event_time_ms < before_ms)
        .filter_map(|e| match &e.body {
            EventBody::Click(c) if c.action == Action::Buy => c.price,
            _ => None,
        })
        .collect();
    if prices.is_empty() {
        return None;
    }
    prices.sort_by(f64::total_cmp);
    Some(prices[prices.len() / 2])
}
