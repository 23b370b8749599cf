//! What events show of arguments and results: sensitive keys redacted, long values cut,
//! and the whole event kept within a size bound.
//!
//! Only event payloads are rewritten; the value a caller gets back is never altered.
//! Every cut leaves a marker that says what was cut.

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
    max_event_bytes: usize,
}

/// Default bound on an event's encoded size.
pub(crate) const DEFAULT_MAX_EVENT_BYTES: usize = 64 * 1024;
/// Room a payload always keeps, whatever the rest of its event takes: enough for a
/// marker at each of a few levels.
const MIN_PAYLOAD_BYTES: usize = 256;
/// The most a container's marker takes, encoded (reserved when the container is
/// entered, so a cut anywhere below still leaves room for it).
const MARKER_BYTES: usize = 112;
/// What a container that does not fit at all becomes.
const CUT: &str = "[TRUNCATED]";

impl Default for Redaction {
    fn default() -> Self {
        Redaction {
            shortest: DEFAULT_SENSITIVE.iter().map(|s| s.len()).min().unwrap_or(0),
            sensitive: DEFAULT_SENSITIVE.iter().map(|s| s.to_string()).collect(),
            max_string_len: 1024,
            max_array_len: 100,
            max_depth: 16,
            max_event_bytes: DEFAULT_MAX_EVENT_BYTES,
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

    /// Values nested deeper than this are replaced by a marker (default 16, at most
    /// 1024).
    pub fn max_depth(mut self, n: usize) -> Self {
        self.max_depth = n.min(crate::json::MAX_DEPTH_LIMIT);
        self
    }

    /// The largest an event may be once encoded as JSON, in bytes (default 64 KiB,
    /// at least 1 KiB). Per-field cuts (strings, arrays, depth) are not enough on
    /// their own: 20,000 keys of a kilobyte each pass every one of them. So the
    /// arguments, results and approval requests events show are also cut to what
    /// fits beside the event's other fields (ids, error text, timestamps), in
    /// document order: the first members are kept and the rest of each container is
    /// replaced by one marker saying how many were cut.
    pub fn max_event_bytes(mut self, n: usize) -> Self {
        self.max_event_bytes = n.max(1024);
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
    /// argument names (exact match, already lower-case with `_` for `-`). The result
    /// encodes to at most [`max_event_bytes`](Self::max_event_bytes).
    pub fn apply(&self, value: &mut Value, extra: &[String]) {
        self.apply_beside(value, extra, 0);
    }

    /// A text of an event (an error, a message, a reason) cut to the longest string
    /// and to what fits beside `others` bytes of the rest of its event.
    pub(crate) fn fit(&self, text: &str, others: usize) -> String {
        cut_to(text, self.max_string_len, self.room(others))
    }

    /// The bytes a payload or text may take beside `others` bytes of its event.
    pub(crate) fn room(&self, others: usize) -> usize {
        self.max_event_bytes
            .saturating_sub(others)
            .max(MIN_PAYLOAD_BYTES)
    }

    /// [`apply`](Self::apply) for a payload whose event's other fields encode to
    /// `others` bytes: the whole event stays within the bound.
    pub(crate) fn apply_beside(&self, value: &mut Value, extra: &[String], others: usize) {
        let mut budget = self.room(others);
        self.walk(value, extra, 0, &mut budget);
    }

    fn walk(&self, value: &mut Value, extra: &[String], depth: usize, budget: &mut usize) {
        let container = matches!(value, Value::Object(_) | Value::Array(_));
        if container && (depth >= self.max_depth || *budget < 2 + MARKER_BYTES) {
            let marker = match depth >= self.max_depth && *budget >= 32 {
                true => "[TRUNCATED: nested too deep]",
                false => CUT,
            };
            // The cut-off part may be deeper than a recursive drop can go.
            crate::json::drop_deep(std::mem::replace(value, Value::from(marker)));
            spend(budget, marker.len() + 2);
            return;
        }
        match value {
            Value::String(s) => {
                cut_text(s, self.max_string_len);
                let len = encoded_len(s);
                if len > *budget {
                    fit_text(s, *budget);
                }
                spend(budget, encoded_len(s));
            }
            Value::Array(items) => {
                spend(budget, 2 + MARKER_BYTES); // its marker's room, given back if unused
                let len = items.len();
                for rest in items.drain(self.max_array_len.min(len)..) {
                    crate::json::drop_deep(rest);
                }
                let mut kept = 0;
                for v in items.iter_mut() {
                    if *budget < MIN_MEMBER_BYTES {
                        break;
                    }
                    self.walk(v, extra, depth + 1, budget);
                    spend(budget, 1);
                    kept += 1;
                }
                let over_bound = items.len() - kept;
                for rest in items.drain(kept..) {
                    crate::json::drop_deep(rest);
                }
                if over_bound > 0 {
                    items.push(Value::from(format!(
                        "[TRUNCATED: {} more items; events are at most {} bytes]",
                        over_bound + len.saturating_sub(self.max_array_len),
                        self.max_event_bytes
                    )));
                } else if len > self.max_array_len {
                    items.push(Value::from(format!(
                        "[TRUNCATED: {} more items]",
                        len - self.max_array_len
                    )));
                } else {
                    *budget += MARKER_BYTES;
                }
            }
            Value::Object(map) => {
                spend(budget, 2 + MARKER_BYTES); // its marker's room, given back if unused
                let mut cut_from = None;
                for (i, (k, v)) in map.iter_mut().enumerate() {
                    let key = encoded_len(k) + 2;
                    if *budget < key + MIN_MEMBER_BYTES {
                        cut_from = Some(i);
                        break;
                    }
                    spend(budget, key);
                    if self.is_sensitive(k, extra) {
                        crate::json::drop_deep(std::mem::replace(v, Value::from(REDACTED)));
                        spend(budget, REDACTED.len() + 2);
                    } else {
                        self.walk(v, extra, depth + 1, budget);
                    }
                }
                if let Some(i) = cut_from {
                    let rest: Vec<String> = map.keys().skip(i).cloned().collect();
                    let n = rest.len();
                    for k in rest {
                        if let Some(v) = map.remove(&k) {
                            crate::json::drop_deep(v);
                        }
                    }
                    map.insert(
                        CUT.to_owned(),
                        Value::from(format!(
                            "{n} more keys; events are at most {} bytes",
                            self.max_event_bytes
                        )),
                    );
                } else {
                    *budget += MARKER_BYTES;
                }
            }
            Value::Number(n) => spend(budget, number_len(n)),
            Value::Bool(_) | Value::Null => spend(budget, 5),
        }
    }
}

/// The least room a further member of a container needs; below it the rest of the
/// container is cut.
const MIN_MEMBER_BYTES: usize = 32;

fn spend(budget: &mut usize, n: usize) {
    *budget = budget.saturating_sub(n);
}

/// The bytes a string takes encoded as a JSON string, quotes included: exact for
/// text without control characters, an upper bound with them (each counted as a
/// six-byte `\uXXXX`). Branch-free, so it runs at memory speed over ids and text.
pub(crate) fn encoded_len(s: &str) -> usize {
    let extra: usize = s
        .bytes()
        .map(|b| usize::from(b < 0x20) * 5 + usize::from(b == b'"' || b == b'\\'))
        .sum();
    2 + s.len() + extra
}

/// An upper bound on the bytes of a number in JSON.
fn number_len(n: &serde_json::Number) -> usize {
    match (n.as_u64(), n.as_i64()) {
        (Some(u), _) => u.checked_ilog10().unwrap_or(0) as usize + 1,
        (None, Some(i)) => i.unsigned_abs().checked_ilog10().unwrap_or(0) as usize + 2,
        _ => 24, // a float: at most 24 bytes as serde_json writes it
    }
}

/// `s` cut to at most `max_chars` characters and `max_bytes` encoded bytes, with a
/// marker when it was cut.
pub(crate) fn cut_to(s: &str, max_chars: usize, max_bytes: usize) -> String {
    let mut out = crate::json::cut(s, max_chars);
    if encoded_len(&out) > max_bytes {
        fit_text(&mut out, max_bytes);
    }
    out
}

/// Cuts `s` so that it encodes to at most `max` bytes, marker included.
fn fit_text(s: &mut String, max: usize) {
    const SUFFIX: usize = 40; // "…[truncated N bytes]" and the quotes
    let mut used = 0;
    let mut chars = 0;
    for c in s.chars() {
        let mut buf = [0u8; 4];
        let w = encoded_len(c.encode_utf8(&mut buf)) - 2;
        if used + w + SUFFIX > max {
            break;
        }
        used += w;
        chars += 1;
    }
    cut_text(s, chars);
    if encoded_len(s) > max {
        s.clear(); // not even the marker fits
        s.push_str("[TRUNCATED]");
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
