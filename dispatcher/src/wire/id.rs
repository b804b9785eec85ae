//! TEMPORARY stand-in for the parser's `Id` (branch wt/lexer replaces this file).

use std::ops::Deref;

use serde_json::Value;
use serde_json::value::RawValue;

/// A request id: its echo text and its canonical key.
#[derive(Debug)]
pub struct Id {
    text: Box<RawValue>,
    key: Option<Box<str>>,
}

impl Id {
    /// Wraps echo text, computing the key the old way.
    pub fn from_text(text: Box<RawValue>) -> Id {
        let key = serde_json::from_str::<Value>(text.get())
            .map(|v| canonical_key(&v))
            .unwrap_or_else(|_| text.get().to_string());
        let key = (key != text.get()).then(|| key.into_boxed_str());
        Id { text, key }
    }

    /// The echo text.
    pub fn text(&self) -> &RawValue {
        &self.text
    }

    /// The canonical key.
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or(self.text.get())
    }

    /// Bytes retained.
    pub fn heap_size(&self) -> usize {
        self.text.get().len() + self.key.as_ref().map_or(0, |k| k.len())
    }
}

impl Deref for Id {
    type Target = RawValue;
    fn deref(&self) -> &RawValue {
        &self.text
    }
}

/// Canonical key of a value.
pub fn canonical_key(value: &Value) -> String {
    value.to_string()
}
