//! The changelog's record format: one user's window state as of a delivered signal.
//!
//! The changelog is a compacted topic keyed by the pseudonymised user key, with one partition
//! per input partition number: the state of the users read from input partition `p` lives in
//! changelog partition `p`, so whoever is assigned `p` restores exactly its users. A record is
//! written next to every signal record (the state that signal was computed from), and an
//! empty value (a tombstone) when the user is evicted, deleted or opts out.
//!
//! A value is one format byte followed by the [`Snapshot`] in `postcard`'s encoding. A format
//! this build does not know is an error, never a guess.

use serde::{Deserialize, Serialize};

use crate::actions::Marks;
use crate::window::UserState;

/// Format byte of the values this build writes. Format 1 (no marks) is still read.
pub const FORMAT: u8 = 2;
/// The format before marks were kept.
const FORMAT_1: u8 = 1;

/// One user's state as the changelog keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The input partition number the user's events are read from.
    pub partition: i32,
    /// The window, counters and interests.
    pub state: UserState,
    /// Per input topic, the offset of the last record applied to `state`. After a restart,
    /// records at or below these offsets are already in the state and are not applied twice.
    pub applied_through: Vec<AppliedThrough>,
    /// Segment membership and alert de-duplication (format 2 on).
    pub marks: Marks,
}

/// Format 1's snapshot: the same without marks.
#[derive(Deserialize)]
struct SnapshotV1 {
    partition: i32,
    state: UserState,
    applied_through: Vec<AppliedThrough>,
}

/// The last input offset of one topic applied to a state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedThrough {
    pub topic: Box<str>,
    pub offset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("empty changelog value (a tombstone is not a state)")]
    Empty,
    #[error("changelog value has format {0}; this build reads formats 1 and {FORMAT}")]
    Format(u8),
    #[error("changelog value does not decode")]
    Decode(#[source] postcard::Error),
}

/// Encodes a snapshot as a changelog value.
pub fn encode(snapshot: &Snapshot) -> Vec<u8> {
    let mut out = vec![FORMAT];
    // Serialising plain owned data into a Vec cannot fail.
    let body = postcard::to_stdvec(snapshot).expect("a snapshot serialises");
    out.extend_from_slice(&body);
    out
}

/// Decodes a changelog value.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, StateError> {
    match bytes.split_first() {
        None => Err(StateError::Empty),
        Some((&FORMAT, body)) => postcard::from_bytes(body).map_err(StateError::Decode),
        Some((&FORMAT_1, body)) => {
            let v1: SnapshotV1 = postcard::from_bytes(body).map_err(StateError::Decode)?;
            Ok(Snapshot {
                partition: v1.partition,
                state: v1.state,
                applied_through: v1.applied_through,
                marks: Marks::default(),
            })
        }
        Some((&other, _)) => Err(StateError::Format(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Action, Click, Event, EventBody, Review};
    use crate::window::{Lineage, StateSpec, WindowEvent, WindowSpec};

    fn spec() -> StateSpec {
        StateSpec {
            window: WindowSpec::default(),
            user_ttl_ms: 86_400_000,
            interest_half_life_ms: 86_400_000,
            interests_tracked: 4,
        }
    }

    fn event(id: &str, time: i64, body: EventBody) -> WindowEvent {
        let event = Event {
            user_id: "u".into(),
            event_id: id.into(),
            event_time_ms: time,
            opt_out: false,
            body,
        };
        let lineage = Lineage { topic: "clicks".into(), partition: 2, offset: time };
        WindowEvent::from_event(&event, lineage, &spec().window).expect("a windowed kind")
    }

    #[test]
    fn a_snapshot_round_trips_exactly() {
        let spec = spec();
        let click = EventBody::Click(Click {
            action: Action::Cart,
            item_id: "item-1".into(),
            category_id: "cat".into(),
            price: Some(19.5),
            discount: None,
            quantity: Some(2),
        });
        let review = EventBody::Review(Review {
            item_id: "item-1".into(),
            rating: Some(2),
            text: "坏了，不能用 😞".into(),
            language: "zh".into(),
        });
        let mut state = UserState::new(event("a", 1_000, click), &spec);
        state.apply(event("b", 2_000, review), &spec);
        let marks = Marks {
            segments: vec!["ready_to_buy".into()],
            sentiment: Some(0.25),
            alerted: vec![crate::actions::Alerted { item_id: "item-1".into(), at_ms: 2_000 }],
        };
        let snapshot = Snapshot {
            partition: 2,
            state,
            applied_through: vec![AppliedThrough { topic: "clicks".into(), offset: 2_000 }],
            marks,
        };
        let bytes = encode(&snapshot);
        assert_eq!(bytes[0], FORMAT);
        assert_eq!(decode(&bytes).unwrap(), snapshot);

        // A format-1 value, written before marks were kept, reads with empty marks.
        let v1 = (snapshot.partition, &snapshot.state, &snapshot.applied_through);
        let mut old = vec![1u8];
        old.extend(postcard::to_stdvec(&v1).unwrap());
        let read = decode(&old).unwrap();
        assert_eq!(read.marks, Marks::default());
        assert_eq!(read.state, snapshot.state);
    }

    #[test]
    fn tombstones_unknown_formats_and_garbage_are_errors() {
        assert!(matches!(decode(&[]), Err(StateError::Empty)));
        assert!(matches!(decode(&[9, 1, 2]), Err(StateError::Format(9))));
        assert!(matches!(decode(&[FORMAT, 0xff, 0xff]), Err(StateError::Decode(_))));
    }
}
