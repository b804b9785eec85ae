//! Bytes to messages and back: the streaming JSON decoder, request validation and the
//! encoder of replies, events and the greeting. Pure and synchronous.

pub mod encode;
pub mod json;
pub(crate) mod qdict;
pub mod request;

pub use encode::LineEnding;
pub use json::{Frame, JsonDecoder, Limits, ParsedValue};
pub use request::{Request, RequestError};
