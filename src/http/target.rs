//! The request target as handlers read it: path parameters and query values, percent-decoded.
//!
//! Routes are matched on the raw path, so an escaped `/` (`%2F`) stays inside its segment
//! and never makes another route; each captured segment is then decoded once. Query values
//! are decoded the same way (RFC 3986: a `+` is a `+`, not a space). A decoded value goes
//! through the same checks as one sent unescaped (`check_id`, `check_sku`, …), so an escape
//! cannot smuggle in a character the raw form would be refused for. Bytes that are not UTF-8
//! once decoded are `ERR_BAD_REQUEST`; a `%` not followed by two hex digits is kept as a
//! literal `%`, which no identifier accepts.

use std::borrow::Cow;

use percent_encoding::percent_decode_str;

use crate::error::Error;

/// Path parameters of a matched route, decoded and owned so handlers can hold them across
/// awaits.
#[derive(Debug, Default)]
pub struct Params(Vec<(String, String)>);

impl Params {
    /// The decoded parameters of a matched route; [`Error::BadRequest`] when one is not
    /// UTF-8 once decoded.
    pub fn decode(params: &matchit::Params<'_, '_>) -> Result<Params, Error> {
        params
            .iter()
            .map(|(name, raw)| {
                let value = decode(raw).ok_or_else(|| {
                    Error::BadRequest(format!(
                        "path parameter `{name}` is not UTF-8 once percent-decoded"
                    ))
                })?;
                Ok((name.to_owned(), value.into_owned()))
            })
            .collect::<Result<_, _>>()
            .map(Params)
    }

    /// A parameter, when the route pattern has it.
    pub fn try_get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// A parameter the route pattern guarantees.
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_default()
    }
}

/// The first value of `name` in a query string, decoded; `None` when it is not there.
/// Names are compared decoded too (`batch%5Fid` is `batch_id`). [`Error::BadRequest`] when
/// the value is not UTF-8 once decoded.
pub fn query_param(query: Option<&str>, name: &str) -> Result<Option<String>, Error> {
    let Some(query) = query else {
        return Ok(None);
    };
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if decode(key).as_deref() != Some(name) {
            continue;
        }
        return match decode(value) {
            Some(value) => Ok(Some(value.into_owned())),
            None => Err(Error::BadRequest(format!(
                "query parameter `{name}` is not UTF-8 once percent-decoded"
            ))),
        };
    }
    Ok(None)
}

/// `raw` with its `%XX` escapes decoded, once; `None` if the result is not UTF-8 (which
/// also refuses overlong encodings and surrogates).
fn decode(raw: &str) -> Option<Cow<'_, str>> {
    percent_decode_str(raw).decode_utf8().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded_once_and_must_be_utf8() {
        let param = |q, name| query_param(q, name).map_err(|e| e.code());
        let q = Some("a=1&batch%5Fid=x%3Ay&batch_id=second&plus=a+b&bad=%FF&lit=50%zz");
        assert_eq!(
            param(q, "batch_id"),
            Ok(Some("x:y".into())),
            "the first one"
        );
        assert_eq!(param(q, "plus"), Ok(Some("a+b".into())), "a plus is a plus");
        assert_eq!(param(q, "lit"), Ok(Some("50%zz".into())), "not an escape");
        assert_eq!(param(q, "bad"), Err("ERR_BAD_REQUEST"));
        assert_eq!(param(q, "missing"), Ok(None));
        assert_eq!(param(Some("flag"), "flag"), Ok(Some(String::new())));
        assert_eq!(param(None, "flag"), Ok(None));
        assert_eq!(
            param(Some("x=%252F"), "x"),
            Ok(Some("%2F".into())),
            "decoded once, never twice"
        );
    }

    #[test]
    fn path_parameters_are_decoded_per_segment() {
        let mut router = matchit::Router::new();
        router.insert("/v1/{sku}/{id}", ()).expect("a route");
        let params = |path| {
            let found = router.at(path).expect("matched");
            Params::decode(&found.params).map_err(|e| e.code())
        };
        let decoded = params("/v1/s%31/a%3Ab%2Fc").expect("decoded");
        assert_eq!((decoded.get("sku"), decoded.get("id")), ("s1", "a:b/c"));
        assert_eq!(params("/v1/s/%C0%AF").map(|_| ()), Err("ERR_BAD_REQUEST"));
        assert_eq!(
            params("/v1/s/%ED%A0%80").map(|_| ()),
            Err("ERR_BAD_REQUEST")
        );
    }
}
