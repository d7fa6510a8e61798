//! Reading requests and writing responses: size limits, JSON fields, the error envelope.
//!
//! JSON bodies are parsed into a `serde_json::Value` and fields are taken out one by one,
//! rather than deserialised into structs, so that every error message is ours: serde's
//! messages can quote the offending value, and a value may be a secret code. A key given
//! twice in any object of a body is refused: a plain `Value` would keep the last one, while
//! a proxy or firewall in front may have judged the first.

use bytes::Bytes;
use futures_util::{Stream, TryStreamExt};
use http::header::{
    ALLOW, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Frame;
use hyper::body::Incoming;
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::error::Category;
use serde_json::{Map, Number, Value};

use crate::error::Error;

/// What handlers answer with.
pub type Reply = Response<ReplyBody>;

/// A response body: whole, or streamed ([`stream`]). A streamed body that fails part way
/// ends the connection, so the client sees a cut answer rather than one that looks whole.
pub type ReplyBody = UnsyncBoxBody<Bytes, BodyError>;

/// Why a streamed body stopped part way.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

fn whole(bytes: Bytes) -> ReplyBody {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A response whose body is written as `chunks` come (chunked transfer encoding), for
/// answers too large to build in memory.
pub fn stream(
    status: StatusCode,
    content_type: &'static str,
    chunks: impl Stream<Item = Result<Bytes, BodyError>> + Send + 'static,
) -> Reply {
    let mut response = Response::new(StreamBody::new(chunks.map_ok(Frame::data)).boxed_unsync());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A JSON response.
pub fn json(status: StatusCode, body: &Value) -> Reply {
    let mut response = Response::new(whole(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// A plain-text response (for `/metrics`).
pub fn text(body: String, content_type: &'static str) -> Reply {
    let mut response = Response::new(whole(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The error envelope, with `Retry-After` where the error has one. A body over the limit
/// is left unread, so its connection cannot serve another request: `Connection: close` says
/// so, and the connection ends with a lingering close ([`super::conn::LingeringStream`]) so
/// that a client still sending reads this answer instead of a reset.
pub fn error(e: &Error) -> Reply {
    let mut response = json(e.status(), &e.envelope());
    if let Error::PayloadTooLarge { .. } = e {
        response
            .headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    if let Some(secs) = e.retry_after_secs() {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if let Error::Unauthorized = e {
        // RFC 9110 asks a 401 to name the scheme it wants.
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"kamigate\""),
        );
    }
    if let Error::MethodNotAllowed { allow } = e {
        if let Ok(allow) = HeaderValue::from_str(allow) {
            response.headers_mut().insert(ALLOW, allow);
        }
    }
    response
}

/// Rejects a request whose declared length exceeds `limit` before reading any of it.
pub fn check_declared_length(headers: &http::HeaderMap, limit: u64) -> Result<(), Error> {
    let declared = headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(n) if n > limit => Err(Error::PayloadTooLarge { limit_bytes: limit }),
        _ => Ok(()),
    }
}

/// Reads a whole (small) body, at most `limit` bytes.
pub async fn read_limited(body: Incoming, limit: u64) -> Result<Bytes, Error> {
    let limit_usize = usize::try_from(limit).unwrap_or(usize::MAX);
    match Limited::new(body, limit_usize).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(Error::PayloadTooLarge { limit_bytes: limit })
        }
        Err(_) => Err(Error::BadRequest(
            "the request body could not be read".into(),
        )),
    }
}

/// A JSON object body, with the fields it may contain.
pub struct JsonBody {
    fields: Map<String, Value>,
}

impl JsonBody {
    /// Parses `bytes` as a JSON object whose keys are all in `allowed`. An empty body is an
    /// empty object; a body of only whitespace is not JSON, and refused like any other.
    pub fn parse(bytes: &[u8], allowed: &[&str]) -> Result<JsonBody, Error> {
        if bytes.is_empty() {
            return Ok(JsonBody { fields: Map::new() });
        }
        let StrictValue(value) = serde_json::from_slice(bytes).map_err(|e| {
            // The only data error a `StrictValue` raises is a repeated key; the key itself
            // is not echoed, it may be a code.
            let what = match e.classify() {
                Category::Data => "duplicate key in a JSON object",
                _ => "malformed JSON",
            };
            Error::BadRequest(format!("{what} at line {} column {}", e.line(), e.column()))
        })?;
        JsonBody::from_value(value, allowed)
    }

    /// A JSON value already parsed (an element of a body's array) as an object whose keys
    /// are all in `allowed`.
    pub fn from_value(value: Value, allowed: &[&str]) -> Result<JsonBody, Error> {
        let Value::Object(fields) = value else {
            return Err(Error::BadRequest("the body must be a JSON object".into()));
        };
        if let Some(unknown) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
            // Field names are echoed only if they are short and plain.
            let plain = unknown.len() <= 32
                && unknown
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_');
            return Err(Error::BadRequest(if plain {
                format!("unknown field `{unknown}`; allowed: {}", allowed.join(", "))
            } else {
                format!("unknown field; allowed: {}", allowed.join(", "))
            }));
        }
        Ok(JsonBody { fields })
    }

    /// A required array field: its elements.
    pub fn take_array(&mut self, name: &str) -> Result<Vec<Value>, Error> {
        match self.fields.remove(name) {
            Some(Value::Array(items)) => Ok(items),
            Some(_) => Err(Error::BadRequest(format!(
                "field `{name}` must be an array"
            ))),
            None => Err(Error::BadRequest(format!("field `{name}` is required"))),
        }
    }

    /// The raw object (for bodies handed to serde whole, such as SKU settings).
    pub fn into_value(self) -> Value {
        Value::Object(self.fields)
    }

    /// An optional string field of at most `max` bytes.
    pub fn opt_str(&self, name: &str, max: usize) -> Result<Option<&str>, Error> {
        match self.fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.len() <= max => Ok(Some(s)),
            Some(Value::String(_)) => Err(Error::BadRequest(format!(
                "field `{name}` is longer than {max} bytes"
            ))),
            Some(_) => Err(Error::BadRequest(format!(
                "field `{name}` must be a string"
            ))),
        }
    }

    /// A required string field of at most `max` bytes.
    pub fn str(&self, name: &str, max: usize) -> Result<&str, Error> {
        self.opt_str(name, max)?
            .ok_or_else(|| Error::BadRequest(format!("field `{name}` is required")))
    }

    /// An optional integer field within `range`.
    pub fn opt_u64(
        &self,
        name: &str,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Option<u64>, Error> {
        match self.fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if range.contains(&n) => Ok(Some(n)),
                _ => Err(Error::BadRequest(format!(
                    "field `{name}` must be an integer from {} to {}",
                    range.start(),
                    range.end()
                ))),
            },
        }
    }

    /// An optional boolean field.
    pub fn opt_bool(&self, name: &str) -> Result<Option<bool>, Error> {
        match self.fields.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(Error::BadRequest(format!(
                "field `{name}` must be true or false"
            ))),
        }
    }
}

/// A JSON value read like `serde_json::Value`, except that an object naming a key twice, at
/// any depth, is an error instead of keeping the last value.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<StrictValue, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // JSON text cannot spell NaN or infinity, so this is always a number.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let StrictValue(value) = map.next_value()?;
            if fields.insert(key, value).is_some() {
                return Err(de::Error::custom("duplicate key"));
            }
        }
        Ok(Value::Object(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_body_is_an_empty_object_but_whitespace_is_not_json() {
        let empty = JsonBody::parse(b"", &["reason"]).expect("empty is {}");
        assert!(empty.into_value().as_object().is_some_and(|o| o.is_empty()));
        for body in [&b"\t"[..], b" ", b"\r\n"] {
            let err = JsonBody::parse(body, &["reason"]).err().expect("refused");
            assert!(matches!(err, Error::BadRequest(_)), "{err}");
        }
    }

    #[test]
    fn json_errors_never_quote_values() {
        let secret = "SECRET-CODE-1234";
        let bodies = [
            format!("{{\"code\": \"{secret}\""),
            format!("{{\"code\": 5, \"{secret}\": 1}}"),
            format!("[\"{secret}\"]"),
        ];
        for body in bodies {
            let err = JsonBody::parse(body.as_bytes(), &["code"])
                .err()
                .expect("rejected");
            assert!(!err.to_string().contains(secret), "{err}");
        }
        let body = JsonBody::parse(
            format!("{{\"code\": {{\"x\": \"{secret}\"}}}}").as_bytes(),
            &["code"],
        )
        .expect("parses");
        let err = body.str("code", 10).expect_err("not a string");
        assert!(!err.to_string().contains(secret));
    }

    #[test]
    fn keys_given_twice_are_refused_at_any_depth() {
        let secret = "SECRET-CODE-1234";
        let bodies = [
            r#"{"order_id": "a", "order_id": "b"}"#.to_owned(),
            r#"{"format": {"preset": "default", "preset": "crockford32"}}"#.to_owned(),
            r#"{"list": [{"x": 1, "x": 1}]}"#.to_owned(),
            format!(r#"{{"{secret}": 1, "{secret}": 2}}"#),
        ];
        for body in bodies {
            let err = JsonBody::parse(body.as_bytes(), &["order_id", "format", "list"])
                .err()
                .expect("refused");
            assert_eq!(err.code(), "ERR_BAD_REQUEST");
            let message = err.to_string();
            assert!(message.starts_with("duplicate key"), "{message}");
            assert!(!message.contains(secret), "{message}");
        }
        let parsed = JsonBody::parse(
            br#"{"format": {"a": [1, -2, 1.5, true, null, "s", {"b": {}}]}, "order_id": "o"}"#,
            &["order_id", "format"],
        )
        .expect("distinct keys at every level parse");
        assert_eq!(
            parsed.into_value(),
            serde_json::json!({"format": {"a": [1, -2, 1.5, true, null, "s", {"b": {}}]}, "order_id": "o"})
        );
    }

    #[test]
    fn integers_are_range_checked() {
        let body = JsonBody::parse(
            br#"{"quantity": 0, "n": -1, "f": 1.5}"#,
            &["quantity", "n", "f"],
        )
        .expect("parses");
        assert!(body.opt_u64("quantity", 1..=100).is_err());
        assert!(body.opt_u64("n", 0..=10).is_err());
        assert!(body.opt_u64("f", 0..=10).is_err());
        assert_eq!(
            body.opt_u64("missing", 1..=2).expect("absent is fine"),
            None
        );
    }
}
