//! Fuzzes `mindstream::event::decode` on the protobuf wire form (src/event/protobuf.rs,
//! `mindstream.events.v1.Event` in proto/events.proto).
//!
//! Protobuf records come off input topics from producers mindstream does not control; prost
//! parses them and the decoder maps and validates the result, so any bytes must give an event
//! or a rejection without panicking. An accepted event must validate and survive both encoders
//! (the JSON one too: replays and imports move events between the forms), and a rejection's
//! detail must stay bounded (it is written to the dead-letter queue).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mindstream::event::{decode, Format};
use mindstream_fuzz::{check_accepted, check_rejection};

fuzz_target!(|data: &[u8]| {
    match decode(Format::Protobuf, data) {
        Ok(event) => check_accepted(&event),
        Err(rejection) => check_rejection(&rejection),
    }
});
