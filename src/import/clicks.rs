//! Click-stream and purchase sets: Taobao, CDNOW, OTTO.

use std::io::{BufRead, BufReader};
use std::path::Path;

use super::{checked, line_error, ImportError};
use crate::event::{Action, Click, Event, EventBody};

fn lines(
    path: &Path,
) -> Result<impl Iterator<Item = (usize, std::io::Result<String>)>, ImportError> {
    let file = std::fs::File::open(path)
        .map_err(|source| ImportError::Read { path: path.into(), source })?;
    Ok(BufReader::new(file).lines().enumerate().map(|(i, line)| (i + 1, line)))
}

fn read_err(path: &Path) -> impl Fn(std::io::Error) -> ImportError + '_ {
    move |source| ImportError::Read { path: path.into(), source }
}

fn click(
    user: String,
    id: String,
    time_ms: i64,
    action: Action,
    item: &str,
    category: &str,
) -> Event {
    Event {
        user_id: user.into(),
        event_id: id.into(),
        event_time_ms: time_ms,
        opt_out: false,
        body: EventBody::Click(Click {
            action,
            item_id: item.into(),
            category_id: category.into(),
            price: None,
            discount: None,
            quantity: None,
        }),
    }
}

/// Taobao UserBehavior: `user_id,item_id,category_id,behavior,unix_ts`, no header.
pub fn taobao(path: &Path) -> Result<Vec<Event>, ImportError> {
    let mut events = Vec::new();
    for (number, line) in lines(path)? {
        let line = line.map_err(read_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.trim().split(',').collect();
        let [user, item, category, behavior, ts] = fields[..] else {
            return Err(line_error(path, number, "expected 5 comma-separated fields"));
        };
        let action = match behavior {
            "pv" => Action::View,
            "cart" => Action::Cart,
            "fav" => Action::Fav,
            "buy" => Action::Buy,
            other => return Err(line_error(path, number, format!("unknown behavior `{other}`"))),
        };
        let seconds: i64 =
            ts.parse().map_err(|_| line_error(path, number, "timestamp is not an integer"))?;
        let event = click(
            format!("taobao:{user}"),
            format!("taobao-{number}"),
            seconds * 1000,
            action,
            item,
            category,
        );
        events.push(checked(event, path, number)?);
    }
    Ok(events)
}

/// CDNOW: header, then `customer_id date number_of_cds dollar_value`, date as YYYYMMDD.
/// Orders have no item ids: each is a buy of item `order` in category `cd`, at noon UTC of its
/// day plus one second per earlier order of the same customer that day, with the unit price
/// `dollar_value / number_of_cds`.
pub fn cdnow(path: &Path) -> Result<Vec<Event>, ImportError> {
    let mut events: Vec<Event> = Vec::new();
    let mut last: Option<(String, i64, i64)> = None;
    for (number, line) in lines(path)? {
        let line = line.map_err(read_err(path))?;
        let fields: Vec<&str> = line.split_whitespace().collect();
        if number == 1 && fields.first() == Some(&"customer_id") || fields.is_empty() {
            continue;
        }
        let [customer, date, cds, dollars] = fields[..] else {
            return Err(line_error(path, number, "expected 4 whitespace-separated fields"));
        };
        let day = parse_yyyymmdd(date).ok_or_else(|| line_error(path, number, "bad date"))?;
        let cds: u32 = cds.parse().map_err(|_| line_error(path, number, "bad number_of_cds"))?;
        let dollars: f64 =
            dollars.parse().map_err(|_| line_error(path, number, "bad dollar_value"))?;
        let noon = day + 12 * 3_600_000;
        let bump = match &last {
            Some((c, d, b)) if c == customer && *d == noon => b + 1,
            _ => 0,
        };
        last = Some((customer.to_owned(), noon, bump));
        let mut event = click(
            format!("cdnow:{customer}"),
            format!("cdnow-{number}"),
            noon + bump * 1000,
            Action::Buy,
            "order",
            "cd",
        );
        if let EventBody::Click(c) = &mut event.body {
            c.quantity = Some(cds.max(1));
            c.price = Some(if cds == 0 { dollars } else { dollars / f64::from(cds) });
        }
        events.push(checked(event, path, number)?);
    }
    Ok(events)
}

/// Days since the epoch of a proleptic Gregorian date, in ms (Howard Hinnant's algorithm).
fn parse_yyyymmdd(date: &str) -> Option<i64> {
    if date.len() != 8 {
        return None;
    }
    let y: i64 = date[..4].parse().ok()?;
    let m: i64 = date[4..6].parse().ok()?;
    let d: i64 = date[6..].parse().ok()?;
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some((era * 146_097 + doe - 719_468) * 86_400_000)
}

#[derive(serde::Deserialize)]
struct OttoSession {
    session: u64,
    events: Vec<OttoEvent>,
}

#[derive(serde::Deserialize)]
struct OttoEvent {
    aid: u64,
    ts: i64,
    #[serde(rename = "type")]
    kind: String,
}

/// OTTO sessions: `{"session":N,"events":[{"aid":N,"ts":ms,"type":"clicks|carts|orders"}]}`.
pub fn otto(path: &Path) -> Result<Vec<Event>, ImportError> {
    let mut events = Vec::new();
    for (number, line) in lines(path)? {
        let line = line.map_err(read_err(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let session: OttoSession = serde_json::from_str(&line)
            .map_err(|e| line_error(path, number, format!("not an OTTO session: {e}")))?;
        for e in &session.events {
            let action = match e.kind.as_str() {
                "clicks" => Action::View,
                "carts" => Action::Cart,
                "orders" => Action::Buy,
                other => {
                    return Err(line_error(path, number, format!("unknown event type `{other}`")))
                }
            };
            let event = click(
                format!("otto:{}", session.session),
                format!("otto-{}", events.len() + 1),
                e.ts,
                action,
                &e.aid.to_string(),
                "",
            );
            events.push(checked(event, path, number)?);
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert_to_epoch_days() {
        assert_eq!(parse_yyyymmdd("19700101"), Some(0));
        assert_eq!(parse_yyyymmdd("19970101"), Some(852_076_800_000));
        assert_eq!(parse_yyyymmdd("20000229"), Some(951_782_400_000));
        assert_eq!(parse_yyyymmdd("19971301"), None);
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "1,2,3,pv,1511658000\n1,2,3,teleport,1511658000\n").unwrap();
        let err = taobao(&path).unwrap_err().to_string();
        assert!(err.contains("t.csv:2") && err.contains("teleport"), "{err}");
    }
}
