//! Bytes to messages and back.
pub mod json;
