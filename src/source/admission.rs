//! Admission: what a record becomes before it reaches a window. Its size is checked before it
//! is parsed, then it is decoded in its topic's format and checked against the input limits;
//! it becomes an [`Event`] or a [`Rejection`] for the DLQ. The processor admits each record on
//! its polling thread ([`Admission`]); the offline scorer calls [`admit`] directly.

use rdkafka::message::Timestamp;

use super::Admitted;
use crate::config::{Config, LimitsConfig};
use crate::event::{self, limits, Event, Format, RejectReason, Rejection};

/// Admission on the polling thread: each input topic's format and the input limits. Decoding
/// there overlaps the pipeline's windowing of the batch before; the pipeline then only windows
/// the events, or sends the rejected records to the DLQ.
pub struct Admission {
    /// Each input topic with its format: a handful, so a record's is found by a scan.
    inputs: Vec<(Box<str>, Format)>,
    limits: LimitsConfig,
}

impl Admission {
    /// The configured inputs and limits.
    pub fn new(config: &Config) -> Admission {
        let inputs = config.inputs.iter().map(|i| (i.topic.as_str(), i.format));
        Admission::with_inputs(config.limits.clone(), inputs)
    }

    /// Inputs given directly, each topic with its format.
    pub fn with_inputs<'a>(
        limits: LimitsConfig,
        inputs: impl IntoIterator<Item = (&'a str, Format)>,
    ) -> Admission {
        let inputs = inputs.into_iter().map(|(topic, format)| (topic.into(), format)).collect();
        Admission { inputs, limits }
    }

    /// [`admit`] with the topic's format; `None` for a topic that is not an input.
    pub fn admit(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        timestamp: Timestamp,
    ) -> Admitted {
        let &(_, format) = self.inputs.iter().find(|(name, _)| **name == *topic)?;
        Some(admit(&self.limits, format, key, payload, timestamp.to_millis()))
    }
}

/// Decodes a record under the input limits ([`event::limits`]): its size before it is parsed,
/// and the nesting of JSON that is not one flat object before serde_json reads it, then the
/// schema and the limits on the event (text, time around the record's broker timestamp). An
/// `event_id` already in the user's window is found by the store. The processor and the
/// offline scorer (whose lines have no key and no broker timestamp) both admit records here.
pub fn admit(
    limits: &LimitsConfig,
    format: Format,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    broker_time_ms: Option<i64>,
) -> Result<Event, Rejection> {
    limits::check_size(limits, key, payload)?;
    let event = match (format, payload) {
        (Format::Json, Some(bytes)) if !bytes.is_empty() => {
            event::json::decode_nested_at_most(bytes, Some(limits.max_json_depth))?
        }
        _ => decode(format, payload)?,
    };
    limits::check_event(limits, event, broker_time_ms)
}

/// Decodes a record's payload. An absent payload (a tombstone) is malformed input.
pub fn decode(format: Format, payload: Option<&[u8]>) -> Result<Event, Rejection> {
    match payload {
        None | Some([]) => Err(Rejection::new(RejectReason::Malformed, "empty record")),
        Some(bytes) => event::decode(format, bytes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLICK: &[u8] = br#"{"user_id":"u1","event_id":"e1","event_time":1511658000000,
        "kind":"click","action":"cart","item_id":"i1","category_id":"c1","price":9.5}"#;

    #[test]
    fn admission_reads_each_input_in_its_format_under_the_limits() {
        let limits = LimitsConfig { max_record_bytes: 1024, ..LimitsConfig::default() };
        let inputs = [("clicks", Format::Json), ("clicks-pb", Format::Protobuf)];
        let admission = Admission::with_inputs(limits, inputs);
        let event = event::decode(Format::Json, CLICK).expect("a click");
        let time = Timestamp::CreateTime(event.event_time_ms);
        let proto = event::encode(Format::Protobuf, &event);
        let admit = |topic, payload: &[u8]| admission.admit(topic, None, Some(payload), time);
        assert_eq!(admit("clicks", CLICK), Some(Ok(event.clone())));
        assert_eq!(admit("clicks-pb", &proto), Some(Ok(event)));
        let reason = |admitted: Admitted| admitted.and_then(Result::err).map(|r| r.reason);
        // Each topic is read in its own format only.
        assert_eq!(reason(admit("clicks", &proto)), Some(RejectReason::Malformed));
        let large = [b" ".repeat(1024), CLICK.to_vec()].concat();
        assert_eq!(reason(admit("clicks", &large)), Some(RejectReason::TooLarge));
        // The event time is checked against the broker's timestamp: two hours ahead of it is
        // more than `limits.max_future` allows.
        let earlier = Timestamp::CreateTime(1_511_658_000_000 - 2 * 3_600_000);
        let admitted = admission.admit("clicks", None, Some(CLICK), earlier);
        assert_eq!(reason(admitted), Some(RejectReason::TimeOutOfRange));
        // A topic that is not an input is left to the pipeline, which skips it.
        assert_eq!(admit("elsewhere", CLICK), None);
    }
}
