//! Review sets: Chinese product review sentences and English clothing reviews.

use std::io::Read;
use std::path::Path;

use rand::seq::SliceRandom;
use rand::SeedableRng;

use super::{checked, line_error, ImportError};
use crate::event::{Event, EventBody, Review};

/// Time of the first imported review (2020-01-01T00:00:00Z); the others follow a minute apart.
pub const REVIEW_EPOCH_MS: i64 = 1_577_836_800_000;
/// Seed of the shuffle that orders reviews before they are spaced in time.
const SHUFFLE_SEED: u64 = 20_171_126;

/// A review with its sentiment label.
#[derive(Clone, Debug)]
pub struct LabelledReview {
    pub event: Event,
    pub positive: bool,
}

/// A review event. `event_id` must not be derived from the user id: explanations publish event
/// ids, so an id that embeds the user id would carry it out of the process.
fn review(
    user: String,
    event_id: String,
    item: &str,
    text: String,
    rating: Option<u8>,
    language: &str,
) -> Event {
    Event {
        event_id: event_id.into(),
        user_id: user.into(),
        // Replaced by `space_in_time`; set here so that validation sees a real time.
        event_time_ms: REVIEW_EPOCH_MS,
        opt_out: false,
        body: EventBody::Review(Review {
            item_id: item.into(),
            rating,
            text,
            language: language.into(),
        }),
    }
}

/// Shuffles with a fixed seed and spaces the reviews a minute apart from [`REVIEW_EPOCH_MS`].
fn space_in_time(mut reviews: Vec<LabelledReview>) -> Vec<LabelledReview> {
    reviews.shuffle(&mut rand::rngs::StdRng::seed_from_u64(SHUFFLE_SEED));
    for (i, r) in reviews.iter_mut().enumerate() {
        r.event.event_time_ms = REVIEW_EPOCH_MS + i as i64 * 60_000;
    }
    reviews
}

/// `pos.txt` and `neg.txt` in `dir`: one review per line; the file gives the label. The set
/// has no star ratings, so none are set.
pub fn reviews_zh(dir: &Path) -> Result<Vec<LabelledReview>, ImportError> {
    let mut reviews = Vec::new();
    for (file, positive) in [("pos.txt", true), ("neg.txt", false)] {
        let path = dir.join(file);
        let text = std::fs::read_to_string(&path)
            .map_err(|source| ImportError::Read { path: path.clone(), source })?;
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let label = if positive { "pos" } else { "neg" };
            let user = format!("zhrev:{label}{}", index + 1);
            let event_id = format!("zh-review-{}", reviews.len() + 1);
            let event = review(user, event_id, "zh-product", line.to_owned(), None, "zh");
            let event = checked(event, &path, index + 1)?;
            reviews.push(LabelledReview { event, positive });
        }
    }
    Ok(space_in_time(reviews))
}

/// The clothing reviews zip: a CSV with `Clothing ID`, `Title`, `Review Text` and `Rating`
/// columns. Rows without text are skipped; ratings 4 and 5 are positive.
pub fn reviews_en(zip_path: &Path) -> Result<Vec<LabelledReview>, ImportError> {
    let format_err = |message: String| ImportError::Format { path: zip_path.into(), message };
    let file = std::fs::File::open(zip_path)
        .map_err(|source| ImportError::Read { path: zip_path.into(), source })?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| format_err(e.to_string()))?;
    let name = archive
        .file_names()
        .find(|n| n.ends_with(".csv") && !n.starts_with("__MACOSX"))
        .map(str::to_owned)
        .ok_or_else(|| format_err("no CSV file in the archive".into()))?;
    let mut text = String::new();
    archive
        .by_name(&name)
        .map_err(|e| format_err(e.to_string()))?
        .read_to_string(&mut text)
        .map_err(|e| format_err(format!("{name}: {e}")))?;

    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader.headers().map_err(|e| format_err(e.to_string()))?.clone();
    let column = |wanted: &str| {
        headers
            .iter()
            .position(|h| h == wanted)
            .ok_or_else(|| format_err(format!("no `{wanted}` column")))
    };
    let (item, title, body, rating) =
        (column("Clothing ID")?, column("Title")?, column("Review Text")?, column("Rating")?);
    let mut reviews = Vec::new();
    for (index, row) in reader.records().enumerate() {
        let line = index + 2;
        let row = row.map_err(|e| line_error(zip_path, line, e.to_string()))?;
        let text = row.get(body).unwrap_or("").trim();
        if text.is_empty() {
            continue;
        }
        let stars: u8 = row
            .get(rating)
            .and_then(|r| r.trim().parse().ok())
            .ok_or_else(|| line_error(zip_path, line, "bad Rating"))?;
        let title = row.get(title).unwrap_or("").trim();
        let full = if title.is_empty() { text.to_owned() } else { format!("{title}. {text}") };
        let user = format!("enrev:{line}");
        let item = format!("clothing-{}", row.get(item).unwrap_or("").trim());
        let event_id = format!("en-review-{}", reviews.len() + 1);
        let event = review(user, event_id, &item, full, Some(stars), "en");
        let event = checked(event, zip_path, line)?;
        reviews.push(LabelledReview { event, positive: stars >= 4 });
    }
    Ok(space_in_time(reviews))
}
