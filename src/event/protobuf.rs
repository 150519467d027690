//! The protobuf form of [`Event`] (`mindstream.events.v1.Event` in `proto/events.proto`).

use prost::Message;

use super::{Action, Click, Event, EventBody, RejectReason, Rejection, Review, Search};
use crate::proto::events as pb;

/// Decodes and validates one protobuf record.
pub fn decode(bytes: &[u8]) -> Result<Event, Rejection> {
    let wire = pb::Event::decode(bytes)
        .map_err(|e| Rejection::new(RejectReason::Malformed, format!("protobuf: {e}")))?;
    let body = match wire.body {
        None => return Err(Rejection::missing("body")),
        Some(pb::event::Body::Click(c)) => EventBody::Click(Click {
            action: action_from_wire(c.action)?,
            item_id: c.item_id.into(),
            category_id: c.category_id.into(),
            price: c.price,
            discount: c.discount,
            quantity: c.quantity,
        }),
        Some(pb::event::Body::Search(s)) => EventBody::Search(Search {
            query: s.query,
            sort: s.sort,
            category_id: s.category_id.into(),
        }),
        Some(pb::event::Body::Review(r)) => EventBody::Review(Review {
            item_id: r.item_id.into(),
            rating: match r.rating {
                None => None,
                Some(r) => Some(
                    u8::try_from(r).map_err(|_| Rejection::invalid("rating", "must be 1..=5"))?,
                ),
            },
            text: r.text,
            language: r.language,
        }),
        Some(pb::event::Body::DeleteUser(pb::DeleteUser {})) => EventBody::DeleteUser,
    };
    if wire.event_time_ms == 0 {
        return Err(Rejection::missing("event_time_ms"));
    }
    let event = Event {
        user_id: wire.user_id.into(),
        event_id: wire.event_id.into(),
        event_time_ms: wire.event_time_ms,
        opt_out: wire.opt_out,
        body,
    };
    event.validate()?;
    Ok(event)
}

fn action_from_wire(value: i32) -> Result<Action, Rejection> {
    match pb::Action::try_from(value) {
        Ok(pb::Action::Unspecified) => Err(Rejection::missing("action")),
        Ok(pb::Action::View) => Ok(Action::View),
        Ok(pb::Action::Cart) => Ok(Action::Cart),
        Ok(pb::Action::Fav) => Ok(Action::Fav),
        Ok(pb::Action::Buy) => Ok(Action::Buy),
        Ok(pb::Action::RemoveCart) => Ok(Action::RemoveCart),
        Err(_) => Err(Rejection::invalid("action", "is not a known Action value")),
    }
}

fn action_to_wire(action: Action) -> pb::Action {
    match action {
        Action::View => pb::Action::View,
        Action::Cart => pb::Action::Cart,
        Action::Fav => pb::Action::Fav,
        Action::Buy => pb::Action::Buy,
        Action::RemoveCart => pb::Action::RemoveCart,
    }
}

/// Encodes one event as a protobuf message.
pub fn encode(event: &Event) -> Vec<u8> {
    let body = match &event.body {
        EventBody::Click(c) => pb::event::Body::Click(pb::Click {
            action: action_to_wire(c.action) as i32,
            item_id: c.item_id.to_string(),
            category_id: c.category_id.to_string(),
            price: c.price,
            discount: c.discount,
            quantity: c.quantity,
        }),
        EventBody::Search(s) => pb::event::Body::Search(pb::Search {
            query: s.query.clone(),
            sort: s.sort.clone(),
            category_id: s.category_id.to_string(),
        }),
        EventBody::Review(r) => pb::event::Body::Review(pb::Review {
            item_id: r.item_id.to_string(),
            rating: r.rating.map(u32::from),
            text: r.text.clone(),
            language: r.language.clone(),
        }),
        EventBody::DeleteUser => pb::event::Body::DeleteUser(pb::DeleteUser {}),
    };
    pb::Event {
        user_id: event.user_id.to_string(),
        event_id: event.event_id.to_string(),
        event_time_ms: event.event_time_ms,
        opt_out: event.opt_out,
        body: Some(body),
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review() -> Event {
        Event {
            user_id: "u1".into(),
            event_id: "e7".into(),
            event_time_ms: 1_600_000_000_000,
            opt_out: false,
            body: EventBody::Review(Review {
                item_id: "i1".into(),
                rating: Some(1),
                text: "坏了".into(),
                language: "zh".into(),
            }),
        }
    }

    #[test]
    fn roundtrip() {
        let event = review();
        assert_eq!(decode(&encode(&event)).unwrap(), event);
    }

    #[test]
    fn truncated_and_garbage_are_malformed() {
        let bytes = encode(&review());
        let err = decode(&bytes[..bytes.len() - 3]).unwrap_err();
        assert_eq!(err.reason, RejectReason::Malformed);
        let err = decode(b"\xff\xff\xff\xff").unwrap_err();
        assert_eq!(err.reason, RejectReason::Malformed);
    }

    #[test]
    fn missing_body_and_time() {
        let mut wire =
            pb::Event { user_id: "u".into(), event_id: "e".into(), ..Default::default() };
        assert_eq!(decode(&wire.encode_to_vec()).unwrap_err().detail, "missing field `body`");
        wire.body =
            Some(pb::event::Body::Search(pb::Search { query: "q".into(), ..Default::default() }));
        let err = decode(&wire.encode_to_vec()).unwrap_err();
        assert_eq!(err.reason, RejectReason::MissingField);
        assert!(err.detail.contains("event_time_ms"));
    }

    #[test]
    fn unknown_action_value_is_invalid() {
        let wire = pb::Event {
            user_id: "u".into(),
            event_id: "e".into(),
            event_time_ms: 9,
            opt_out: false,
            body: Some(pb::event::Body::Click(pb::Click {
                action: 42,
                item_id: "i".into(),
                ..Default::default()
            })),
        };
        assert_eq!(decode(&wire.encode_to_vec()).unwrap_err().reason, RejectReason::InvalidField);
    }
}
