//! Bytes to messages and back: the streaming JSON decoder, request validation, the encoder of
//! replies and events, and the codec that frames them. Pure and synchronous.

pub mod codec;
pub mod encode;
pub mod id;
pub mod json;
pub(crate) mod qdict;
pub mod request;

pub use codec::{Message, QmpCodec, ServerCodec};
pub use encode::LineEnding;
pub use id::{Id, canonical_key};
pub use json::{Frame, JsonDecoder, Limits, ParsedValue};
pub use request::{Request, RequestError};
