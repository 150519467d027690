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

/// How far after a window each label looks, in milliseconds. Labels read only events in
/// `(window end, window end + horizon]`, and a window whose horizon runs past the end of the
/// data gets no label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Horizons {
    /// Purchase intent and cart abandonment: a buy within this time.
    pub click_ms: i64,
    /// Churn risk: no activity within this time.
    pub churn_ms: i64,
    /// Price sensitivity: the next purchase within this time.
    pub price_ms: i64,
}

impl Default for Horizons {
    fn default() -> Self {
        Horizons { click_ms: 20 * 60_000, churn_ms: 90 * 86_400_000, price_ms: 180 * 86_400_000 }
    }
}

/// A horizon as the card writes it: `20m`, `90d`.
pub fn horizon_text(ms: i64) -> String {
    let units = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1_000, "s")];
    units
        .iter()
        .find(|(size, _)| ms != 0 && ms % size == 0)
        .map_or_else(|| format!("{ms}ms"), |(size, unit)| format!("{}{unit}", ms / size))
}

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

/// The heads with the default horizons, in output order.
pub fn head_signals() -> Vec<SignalSpec> {
    head_signals_for(&Horizons::default())
}

/// The heads, in output order, with the horizons they were trained with.
pub fn head_signals_for(horizons: &Horizons) -> Vec<SignalSpec> {
    let click = horizon_text(horizons.click_ms);
    let churn = horizon_text(horizons.churn_ms);
    let price = horizon_text(horizons.price_ms);
    vec![
        spec(
            "purchase_intent",
            &format!("probability that the user buys within {click} of the window's newest event"),
            "a buy event by the user within the horizon after the window (Taobao click stream)",
            Status::Stable,
            AppliesWhen::HasClick,
            Some(&click),
            &["taobao"],
        ),
        spec(
            "cart_abandonment",
            &format!(
                "for a window holding a cart event: probability of no purchase within {click}"
            ),
            "no buy event within the horizon after a window with a cart (Taobao click stream)",
            Status::Stable,
            AppliesWhen::HasCart,
            Some(&click),
            &["taobao"],
        ),
        spec(
            "churn_risk",
            &format!("probability that the user has no activity within {churn}"),
            "no purchase within the horizon after the window (CDNOW purchase log)",
            Status::Experimental,
            AppliesWhen::HasClick,
            Some(&churn),
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
            &format!(
                "unit price of the next purchase within {price} below the training-period \
                 median (CDNOW purchase log)"
            ),
            Status::Experimental,
            AppliesWhen::HasPrice,
            Some(&price),
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
pub fn click_labellers(horizons: &Horizons) -> Vec<Labeller> {
    let h = horizons.click_ms;
    vec![
        Labeller {
            signal: PURCHASE_INTENT,
            horizon_ms: h,
            applies_when: AppliesWhen::HasClick,
            label: Box::new(move |input| observed(input, h).then(|| within(input, h).any(is_buy))),
        },
        Labeller {
            signal: CART_ABANDONMENT,
            horizon_ms: h,
            applies_when: AppliesWhen::HasCart,
            label: Box::new(move |input| observed(input, h).then(|| !within(input, h).any(is_buy))),
        },
    ]
}

/// Labels of the purchase-log set; `median_unit_price` is taken over the training period.
pub fn purchase_labellers(median_unit_price: f64, horizons: &Horizons) -> Vec<Labeller> {
    let (churn, price) = (horizons.churn_ms, horizons.price_ms);
    vec![
        Labeller {
            signal: CHURN_RISK,
            horizon_ms: churn,
            applies_when: AppliesWhen::HasClick,
            label: Box::new(move |input| {
                observed(input, churn).then(|| within(input, churn).next().is_none())
            }),
        },
        Labeller {
            signal: PRICE_SENSITIVITY,
            horizon_ms: price,
            applies_when: AppliesWhen::HasPrice,
            label: Box::new(move |input| {
                let next = within(input, price).find(|e| is_buy(e))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn horizons_are_written_in_their_largest_whole_unit() {
        assert_eq!(horizon_text(20 * 60_000), "20m");
        assert_eq!(horizon_text(90 * 86_400_000), "90d");
        assert_eq!(horizon_text(36 * 3_600_000), "36h");
        assert_eq!(horizon_text(1_500), "1500ms");
    }

    #[test]
    fn a_configured_horizon_reaches_the_card_and_the_labels() {
        let horizons = Horizons { click_ms: 5 * 60_000, ..Horizons::default() };
        let signals = head_signals_for(&horizons);
        assert_eq!(signals[PURCHASE_INTENT].horizon.as_deref(), Some("5m"));
        assert!(signals[PURCHASE_INTENT].meaning.contains("within 5m"));
        let labellers = click_labellers(&horizons);
        assert!(labellers.iter().all(|l| l.horizon_ms == 5 * 60_000));
    }
}
