//! Bounded work over JSON that came from outside: a depth check that recurses at most
//! `limit` levels, a teardown that never recurses, serialization that stops at a
//! depth instead of overflowing the stack, and text cut to a bound.
//!
//! `serde_json` parses text with a recursion limit of 128, but a `Value` built in
//! memory, or a type whose `Serialize` recurses, has none: cloning, serializing or
//! even dropping a value nested 100,000 deep overflows the stack. Everything the
//! library does with caller data goes through these first.

use serde::ser::{self, Serialize, Serializer};
use serde_json::Value;

/// Deepest nesting accepted in arguments, typed inputs and results unless the engine
/// says otherwise (the limit `serde_json` applies to text).
pub(crate) const DEFAULT_MAX_DEPTH: usize = 128;

/// Highest depth limit an engine may set: the check below recurses once per level.
pub(crate) const MAX_DEPTH_LIMIT: usize = 1024;

/// Whether `v` nests arrays and objects more than `limit` levels deep (a scalar is
/// depth 0, `[1]` depth 1). Recurses at most `limit + 1` times, whatever `v` is.
pub(crate) fn exceeds_depth(v: &Value, limit: usize) -> bool {
    match v {
        Value::Array(items) => limit == 0 || items.iter().any(|x| exceeds_depth(x, limit - 1)),
        Value::Object(map) => limit == 0 || map.values().any(|x| exceeds_depth(x, limit - 1)),
        _ => false,
    }
}

/// Drops `v` without recursion (serde_json's own drop recurses once per level).
pub(crate) fn drop_deep(v: Value) {
    let mut stack = vec![v];
    while let Some(mut v) = stack.pop() {
        match &mut v {
            Value::Array(items) => stack.append(items),
            Value::Object(map) => stack.extend(std::mem::take(map).into_iter().map(|(_, v)| v)),
            _ => {}
        }
    }
}

/// Drops `v`; when it is a `serde_json::Value`, without recursion. For values of a
/// caller's or a tool's type that the library refuses (a typed input, a result that
/// could not be serialized), which may be nested arbitrarily deep.
pub(crate) fn drop_any<T: 'static>(v: T) {
    let mut slot = Some(v);
    if let Some(v) = (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<Value>>()
        && let Some(v) = v.take()
    {
        drop_deep(v);
    }
}

/// A value that cannot be shown as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NotJson(pub(crate) String);

/// `serde_json::to_value`, refusing values nested more than `limit` levels deep
/// before the recursion gets there.
pub(crate) fn to_value<T: Serialize + ?Sized>(v: &T, limit: usize) -> Result<Value, NotJson> {
    Limited {
        value: v,
        left: limit,
    }
    .serialize(serde_json::value::Serializer)
    .map_err(|e| NotJson(e.to_string()))
}

/// `s` cut to at most `max` characters, with a note of how much was dropped.
pub(crate) fn cut_text(s: &mut String, max: usize) {
    if s.len() <= max {
        return; // the byte length bounds the character count
    }
    if let Some((at, _)) = s.char_indices().nth(max) {
        let dropped = s.len() - at;
        s.truncate(at);
        s.push_str(&format!("…[truncated {dropped} bytes]"));
    }
}

/// [`cut_text`] of a borrowed string: copies at most `max` characters.
pub(crate) fn cut(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) if s.len() > max => {
            format!("{}…[truncated {} bytes]", &s[..at], s.len() - at)
        }
        _ => s.to_owned(),
    }
}

// ---------------------------------------------------------------------------------
// A serializer that counts depth: every compound value and every `Some` or newtype
// costs one level, so the recursion of a caller's `Serialize` impl ends at the limit.
// ---------------------------------------------------------------------------------

struct Limited<'a, T: ?Sized> {
    value: &'a T,
    left: usize,
}

impl<T: Serialize + ?Sized> Serialize for Limited<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(Depth {
            inner: s,
            left: self.left,
        })
    }
}

struct Depth<S> {
    inner: S,
    left: usize,
}

impl<S> Depth<S> {
    fn deeper<E: ser::Error>(&self) -> Result<usize, E> {
        self.left
            .checked_sub(1)
            .ok_or_else(|| E::custom("the value is nested too deep"))
    }
}

fn wrap<T: ?Sized>(value: &T, left: usize) -> Limited<'_, T> {
    Limited { value, left }
}

macro_rules! forward {
    ($($name:ident($($arg:ident: $ty:ty),*);)*) => {
        $(fn $name(self, $($arg: $ty),*) -> Result<S::Ok, S::Error> {
            self.inner.$name($($arg),*)
        })*
    };
}

impl<S: Serializer> Serializer for Depth<S> {
    type Ok = S::Ok;
    type Error = S::Error;
    type SerializeSeq = Depth<S::SerializeSeq>;
    type SerializeTuple = Depth<S::SerializeTuple>;
    type SerializeTupleStruct = Depth<S::SerializeTupleStruct>;
    type SerializeTupleVariant = Depth<S::SerializeTupleVariant>;
    type SerializeMap = Depth<S::SerializeMap>;
    type SerializeStruct = Depth<S::SerializeStruct>;
    type SerializeStructVariant = Depth<S::SerializeStructVariant>;

    forward! {
        serialize_bool(v: bool);
        serialize_i8(v: i8);
        serialize_i16(v: i16);
        serialize_i32(v: i32);
        serialize_i64(v: i64);
        serialize_i128(v: i128);
        serialize_u8(v: u8);
        serialize_u16(v: u16);
        serialize_u32(v: u32);
        serialize_u64(v: u64);
        serialize_u128(v: u128);
        serialize_f32(v: f32);
        serialize_f64(v: f64);
        serialize_char(v: char);
        serialize_str(v: &str);
        serialize_bytes(v: &[u8]);
        serialize_none();
        serialize_unit();
        serialize_unit_struct(name: &'static str);
        serialize_unit_variant(name: &'static str, index: u32, variant: &'static str);
    }

    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> Result<S::Ok, S::Error> {
        let left = self.deeper()?;
        self.inner.serialize_some(&wrap(v, left))
    }

    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        v: &T,
    ) -> Result<S::Ok, S::Error> {
        let left = self.deeper()?;
        self.inner.serialize_newtype_struct(name, &wrap(v, left))
    }

    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        v: &T,
    ) -> Result<S::Ok, S::Error> {
        let left = self.deeper()?;
        self.inner
            .serialize_newtype_variant(name, index, variant, &wrap(v, left))
    }

    fn serialize_seq(self, len: Option<usize>) -> Result<Self::SerializeSeq, S::Error> {
        let left = self.deeper()?;
        Ok(Depth {
            inner: self.inner.serialize_seq(len)?,
            left,
        })
    }

    fn serialize_tuple(self, len: usize) -> Result<Self::SerializeTuple, S::Error> {
        let left = self.deeper()?;
        Ok(Depth {
            inner: self.inner.serialize_tuple(len)?,
            left,
        })
    }

    fn serialize_tuple_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleStruct, S::Error> {
        let left = self.deeper()?;
        Ok(Depth {
            inner: self.inner.serialize_tuple_struct(name, len)?,
            left,
        })
    }

    fn serialize_tuple_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeTupleVariant, S::Error> {
        let left = self.deeper()?;
        Ok(Depth {
            inner: self
                .inner
                .serialize_tuple_variant(name, index, variant, len)?,
            left,
        })
    }

    fn serialize_map(self, len: Option<usize>) -> Result<Self::SerializeMap, S::Error> {
        let left = self.deeper()?;
        Ok(Depth {
            inner: self.inner.serialize_map(len)?,
            left,
        })
    }

    fn serialize_struct(
        self,
        name: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStruct, S::Error> {
        let left = self.deeper()?;
        Ok(Depth {
            inner: self.inner.serialize_struct(name, len)?,
            left,
        })
    }

    fn serialize_struct_variant(
        self,
        name: &'static str,
        index: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Self::SerializeStructVariant, S::Error> {
        let left = self.deeper()?;
        Ok(Depth {
            inner: self
                .inner
                .serialize_struct_variant(name, index, variant, len)?,
            left,
        })
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

macro_rules! compound {
    ($trait:ident, $method:ident) => {
        impl<S: ser::$trait> ser::$trait for Depth<S> {
            type Ok = S::Ok;
            type Error = S::Error;

            fn $method<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), S::Error> {
                self.inner.$method(&wrap(v, self.left))
            }

            fn end(self) -> Result<S::Ok, S::Error> {
                self.inner.end()
            }
        }
    };
}

compound!(SerializeSeq, serialize_element);
compound!(SerializeTuple, serialize_element);
compound!(SerializeTupleStruct, serialize_field);
compound!(SerializeTupleVariant, serialize_field);

impl<S: ser::SerializeMap> ser::SerializeMap for Depth<S> {
    type Ok = S::Ok;
    type Error = S::Error;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> Result<(), S::Error> {
        self.inner.serialize_key(&wrap(k, self.left))
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> Result<(), S::Error> {
        self.inner.serialize_value(&wrap(v, self.left))
    }

    fn end(self) -> Result<S::Ok, S::Error> {
        self.inner.end()
    }
}

macro_rules! fields {
    ($trait:ident) => {
        impl<S: ser::$trait> ser::$trait for Depth<S> {
            type Ok = S::Ok;
            type Error = S::Error;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                key: &'static str,
                v: &T,
            ) -> Result<(), S::Error> {
                self.inner.serialize_field(key, &wrap(v, self.left))
            }

            fn skip_field(&mut self, key: &'static str) -> Result<(), S::Error> {
                self.inner.skip_field(key)
            }

            fn end(self) -> Result<S::Ok, S::Error> {
                self.inner.end()
            }
        }
    };
}

fields!(SerializeStruct);
fields!(SerializeStructVariant);

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nested(depth: usize) -> Value {
        let mut v = Value::Null;
        for _ in 0..depth {
            v = Value::Array(vec![v]);
        }
        v
    }

    #[test]
    fn depth_is_counted_in_levels_of_arrays_and_objects() {
        assert!(!exceeds_depth(&json!(1), 0));
        assert!(exceeds_depth(&json!([1]), 0));
        assert!(!exceeds_depth(&json!({"a": [1]}), 2));
        assert!(exceeds_depth(&json!({"a": [[1]]}), 2));
        let deep = nested(200_000);
        assert!(exceeds_depth(&deep, 128));
        drop_deep(deep);
    }

    #[test]
    fn serialization_stops_at_the_limit_instead_of_recursing() {
        assert_eq!(to_value(&json!({"a": [1, 2]}), 2), Ok(json!({"a": [1, 2]})));
        assert!(to_value(&json!({"a": [1, 2]}), 1).is_err());
        assert_eq!(to_value(&Some(3u8), 1), Ok(json!(3)));
        let deep = nested(100_000);
        assert!(to_value(&deep, 128).is_err());
        drop_deep(deep);
    }

    #[test]
    fn cuts_on_character_boundaries_and_says_how_much() {
        let mut s = "ééééé".to_owned();
        cut_text(&mut s, 3);
        assert_eq!(s, "ééé…[truncated 4 bytes]");
        assert_eq!(cut("short", 10), "short");
        let big = "é".repeat(1 << 20);
        let c = cut(&big, 3);
        assert_eq!(c, format!("ééé…[truncated {} bytes]", big.len() - 6));
        let mut owned = big.clone();
        cut_text(&mut owned, 3);
        assert_eq!(owned, c);
    }
}
