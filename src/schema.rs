//! A small JSON Schema check for tools whose schema is data (a remote MCP server's),
//! not a Rust type: `type` (one or several), `required`, `properties`,
//! `additionalProperties: false`, `items` and `enum`, at every depth. Anything else
//! in the schema is not checked here; the tool itself still is the judge.
//!
//! Messages name the place and the kinds, never the offending value.

use serde_json::{Map, Value};

/// Where arguments break their schema, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Violation {
    /// `city`, `stops[2].name`, or `.` for the whole value.
    pub(crate) path: String,
    /// The object keys on the way.
    pub(crate) keys: Vec<String>,
    pub(crate) message: String,
}

/// The kind of a JSON value, as serde names it (so the messages read like the typed
/// tools' messages).
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "floating point",
        Value::String(_) => "string",
        Value::Array(_) => "sequence",
        Value::Object(_) => "map",
    }
}

fn fits(v: &Value, ty: &str) -> bool {
    match ty {
        "null" => v.is_null(),
        "boolean" => v.is_boolean(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "number" => v.is_number(),
        "string" => v.is_string(),
        "array" => v.is_array(),
        "object" => v.is_object(),
        _ => true, // a type this check does not know: not ours to refuse
    }
}

/// Checks `value` against `schema`.
pub(crate) fn check(schema: &Value, value: &Value) -> Result<(), Violation> {
    let mut keys = Vec::new();
    let mut path = String::new();
    walk(schema, value, &mut path, &mut keys)
}

fn violation(path: &str, keys: &[String], message: String) -> Violation {
    Violation {
        path: if path.is_empty() {
            ".".into()
        } else {
            path.to_owned()
        },
        keys: keys.to_vec(),
        message,
    }
}

fn walk(
    schema: &Value,
    value: &Value,
    path: &mut String,
    keys: &mut Vec<String>,
) -> Result<(), Violation> {
    let Some(schema) = schema.as_object() else {
        return Ok(()); // `true`, `{}`-like or not a schema: anything goes
    };
    if let Some(ty) = schema.get("type") {
        let allowed: Vec<&str> = match ty {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if !allowed.is_empty() && !allowed.iter().any(|t| fits(value, t)) {
            let expected = allowed.join(" or ");
            return Err(violation(
                path,
                keys,
                format!("invalid type: {}, expected {expected}", kind(value)),
            ));
        }
    }
    if let Some(Value::Array(options)) = schema.get("enum")
        && !options.contains(value)
    {
        return Err(violation(
            path,
            keys,
            "invalid value, expected one of the schema's values".to_owned(),
        ));
    }
    match value {
        Value::Object(fields) => object(schema, fields, path, keys),
        Value::Array(items) => {
            let Some(item_schema) = schema.get("items") else {
                return Ok(());
            };
            let len = path.len();
            for (i, item) in items.iter().enumerate() {
                path.push_str(&format!("[{i}]"));
                walk(item_schema, item, path, keys)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn object(
    schema: &Map<String, Value>,
    fields: &Map<String, Value>,
    path: &mut String,
    keys: &mut Vec<String>,
) -> Result<(), Violation> {
    if let Some(Value::Array(required)) = schema.get("required") {
        for name in required.iter().filter_map(Value::as_str) {
            if !fields.contains_key(name) {
                return Err(violation(
                    path,
                    keys,
                    format!("missing field `{}`", crate::json::cut(name, 64)),
                ));
            }
        }
    }
    let properties = schema.get("properties").and_then(Value::as_object);
    let closed = schema.get("additionalProperties") == Some(&Value::Bool(false));
    for (name, field) in fields {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(name);
        keys.push(name.clone());
        let result = match properties.and_then(|p| p.get(name)) {
            Some(s) => walk(s, field, path, keys),
            None if closed => Err(violation(
                path,
                keys,
                format!("unknown field `{}`", crate::json::cut(name, 64)),
            )),
            None => Ok(()),
        };
        keys.pop();
        path.truncate(len);
        result?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn required_types_nesting_items_enums_and_closed_objects() {
        let schema = json!({
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "unit": {"enum": ["c", "f"]},
                "stops": {"type": "array", "items": {
                    "type": "object", "required": ["name"],
                    "properties": {"name": {"type": "string"}}}},
                "note": {"type": ["string", "null"]}
            },
            "required": ["city"],
            "additionalProperties": false
        });
        let ok = json!({"city": "Paris", "days": 3, "unit": "c",
                        "stops": [{"name": "a"}], "note": null});
        assert_eq!(check(&schema, &ok), Ok(()));
        let cases = [
            (json!({}), ".", "missing field `city`"),
            (
                json!({"city": 5}),
                "city",
                "invalid type: integer, expected string",
            ),
            (
                json!({"city": "x", "days": 1.5}),
                "days",
                "invalid type: floating point, expected integer",
            ),
            (
                json!({"city": "x", "unit": "k"}),
                "unit",
                "invalid value, expected one of the schema's values",
            ),
            (
                json!({"city": "x", "stops": [{}, {"name": 1}]}),
                "stops[0]",
                "missing field `name`",
            ),
            (
                json!({"city": "x", "stops": [{"name": "a"}, {"name": 1}]}),
                "stops[1].name",
                "invalid type: integer, expected string",
            ),
            (
                json!({"city": "x", "zz": "secret"}),
                "zz",
                "unknown field `zz`",
            ),
            (json!("Paris"), ".", "invalid type: string, expected object"),
        ];
        for (value, path, message) in cases {
            let v = check(&schema, &value).unwrap_err();
            assert_eq!(
                (v.path.as_str(), v.message.as_str()),
                (path, message),
                "{value}"
            );
            assert!(!v.message.contains("secret"));
        }
        // Not a schema this check reads: nothing is refused.
        assert_eq!(check(&json!(true), &json!({"a": 1})), Ok(()));
        assert_eq!(check(&json!({"type": "frobnicate"}), &json!(1)), Ok(()));
    }
}
