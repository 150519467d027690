//! mindstream: shopping-psychology signals from e-commerce events.
//!
//! The modules in the order the data flows through the processor:
//!
//! - [`source`]: the consumer group over the input topics, the restore of assigned
//!   partitions' state from the changelog, and decoding;
//! - [`event`]: the validated event, its JSON and protobuf forms and the input limits;
//!   [`privacy`]: user keys and the scrubbing of free text;
//! - [`window`]: per-user rolling windows, watermarks and coalescing; [`state`]: a window as a
//!   changelog record;
//! - [`render`] and [`tokenize`]: a window as model text and token ids;
//! - [`model`]: the model card, ONNX Runtime sessions and the batching workers;
//! - [`signals`]: records built from scores, with explanations and interests;
//! - [`actions`]: segment changes and service alerts derived from each record;
//! - [`sink`]: signal records, changelog state and rejected records out, and [`offsets`]: which
//!   input offsets may be committed once they are delivered;
//! - [`pipeline`]: the processor that wires these together.
//!
//! Around them: [`config`] and [`cli`] (start-up), [`allocator`], [`metrics`], [`http`],
//! [`lookup`] and [`console`] (what operators, integrators and marketers read), [`offline`]
//! (the same path over a file), [`ops`] (topics, replay, summary), [`import`] (public data
//! sets into events), [`train`] (`mindstream-train`), [`proto`] (generated types) and
//! [`time`].

pub mod actions;
pub mod allocator;
pub mod cli;
pub mod config;
pub mod console;
pub mod event;
pub mod http;
pub mod import;
pub mod lookup;
pub mod metrics;
pub mod model;
pub mod offline;
pub mod offsets;
pub mod ops;
pub mod pipeline;
pub mod privacy;
pub mod proto;
pub mod render;
pub mod signals;
pub mod sink;
pub mod source;
pub mod state;
pub mod time;
pub mod tokenize;
pub mod train;
pub mod window;
