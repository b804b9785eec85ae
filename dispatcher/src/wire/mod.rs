//! Bytes to messages and back: the streaming JSON decoder, request validation, the encoder of
//! replies and events, and the codec that frames them. Pure and synchronous.

pub mod codec;
pub mod encode;
pub mod json;
pub(crate) mod qdict;
pub mod request;

pub use codec::{Message, QmpCodec, ServerCodec};
pub use encode::LineEnding;
pub use json::{Frame, Id, JsonDecoder, Limits, ParsedValue, canonical_key};
pub use request::{Request, RequestError};
