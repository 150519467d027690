//! Fuzzes `mindstream::event::decode` on the JSON wire form (src/event/json.rs).
//!
//! JSON records come straight off input topics and `mindstream score` files, written by
//! producers mindstream does not control, so the decoder must turn any bytes into an event or a
//! rejection without panicking. Beyond that, an accepted event must validate and survive both
//! encoders, and a rejection's detail must stay bounded and never repeat record content (it is
//! written to the dead-letter queue). The plain reader that takes common records without serde
//! must read exactly what serde_json reads, or leave the record to it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mindstream::event::{decode, Format};
use mindstream_fuzz::{check_accepted, check_json_detail, check_rejection};

fuzz_target!(|data: &[u8]| {
    assert!(mindstream::event::json::plain_reader_agrees(data));
    match decode(Format::Json, data) {
        Ok(event) => check_accepted(&event),
        Err(rejection) => {
            check_rejection(&rejection);
            check_json_detail(data, &rejection);
        }
    }
});
