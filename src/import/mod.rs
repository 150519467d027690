//! Importers of public e-commerce data sets into the event schema.
//!
//! | source | file | events |
//! |---|---|---|
//! | `taobao` | Taobao UserBehavior CSV (`user,item,category,behavior,unix_ts`) | clicks |
//! | `cdnow` | CDNOW purchase log (`customer date cds dollars`) | buys |
//! | `otto` | OTTO sessions JSON lines | clicks, carts, orders |
//! | `reviews-zh` | folder with `pos.txt` and `neg.txt`, one review per line | reviews |
//! | `reviews-en` | Women's clothing reviews, a zip of one CSV | reviews |
//!
//! User ids are prefixed with the source (`taobao:543462`) so that sets never collide. The
//! review sets carry no time and no user: each review becomes its own user, and reviews are
//! spaced one minute apart in a seeded shuffle of the file, so that any split by time is a
//! seeded random split. Every imported event passes [`Event::validate`]; a line that does not
//! parse is an error naming the file and line.

mod clicks;
mod reviews;

pub use clicks::{cdnow, otto, taobao};
pub use reviews::{reviews_en, reviews_zh, LabelledReview, REVIEW_EPOCH_MS};

use std::path::PathBuf;

use crate::event::Event;

#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    Line { path: PathBuf, line: usize, message: String },
    #[error("{path}: {message}")]
    Format { path: PathBuf, message: String },
}

/// The data sets an importer knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    Taobao,
    Cdnow,
    Otto,
    ReviewsZh,
    ReviewsEn,
}

impl Source {
    pub fn name(self) -> &'static str {
        match self {
            Source::Taobao => "taobao",
            Source::Cdnow => "cdnow",
            Source::Otto => "otto",
            Source::ReviewsZh => "reviews-zh",
            Source::ReviewsEn => "reviews-en",
        }
    }
}

/// Imports `source` from `path` as events in time order (stable for equal times).
pub fn events(source: Source, path: &std::path::Path) -> Result<Vec<Event>, ImportError> {
    let mut events = match source {
        Source::Taobao => taobao(path)?,
        Source::Cdnow => cdnow(path)?,
        Source::Otto => otto(path)?,
        Source::ReviewsZh => reviews_zh(path)?.into_iter().map(|r| r.event).collect(),
        Source::ReviewsEn => reviews_en(path)?.into_iter().map(|r| r.event).collect(),
    };
    events.sort_by_key(|e| e.event_time_ms);
    Ok(events)
}

fn line_error(path: &std::path::Path, line: usize, message: impl Into<String>) -> ImportError {
    ImportError::Line { path: path.into(), line, message: message.into() }
}

/// Checks an imported event against the processor's rules.
fn checked(event: Event, path: &std::path::Path, line: usize) -> Result<Event, ImportError> {
    event.validate().map_err(|r| line_error(path, line, r.to_string()))?;
    Ok(event)
}
