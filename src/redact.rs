//! What events show of arguments and results: sensitive keys redacted, long values cut.
//!
//! Only event payloads are rewritten; the value a caller gets back is never altered.

use serde_json::Value;

use crate::json::cut_text;

/// The text that replaces a sensitive value in events.
pub const REDACTED: &str = "[REDACTED]";

/// Key fragments treated as sensitive by default (matched case-insensitively,
/// anywhere in the key, `-` and `_` treated alike).
const DEFAULT_SENSITIVE: &[&str] = &[
    "api_key",
    "apikey",
    "password",
    "passwd",
    "secret",
    "token",
    "authorization",
    "credential",
    "private_key",
    "cookie",
    "session_id",
];

/// How event payloads are redacted and truncated.
///
/// ```
/// use serde_json::json;
/// use tool_dispatch::Redaction;
/// let r = Redaction::default().max_string_len(8);
/// let mut v = json!({"city": "Paris", "api_key": "sk-123", "note": "a long sentence"});
/// r.apply(&mut v, &[]);
/// assert_eq!(v["api_key"], "[REDACTED]");
/// assert_eq!(v["city"], "Paris");
/// assert!(v["note"].as_str().unwrap().starts_with("a long s…"));
/// ```
#[derive(Debug, Clone)]
pub struct Redaction {
    sensitive: Vec<String>,
    /// Length of the shortest fragment in `sensitive`.
    shortest: usize,
    max_string_len: usize,
    max_array_len: usize,
    max_depth: usize,
}

impl Default for Redaction {
    fn default() -> Self {
        Redaction {
            shortest: DEFAULT_SENSITIVE.iter().map(|s| s.len()).min().unwrap_or(0),
            sensitive: DEFAULT_SENSITIVE.iter().map(|s| s.to_string()).collect(),
            max_string_len: 1024,
            max_array_len: 100,
            max_depth: 16,
        }
    }
}

fn fold(b: u8) -> u8 {
    match b.to_ascii_lowercase() {
        b'-' => b'_',
        b => b,
    }
}

/// Lower-case with `-` read as `_`: the form keys are compared in.
pub(crate) fn normalize(key: &str) -> String {
    key.bytes().map(|b| char::from(fold(b))).collect()
}

fn contains_folded(hay: &str, needle: &str) -> bool {
    let (h, n) = (hay.as_bytes(), needle.as_bytes());
    n.len() <= h.len()
        && h.windows(n.len())
            .any(|w| w.iter().zip(n).all(|(a, b)| fold(*a) == *b))
}

fn eq_folded(key: &str, normalized: &str) -> bool {
    key.len() == normalized.len()
        && key
            .bytes()
            .zip(normalized.bytes())
            .all(|(a, b)| fold(a) == b)
}

impl Redaction {
    /// Adds a sensitive key fragment for every tool.
    pub fn sensitive(mut self, key: &str) -> Self {
        let key = normalize(key);
        self.shortest = self.shortest.min(key.len());
        self.sensitive.push(key);
        self
    }

    /// Strings longer than this many characters are cut in events (default 1024);
    /// so are error and progress messages.
    pub fn max_string_len(mut self, n: usize) -> Self {
        self.max_string_len = n;
        self
    }

    /// Arrays longer than this are cut in events (default 100).
    pub fn max_array_len(mut self, n: usize) -> Self {
        self.max_array_len = n;
        self
    }

    /// Values nested deeper than this are replaced by a marker (default 16).
    pub fn max_depth(mut self, n: usize) -> Self {
        self.max_depth = n;
        self
    }

    /// The longest text an event carries, in characters: strings in payloads, and
    /// error and progress messages.
    pub(crate) fn max_text(&self) -> usize {
        self.max_string_len
    }

    /// Whether `key` is sensitive for every tool, or is one of `extra`.
    pub(crate) fn is_sensitive(&self, key: &str, extra: &[String]) -> bool {
        if key.len() < self.shortest && extra.is_empty() {
            return false; // shorter than every fragment: contains none of them
        }
        self.sensitive.iter().any(|s| contains_folded(key, s))
            || extra.iter().any(|s| eq_folded(key, s))
    }

    /// Rewrites `value` in place for an event; `extra` are the tool's own sensitive
    /// argument names (exact match, already lower-case with `_` for `-`).
    pub fn apply(&self, value: &mut Value, extra: &[String]) {
        self.walk(value, extra, 0);
    }

    fn walk(&self, value: &mut Value, extra: &[String], depth: usize) {
        if depth >= self.max_depth && matches!(value, Value::Object(_) | Value::Array(_)) {
            // The cut-off part may be deeper than a recursive drop can go.
            let rest = std::mem::replace(value, Value::from("[TRUNCATED: nested too deep]"));
            crate::json::drop_deep(rest);
            return;
        }
        match value {
            Value::String(s) => cut_text(s, self.max_string_len),
            Value::Array(items) => {
                let len = items.len();
                for rest in items.drain(self.max_array_len.min(len)..) {
                    crate::json::drop_deep(rest);
                }
                for v in items.iter_mut() {
                    self.walk(v, extra, depth + 1);
                }
                if len > self.max_array_len {
                    items.push(Value::from(format!(
                        "[TRUNCATED: {} more items]",
                        len - self.max_array_len
                    )));
                }
            }
            Value::Object(map) => {
                for (k, v) in map.iter_mut() {
                    if self.is_sensitive(k, extra) {
                        crate::json::drop_deep(std::mem::replace(v, Value::from(REDACTED)));
                    } else {
                        self.walk(v, extra, depth + 1);
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn redacts_nested_and_tool_specific_keys() {
        let r = Redaction::default();
        assert!(!r.is_sensitive("city", &[]));
        let mut v =
            json!({"a": {"Api-Key": "x", "list": [{"password": 1}]}, "pin": "1234", "ok": 1});
        r.apply(&mut v, &[normalize("PIN")]);
        assert_eq!(
            v,
            json!({"a": {"Api-Key": REDACTED, "list": [{"password": REDACTED}]}, "pin": REDACTED, "ok": 1})
        );
    }

    #[test]
    fn truncates_on_char_boundaries_and_bounds_arrays_and_depth() {
        let r = Redaction::default()
            .max_string_len(3)
            .max_array_len(2)
            .max_depth(3);
        let mut v = json!({"s": "ééééé", "a": [1, 2, 3, 4], "d": {"d": {"d": {"d": 1}}}});
        r.apply(&mut v, &[]);
        assert_eq!(v["s"], "ééé…[truncated 4 bytes]");
        assert_eq!(v["a"], json!([1, 2, "[TRUNCATED: 2 more items]"]));
        assert_eq!(v["d"]["d"]["d"], "[TRUNCATED: nested too deep]");
    }
}
