//! The JSON text of each output message, without its line ending (the codec adds that).
//!
//! Replies are assembled from pieces that are already JSON (the handler's serialized return
//! value and the request's raw `id`), so a reply costs one copy and no re-serialization.

use bytes::{BufMut, BytesMut};
use serde::Serialize;

use crate::error::QmpError;

/// How each output message ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LineEnding {
    /// `"\r\n"`, as QEMU's monitor writes it (libvirt splits on it).
    #[default]
    CrLf,
    /// `"\n"`, as the QEMU guest agent writes it.
    Lf,
}

impl LineEnding {
    /// The bytes that end a message.
    pub fn as_bytes(self) -> &'static [u8] {
        match self {
            LineEnding::CrLf => b"\r\n",
            LineEnding::Lf => b"\n",
        }
    }
}

/// Appends `{"return": VALUE, "id": ID}`; `value` and `id` are JSON text.
pub fn success(out: &mut BytesMut, value: &[u8], id: Option<&str>) {
    out.put_slice(b"{\"return\": ");
    out.put_slice(value);
    if let Some(id) = id {
        out.put_slice(b", \"id\": ");
        out.put_slice(id.as_bytes());
    }
    out.put_slice(b"}");
}

/// Appends `{"id": ID, "error": {"class": C, "desc": D}}`; `id` is JSON text.
pub fn error(out: &mut BytesMut, err: &QmpError, id: Option<&str>) {
    out.put_slice(b"{");
    if let Some(id) = id {
        out.put_slice(b"\"id\": ");
        out.put_slice(id.as_bytes());
        out.put_slice(b", ");
    }
    out.put_slice(b"\"error\": {\"class\": \"");
    out.put_slice(err.class.as_str().as_bytes());
    out.put_slice(b"\", \"desc\": ");
    put_json(out, err.desc.as_str());
    out.put_slice(b"}}");
}

/// Appends `{"timestamp": {...}, "event": NAME, "data": DATA}` (no `data` when `None`).
pub fn event(
    out: &mut BytesMut,
    name: &str,
    data: Option<&serde_json::Value>,
    timestamp: std::time::SystemTime,
) {
    let since_epoch = timestamp
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    out.put_slice(b"{\"timestamp\": {\"seconds\": ");
    out.put_slice(since_epoch.as_secs().to_string().as_bytes());
    out.put_slice(b", \"microseconds\": ");
    out.put_slice(since_epoch.subsec_micros().to_string().as_bytes());
    out.put_slice(b"}, \"event\": ");
    put_json(out, name);
    if let Some(data) = data {
        out.put_slice(b", \"data\": ");
        put_json(out, data);
    }
    out.put_slice(b"}");
}

/// Serializes `value` compactly into `out`. Serializing a `Value`, a string or a derived
/// `Serialize` type cannot fail; a hand-written impl that fails yields `null`.
pub(crate) fn put_json<T: Serialize + ?Sized>(out: &mut BytesMut, value: &T) {
    let mark = out.len();
    if serde_json::to_writer(out.writer(), value).is_err() {
        out.truncate(mark);
        out.put_slice(b"null");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorClass;

    #[test]
    fn success_echoes_the_raw_id() {
        let mut out = BytesMut::new();
        success(&mut out, b"{}", Some("{\"b\":1,\"a\":1.0}"));
        assert_eq!(&out[..], b"{\"return\": {}, \"id\": {\"b\":1,\"a\":1.0}}");
    }

    #[test]
    fn error_without_id_and_with_escaping() {
        let mut out = BytesMut::new();
        let err = QmpError::new(ErrorClass::CommandNotFound, "quote \" and \u{1}");
        error(&mut out, &err, None);
        assert_eq!(
            &out[..],
            b"{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"quote \\\" and \\u0001\"}}"
        );
    }

    #[test]
    fn event_has_qemu_timestamp_shape() {
        let mut out = BytesMut::new();
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_micros(1_500_000_123);
        event(&mut out, "STOP", None, t);
        assert_eq!(
            &out[..],
            b"{\"timestamp\": {\"seconds\": 1500, \"microseconds\": 123}, \"event\": \"STOP\"}"
        );
    }
}
