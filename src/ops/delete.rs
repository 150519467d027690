//! `mindstream delete-user`: asks the processor to erase users, by producing a `delete_user`
//! event for each into an input topic, keyed by the raw user id as the shop's own events are.
//!
//! The request travels the user's partition in order with their other events, so the
//! instance that owns the user honours it: it drops the user's state, writes tombstones for the
//! user's key to the changelog and to the signal topic (compaction then removes both), and
//! forgets the user's latest record in the HTTP lookup. Events of the user produced after the
//! request start a new, empty history.

use std::time::Duration;

use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::ClientConfig;

use crate::event::{self, Event, EventBody, Format, Rejection};

/// How long one request may wait for the broker's acknowledgement.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    #[error("cannot create the producer")]
    Producer(#[source] KafkaError),
    #[error("user id {index} of the request cannot be sent")]
    Invalid {
        index: usize,
        #[source]
        source: Rejection,
    },
    #[error("the request for user id {index} was not acknowledged by {topic}")]
    Send {
        index: usize,
        topic: String,
        #[source]
        source: KafkaError,
    },
}

/// The delete requests for `user_ids`, as events of `now_ms`.
pub fn requests(user_ids: &[String], now_ms: i64) -> Result<Vec<Event>, DeleteError> {
    user_ids
        .iter()
        .enumerate()
        .map(|(index, user_id)| {
            let event = Event {
                user_id: user_id.as_str().into(),
                event_id: compact_str::format_compact!("delete-{now_ms}-{index}"),
                event_time_ms: now_ms,
                opt_out: false,
                body: EventBody::DeleteUser,
            };
            event.validate().map_err(|source| DeleteError::Invalid { index, source })?;
            Ok(event)
        })
        .collect()
}

/// Produces `events` into `topic` in `format`, keyed by user id, and waits for every
/// acknowledgement. Returns how many were acknowledged.
pub async fn send(
    client: &ClientConfig,
    topic: &str,
    format: Format,
    events: &[Event],
) -> Result<usize, DeleteError> {
    let producer: FutureProducer = client.create().map_err(DeleteError::Producer)?;
    for (index, event) in events.iter().enumerate() {
        let payload = event::encode(format, event);
        let record = FutureRecord::to(topic).key(event.user_id.as_str()).payload(&payload);
        producer.send(record, DELIVERY_TIMEOUT).await.map_err(|(source, _)| DeleteError::Send {
            index,
            topic: topic.to_owned(),
            source,
        })?;
    }
    Ok(events.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_through_both_formats() {
        let events = requests(&["u-1".to_owned(), "u-2".to_owned()], 1_700_000_000_000).unwrap();
        assert_eq!(events.len(), 2);
        assert_ne!(events[0].event_id, events[1].event_id, "event ids are unique per request");
        for format in [Format::Json, Format::Protobuf] {
            for event in &events {
                let back = event::decode(format, &event::encode(format, event)).unwrap();
                assert_eq!(&back, event, "{format:?}");
                assert_eq!(back.kind().as_str(), "delete_user");
            }
        }
    }

    #[test]
    fn an_empty_user_id_is_refused_before_anything_is_sent() {
        let err = requests(&["u-1".to_owned(), String::new()], 1).unwrap_err();
        assert!(matches!(err, DeleteError::Invalid { index: 1, .. }), "{err}");
    }
}
